//! What identity-sync reports about itself: `/status` JSON per remote, Prometheus metrics, and readiness.
//!
//! Remote tasks and the kube writer report here through [`Status`] / [`RemoteReporter`]; nothing here feeds back
//! into the merged view.
//!
//! Readiness (`/readyz`) turns on once the kube writer has done its first pass and every configured remote is
//! *settled*: synced (every kind's canary seen and its first list complete), or failed for a reason that needs a
//! human (invalid config file, cluster config rejected), or still not synced after the remote ready timeout (an
//! unreachable remote). A broken peer therefore delays readiness by at most that timeout and never blocks it, since
//! a remote's failure must stay remote. Readiness latches: once ready, later remote trouble shows in `/status` and
//! metrics, not as a not-ready pod that kube would take out of service for no local reason.
//!
//! With leader election (several replicas), only the leader runs the kube writer; a standby is ready without it
//! (it still serves the MeshView stream), and `/status` names the role and the Lease holder, so that users can see
//! which replica writes the EndpointSlices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use causeway_leader::Role;
use causeway_runtime::prometheus_client::encoding::EncodeLabelSet;
use causeway_runtime::prometheus_client::metrics::counter::Counter;
use causeway_runtime::prometheus_client::metrics::family::Family;
use causeway_runtime::prometheus_client::metrics::gauge::Gauge;
use causeway_runtime::Health;
use causeway_store::Kind;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// Where a remote is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteState {
    /// The config file cannot be used; see `config_error`.
    ConfigInvalid,
    Connecting,
    WaitingForClusterConfig,
    /// The remote's cluster config was refused (ID clash, range, mode); retried periodically.
    ValidationFailed,
    WaitingForCanaries,
    Syncing,
    Synced,
    /// Lost the connection after connecting; entries are kept until it comes back (or the cache TTL).
    Disconnected,
}

#[derive(Debug, Clone, Serialize)]
pub struct RemoteStatus {
    pub name: String,
    pub cluster_id: Option<u32>,
    pub state: RemoteState,
    pub connected: bool,
    pub validated: bool,
    /// Per kind: initial list complete (after its canary, when the remote uses canaries).
    pub synced: BTreeMap<String, bool>,
    pub entries: BTreeMap<String, u64>,
    pub rejected: BTreeMap<String, u64>,
    pub resyncs: u64,
    pub last_error: Option<String>,
    pub config_error: Option<String>,
    pub last_change: DateTime<Utc>,
    #[serde(skip)]
    added: Instant,
}

impl RemoteStatus {
    fn new(name: &str) -> Self {
        RemoteStatus {
            name: name.to_string(),
            cluster_id: None,
            state: RemoteState::Connecting,
            connected: false,
            validated: false,
            synced: BTreeMap::new(),
            entries: BTreeMap::new(),
            rejected: BTreeMap::new(),
            resyncs: 0,
            last_error: None,
            config_error: None,
            last_change: Utc::now(),
            added: Instant::now(),
        }
    }

