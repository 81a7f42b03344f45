//! One task per remote cluster: connect, validate the remote's cluster config, wait for its canaries, then mirror
//! each kind's prefix into the merged view.
//!
//! The task decides nothing about merging; it validates every value with [`RemoteContext::decode`] and reports
//! [`RemoteEvent`]s, in order, on one channel shared by all remotes. Dropping the [`RemoteHandle`] aborts the task
//! and with it every watch it started (a `WatchStore` stops when dropped).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_kvstore::{EtcdConfig, KvError, WatchEvent, WatchStore, WatchStoreConfig};
use causeway_store::keys::{CLUSTER_CONFIG_PREFIX, HAS_CLUSTER_CONFIG};
use causeway_store::validate::{validate_cluster_config, RemoteEntry};
use causeway_store::values::ClusterConfig;
use causeway_store::{ClusterId, ClusterName, Kind, MaxConnectedClusters, Rejected, RemoteContext};
use etcd_client::{Client, EventType, WatchOptions};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, instrument, warn, Instrument};

use crate::remotes::config::RemoteConfig;
use crate::status::{RemoteReporter, RemoteState};

/// The kinds identity-sync imports. Service exports feed MCS, which this view does not hold.
pub const KINDS: [Kind; 4] = [Kind::Nodes, Kind::Services, Kind::Ip, Kind::Identities];

/// What a remote task reports to the merged view, in order.
// Events move once through a channel; boxing the entry would add an allocation per imported entry.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RemoteEvent {
    /// A connection was made and the remote's cluster config accepted. Each kind is now listed afresh: entries
    /// from before this session that are not listed again by that kind's `ListDone` are stale.
    Session {
        ctx: RemoteContext,
    },
    Upsert {
        kind: Kind,
        key: String,
        entry: RemoteEntry,
        mod_revision: i64,
    },
    Delete {
        kind: Kind,
        key: String,
    },
    /// A value failed validation. The entry under `key` (if any) keeps its last good value.
    Rejected {
        kind: Kind,
        key: String,
        error: Rejected,
    },
    /// `kind` has been listed completely (first list of a session, or a re-list after compaction).
    ListDone {
        kind: Kind,
    },
    /// The connection is down; entries stay (until the cache TTL, if one is set).
    Disconnected,
    /// The remote's cluster config was refused: drain its entries.
    ConfigRejected {
        reason: String,
    },
    /// The remote's config file is gone: drain its entries and forget it.
    Removed,
}

/// Events of every remote, tagged with the remote's name.
pub type EventSender = mpsc::Sender<(Arc<str>, RemoteEvent)>;

/// Why a session ended; every one of these is retried.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("TLS material of remote {remote} is not valid UTF-8 PEM: {what}")]
    TlsNotUtf8 { remote: String, what: &'static str },
    #[error("cannot connect to remote {remote}: {source}")]
    Connect {
        remote: String,
        #[source]
        source: KvError,
    },
    #[error("etcd request to remote {remote} failed while {doing}: {source}")]
    Etcd {
        remote: String,
        doing: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("remote {remote} has no cluster config at {CLUSTER_CONFIG_PREFIX}{remote}: its clustermesh-apiserver must write it (is the remote's file named after the remote cluster?)")]
    NoClusterConfig { remote: String },
    #[error("remote {remote}'s cluster config was refused: {error} (fix the remote's cluster ID/maxConnectedClusters or this remote file; retrying)")]
    Invalid { remote: String, error: Rejected },
    #[error("remote {remote}'s cluster config changed; reconnecting to validate it again")]
    ConfigChanged { remote: String },
    #[error("the watch of remote {remote}'s {kind} stopped unexpectedly; reconnecting")]
    WatchStopped { remote: String, kind: Kind },
    #[error("connection to remote {remote} restored; starting a new session to re-list")]
    Reconnect { remote: String },
    #[error("remote {remote}'s etcd has a different history (restored, or restarted empty), seen by the {kind} watch; starting a new session and keeping entries until it has synced again")]
    StoreReset { remote: String, kind: Kind },
    #[error("the merged view is gone")]
    Closed,
}

