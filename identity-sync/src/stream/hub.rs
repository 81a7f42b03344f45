//! The hub: owns the merged view, the bounded delta log and the per-client queues.
//!
//! Every change to the view goes through [`MeshViewHub::update`], which applies it and publishes the resulting
//! deltas under the same lock. A client registers and takes its snapshot (or its replay from the log) under that
//! lock too, so it never misses or double-applies a delta.
//!
//! Publishing never blocks: each client has a bounded queue filled with `try_send`. A client whose queue is full
//! is marked lagging and its queue is dropped; when it is next polled it starts over from a fresh snapshot. Memory
//! per client is therefore bounded by the queue size, whatever the client does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use causeway_runtime::Health;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tracing::debug;

use crate::core::{Delta, MergedView, Snapshot};

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
        // A queue of 16k deltas is ~256 KiB of pointers per client and absorbs a large service rollout; the log
        // covers a few minutes of ordinary churn, so a restarting agent usually resumes without a snapshot.
        StreamConfig { client_queue: 16 * 1024, delta_log: 64 * 1024 }
    }
}

/// Stream metrics; register them with [`StreamMetrics::register`].
#[derive(Debug, Clone, Default)]
pub struct StreamMetrics {
    pub clients_connected: Gauge,
    pub snapshots_sent: Counter,
    pub resumes: Counter,
    pub lagging_client_resets: Counter,
    pub deltas_published: Counter,
}

impl StreamMetrics {
    /// Registers under `causeway_meshview_*`.
    pub fn register(&self, health: &Health) {
        health.with_registry(|r| {
            r.register(
                "meshview_clients_connected",
                "Node agents watching the mesh view",
                self.clients_connected.clone(),
            );
            r.register(
                "meshview_snapshots_sent",
                "Full snapshots started for watching clients",
                self.snapshots_sent.clone(),
            );
            r.register(
                "meshview_resumes",
                "Watches resumed from the delta log without a snapshot",
                self.resumes.clone(),
            );
            r.register(
                "meshview_lagging_client_resets",
                "Clients whose queue overflowed and were reset to a snapshot",
                self.lagging_client_resets.clone(),
            );
            r.register("meshview_deltas_published", "View changes published", self.deltas_published.clone());
        });
    }
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Delta>,
    lagged: Arc<AtomicBool>,
}

struct HubState {
    view: MergedView,
    log: VecDeque<Delta>,
    subs: Vec<Subscriber>,
    next_id: u64,
}

pub(crate) struct Inner {
    state: Mutex<HubState>,
    pub(crate) cfg: StreamConfig,
    pub(crate) metrics: StreamMetrics,
    pub(crate) epoch: u64,
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

/// Shared handle to the view and its stream. Cheap to clone.
#[derive(Clone)]
pub struct MeshViewHub {
    pub(crate) inner: Arc<Inner>,
}

impl MeshViewHub {
    pub fn new(mut view: MergedView, cfg: StreamConfig, metrics: StreamMetrics) -> Self {
        // Deltas from before the hub existed are covered by the snapshot every first client gets.
        view.take_deltas();
        let cfg = StreamConfig { client_queue: cfg.client_queue.max(1), delta_log: cfg.delta_log.max(1) };
        // Revisions restart with the process; the epoch tells a resuming client that they did.
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1).max(1);
        MeshViewHub {
            inner: Arc::new(Inner {
                state: Mutex::new(HubState { view, log: VecDeque::new(), subs: Vec::new(), next_id: 0 }),
                cfg,
                metrics,
                epoch,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock leaves the view as it was between two inputs; keep serving it.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies inputs to the view and publishes the deltas they produced. Do not call `take_deltas` inside `f`:
    /// the deltas it took would never reach the stream.
    pub fn update<R>(&self, f: impl FnOnce(&mut MergedView) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st.view);
        let deltas = st.view.take_deltas();
        self.publish(&mut st, deltas);
        r
    }

    /// Reads the view (for the kube adapter and status).
    pub fn read<R>(&self, f: impl FnOnce(&MergedView) -> R) -> R {
        f(&self.lock().view)
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    pub fn metrics(&self) -> &StreamMetrics {
        &self.inner.metrics
    }

    /// Deltas queued per connected client (for tests and debugging).
    pub fn client_queue_lens(&self) -> Vec<usize> {
        let st = self.lock();
        st.subs.iter().map(|s| s.tx.max_capacity() - s.tx.capacity()).collect()
    }

    /// Deltas held for resuming clients.
    pub fn delta_log_len(&self) -> usize {
        self.lock().log.len()
    }

    fn publish(&self, st: &mut HubState, deltas: Vec<Delta>) {
        if deltas.is_empty() {
            return;
        }
        let m = &self.inner.metrics;
        m.deltas_published.inc_by(deltas.len() as u64);
        let cap = self.inner.cfg.client_queue;
        if deltas.len() > cap {
            // No client could take this batch (a big import); skip the per-client work and reset everyone.
            for s in st.subs.drain(..) {
                s.lagged.store(true, Ordering::Release);
            }
        } else {
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
        }
        let max = self.inner.cfg.delta_log;
        if deltas.len() >= max {
            let skip = deltas.len() - max;
            st.log.clear();
            st.log.extend(deltas.into_iter().skip(skip));
        } else {
            st.log.extend(deltas);
            while st.log.len() > max {
                st.log.pop_front();
            }
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
        let current = st.view.revision();
        let start = match resume {
            Some((epoch, rev)) if epoch == self.inner.epoch && rev <= current && covers(&st.log, rev, current) => {
                self.inner.metrics.resumes.inc();
                Start::Replay(st.log.iter().filter(|d| d.revision > rev).cloned().collect())
            }
            _ => {
                self.inner.metrics.snapshots_sent.inc();
                Start::Snapshot(st.view.snapshot())
            }
        };
        Subscription { id, rx, lagged, start }
    }
}

/// True when the log holds every delta after `rev`.
fn covers(log: &VecDeque<Delta>, rev: u64, current: u64) -> bool {
    rev == current || log.front().is_some_and(|d| d.revision <= rev + 1)
}
