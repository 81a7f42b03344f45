//! Well-known keys of the store, and the heartbeat and cluster-config writers.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions, Txn, TxnOp};
use tokio::task::JoinHandle;

use crate::{KvError, LeasePool};

/// Rewritten every minute with an RFC 3339 timestamp: tells readers the writer is alive.
pub const HEARTBEAT_KEY: &str = "cilium/.heartbeat";
/// Marker: readers must wait for the cluster config before watching anything.
pub const HAS_CLUSTER_CONFIG_KEY: &str = "cilium/.has-cluster-config";
/// How often the heartbeat is written.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// `cilium/cluster-config/<cluster>`.
pub fn cluster_config_key(cluster: &str) -> String {
    format!("cilium/cluster-config/{cluster}")
}

/// `cilium/synced/<cluster>/cilium/state/<kind>/v1`: written once the initial export of
/// `kind` (`nodes`, `services`, `ip`, `identities`, ...) is complete.
pub fn canary_key(cluster: &str, kind: &str) -> String {
    format!("cilium/synced/{cluster}/cilium/state/{kind}/v1")
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Writes the cluster config JSON and the `.has-cluster-config` marker in one txn.
/// Neither is attached to a lease: peers must be able to validate the config even while
/// the apiserver restarts.
#[tracing::instrument(skip_all, fields(cluster))]
pub async fn write_cluster_config(client: &mut Client, cluster: &str, config_json: &[u8]) -> Result<(), KvError> {
    let key = cluster_config_key(cluster);
    client
        .txn(Txn::new().and_then(vec![
            TxnOp::put(key.as_str(), config_json.to_vec(), None),
            TxnOp::put(HAS_CLUSTER_CONFIG_KEY, "true", None),
        ]))
        .await
        .map_err(|e| KvError::request("put", key, e))?;
    Ok(())
}

/// Writes the heartbeat in the background every `interval`; stops when dropped.
pub struct Heartbeat {
    task: JoinHandle<()>,
    wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat").finish_non_exhaustive()
    }
}

impl Heartbeat {
    /// Starts writing [`HEARTBEAT_KEY`] now and then every `interval` (normally
    /// [`HEARTBEAT_INTERVAL`]), attached to the pool's lease for that key, so that a dead
    /// writer's heartbeat goes away with its other keys. Waits at the pool's
    /// [`crate::WriteGate`] like every other writer.
    pub fn start(client: Client, leases: Arc<LeasePool>, interval: Duration) -> Heartbeat {
        let wake = Arc::new(tokio::sync::Notify::new());
        let woken = wake.clone();
        let task = tokio::spawn(async move {
            let mut kv = client.kv_client();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = woken.notified() => ticker.reset(),
                }
                // Lease first, gate second: a lease granted after a reset was granted after
                // the gate closed, so this cannot write on it before the reset sequence ran.
                let lease = loop {
                    let lease = leases.lease_for_key(HEARTBEAT_KEY.as_bytes());
                    if leases.gate().is_open() {
                        break lease;
                    }
                    leases.gate().wait_open().await;
                };
                let put = kv.put(HEARTBEAT_KEY, now_rfc3339(), Some(PutOptions::new().with_lease(lease))).await;
                if let Err(e) = put {
                    // Next tick retries; a lost lease is replaced by the pool.
                    tracing::warn!(key = HEARTBEAT_KEY, error = %e, "heartbeat write failed");
                }
            }
        });
        Heartbeat { task, wake }
    }

    /// Writes the heartbeat now instead of at the next tick (e.g. after etcd lost its
    /// data), then goes on every interval from there.
    pub fn write_now(&self) {
        self.wake.notify_one();
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}
