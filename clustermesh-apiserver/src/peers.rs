//! Peer etcd users that follow `causeway clustermesh connect`/`disconnect` while the apiserver runs.
//!
//! `connect` and `disconnect` keep the peer list in the `peers` key of ConfigMap `causeway-config`. Each peer reads
//! this cluster's etcd as the read-only user `remote-<peer>`. With `--peers-configmap`, a task watches that one
//! ConfigMap and converges the etcd users to (ConfigMap peers ∪ `--peers`): a new peer can read at once, and a
//! disconnected peer's user is deleted, which revokes its access at once. No restart needed.
//!
//! - [`PeerState`]: the sans-IO core. ConfigMap observations in; the wanted peer set, what is applied, and the retry
//!   delay out.
//! - [`run`]: the adapter. A kube-runtime watcher on the single ConfigMap, and the etcd calls
//!   ([`causeway_kvstore::ensure_auth`], then [`causeway_kvstore::sync_peer_users`]) with backoff on failure.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use causeway_store::ClusterName;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

/// The ConfigMap key `connect`/`disconnect` keep the comma-separated peer names in.
pub const PEERS_KEY: &str = "peers";

/// First delay before retrying a failed convergence; doubled per failure up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Longest delay between retries.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Longest one convergence may take: a request to an etcd that went away can hang on reconnecting, and meanwhile
/// the ConfigMap's changes would wait. A timeout counts as a failure and is retried with backoff.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(10);

/// `NAMESPACE/NAME` of the ConfigMap to follow (`--peers-configmap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMapRef {
    pub namespace: String,
    pub name: String,
}

impl FromStr for ConfigMapRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ConfigMapRef { namespace: ns.to_string(), name: name.to_string() })
            }
            _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
        }
    }
}

impl fmt::Display for ConfigMapRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A peer name from the ConfigMap that is not used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedPeer {
    pub name: String,
    pub why: String,
}

/// Splits a `peers` value (comma-separated, as `connect` writes it) into valid peer names and rejected ones. The
/// local cluster is not its own peer.
pub fn parse_peers(value: &str, local_cluster: &str) -> (BTreeSet<String>, Vec<RejectedPeer>) {
    let mut valid = BTreeSet::new();
    let mut rejected = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match ClusterName::new(name) {
            Ok(n) if n.as_str() == local_cluster => {
                rejected.push(RejectedPeer { name: name.to_string(), why: "it is this cluster's own name".into() })
            }
            Ok(n) => {
                valid.insert(n.as_str().to_string());
            }
            Err(e) => rejected.push(RejectedPeer { name: name.to_string(), why: e.to_string() }),
        }
    }
    (valid, rejected)
}

/// The sans-IO core: what the ConfigMap says, what etcd was last converged to, and the retry backoff.
#[derive(Debug, Clone)]
pub struct PeerState {
    local_cluster: String,
    floor: BTreeSet<String>,
    /// Peers from the ConfigMap; `None` until the first complete list of it (absent counts as seen, with none).
    from_config_map: Option<BTreeSet<String>>,
    /// Names rejected in the ConfigMap's current value.
    rejected: Vec<RejectedPeer>,
    /// What etcd's users were last converged to.
    applied: Option<BTreeSet<String>>,
    failures: u32,
}

impl PeerState {
    /// `floor`: the `--peers` given on the command line, always wanted (already validated).
    pub fn new(local_cluster: impl Into<String>, floor: impl IntoIterator<Item = String>) -> Self {
        PeerState {
            local_cluster: local_cluster.into(),
            floor: floor.into_iter().collect(),
            from_config_map: None,
            rejected: Vec::new(),
            applied: None,
            failures: 0,
        }
    }

    /// The ConfigMap's data as it now is (`None`: the ConfigMap does not exist, so no peers beyond the floor).
    /// Returns the names rejected in it.
    pub fn observe(&mut self, data: Option<&BTreeMap<String, String>>) -> &[RejectedPeer] {
        let value = data.and_then(|d| d.get(PEERS_KEY)).map(String::as_str).unwrap_or("");
        let (valid, rejected) = parse_peers(value, &self.local_cluster);
        self.from_config_map = Some(valid);
        self.rejected = rejected;
        &self.rejected
    }