/// Cluster IDs claimed by validated remotes, so two remotes cannot both hold one ID. The first to validate keeps
/// it; the other is refused until the clash is resolved.
#[derive(Debug, Clone, Default)]
pub struct IdClaims(Arc<Mutex<BTreeMap<String, ClusterId>>>);

impl IdClaims {
    fn validate(
        &self,
        remote: &ClusterName,
        value: &[u8],
        local_id: ClusterId,
        mode: MaxConnectedClusters,
    ) -> Result<RemoteContext, Rejected> {
        self.claim(remote, |claims| {
            let others: Vec<(String, ClusterId)> =
                claims.iter().filter(|(n, _)| n.as_str() != remote.as_str()).map(|(n, id)| (n.clone(), *id)).collect();
            validate_cluster_config(remote, value, local_id, mode, others)
        })
    }

    /// Validates a remote's cluster config with the rules of `env`: the normal checks (via `validate_cluster_config`:
    /// same mode, an ID that is not the local one nor another remote's), plus a refusal of a remote named like the
    /// local cluster, except in external-workload mode, where the file named after the local (home) cluster is the
    /// home cluster's own store and must carry exactly the local ID (see [`validate_home_config`]).
    fn validate_for(&self, remote: &ClusterName, value: &[u8], env: &TaskEnv) -> Result<RemoteContext, Rejected> {
        if remote.as_str() != env.local_name.as_str() {
            return self.validate(remote, value, env.local_id, env.mode);
        }
        if !env.external_workload {
            self.release(remote.as_str());
            return Err(Rejected::ClusterConfig(format!(
                "remote {remote:?} has the local cluster's own name; a cluster does not import its own store (only \
                 identity-sync in --external-workload mode reads its home cluster under the home's name)"
            )));
        }
        self.claim(remote, |_| validate_home_config(remote, value, env.local_id, env.mode))
    }

    /// Runs `check` under the claims lock (two remotes validating at once must not both take one ID) and records
    /// or drops `remote`'s claim by its outcome.
    fn claim(
        &self,
        remote: &ClusterName,
        check: impl FnOnce(&BTreeMap<String, ClusterId>) -> Result<RemoteContext, Rejected>,
    ) -> Result<RemoteContext, Rejected> {
        let mut claims = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match check(&claims) {
            Ok(ctx) => {
                claims.insert(remote.to_string(), ctx.id);
                Ok(ctx)
            }
            Err(e) => {
                claims.remove(remote.as_str());
                Err(e)
            }
        }
    }

    pub fn release(&self, remote: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(remote);
    }
}

/// The check of the home cluster's config in external-workload mode, in place of `validate_cluster_config`'s
/// "not the local ID" rule: `--cluster-id` is the home cluster's, so its config must carry exactly that ID (and the
/// same mode). Anything else means the file points at another cluster's store, which is refused.
pub fn validate_home_config(
    remote: &ClusterName,
    value: &[u8],
    local_id: ClusterId,
    local_mode: MaxConnectedClusters,
) -> Result<RemoteContext, Rejected> {
    let cfg: ClusterConfig = serde_json::from_slice(value).map_err(|e| {
        Rejected::ClusterConfig(format!("home cluster {remote:?}'s cluster config is not valid JSON: {e}"))
    })?;
    let mode = match cfg.capabilities.max_connected_clusters {
        0 => MaxConnectedClusters::C255,
        n => MaxConnectedClusters::try_from(n)?,
    };
    if mode != local_mode {
        return Err(Rejected::ClusterConfig(format!(
            "home cluster {remote:?} has maxConnectedClusters {}, --max-connected-clusters is {}",
            mode.get(),
            local_mode.get()
        )));
    }
    let id = ClusterId::new(cfg.id, mode)?;
    if id != local_id {
        return Err(Rejected::ClusterConfig(format!(
            "home cluster {remote:?} has cluster ID {id}, but --cluster-id is {local_id}: the file named after the \
             home cluster must point at the home cluster's own store"
        )));
    }
    Ok(RemoteContext { name: remote.clone(), id, mode })
}