    fn settled(&self, grace: Duration, now: Instant) -> bool {
        matches!(self.state, RemoteState::Synced | RemoteState::ConfigInvalid | RemoteState::ValidationFailed)
            || now.duration_since(self.added) >= grace
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub cluster: String,
    pub cluster_id: u32,
    pub ready: bool,
    pub kube_synced: bool,
    /// Which replica writes the EndpointSlices.
    pub leader: LeaderReport,
    pub remotes: Vec<RemoteStatus>,
}

/// This replica's part in the leader election (`enabled: false` with a single replica, which always writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaderReport {
    pub enabled: bool,
    /// `leader` (writes the EndpointSlices), `standby`, or `unknown` (the Lease was not read yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Who holds the Lease, if anyone (this replica's identity when it leads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// `namespace/name` of the Lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// This replica's name in the Lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// The leader election as the board sees it.
struct Election {
    lease: String,
    identity: String,
    role: Role,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteLabels {
    remote: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteKindLabels {
    remote: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteReasonLabels {
    remote: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    op: String,
    result: String,
}

#[derive(Default)]
struct Metrics {
    connected: Family<RemoteLabels, Gauge>,
    ready: Family<RemoteLabels, Gauge>,
    entries: Family<RemoteKindLabels, Gauge>,
    rejected: Family<RemoteReasonLabels, Counter>,
    resyncs: Family<RemoteLabels, Counter>,
    slice_writes: Family<WriteLabels, Counter>,
}

struct Board {
    remotes: BTreeMap<String, RemoteStatus>,
    kube_synced: bool,
    remotes_scanned: bool,
    local_synced: bool,
    ready: bool,
    /// `None`: no leader election, this replica writes.
    election: Option<Election>,
}

impl Board {
    /// Whether readiness waits for the kube writer's first pass: only where the writer runs (or is about to).
    fn writes(&self) -> bool {
        self.election.as_ref().is_none_or(|e| e.role == Role::Leader)
    }
}

/// Shared status board. Cheap to clone.
#[derive(Clone)]
pub struct Status {
    cluster: String,
    cluster_id: u32,
    board: Arc<Mutex<Board>>,
    metrics: Arc<Metrics>,
    health: Health,
    ready_grace: Duration,
}

impl Status {
    /// `ready_grace`: how long an unsynced remote may hold back readiness.
    pub fn new(cluster: &str, cluster_id: u32, health: Health, ready_grace: Duration) -> Self {
        let metrics = Arc::new(Metrics::default());
        health.with_registry(|r| {
            r.register(
                "identity_sync_remote_connected",
                "1 while the connection to the remote cluster's etcd is up",
                metrics.connected.clone(),
            );
            r.register(
                "identity_sync_remote_ready",
                "1 once the remote is validated and every kind is synced",
                metrics.ready.clone(),
            );
            r.register(
                "identity_sync_remote_entries",
                "Entries currently imported from the remote, by kind",
                metrics.entries.clone(),
            );
            r.register(
                "identity_sync_remote_rejected_values",
                "Values from the remote refused by validation, by reason",
                metrics.rejected.clone(),
            );
            r.register(
                "identity_sync_remote_resyncs",
                "Full re-lists of a remote's prefix (reconnects, compaction)",
                metrics.resyncs.clone(),
            );
            r.register(
                "identity_sync_endpointslice_writes",
                "EndpointSlice writes to the local kube API, by operation and result",
                metrics.slice_writes.clone(),
            );
        });
        health.set_not_ready("waiting for the first scan of the remotes directory and the kube writer");
        Status {
            cluster: cluster.to_string(),
            cluster_id,
            board: Arc::new(Mutex::new(Board {
                remotes: BTreeMap::new(),
                kube_synced: false,
                remotes_scanned: false,
                local_synced: false,
                ready: false,
                election: None,
            })),
            metrics,
            health,
            ready_grace,
        }
    }

    fn board(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reporter for one remote, creating its entry.
    pub fn remote(&self, name: &str) -> RemoteReporter {
        self.board().remotes.entry(name.to_string()).or_insert_with(|| RemoteStatus::new(name));
        RemoteReporter { status: self.clone(), name: name.to_string() }
    }

    /// Forgets a removed remote: its status entry and its metric series.
    pub fn remove_remote(&self, name: &str) {
        let removed = self.board().remotes.remove(name);
        let l = RemoteLabels { remote: name.to_string() };
        self.metrics.connected.remove(&l);
        self.metrics.ready.remove(&l);
        self.metrics.resyncs.remove(&l);
        for kind in Kind::ALL {
            self.metrics.entries.remove(&RemoteKindLabels { remote: name.to_string(), kind: kind.to_string() });
        }
        // Rejection series are keyed by reason; the board knows which reasons this remote had.
        for reason in removed.iter().flat_map(|r| r.rejected.keys()) {
            self.metrics.rejected.remove(&RemoteReasonLabels { remote: name.to_string(), reason: reason.clone() });
        }
        self.evaluate();
    }

    /// A remote's entry counts per kind, as the merged view holds them. Does nothing for a remote that is not (or
    /// no longer) on the board.
    pub fn remote_entries(&self, name: &str, counts: impl IntoIterator<Item = (Kind, u64)>) {
        if !self.board().remotes.contains_key(name) {
            return;
        }
        let reporter = RemoteReporter { status: self.clone(), name: name.to_string() };
        for (kind, count) in counts {
            reporter.entries(kind, count);
        }
    }

    /// Marks a remote's config file invalid (creating its entry if needed).
    pub fn config_invalid(&self, name: &str, error: &str) {
        let mut b = self.board();
        let r = b.remotes.entry(name.to_string()).or_insert_with(|| RemoteStatus::new(name));
        r.config_error = Some(error.to_string());
        if !r.connected && !r.validated {
            r.state = RemoteState::ConfigInvalid;
        }
        r.last_change = Utc::now();
        drop(b);
        self.evaluate();
    }

    pub fn config_fixed(&self, name: &str) {
        if let Some(r) = self.board().remotes.get_mut(name) {
            r.config_error = None;
            if r.state == RemoteState::ConfigInvalid {
                r.state = RemoteState::Connecting;
            }
            r.last_change = Utc::now();
        }
    }

    /// The remotes directory has been read once, so the set of configured remotes is known.
    pub fn remotes_scanned(&self) {
        self.board().remotes_scanned = true;
        self.evaluate();
    }

    /// Local Services and EndpointSlices have been listed once, so the view knows which services are global.
    pub fn local_synced(&self) {
        self.board().local_synced = true;
        self.evaluate();
    }

    /// The kube writer finished its first pass (stale slices cleaned, desired slices written).
    pub fn kube_synced(&self) {
        self.board().kube_synced = true;
        self.evaluate();
    }

    /// Leader election is on: this replica writes EndpointSlices only while it holds `lease` as `identity`.
    pub fn leader_election(&self, lease: &str, identity: &str) {
        self.board().election =
            Some(Election { lease: lease.to_string(), identity: identity.to_string(), role: Role::Unknown });
        self.evaluate();
    }

    /// The election's latest verdict for this replica.
    pub fn leader_role(&self, role: &Role) {
        if let Some(e) = self.board().election.as_mut() {
            e.role = role.clone();
        }
        self.evaluate();
    }

    pub fn endpointslice_write(&self, op: &str, ok: bool) {
        let labels = WriteLabels { op: op.to_string(), result: if ok { "ok" } else { "error" }.to_string() };
        self.metrics.slice_writes.get_or_create(&labels).inc();
    }

    /// True once the remotes directory was read and every remote is settled (see the module docs). The kube writer
    /// waits for this before deleting slices left by an earlier run, so a restart does not drop live backends.
    pub fn remotes_settled(&self) -> bool {
        let b = self.board();
        let now = Instant::now();
        b.ready || (b.remotes_scanned && b.local_synced && b.remotes.values().all(|r| r.settled(self.ready_grace, now)))
    }

    /// Re-checks readiness; call periodically so that the remote ready timeout can take effect.
    pub fn evaluate(&self) {
        let mut b = self.board();
        if b.ready {
            return;
        }
        let now = Instant::now();
        let pending: Vec<String> =
            b.remotes.values().filter(|r| !r.settled(self.ready_grace, now)).map(|r| r.name.clone()).collect();
        let reason = if !b.remotes_scanned {
            Some("waiting for the first scan of the remotes directory".to_string())
        } else if !b.local_synced {
            Some("waiting for the first list of local Services".to_string())
        } else if b.election.as_ref().is_some_and(|e| e.role == Role::Unknown) {
            Some("waiting for the leader election (the Lease was not read yet)".to_string())
        } else if b.writes() && !b.kube_synced {
            Some("waiting for the first EndpointSlice reconcile".to_string())
        } else if !pending.is_empty() {
            Some(format!("waiting for remotes to sync: {}", pending.join(", ")))
        } else {
            None
        };
        match reason {
            None => {
                b.ready = true;
                drop(b);
                tracing::info!("ready: every configured remote is synced or has failed validation");
                self.health.set_ready();
            }
            Some(r) => self.health.set_not_ready(r),
        }
    }

    pub fn report(&self) -> StatusReport {
        let b = self.board();
        StatusReport {
            cluster: self.cluster.clone(),
            cluster_id: self.cluster_id,
            ready: b.ready,
            kube_synced: b.kube_synced,
            leader: leader_report(b.election.as_ref()),
            remotes: b.remotes.values().cloned().collect(),
        }
    }

    pub fn remote_status(&self, name: &str) -> Option<RemoteStatus> {
        self.board().remotes.get(name).cloned()
    }

    /// `/status` route, to merge into the runtime router.
    pub fn router(&self) -> Router {
        Router::new().route("/status", get(status_handler)).with_state(self.clone())
    }
}

fn leader_report(e: Option<&Election>) -> LeaderReport {
    let Some(e) = e else {
        return LeaderReport { enabled: false, role: None, holder: None, lease: None, identity: None };
    };
    let (role, holder) = match &e.role {
        Role::Leader => ("leader", Some(e.identity.clone())),
        Role::Follower { holder } => ("standby", holder.clone()),
        Role::Unknown => ("unknown", None),
    };
    LeaderReport {
        enabled: true,
        role: Some(role),
        holder,
        lease: Some(e.lease.clone()),
        identity: Some(e.identity.clone()),
    }
}

async fn status_handler(State(s): State<Status>) -> Json<StatusReport> {
    Json(s.report())
}

/// One remote's view of the board.
#[derive(Clone)]
pub struct RemoteReporter {
    status: Status,
    name: String,
}

impl RemoteReporter {
    fn update(&self, f: impl FnOnce(&mut RemoteStatus)) {
        self.update_quiet(f);
        self.status.evaluate();
    }

    /// For high-rate updates (entry counts) that cannot change readiness.
    fn update_quiet(&self, f: impl FnOnce(&mut RemoteStatus)) {
        {
            let mut b = self.status.board();
            // A removed remote's task may still report while it shuts down; do not resurrect its entry.
            let Some(r) = b.remotes.get_mut(&self.name) else { return };
            f(r);
            r.last_change = Utc::now();
        }
    }

    fn labels(&self) -> RemoteLabels {
        RemoteLabels { remote: self.name.clone() }
    }

    pub fn state(&self, state: RemoteState) {
        self.update(|r| r.state = state);
        let ready = i64::from(state == RemoteState::Synced);
        self.status.metrics.ready.get_or_create(&self.labels()).set(ready);
    }

    pub fn connected(&self, up: bool) {
        self.update(|r| {
            r.connected = up;
            if up {
                r.last_error = None;
                if r.state == RemoteState::Disconnected {
                    let all = !r.synced.is_empty() && r.synced.values().all(|s| *s);
                    r.state = if all { RemoteState::Synced } else { RemoteState::Syncing };
                }
            } else if r.validated {
                r.state = RemoteState::Disconnected;
            }
        });
        self.status.metrics.connected.get_or_create(&self.labels()).set(i64::from(up));
        if !up {
            self.status.metrics.ready.get_or_create(&self.labels()).set(0);
        }
    }

    pub fn validated(&self, id: u32) {
        self.update(|r| {
            r.cluster_id = Some(id);
            r.validated = true;
        });
    }

    /// The remote's cluster config was refused.
    pub fn validation_failed(&self, error: &str) {
        self.update(|r| {
            r.validated = false;
            r.state = RemoteState::ValidationFailed;
            r.last_error = Some(error.to_string());
        });
        self.status.metrics.ready.get_or_create(&self.labels()).set(0);
    }

    pub fn error(&self, error: &str) {
        self.update(|r| r.last_error = Some(error.to_string()));
    }

    /// Resets per-kind sync flags for a new connection.
    pub fn reset_sync(&self, kinds: &[Kind]) {
        self.update(|r| {
            r.synced = kinds.iter().map(|k| (k.to_string(), false)).collect();
        });
    }

    pub fn kind_synced(&self, kind: Kind) {
        self.update(|r| {
            r.synced.insert(kind.to_string(), true);
            if r.synced.values().all(|s| *s) && r.validated && r.connected {
                r.state = RemoteState::Synced;
            }
        });
        let synced = self.status.remote_status(&self.name).is_some_and(|r| r.state == RemoteState::Synced);
        self.status.metrics.ready.get_or_create(&self.labels()).set(i64::from(synced));
    }

    pub fn entries(&self, kind: Kind, count: u64) {
        self.update_quiet(|r| {
            r.entries.insert(kind.to_string(), count);
        });
        let l = RemoteKindLabels { remote: self.name.clone(), kind: kind.to_string() };
        self.status.metrics.entries.get_or_create(&l).set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn rejected(&self, reason: &str, error: &str) {
        self.update_quiet(|r| {
            *r.rejected.entry(reason.to_string()).or_default() += 1;
            r.last_error = Some(error.to_string());
        });
        let l = RemoteReasonLabels { remote: self.name.clone(), reason: reason.to_string() };
        self.status.metrics.rejected.get_or_create(&l).inc();
    }

    pub fn resync(&self) {
        self.update(|r| r.resyncs += 1);
        self.status.metrics.resyncs.get_or_create(&self.labels()).inc();
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_remotes_then_latches() {
        let health = Health::new();
        let s = Status::new("west", 2, health.clone(), Duration::from_secs(3600));
        let east = s.remote("east");
        let bad = s.remote("bad");
        s.remotes_scanned();
        s.local_synced();
        s.kube_synced();
        assert!(!health.is_ready());
        bad.validation_failed("remote \"bad\" has cluster ID 2, which is the local cluster's own ID");
        assert!(!health.is_ready(), "east is still syncing");
        east.connected(true);
        east.validated(1);
        east.reset_sync(&[Kind::Nodes, Kind::Services]);
        east.kind_synced(Kind::Nodes);
        assert!(!health.is_ready());
        east.kind_synced(Kind::Services);
        assert!(health.is_ready());
        east.connected(false);
        assert!(health.is_ready(), "readiness latches");
        let report = s.report();
        assert_eq!(report.remotes.len(), 2);
        let e = s.remote_status("east").unwrap_or_else(|| panic!("east missing"));
        assert_eq!(e.state, RemoteState::Disconnected);
        assert_eq!(e.cluster_id, Some(1));
    }

    #[test]
    fn an_unreachable_remote_stops_blocking_after_the_grace_period() {
        let health = Health::new();
        let s = Status::new("west", 2, health.clone(), Duration::ZERO);
        let _east = s.remote("east");
        s.remotes_scanned();
        s.local_synced();
        s.kube_synced();
        assert!(health.is_ready());
    }

    #[test]
    fn a_standby_is_ready_without_the_writer_and_a_leader_waits_for_it() {
        let standby = Status::new("west", 2, Health::new(), Duration::ZERO);
        let leader = Status::new("west", 2, Health::new(), Duration::ZERO);
        for s in [&standby, &leader] {
            s.leader_election("causeway/causeway-identity-sync", "me");
            s.remotes_scanned();
            s.local_synced();
            assert!(!s.health.is_ready(), "the role is not known yet");
        }
        standby.leader_role(&Role::Follower { holder: Some("other".into()) });
        assert!(standby.health.is_ready(), "a standby serves the stream without writing");
        leader.leader_role(&Role::Leader);
        assert!(!leader.health.is_ready(), "the leader waits for its first EndpointSlice pass");
        leader.kube_synced();
        assert!(leader.health.is_ready());
        let json = serde_json::to_value(standby.report()).unwrap_or_default();
        assert_eq!(
            json["leader"],
            serde_json::json!({"enabled": true, "role": "standby", "holder": "other",
                               "lease": "causeway/causeway-identity-sync", "identity": "me"})
        );
        let single = Status::new("west", 2, Health::new(), Duration::ZERO);
        assert_eq!(
            serde_json::to_value(single.report()).unwrap_or_default()["leader"],
            serde_json::json!({"enabled": false})
        );
    }

    #[test]
    fn metrics_and_removal() {
        let health = Health::new();
        let s = Status::new("west", 2, health.clone(), Duration::from_secs(60));
        let east = s.remote("east");
        east.entries(Kind::Services, 3);
        east.rejected("malformed", "value is not valid JSON");
        east.connected(true);
        s.endpointslice_write("apply", true);
        let text = health.render_metrics();
        assert!(text.contains("causeway_identity_sync_remote_entries{remote=\"east\",kind=\"services\"} 3"), "{text}");
        assert!(
            text.contains(
                "causeway_identity_sync_remote_rejected_values_total{remote=\"east\",reason=\"malformed\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("causeway_identity_sync_endpointslice_writes_total{op=\"apply\",result=\"ok\"} 1"),
            "{text}"
        );
        let st = s.remote_status("east").unwrap_or_else(|| panic!("east missing"));
        assert_eq!(st.rejected.get("malformed"), Some(&1));
        s.remove_remote("east");
        assert!(s.remote_status("east").is_none());
        let text = health.render_metrics();
        assert!(!text.contains("causeway_identity_sync_remote_entries{remote=\"east\""), "{text}");
        // Reports after removal do not resurrect it.
        east.error("late");
        assert!(s.remote_status("east").is_none());
    }
}