    /// The names rejected in the ConfigMap's current value.
    pub fn rejected(&self) -> &[RejectedPeer] {
        &self.rejected
    }

    /// The peers whose users etcd must have, once the ConfigMap was seen: its peers plus the floor.
    pub fn wanted(&self) -> Option<BTreeSet<String>> {
        let mut wanted = self.from_config_map.clone()?;
        wanted.extend(self.floor.iter().cloned());
        Some(wanted)
    }

    /// The set to converge etcd to, if etcd is not already there. Nothing before the ConfigMap was seen: an
    /// unknown set must not revoke anyone.
    pub fn pending(&self) -> Option<BTreeSet<String>> {
        let wanted = self.wanted()?;
        (self.applied.as_ref() != Some(&wanted)).then_some(wanted)
    }

    /// etcd was converged to `peers`.
    pub fn converged(&mut self, peers: BTreeSet<String>) {
        self.applied = Some(peers);
        self.failures = 0;
    }

    /// Converging failed: the delay before the next attempt (doubling, capped). A failed pass may have changed
    /// some users and not others, so etcd's state is unknown until the next success: whatever is wanted next, even
    /// the set last converged to, is converged again.
    pub fn failed(&mut self) -> Duration {
        self.applied = None;
        let delay = FIRST_RETRY_DELAY.saturating_mul(1u32 << self.failures.min(16)).min(MAX_RETRY_DELAY);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// etcd lost its users (it was reset) : the next pass re-creates them.
    pub fn forget_applied(&mut self) {
        self.applied = None;
    }

    /// What etcd was last converged to.
    pub fn applied(&self) -> Option<&BTreeSet<String>> {
        self.applied.as_ref()
    }
}

/// Prometheus metrics of the peer-user task (registered under `causeway_apiserver_peer_*`).
#[derive(Debug, Clone, Default)]
pub struct PeerMetrics {
    /// `remote-<peer>` users etcd was last converged to.
    pub users: Gauge,
    /// Names in the ConfigMap's `peers` that are not valid cluster names (skipped).
    pub invalid_names: Gauge,
    /// Successful convergences that added or removed users.
    pub changes: Counter,
    /// Failed convergence attempts (etcd errors), each retried with backoff.
    pub errors: Counter,
}

impl PeerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("apiserver_peer_users", "remote-<peer> etcd users, as last converged", self.users.clone());
        registry.register(
            "apiserver_peer_invalid_names",
            "Peer names in the peers ConfigMap that are not valid cluster names (skipped)",
            self.invalid_names.clone(),
        );
        registry.register(
            "apiserver_peer_user_changes",
            "Convergences of the peer etcd users that added or removed users",
            self.changes.clone(),
        );
        registry.register(
            "apiserver_peer_user_errors",
            "Failed attempts to converge the peer etcd users (retried with backoff)",
            self.errors.clone(),
        );
    }
}

/// Everything [`run`] needs.
pub struct PeerTask {
    pub kube: kube::Client,
    pub config_map: ConfigMapRef,
    pub etcd: causeway_kvstore::Client,
    pub cluster: String,
    /// `--peers`: always wanted.
    pub floor: Vec<String>,
    pub metrics: PeerMetrics,
    /// Publishes the peers etcd was last converged to (the reset handler re-creates those).
    pub current: watch::Sender<Vec<String>>,
    /// Bumped by the reset handler after etcd lost its data and was re-created.
    pub resets: watch::Receiver<u64>,
}

/// Watches the ConfigMap and converges the etcd users until the process ends.
pub async fn run(task: PeerTask) {
    let span = tracing::info_span!("peer_users", cluster = %task.cluster, configmap = %task.config_map);
    run_inner(task).instrument(span).await
}

