//! The hub: the last published assignments, the bounded delta log and the per-client queues.
//!
//! Every change goes through [`AssignmentHub::apply`], which diffs the new assignments against the held ones and
//! publishes one delta per changed or removed policy, under one lock. A client registers and takes its snapshot
//! (or its replay from the log) under the same lock, so it never misses or double-applies a delta.
//!
//! Publishing never blocks: each client has a bounded queue filled with `try_send`. A client whose queue is full
//! is marked lagging and dropped from the fan-out; when it next reads it starts over from a fresh snapshot.
//!
//! Every client's queue holds the same [`Current`] for one change, and a `Current` converts and encodes its policy
//! once per distinct zone view ([`Current::view`]): a change costs one conversion per view, not per client. Only
//! the current version of each policy and versions still queued or being sent keep their encodings; the resume
//! log holds bare assignments, so its memory does not grow with the number of zones.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use super::convert;
use crate::core::PolicyAssignment;

/// Bounds of the stream.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Deltas a client may have queued before it is reset to a snapshot.
    pub client_queue: usize,
    /// Deltas kept for resuming clients.
    pub delta_log: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        // Deltas are shared pointers, so both bounds cost little memory; a policy changes a few times per pod
        // rollout or failover, so 4096 deltas covers minutes of churn for an agent that restarts.
        StreamConfig { client_queue: 1024, delta_log: 4096 }
    }
}

/// Stream metrics, registered as `causeway_egress_stream_*`.
#[derive(Debug, Clone, Default)]
pub struct StreamMetrics {
    pub clients_connected: Gauge,
    pub snapshots_sent: Counter,
    pub resumes: Counter,
    pub lagging_client_resets: Counter,
    pub deltas_published: Counter,
    pub revision: Gauge,
    pub views_encoded: Counter,
}

impl StreamMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("egress_stream_clients", "Node agents watching egress assignments", self.clients_connected.clone());
        r.register("egress_stream_snapshots_sent", "Full snapshots started", self.snapshots_sent.clone());
        r.register("egress_stream_resumes", "Watches resumed from the delta log", self.resumes.clone());
        r.register(
            "egress_stream_lagging_client_resets",
            "Clients whose queue overflowed and were reset to a snapshot",
            self.lagging_client_resets.clone(),
        );
        r.register("egress_stream_deltas_published", "Policy deltas published", self.deltas_published.clone());
        r.register("egress_stream_revision", "Current revision of the assignment stream", self.revision.clone());
        r.register(
            "egress_stream_views_encoded",
            "Policy versions converted and encoded for one zone view (shared by every client of that view)",
            self.views_encoded.clone(),
        );
    }
}

/// One version of a policy with its encodings, one per zone view, made on first use and shared by every client.
#[derive(Debug)]
pub(crate) struct Current {
    pub(crate) assignment: Arc<PolicyAssignment>,
    /// (view key, encoded `EgressPolicyAssignment`); a handful of entries (zones + the agnostic view).
    views: Mutex<Vec<(Option<String>, Bytes)>>,
}

impl Current {
    pub(crate) fn new(assignment: Arc<PolicyAssignment>) -> Self {
        Current { assignment, views: Mutex::new(Vec::new()) }
    }

    /// The policy as a node in `zone` sees it, encoded. The first client of a view converts and encodes it (under
    /// the lock, so clients of the same view arriving together wait for that one encoding instead of repeating it);
    /// the others get the same bytes.
    pub(crate) fn view(&self, zone: Option<&str>, metrics: &StreamMetrics) -> Bytes {
        let key = convert::view_key(&self.assignment, zone);
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, b)) = views.iter().find(|(k, _)| k.as_deref() == key) {
            return b.clone();
        }
        let b = convert::encode_policy(&self.assignment, key);
        metrics.views_encoded.inc();
        views.push((key.map(str::to_string), b.clone()));
        b
    }
}

/// One policy changed (`Some`) or removed (`None`) at `revision`, as queued to clients: every client's queue holds
/// the same `Arc<Current>`.
#[derive(Debug, Clone)]
pub(crate) struct Delta {
    pub(crate) revision: u64,
    pub(crate) name: String,
    pub(crate) policy: Option<Arc<Current>>,
}