/// Retry and probe intervals; shortened in tests.
#[derive(Debug, Clone)]
pub struct Timing {
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long to wait before checking a refused cluster config again.
    pub invalid_retry: Duration,
    /// How often the connection is probed (and the cluster config re-checked).
    pub probe_interval: Duration,
    pub connect_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            invalid_retry: Duration::from_secs(30),
            probe_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What every remote task shares.
#[derive(Clone)]
pub struct TaskEnv {
    pub local_name: ClusterName,
    pub local_id: ClusterId,
    pub mode: MaxConnectedClusters,
    /// External-workload mode: the remote named like the local cluster is the home cluster's store, imported with
    /// [`validate_home_config`]; every other remote keeps the normal checks.
    pub external_workload: bool,
    pub claims: IdClaims,
    pub events: EventSender,
    pub timing: Timing,
}

/// A running remote task; dropping it stops the task and everything it started.
pub struct RemoteHandle {
    task: JoinHandle<()>,
    claims: IdClaims,
    name: String,
}

impl Drop for RemoteHandle {
    fn drop(&mut self) {
        self.task.abort();
        self.claims.release(&self.name);
    }
}

/// Starts the task for one remote.
pub fn spawn(cfg: RemoteConfig, env: TaskEnv, reporter: RemoteReporter) -> RemoteHandle {
    let name = cfg.name.to_string();
    let claims = env.claims.clone();
    let task = tokio::spawn(run(cfg, env, reporter));
    RemoteHandle { task, claims, name }
}

/// How far a session got; decides how the next one starts.
#[derive(Debug, Default)]
struct Progress {
    /// The remote's cluster config was accepted.
    validated: AtomicBool,
    /// Kinds whose first list completed.
    kinds_listed: AtomicUsize,
}

impl Progress {
    fn synced(&self) -> bool {
        self.kinds_listed.load(Ordering::Relaxed) >= KINDS.len()
    }
}

#[instrument(name = "remote", skip_all, fields(cluster = %cfg.name))]
async fn run(cfg: RemoteConfig, env: TaskEnv, reporter: RemoteReporter) {
    let name: Arc<str> = cfg.name.as_str().into();
    let mut delay = env.timing.min_backoff;
    // Once a session of this task accepted a cluster config, later sessions wait for it instead of failing when it
    // is missing: the remote writes one, it is just being rebuilt (its etcd restarted empty, say).
    let mut had_config = false;
    loop {
        let progress = Progress::default();
        let result = session(&cfg, &env, &reporter, &name, &progress, had_config).await;
        had_config |= progress.validated.load(Ordering::Relaxed);
        let err = match result {
            Ok(()) | Err(SessionError::Closed) => return,
            Err(e) => e,
        };
        // Only a session that got all the way to synced proves the remote healthy; anything that failed earlier
        // (no cluster config, a canary that never came, a watch that broke during the list) keeps backing off, so a
        // misconfigured remote is not retried twice a second forever.
        if progress.synced() {
            delay = env.timing.min_backoff;
        }
        let mut next_delay = || {
            let d = delay;
            delay = (delay * 2).min(env.timing.max_backoff);
            d
        };
        let wait = match &err {
            SessionError::Invalid { error, .. } => {
                warn!(error = %err, "remote refused");
                reporter.validation_failed(&err.to_string());
                let reason = error.to_string();
                if env.events.send((name.clone(), RemoteEvent::ConfigRejected { reason })).await.is_err() {
                    return;
                }
                env.timing.invalid_retry
            }
            SessionError::ConfigChanged { .. } | SessionError::Reconnect { .. } | SessionError::StoreReset { .. } => {
                // Deliberate restarts: prompt after a synced session, backing off if they repeat before one syncs.
                let wait = next_delay();
                info!(retry_in = ?wait, "{err}");
                wait
            }
            SessionError::Connect { .. } | SessionError::TlsNotUtf8 { .. } => {
                let wait = next_delay();
                warn!(error = %err, retry_in = ?wait, "cannot connect to remote; retrying");
                reporter.error(&err.to_string());
                wait
            }
            _ => {
                let wait = next_delay();
                warn!(error = %err, retry_in = ?wait, "remote session failed; retrying");
                reporter.error(&err.to_string());
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn etcd_config(cfg: &RemoteConfig, timing: &Timing) -> Result<EtcdConfig, SessionError> {
    let remote = cfg.name.to_string();
    let mut ec = EtcdConfig::new(cfg.endpoints.clone()).with_connect_timeout(timing.connect_timeout);
    if let Some(tls) = &cfg.tls {
        let t = tls.to_kvstore().map_err(|what| SessionError::TlsNotUtf8 { remote: remote.clone(), what })?;
        ec = ec.with_tls(t);
    }
    Ok(ec)
}

async fn get(
    client: &mut Client,
    remote: &str,
    key: &str,
    doing: &'static str,
) -> Result<(Option<Vec<u8>>, i64), SessionError> {
    let resp = client.get(key, None).await.map_err(|source| SessionError::Etcd {
        remote: remote.to_string(),
        doing,
        source,
    })?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    Ok((resp.kvs().first().map(|kv| kv.value().to_vec()), rev))
}

/// Returns the key's value, waiting (with a watch) until it exists.
async fn wait_for_key(
    client: &mut Client,
    remote: &str,
    key: &str,
    doing: &'static str,
) -> Result<Vec<u8>, SessionError> {
    let err = |source| SessionError::Etcd { remote: remote.to_string(), doing, source };
    loop {
        let (value, rev) = get(client, remote, key, doing).await?;
        if let Some(v) = value {
            return Ok(v);
        }
        debug!(key, "waiting for key");
        let opts = WatchOptions::new().with_start_revision(rev + 1);
        let mut stream = client.watch(key, Some(opts)).await.map_err(err)?;
        while let Some(msg) = stream.message().await.map_err(err)? {
            for ev in msg.events() {
                if ev.event_type() == EventType::Put {
                    if let Some(kv) = ev.kv() {
                        return Ok(kv.value().to_vec());
                    }
                }
            }
            if msg.canceled() {
                break;
            }
        }
    }
}

async fn session(
    cfg: &RemoteConfig,
    env: &TaskEnv,
    reporter: &RemoteReporter,
    name: &Arc<str>,
    progress: &Progress,
    had_config: bool,
) -> Result<(), SessionError> {
    let remote = cfg.name.to_string();
    reporter.state(RemoteState::Connecting);
    let ec = etcd_config(cfg, &env.timing)?;
    let mut client = causeway_kvstore::connect(&ec)
        .await
        .map_err(|source| SessionError::Connect { remote: remote.clone(), source })?;
    reporter.connected(true);
    reporter.state(RemoteState::WaitingForClusterConfig);
    info!(endpoints = ?cfg.endpoints, "connected");

    let config_key = format!("{CLUSTER_CONFIG_PREFIX}{remote}");
    let (marker, _) = get(&mut client, &remote, HAS_CLUSTER_CONFIG, "reading the cluster-config marker").await?;
    let raw = if marker.is_some() || had_config {
        wait_for_key(&mut client, &remote, &config_key, "waiting for the cluster config").await?
    } else {
        get(&mut client, &remote, &config_key, "reading the cluster config")
            .await?
            .0
            .ok_or_else(|| SessionError::NoClusterConfig { remote: remote.clone() })?
    };
    let ctx = env
        .claims
        .validate_for(&cfg.name, &raw, env)
        .map_err(|error| SessionError::Invalid { remote: remote.clone(), error })?;
    progress.validated.store(true, Ordering::Relaxed);
    // validate_cluster_config parsed it already; this only reads the capability flag.
    let canaries =
        serde_json::from_slice::<ClusterConfig>(&raw).map(|c| c.capabilities.synced_canaries).unwrap_or(false);
    reporter.validated(ctx.id.get());
    info!(cluster_id = ctx.id.get(), synced_canaries = canaries, "cluster config accepted");
    send(&env.events, name, RemoteEvent::Session { ctx: ctx.clone() }).await?;
    reporter.reset_sync(&KINDS);
    reporter.state(if canaries { RemoteState::WaitingForCanaries } else { RemoteState::Syncing });

    let kinds = KINDS.map(|kind| {
        mirror_kind(
            client.clone(),
            ctx.clone(),
            kind,
            canaries,
            env.events.clone(),
            reporter.clone(),
            name.clone(),
            &progress.kinds_listed,
        )
        .instrument(tracing::info_span!("kind", kind = %kind))
    });
    let mirrors = futures::future::try_join_all(kinds);
    let probe = probe(client, &config_key, raw, env, reporter, name);
    tokio::select! {
        r = mirrors => r.map(|_| ()),
        r = probe => r,
    }
}

async fn send(events: &EventSender, name: &Arc<str>, ev: RemoteEvent) -> Result<(), SessionError> {
    events.send((name.clone(), ev)).await.map_err(|_| SessionError::Closed)
}

/// Checks the connection and the cluster config; ends the session when the config changes.
async fn probe(
    mut client: Client,
    config_key: &str,
    accepted: Vec<u8>,
    env: &TaskEnv,
    reporter: &RemoteReporter,
    name: &Arc<str>,
) -> Result<(), SessionError> {
    let remote = name.to_string();
    let mut up = true;
    loop {
        tokio::time::sleep(env.timing.probe_interval).await;
        let res = tokio::time::timeout(env.timing.connect_timeout, client.get(config_key, None)).await;
        match res {
            Ok(Ok(resp)) => {
                if !up {
                    // Start over with a fresh session: it re-lists every kind, so the merged view can sweep what
                    // was deleted meanwhile and restore what a cache-TTL revocation dropped.
                    return Err(SessionError::Reconnect { remote });
                }
                let now = resp.kvs().first().map(|kv| kv.value().to_vec());
                if now.as_deref() != Some(accepted.as_slice()) {
                    return Err(SessionError::ConfigChanged { remote });
                }
            }
            Ok(Err(e)) => {
                if up {
                    up = false;
                    warn!(error = %e, "connection lost; keeping entries");
                    reporter.connected(false);
                    reporter.error(&format!("connection to remote {remote} lost: {e}"));
                    send(&env.events, name, RemoteEvent::Disconnected).await?;
                }
            }
            Err(_) => {
                if up {
                    up = false;
                    warn!("connection probe timed out; keeping entries");
                    reporter.connected(false);
                    reporter.error(&format!("remote {remote} did not answer within {:?}", env.timing.connect_timeout));
                    send(&env.events, name, RemoteEvent::Disconnected).await?;
                }
            }
        }
    }
}

/// Waits for the kind's canary (when the remote writes canaries), then mirrors its prefix until the session ends.
///
/// Entry counts are not kept here: the merged view counts each remote's accepted entries, and the driver reports
/// them (see `app::drive`).
///
/// A reset of the remote's store (its etcd restored or restarted empty) ends the session rather than being followed
/// in place: the new history has to be validated and waited for (cluster config, canary) like a new remote, and
/// the entries held meanwhile stay in the view until this kind's list in the next session sweeps them.
#[allow(clippy::too_many_arguments)]
async fn mirror_kind(
    mut client: Client,
    ctx: RemoteContext,
    kind: Kind,
    canaries: bool,
    events: EventSender,
    reporter: RemoteReporter,
    name: Arc<str>,
    kinds_listed: &AtomicUsize,
) -> Result<(), SessionError> {
    let remote = ctx.name.to_string();
    if canaries {
        wait_for_key(&mut client, &remote, &kind.canary_key(&remote), "waiting for a synced canary").await?;
        debug!("canary present");
    }
    let mut ws = WatchStore::start(client, WatchStoreConfig::new(kind.watch_prefix(&remote)));
    let mut lists = 0u64;
    while let Some(ev) = ws.next().await {
        let out = match ev {
            WatchEvent::Upsert { key, value, mod_revision } => match ctx.decode(&key, &value) {
                Ok(entry) => RemoteEvent::Upsert { kind, key, entry, mod_revision },
                Err(error) => {
                    debug!(key, reason = error.reason(), error = %error, "value rejected");
                    reporter.rejected(error.reason(), &format!("{key}: {error}"));
                    RemoteEvent::Rejected { kind, key, error }
                }
            },
            WatchEvent::Delete { key } => RemoteEvent::Delete { kind, key },
            WatchEvent::ListDone => {
                lists += 1;
                if lists == 1 {
                    info!("initial list complete");
                    reporter.kind_synced(kind);
                    kinds_listed.fetch_add(1, Ordering::Relaxed);
                } else {
                    info!("re-list complete");
                    reporter.resync();
                }
                RemoteEvent::ListDone { kind }
            }
            WatchEvent::Reset => {
                warn!(cluster = %remote, %kind, "remote etcd has a different history; keeping entries and starting a new session");
                reporter.resync();
                return Err(SessionError::StoreReset { remote, kind });
            }
        };
        send(&events, &name, out).await?;
    }
    // A WatchStore only stops if its task died; start a new session.
    Err(SessionError::WatchStopped { remote, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn id_claims_first_validated_remote_keeps_its_id() {
        let claims = IdClaims::default();
        let mode = MaxConnectedClusters::C255;
        let local = ClusterId::new(2, mode).unwrap_or_else(|e| panic!("{e}"));
        let cfg = br#"{"id": 1, "capabilities": {"maxConnectedClusters": 255}}"#;
        assert!(claims.validate(&name("east"), cfg, local, mode).is_ok());
        // Re-validating the same remote is fine.
        assert!(claims.validate(&name("east"), cfg, local, mode).is_ok());
        let err = claims.validate(&name("twin"), cfg, local, mode).err().unwrap_or_else(|| panic!("twin accepted"));
        assert!(err.to_string().contains("already used by remote \"east\""), "{err}");
        let own = br#"{"id": 2}"#;
        assert!(claims.validate(&name("self"), own, local, mode).is_err());
        let other_mode = br#"{"id": 3, "capabilities": {"maxConnectedClusters": 511}}"#;
        assert!(claims.validate(&name("wide"), other_mode, local, mode).is_err());
        claims.release("east");
        assert!(claims.validate(&name("twin"), cfg, local, mode).is_ok());
    }

    fn env(external_workload: bool) -> TaskEnv {
        let mode = MaxConnectedClusters::C255;
        TaskEnv {
            local_name: name("home"),
            local_id: ClusterId::new(5, mode).unwrap_or_else(|e| panic!("{e}")),
            mode,
            external_workload,
            claims: IdClaims::default(),
            events: mpsc::channel(1).0,
            timing: Timing::default(),
        }
    }

    #[test]
    fn a_remote_named_like_the_local_cluster_is_the_home_only_in_external_workload_mode() {
        let own = br#"{"id": 5, "capabilities": {"maxConnectedClusters": 255}}"#;
        let other = br#"{"id": 6}"#;
        // A cluster: refused by name, whatever its ID.
        let e = env(false);
        for cfg in [&own[..], &other[..]] {
            let err = e.claims.validate_for(&name("home"), cfg, &e).err().unwrap_or_else(|| panic!("accepted"));
            assert!(err.to_string().contains("local cluster's own name"), "{err}");
        }
        // An external workload: the home file is consumed with the local name and exactly the local ID...
        let e = env(true);
        let ctx = e.claims.validate_for(&name("home"), own, &e).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!((ctx.name.as_str(), ctx.id.get()), ("home", 5));
        // ...and refused when it points at another cluster's store or another mode.
        let err = e.claims.validate_for(&name("home"), other, &e).err().unwrap_or_else(|| panic!("accepted"));
        assert!(err.to_string().contains("--cluster-id is 5"), "{err}");
        let wide = br#"{"id": 5, "capabilities": {"maxConnectedClusters": 511}}"#;
        assert!(e.claims.validate_for(&name("home"), wide, &e).is_err());
        assert!(e.claims.validate_for(&name("home"), b"not json", &e).is_err());
        // Any other remote keeps the normal checks: the local (home) ID is refused, another one accepted.
        let err = e.claims.validate_for(&name("east"), own, &e).err().unwrap_or_else(|| panic!("accepted"));
        assert!(err.to_string().contains("local cluster's own ID"), "{err}");
        assert!(e.claims.validate_for(&name("east"), other, &e).is_ok());
    }
}