async fn run_inner(mut task: PeerTask) {
    let api: Api<ConfigMap> = Api::namespaced(task.kube.clone(), &task.config_map.namespace);
    // One object: list and watch it by name (a fieldSelector), which RBAC with resourceNames allows.
    let config = watcher::Config::default().fields(&format!("metadata.name={}", task.config_map.name));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut state = PeerState::new(task.cluster.clone(), task.floor.clone());
    // The object seen during an ongoing (re)list; committed at InitDone.
    let mut relist: Option<Option<ConfigMap>> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut resets = Some(task.resets.clone());
    info!("following the peers ConfigMap");
    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let observed: Option<Option<ConfigMap>> = tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Ok(watcher::Event::Init)) => { relist = Some(None); None }
                Some(Ok(watcher::Event::InitApply(cm))) => { relist = Some(Some(cm)); None }
                Some(Ok(watcher::Event::InitDone)) => Some(relist.take().flatten()),
                Some(Ok(watcher::Event::Apply(cm))) => Some(Some(cm)),
                Some(Ok(watcher::Event::Delete(_))) => Some(None),
                Some(Err(e)) => {
                    // The backoff retries; the peers stay as they are meanwhile.
                    warn!(error = %e, "watching the peers ConfigMap failed; retrying with backoff");
                    None
                }
            },
            changed = reset_changed(&mut resets) => {
                match changed {
                    // A re-created etcd has only the users the reset handler made: converge again.
                    Ok(()) => state.forget_applied(),
                    // The reset handler is gone: no more resets to follow.
                    Err(_) => resets = None,
                }
                None
            }
            _ = retry => { retry_at = None; None }
        };
        if let Some(cm) = observed {
            // Only the wanted object; the field selector already filters, this guards a server that ignores it.
            let cm = cm.filter(|c| c.metadata.name.as_deref() == Some(task.config_map.name.as_str()));
            let rejected = state.observe(cm.as_ref().and_then(|c| c.data.as_ref()));
            task.metrics.invalid_names.set(rejected.len() as i64);
            for r in rejected {
                warn!(peer = %r.name, why = %r.why, "skipping an invalid peer name in the peers ConfigMap");
            }
            // A new wanted set is tried at once, whatever the backoff of the previous one.
            retry_at = None;
        }
        if retry_at.is_some() {
            continue;
        }
        let Some(wanted) = state.pending() else { continue };
        tracing::debug!(peers = ?wanted, "converging the peer etcd users");
        let attempt = tokio::time::timeout(CONVERGE_TIMEOUT, converge(&mut task.etcd, &task.cluster, &wanted)).await;
        match attempt.unwrap_or_else(|_| Err(ConvergeError::TimedOut)) {
            Ok(plan) => {
                if plan.changes_users() {
                    task.metrics.changes.inc();
                    info!(added = ?plan.add, removed = ?plan.remove, peers = ?wanted, "peer etcd users converged");
                }
                task.metrics.users.set(wanted.len() as i64);
                task.current.send_replace(wanted.iter().cloned().collect());
                state.converged(wanted);
            }
            Err(e) => {
                task.metrics.errors.inc();
                let delay = state.failed();
                warn!(error = %e, retry_in = ?delay, "cannot converge the peer etcd users; retrying");
                retry_at = Some(tokio::time::Instant::now() + delay);
            }
        }
    }
}