/// A delta as the resume log keeps it: without encodings.
#[derive(Debug, Clone)]
struct Logged {
    revision: u64,
    name: String,
    policy: Option<Arc<PolicyAssignment>>,
}

pub(crate) struct Snapshot {
    pub(crate) revision: u64,
    pub(crate) policies: Vec<Arc<Current>>,
}

/// The changes that turn `held` into `new`: changed or added policies, then removed ones, each in name order.
pub(crate) fn diff(
    held: &BTreeMap<String, Arc<Current>>,
    new: &BTreeMap<String, PolicyAssignment>,
) -> Vec<(String, Option<PolicyAssignment>)> {
    let changed = new
        .iter()
        .filter(|(name, a)| held.get(*name).is_none_or(|h| *h.assignment != **a))
        .map(|(name, a)| (name.clone(), Some(a.clone())));
    let removed = held.keys().filter(|name| !new.contains_key(*name)).map(|name| (name.clone(), None));
    changed.chain(removed).collect()
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Delta>,
    lagged: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    policies: BTreeMap<String, Arc<Current>>,
    revision: u64,
    log: VecDeque<Logged>,
    subs: Vec<Subscriber>,
    next_id: u64,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    pub(crate) cfg: StreamConfig,
    pub(crate) metrics: StreamMetrics,
    pub(crate) epoch: u64,
    /// Set once the first assignments arrived: before that, a snapshot would tell agents to remove everything.
    pub(crate) ready: watch::Sender<bool>,
    pub(crate) zones: watch::Receiver<BTreeMap<String, String>>,
}

/// Where a new subscription starts.
pub(crate) enum Start {
    Snapshot(Snapshot),
    /// Resume: the deltas after the client's revision (possibly none).
    Replay(Vec<Delta>),
}

pub(crate) struct Subscription {
    pub(crate) id: u64,
    pub(crate) rx: mpsc::Receiver<Delta>,
    pub(crate) lagged: Arc<AtomicBool>,
    pub(crate) start: Start,
}

/// Shared handle to the published assignments and their stream. Cheap to clone.
#[derive(Clone)]
pub struct AssignmentHub {
    pub(crate) inner: Arc<Inner>,
}