/// Why one convergence failed.
#[derive(Debug, thiserror::Error)]
enum ConvergeError {
    #[error(transparent)]
    Etcd(#[from] causeway_kvstore::KvError),
    #[error("etcd did not answer within {CONVERGE_TIMEOUT:?}")]
    TimedOut,
}

async fn reset_changed(resets: &mut Option<watch::Receiver<u64>>) -> Result<(), watch::error::RecvError> {
    match resets {
        Some(r) => r.changed().await,
        None => std::future::pending().await,
    }
}

/// The `remote-*` users become exactly the wanted ones; then, with any peer, auth must be on and the other users
/// and roles right (what `ensure_auth` does at start; idempotent, and its user additions are already done, so the
/// returned plan says what changed).
async fn converge(
    etcd: &mut causeway_kvstore::Client,
    cluster: &str,
    wanted: &BTreeSet<String>,
) -> Result<causeway_kvstore::PeerUserPlan, ConvergeError> {
    let peers: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let plan = causeway_kvstore::sync_peer_users(etcd, cluster, &peers).await?;
    if !peers.is_empty() {
        causeway_kvstore::ensure_auth(etcd, cluster, &peers).await?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(peers: &str) -> BTreeMap<String, String> {
        [("cluster-name".to_string(), "west".to_string()), (PEERS_KEY.to_string(), peers.to_string())]
            .into_iter()
            .collect()
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn config_map_ref_parses_namespace_and_name() {
        assert_eq!(
            "causeway/causeway-config".parse::<ConfigMapRef>(),
            Ok(ConfigMapRef { namespace: "causeway".into(), name: "causeway-config".into() })
        );
        for bad in ["causeway-config", "/x", "x/", "a/b/c", ""] {
            assert!(bad.parse::<ConfigMapRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_skips_bad_names_and_the_local_cluster() {
        let (valid, rejected) = parse_peers(" east, south ,,Bad_Name,west,-x,", "west");
        assert_eq!(valid, set(&["east", "south"]));
        let names: Vec<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["Bad_Name", "west", "-x"]);
        assert!(rejected[1].why.contains("own name"));
    }

    #[test]
    fn nothing_is_converged_before_the_config_map_is_seen() {
        let state = PeerState::new("west", ["east".to_string()]);
        assert_eq!(state.wanted(), None);
        assert_eq!(state.pending(), None, "an unknown peer set must not revoke anyone");
    }

    #[test]
    fn wanted_is_the_config_map_plus_the_floor_and_converges_once() {
        let mut state = PeerState::new("west", ["north".to_string()]);
        state.observe(Some(&data("east")));
        assert_eq!(state.pending(), Some(set(&["east", "north"])));
        state.converged(set(&["east", "north"]));
        assert_eq!(state.pending(), None);
        // The same value again (a resync) changes nothing.
        state.observe(Some(&data("east")));
        assert_eq!(state.pending(), None);
        state.observe(Some(&data("east,south")));
        assert_eq!(state.pending(), Some(set(&["east", "north", "south"])));
        state.converged(set(&["east", "north", "south"]));
        // Removing a peer, then the whole ConfigMap: the floor stays.
        state.observe(Some(&data("south")));
        assert_eq!(state.pending(), Some(set(&["north", "south"])));
        state.observe(None);
        assert_eq!(state.pending(), Some(set(&["north"])));
        // A floor peer named in the ConfigMap is not removed when the ConfigMap drops it.
        state.converged(set(&["north"]));
        state.observe(Some(&data("north")));
        assert_eq!(state.pending(), None);
    }

    #[test]
    fn invalid_names_are_reported_not_wanted() {
        let mut state = PeerState::new("west", Vec::new());
        let rejected = state.observe(Some(&data("east,EVIL!")));
        assert_eq!(rejected.len(), 1);
        assert_eq!(state.pending(), Some(set(&["east"])));
        state.observe(Some(&data("east")));
        assert!(state.rejected().is_empty());
    }

    #[test]
    fn failures_back_off_doubling_and_capped_and_success_resets() {
        let mut state = PeerState::new("west", Vec::new());
        state.observe(Some(&data("east")));
        let delays: Vec<Duration> = (0..12).map(|_| state.failed()).collect();
        assert_eq!(delays[0], FIRST_RETRY_DELAY);
        assert_eq!(delays[1], FIRST_RETRY_DELAY * 2);
        assert_eq!(delays[2], FIRST_RETRY_DELAY * 4);
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*delays.last().unwrap(), MAX_RETRY_DELAY);
        assert_eq!(state.pending(), Some(set(&["east"])), "still pending after failures");
        state.converged(set(&["east"]));
        assert_eq!(state.failed(), FIRST_RETRY_DELAY);
    }

    #[test]
    fn going_back_to_the_converged_set_after_a_failed_pass_converges_again() {
        // east converged; adding south fails half-way (its user may exist); south is removed again.
        let mut state = PeerState::new("west", Vec::new());
        state.observe(Some(&data("east")));
        state.converged(set(&["east"]));
        state.observe(Some(&data("east,south")));
        assert_eq!(state.pending(), Some(set(&["east", "south"])));
        state.failed();
        state.observe(Some(&data("east")));
        assert_eq!(state.pending(), Some(set(&["east"])), "a half-added south must be removed");
    }

    #[test]
    fn a_reset_etcd_is_converged_again() {
        let mut state = PeerState::new("west", Vec::new());
        state.observe(Some(&data("east")));
        state.converged(set(&["east"]));
        state.forget_applied();
        assert_eq!(state.pending(), Some(set(&["east"])));
    }
}