impl AssignmentHub {
    /// `zones` maps node names to zones (see [`crate::kube::Controller::node_zones`]).
    pub fn new(cfg: StreamConfig, metrics: StreamMetrics, zones: watch::Receiver<BTreeMap<String, String>>) -> Self {
        let cfg = StreamConfig { client_queue: cfg.client_queue.max(1), delta_log: cfg.delta_log.max(1) };
        // Revisions restart with the process; the epoch tells a resuming client that they did.
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1).max(1);
        AssignmentHub {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                cfg,
                metrics,
                epoch,
                ready: watch::channel(false).0,
                zones,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state between two publications; keep serving it.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    pub fn metrics(&self) -> &StreamMetrics {
        &self.inner.metrics
    }

    /// Deltas queued per connected client (for tests and debugging).
    pub fn client_queue_lens(&self) -> Vec<usize> {
        self.lock().subs.iter().map(|s| s.tx.max_capacity() - s.tx.capacity()).collect()
    }

    /// Replaces the held assignments with `new`, publishing one delta per changed or removed policy. Returns the
    /// number of deltas. The first call also opens the stream to clients.
    pub fn apply(&self, new: &BTreeMap<String, PolicyAssignment>) -> usize {
        let mut st = self.lock();
        let changes = diff(&st.policies, new);
        let mut deltas = Vec::with_capacity(changes.len());
        for (name, policy) in changes {
            st.revision += 1;
            let policy = policy.map(|p| Arc::new(Current::new(Arc::new(p))));
            match &policy {
                Some(p) => st.policies.insert(name.clone(), p.clone()),
                None => st.policies.remove(&name),
            };
            deltas.push(Delta { revision: st.revision, name, policy });
        }
        let n = deltas.len();
        self.inner.metrics.revision.set(i64::try_from(st.revision).unwrap_or(i64::MAX));
        self.publish(&mut st, deltas);
        drop(st);
        self.inner.ready.send_replace(true);
        n
    }

    /// Feeds the hub from the controller: waits until `synced` turns true (the controller has listed everything
    /// and published its first assignments), then applies every value of `assignments`. Ends when the controller
    /// is gone.
    pub fn follow(
        &self,
        mut assignments: watch::Receiver<BTreeMap<String, PolicyAssignment>>,
        mut synced: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            if synced.wait_for(|s| *s).await.is_err() {
                return;
            }
            loop {
                let n = hub.apply(&assignments.borrow_and_update());
                debug!(deltas = n, revision = hub.revision(), "assignments published to the stream");
                if assignments.changed().await.is_err() {
                    info!("controller gone; the assignment stream keeps its last state");
                    return;
                }
            }
        })
    }

    fn publish(&self, st: &mut State, deltas: Vec<Delta>) {
        if deltas.is_empty() {
            return;
        }
        let m = &self.inner.metrics;
        m.deltas_published.inc_by(deltas.len() as u64);
        st.subs.retain(|s| {
            for d in &deltas {
                match s.tx.try_send(d.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        debug!(client = s.id, "client queue full; resetting it to a snapshot");
                        s.lagged.store(true, Ordering::Release);
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            true
        });
        st.log.extend(deltas.into_iter().map(|d| Logged {
            revision: d.revision,
            name: d.name,
            policy: d.policy.map(|p| p.assignment.clone()),
        }));
        let max = self.inner.cfg.delta_log;
        while st.log.len() > max {
            st.log.pop_front();
        }
    }

    /// Registers a client. `resume` is (epoch, revision) when the client asks to resume.
    pub(crate) fn subscribe(&self, resume: Option<(u64, u64)>) -> Subscription {
        let mut st = self.lock();
        let (tx, rx) = mpsc::channel(self.inner.cfg.client_queue);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = st.next_id;
        st.next_id += 1;
        st.subs.push(Subscriber { id, tx, lagged: lagged.clone() });
        let current = st.revision;
        let start = match resume {
            Some((epoch, rev)) if epoch == self.inner.epoch && rev <= current && covers(&st.log, rev, current) => {
                self.inner.metrics.resumes.inc();
                // A logged version that is still current shares the current encodings; an older one (only a
                // resuming client can still need it) gets its own.
                let replay = st
                    .log
                    .iter()
                    .filter(|d| d.revision > rev)
                    .map(|d| Delta {
                        revision: d.revision,
                        name: d.name.clone(),
                        policy: d.policy.as_ref().map(|a| match st.policies.get(&d.name) {
                            Some(c) if Arc::ptr_eq(&c.assignment, a) => c.clone(),
                            _ => Arc::new(Current::new(a.clone())),
                        }),
                    })
                    .collect();
                Start::Replay(replay)
            }
            _ => {
                self.inner.metrics.snapshots_sent.inc();
                Start::Snapshot(Snapshot { revision: current, policies: st.policies.values().cloned().collect() })
            }
        };
        Subscription { id, rx, lagged, start }
    }
}

/// True when the log holds every delta after `rev`.
fn covers(log: &VecDeque<Logged>, rev: u64, current: u64) -> bool {
    rev == current || log.front().is_some_and(|d| d.revision <= rev + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, generation: i64) -> PolicyAssignment {
        PolicyAssignment { name: name.into(), generation, ..Default::default() }
    }

    fn map(ps: &[PolicyAssignment]) -> BTreeMap<String, PolicyAssignment> {
        ps.iter().map(|p| (p.name.clone(), p.clone())).collect()
    }

    fn hub(log: usize) -> AssignmentHub {
        let cfg = StreamConfig { client_queue: 4, delta_log: log };
        AssignmentHub::new(cfg, StreamMetrics::default(), watch::channel(BTreeMap::new()).1)
    }

    #[test]
    fn diff_lists_changed_and_removed_policies_only() {
        let held: BTreeMap<String, Arc<Current>> = [policy("a", 1), policy("b", 1), policy("c", 1)]
            .into_iter()
            .map(|p| (p.name.clone(), Arc::new(Current::new(Arc::new(p)))))
            .collect();
        let new = map(&[policy("a", 1), policy("b", 2), policy("d", 1)]);
        let d: Vec<(String, Option<i64>)> =
            diff(&held, &new).into_iter().map(|(n, p)| (n, p.map(|p| p.generation))).collect();
        assert_eq!(d, vec![("b".into(), Some(2)), ("d".into(), Some(1)), ("c".into(), None)]);
        assert!(diff(&held, &map(&[policy("a", 1), policy("b", 1), policy("c", 1)])).is_empty());
    }

    #[test]
    fn one_revision_per_delta_and_the_log_is_bounded() {
        let h = hub(3);
        assert_eq!(h.apply(&map(&[policy("a", 1), policy("b", 1)])), 2);
        assert_eq!(h.revision(), 2);
        assert_eq!(h.apply(&map(&[policy("a", 1), policy("b", 1)])), 0, "nothing changed, no revision");
        assert_eq!(h.revision(), 2);
        assert_eq!(h.apply(&map(&[policy("a", 2)])), 2);
        assert_eq!(h.revision(), 4);
        h.apply(&map(&[policy("a", 3)]));
        h.apply(&map(&[policy("a", 4)]));
        let log: Vec<u64> = h.lock().log.iter().map(|d| d.revision).collect();
        assert_eq!(log, vec![4, 5, 6]);
    }

    #[test]
    fn resume_replays_when_held_and_snapshots_otherwise() {
        let h = hub(3);
        for g in 1..=6 {
            h.apply(&map(&[policy("a", g)]));
        }
        let epoch = h.epoch();
        let replayed = |s: &Subscription| match &s.start {
            Start::Replay(d) => Some(d.iter().map(|d| d.revision).collect::<Vec<_>>()),
            Start::Snapshot(_) => None,
        };
        assert_eq!(replayed(&h.subscribe(Some((epoch, 3)))), Some(vec![4, 5, 6]));
        assert_eq!(replayed(&h.subscribe(Some((epoch, 6)))), Some(vec![]));
        assert_eq!(replayed(&h.subscribe(Some((epoch, 2)))), None, "revision 3 is no longer held");
        assert_eq!(replayed(&h.subscribe(Some((epoch + 1, 5)))), None, "another epoch");
        assert_eq!(replayed(&h.subscribe(Some((epoch, 7)))), None, "a revision from the future");
        assert_eq!(replayed(&h.subscribe(None)), None);
        match h.subscribe(None).start {
            Start::Snapshot(s) => {
                assert_eq!(s.revision, 6);
                assert_eq!(s.policies.iter().map(|p| p.assignment.generation).collect::<Vec<_>>(), vec![6]);
            }
            Start::Replay(_) => panic!("expected a snapshot"),
        }
    }

    #[test]
    fn every_queue_holds_the_same_version_and_the_snapshot_shares_it() {
        let h = hub(100);
        let mut a = h.subscribe(None);
        let mut b = h.subscribe(None);
        h.apply(&map(&[policy("a", 1)]));
        let (da, db) = (a.rx.try_recv().expect("queued"), b.rx.try_recv().expect("queued"));
        let (pa, pb) = (da.policy.expect("upsert"), db.policy.expect("upsert"));
        assert!(Arc::ptr_eq(&pa, &pb), "one shared version, not a copy per client");
        match h.subscribe(None).start {
            Start::Snapshot(s) => assert!(Arc::ptr_eq(&s.policies[0], &pa), "a later snapshot reuses its encodings"),
            Start::Replay(_) => panic!("expected a snapshot"),
        }
        // The log keeps the bare assignment; a replay of the still-current version shares the same encodings.
        match h.subscribe(Some((h.epoch(), 0))).start {
            Start::Snapshot(_) => panic!("expected a replay, the log holds revision 1"),
            Start::Replay(d) => assert!(Arc::ptr_eq(d[0].policy.as_ref().expect("upsert"), &pa)),
        }
    }

    #[test]
    fn a_full_queue_marks_the_client_lagging_without_blocking() {
        let h = hub(100);
        let slow = h.subscribe(None);
        let mut fast = h.subscribe(None);
        for g in 1..=10 {
            h.apply(&map(&[policy("a", g)]));
            while fast.rx.try_recv().is_ok() {}
        }
        assert!(slow.lagged.load(Ordering::Acquire));
        assert!(!fast.lagged.load(Ordering::Acquire));
        assert_eq!(h.client_queue_lens(), vec![0], "the slow client was dropped from the fan-out");
    }
}
