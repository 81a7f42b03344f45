//! The writer: a coalescing, lease-attached mirror of one key prefix in etcd.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, KvClient, PutOptions, Txn, TxnOp};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::error::is_lease_not_found;
use crate::lease::LeasePool;
use crate::list::Pager;
use crate::{canary_key, GateState, KvError, WriteGate};

/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

/// Concurrent txns per store: etcd amortises its WAL fsync over concurrent txns (the
/// export bench's raw writer does 1.6× more with 8 in flight than with 1).
pub const DEFAULT_TXNS_IN_FLIGHT: usize = 4;

/// Stay well under etcd's default 1.5 MiB request limit.
const MAX_TXN_BYTES: usize = 1024 * 1024;

/// Configuration of one [`SyncStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStoreConfig {
    /// Local cluster name (names the synced canary).
    pub cluster: String,
    /// Kind for the canary `cilium/synced/<cluster>/cilium/state/<kind>/v1`, e.g.
    /// `nodes`, `services`, `ip`, `identities`.
    pub kind: String,
    /// The prefix this store owns, e.g. `cilium/state/nodes/v1/east/`. Keys under it
    /// that the owner did not upsert are deleted once the initial export is complete.
    pub prefix: String,
    /// Puts and deletes per txn (etcd's `--max-txn-ops`, default 128).
    pub max_txn_ops: usize,
    /// First retry delay after an error; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Keys per page when listing the prefix at start.
    pub list_page_size: i64,
    /// Txns sent concurrently within one flush (each key is in at most one of them).
    pub txns_in_flight: usize,
}

impl SyncStoreConfig {
    /// Defaults: 128 ops per txn, 4 txns in flight, backoff 100 ms → 30 s.
    pub fn new(cluster: impl Into<String>, kind: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            kind: kind.into(),
            prefix: prefix.into(),
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            list_page_size: crate::list::DEFAULT_PAGE_SIZE,
            txns_in_flight: DEFAULT_TXNS_IN_FLIGHT,
        }
    }
}

/// Counters of a [`SyncStore`] (plain atomics; wire them to metrics elsewhere).
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Keys put to etcd.
    pub writes: AtomicU64,
    /// Keys deleted from etcd (explicit deletes and stale keys).
    pub deletes: AtomicU64,
    /// Upserts and deletes that needed no write (value and lease already in etcd).
    pub skipped_unchanged: AtomicU64,
    /// Failed etcd requests (each is retried).
    pub errors: AtomicU64,
    /// Transactions sent.
    pub txns: AtomicU64,
    /// Keys re-written because their lease was lost.
    pub lease_rewrites: AtomicU64,
    /// Stale keys from a previous run deleted after the initial export.
    pub stale_deleted: AtomicU64,
    /// Times [`SyncStore::resync_all`] was carried out.
    pub resyncs: AtomicU64,
}

/// A point-in-time copy of [`SyncStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStatsSnapshot {
    /// See [`SyncStats::writes`].
    pub writes: u64,
    /// See [`SyncStats::deletes`].
    pub deletes: u64,
    /// See [`SyncStats::skipped_unchanged`].
    pub skipped_unchanged: u64,
    /// See [`SyncStats::errors`].
    pub errors: u64,
    /// See [`SyncStats::txns`].
    pub txns: u64,
    /// See [`SyncStats::lease_rewrites`].
    pub lease_rewrites: u64,
    /// See [`SyncStats::stale_deleted`].
    pub stale_deleted: u64,
    /// See [`SyncStats::resyncs`].
    pub resyncs: u64,
}

impl SyncStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> SyncStatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SyncStatsSnapshot {
            writes: r(&self.writes),
            deletes: r(&self.deletes),
            skipped_unchanged: r(&self.skipped_unchanged),
            errors: r(&self.errors),
            txns: r(&self.txns),
            lease_rewrites: r(&self.lease_rewrites),
            stale_deleted: r(&self.stale_deleted),
            resyncs: r(&self.resyncs),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Put(Vec<u8>),
    Delete,
}

#[derive(Default)]
struct Pending {
    /// Latest wins per key: this map is the coalescing.
    ops: HashMap<String, Op>,
    /// Bumped by every call; [`SyncStore::flushed`] waits for the flusher to reach it.
    seq: u64,
    sync_requested: bool,
    /// Set by [`SyncStore::resync_all`] (to the gate's reset count at that moment), taken by
    /// the flusher.
    resync_requested: Option<u64>,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Notify,
    flushed: watch::Sender<u64>,
    synced: watch::Sender<bool>,
    stats: SyncStats,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Mirrors a set of keys under one prefix into etcd, attached to leases.
///
/// * [`upsert`](Self::upsert) / [`delete`](Self::delete) only record the wish; a
///   background task writes. Several changes to one key before it runs coalesce into
///   the last one.
/// * A write is skipped when etcd already holds that value on the right lease (known
///   from the start-up listing or from the last write).
/// * Writes go out in txns of at most `max_txn_ops` ops; failures are retried with
///   exponential backoff, and never lose a newer change.
/// * At start the store lists its prefix. After [`mark_synced`](Self::mark_synced) and
///   once everything before it is written, keys found at start that the owner did not
///   upsert are deleted, then the canary `cilium/synced/<cluster>/cilium/state/<kind>/v1`
///   is written with the current RFC 3339 time.
/// * When a lease is lost, the keys on it are re-written on its replacement.
/// * Every write waits at the pool's [`WriteGate`]. After a reset (the gate was closed and
///   opened again) the store re-lists its prefix and re-writes what etcd no longer holds
///   before anything else, as [`resync_all`](Self::resync_all) does.
///
/// Dropping the store stops its task; unwritten changes are lost, written keys stay
/// until their lease expires.
pub struct SyncStore {
    shared: Arc<Shared>,
    prefix: String,
    gate: WriteGate,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for SyncStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl SyncStore {
    /// Starts the store's task. It first lists the prefix (retrying until etcd answers),
    /// so calls made meanwhile are queued, not lost.
    pub fn start(client: Client, leases: Arc<LeasePool>, config: SyncStoreConfig) -> SyncStore {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            flushed: watch::Sender::new(0),
            synced: watch::Sender::new(false),
            stats: SyncStats::default(),
        });
        let prefix = config.prefix.clone();
        let gate = leases.gate().clone();
        let leases_gate = gate.clone();
        let flusher = Flusher {
            gate_rx: gate.subscribe(),
            resets_seen: gate.resets(),
            resynced_after: None,
            gate,
            kv: client.kv_client().max_decoding_message_size(crate::list::MAX_LIST_MESSAGE),
            lease_rx: leases.subscribe(),
            leases,
            shared: shared.clone(),
            canary: canary_key(&config.cluster, &config.kind),
            backoff: Backoff::new(config.min_backoff, config.max_backoff),
            config,
            etcd: HashMap::new(),
            owned: HashSet::new(),
            found_at_start: HashSet::new(),
            synced: false,
        };
        let span = tracing::info_span!("sync_store", prefix = %prefix);
        let gate = leases_gate;
        let task = tokio::spawn(tracing::Instrument::instrument(flusher.run(), span));
        SyncStore { shared, prefix, gate, task }
    }

    /// The prefix this store owns.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.starts_with(&self.prefix) && key.len() > self.prefix.len() {
            Ok(())
        } else {
            Err(KvError::KeyOutsidePrefix { key: key.to_owned(), prefix: self.prefix.clone() })
        }
    }

    /// Sets `key` (a full key under the prefix) to `value`.
    pub fn upsert(&self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Result<(), KvError> {
        let key = key.into();
        self.check_key(&key)?;
        self.enqueue(key, Op::Put(value.into()));
        Ok(())
    }

    /// Deletes `key` (a full key under the prefix).
    pub fn delete(&self, key: impl Into<String>) -> Result<(), KvError> {
        let key = key.into();
        self.check_key(&key)?;
        self.enqueue(key, Op::Delete);
        Ok(())
    }

    fn enqueue(&self, key: String, op: Op) {
        {
            let mut p = self.shared.lock();
            p.ops.insert(key, op);
            p.seq += 1;
        }
        self.shared.wake.notify_one();
    }

    /// Declares the initial export complete: every key the owner wants has been upserted.
    /// Once those writes are done the store deletes stale keys and writes the canary.
    pub fn mark_synced(&self) {
        {
            let mut p = self.shared.lock();
            p.sync_requested = true;
            p.seq += 1;
        }
        self.shared.wake.notify_one();
    }

    /// Declares that etcd may have lost what this store wrote (it was restarted empty or
    /// restored from an older backup). The store forgets what it believed etcd holds,
    /// lists its prefix again, and re-writes every key the owner wants that is not there
    /// as wanted (on the pool's current leases). If the owner had called
    /// [`mark_synced`](Self::mark_synced), the stale-key cleanup and the canary are done
    /// again once those writes are applied; until then [`is_synced`](Self::is_synced) is
    /// false. [`flushed`](Self::flushed) called after this waits for the re-writes.
    ///
    /// After a reset seen at the [`WriteGate`] the store resyncs by itself; calling this
    /// once the gate is open again does not list the prefix a second time for that reset
    /// (only the canary is written again).
    pub fn resync_all(&self) {
        let resets = self.gate_resets();
        {
            let mut p = self.shared.lock();
            p.resync_requested = Some(resets);
            p.seq += 1;
        }
        self.shared.synced.send_replace(false);
        self.shared.wake.notify_one();
    }

    /// Whether the canary has been written.
    pub fn is_synced(&self) -> bool {
        *self.shared.synced.borrow()
    }

    /// Waits until the canary has been written.
    pub async fn wait_synced(&self) {
        let mut rx = self.shared.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Waits until every call made before this one has reached etcd (or was found to be
    /// unnecessary). Waits through errors and retries.
    pub async fn flushed(&self) {
        let target = self.shared.lock().seq;
        let mut rx = self.shared.flushed.subscribe();
        let _ = rx.wait_for(|s| *s >= target).await;
    }

    /// Counters.
    pub fn stats(&self) -> &SyncStats {
        &self.shared.stats
    }

    fn gate_resets(&self) -> u64 {
        self.gate.resets()
    }
}

impl Drop for SyncStore {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InEtcd {
    value: Vec<u8>,
    lease: i64,
}

struct Flusher {
    kv: KvClient,
    leases: Arc<LeasePool>,
    lease_rx: watch::Receiver<Vec<i64>>,
    shared: Arc<Shared>,
    config: SyncStoreConfig,
    canary: String,
    backoff: Backoff,
    /// What we believe etcd holds for our keys (start-up listing + our writes).
    etcd: HashMap<String, InEtcd>,
    /// Keys the owner upserted and has not deleted since start (plus the canary).
    owned: HashSet<String>,
    /// Keys under the prefix that existed when the store started.
    found_at_start: HashSet<String>,
    synced: bool,
    /// The pool's gate; every write waits for it to be open.
    gate: WriteGate,
    gate_rx: watch::Receiver<GateState>,
    /// Gate resets this store has resynced after.
    resets_seen: u64,
    /// The reset count of the last resync done because of the gate: a
    /// [`SyncStore::resync_all`] made at that count is already satisfied.
    resynced_after: Option<u64>,
}

fn txn_for(batch: &[Planned]) -> Txn {
    let ops: Vec<TxnOp> = batch
        .iter()
        .map(|p| match &p.op {
            Op::Put(v) => TxnOp::put(p.key.as_str(), v.clone(), Some(PutOptions::new().with_lease(p.lease))),
            Op::Delete => TxnOp::delete(p.key.as_str(), None),
        })
        .collect();
    Txn::new().and_then(ops)
}

/// One planned write.
struct Planned {
    key: String,
    op: Op,
    lease: i64,
}

impl Flusher {
    async fn run(mut self) {
        self.initial_list().await;
        loop {
            // Nothing is written while etcd is being re-created after a reset.
            let gate = self.wait_gate().await;
            let requested = self.shared.lock().resync_requested.take();
            if gate.resets != self.resets_seen {
                // A reset happened: etcd lost what we wrote. One resync covers any
                // resync_all requested meanwhile too.
                self.resets_seen = gate.resets;
                self.resync().await;
                self.resynced_after = Some(gate.resets);
            } else if let Some(at) = requested {
                if self.resynced_after == Some(at) {
                    // Already re-listed and re-written after this reset; only the canary is
                    // due again (resync_all un-marked the store).
                    self.resynced_after = None;
                    self.synced = false;
                } else {
                    self.resync().await;
                }
            }
            let (ops, seq, sync_requested) = {
                let mut p = self.shared.lock();
                (std::mem::take(&mut p.ops), p.seq, p.sync_requested)
            };
            let mut ops = ops;
            if self.lease_rx.has_changed().unwrap_or(false) {
                self.lease_rx.borrow_and_update();
                self.queue_lease_rewrites(&mut ops);
            }
            let needs_sync = sync_requested && !self.synced;
            if ops.is_empty() && !needs_sync {
                self.shared.flushed.send_replace(seq);
                tokio::select! {
                    _ = self.shared.wake.notified() => {}
                    _ = self.gate_rx.changed() => {}
                    changed = self.lease_rx.changed() => {
                        if changed.is_err() {
                            // The lease pool is gone; nothing can be written any more.
                            return;
                        }
                        // Handled at the top of the loop via has_changed... which
                        // changed() just cleared, so handle it here.
                        let mut rewrite = HashMap::new();
                        self.queue_lease_rewrites(&mut rewrite);
                        self.requeue(rewrite);
                    }
                }
                continue;
            }
            match self.apply(ops).await {
                Ok(()) => {}
                Err(remaining) => {
                    self.requeue(remaining);
                    self.pause_after_failure().await;
                    continue;
                }
            }
            if needs_sync && self.finish_initial_sync().await.is_err() {
                self.pause_after_failure().await;
                continue;
            }
            self.backoff.reset();
            // Only what was taken at `seq` is done; later calls have bumped seq and
            // will be picked up on the next turn.
            self.shared.flushed.send_replace(seq);
        }
    }

    /// Waits until the gate is open; logs when that means waiting.
    async fn wait_gate(&mut self) -> GateState {
        let state = self.gate_rx.borrow_and_update().clone();
        if state.open {
            return state;
        }
        tracing::info!(
            cluster = %self.config.cluster,
            kind = %self.config.kind,
            reason = state.reason.as_deref().unwrap_or(""),
            "writes paused: etcd is being re-created after a reset"
        );
        self.gate.wait_open().await
    }

    /// After a failed or paused write: backs off, unless the gate is closed, in which case
    /// the wait for it at the top of the loop is the pause.
    async fn pause_after_failure(&mut self) {
        if self.gate.is_open() {
            tokio::time::sleep(self.backoff.next_delay()).await;
        }
    }

    async fn initial_list(&mut self) {
        loop {
            match self.list_once().await {
                Ok(revision) => {
                    tracing::info!(existing = self.found_at_start.len(), revision, "listed store prefix");
                    self.backoff.reset();
                    return;
                }
                Err(e) => {
                    self.count_error(&e, "initial listing");
                    // A partial listing must not count as found: start over.
                    self.found_at_start.clear();
                    self.etcd.clear();
                    tokio::time::sleep(self.backoff.next_delay()).await;
                }
            }
        }
    }

    /// Carries out [`SyncStore::resync_all`]: lists the prefix again (retrying until etcd
    /// answers), then queues a re-write of every owned key etcd does not hold as wanted,
    /// and un-marks the store synced so that the stale-key cleanup and the canary are done
    /// again after those writes.
    async fn resync(&mut self) {
        let believed = std::mem::take(&mut self.etcd);
        self.found_at_start.clear();
        self.initial_list().await;
        self.owned.remove(&self.canary);
        let mut rewrite = HashMap::new();
        for key in &self.owned {
            let Some(wanted) = believed.get(key) else {
                // Never written yet: its op is still queued.
                continue;
            };
            let lease = self.leases.lease_for_key(key.as_bytes());
            let held = self.etcd.get(key).is_some_and(|e| e.lease == lease && e.value == wanted.value);
            if !held {
                rewrite.insert(key.clone(), Op::Put(wanted.value.clone()));
            }
        }
        tracing::warn!(
            cluster = %self.config.cluster,
            kind = %self.config.kind,
            owned = self.owned.len(),
            rewrite = rewrite.len(),
            found = self.found_at_start.len(),
            "resync: re-writing every key etcd no longer holds; the canary follows once they are written"
        );
        // A newer op queued by the owner for the same key wins.
        self.requeue(rewrite);
        self.synced = false;
        self.shared.synced.send_replace(false);
        self.shared.stats.resyncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Records what etcd holds under the prefix, page by page; returns the revision.
    async fn list_once(&mut self) -> Result<i64, KvError> {
        let mut pager = Pager::new(&self.config.prefix, self.config.list_page_size);
        while let Some(page) = pager.next_page(&mut self.kv).await? {
            for kv in page {
                let lease = kv.lease();
                let (key, value) = kv.into_key_value();
                let Ok(key) = String::from_utf8(key) else {
                    tracing::warn!("ignoring non-UTF-8 key under the store prefix");
                    continue;
                };
                self.found_at_start.insert(key.clone());
                self.etcd.insert(key, InEtcd { value, lease });
            }
        }
        Ok(pager.revision)
    }

    fn count_error(&self, e: &KvError, what: &str) {
        self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, source = ?std::error::Error::source(e).map(ToString::to_string), "{what} failed; retrying");
    }

    /// Puts failed or unattempted ops back, unless the owner has queued a newer op for
    /// the same key meanwhile.
    fn requeue(&self, ops: HashMap<String, Op>) {
        if ops.is_empty() {
            return;
        }
        let mut p = self.shared.lock();
        for (key, op) in ops {
            p.ops.entry(key).or_insert(op);
        }
    }

    /// Queues a re-write of every owned key whose lease is no longer current.
    fn queue_lease_rewrites(&mut self, ops: &mut HashMap<String, Op>) {
        let mut n = 0u64;
        for key in &self.owned {
            let Some(in_etcd) = self.etcd.get(key) else {
                continue;
            };
            if in_etcd.lease != self.leases.lease_for_key(key.as_bytes()) {
                if !ops.contains_key(key) {
                    ops.insert(key.clone(), Op::Put(in_etcd.value.clone()));
                }
                n += 1;
            }
        }
        if n > 0 {
            self.shared.stats.lease_rewrites.fetch_add(n, Ordering::Relaxed);
            tracing::info!(keys = n, "re-writing keys after a lease change");
        }
    }

    /// Writes `ops`; on error returns the ops that were not applied.
    async fn apply(&mut self, ops: HashMap<String, Op>) -> Result<(), HashMap<String, Op>> {
        let mut plan = Vec::new();
        for (key, op) in ops {
            let lease = self.leases.lease_for_key(key.as_bytes());
            match &op {
                Op::Put(value) => {
                    self.owned.insert(key.clone());
                    let unchanged = self.etcd.get(&key).is_some_and(|e| e.lease == lease && &e.value == value);
                    if unchanged {
                        self.shared.stats.skipped_unchanged.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                Op::Delete => {
                    self.owned.remove(&key);
                    if !self.etcd.contains_key(&key) {
                        self.shared.stats.skipped_unchanged.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            plan.push(Planned { key, op, lease });
        }
        // Deterministic order makes txns and logs reproducible.
        plan.sort_by(|a, b| a.key.cmp(&b.key));
        self.write_batches(plan).await
    }

    /// Writes `plan` (distinct keys) in txns, up to `txns_in_flight` at once. On the first
    /// failure no new txn starts, but the ones in flight are awaited before returning: a
    /// key is then in no txn any more, so its re-queued op can never be overtaken by an
    /// older write still on the wire. Returns the ops not known to be applied.
    async fn write_batches(&mut self, plan: Vec<Planned>) -> Result<(), HashMap<String, Op>> {
        let mut batches = self.split_batches(plan).into_iter();
        let mut in_flight = FuturesUnordered::new();
        let mut failed: Vec<Planned> = Vec::new();
        let mut lease_lost = false;
        let mut paused = false;
        loop {
            while failed.is_empty() && !paused && in_flight.len() < self.config.txns_in_flight.max(1) {
                // Checked after the plan took its lease ids: a lease granted after a reset
                // was granted after the gate closed, so a txn using it sees the gate shut.
                if !self.gate.is_open() {
                    paused = true;
                    break;
                }
                let Some(batch) = batches.next() else { break };
                let mut kv = self.kv.clone();
                let txn = txn_for(&batch);
                in_flight.push(async move {
                    let result = kv.txn(txn).await;
                    (batch, result)
                });
            }
            let Some((batch, result)) = in_flight.next().await else { break };
            match result {
                Ok(_) => self.record_written(&batch),
                Err(source) => {
                    let lost = is_lease_not_found(&source);
                    let first = batch.first().map(|p| p.key.clone()).unwrap_or_default();
                    self.count_error(&KvError::request("txn", first, source), "txn");
                    lease_lost |= lost;
                    failed.extend(batch);
                }
            }
        }
        if failed.is_empty() && !paused {
            return Ok(());
        }
        if lease_lost {
            // Checks every failed batch's leases; they are few (one per pool slot).
            self.replace_lost_leases(&failed).await;
        }
        let mut back: HashMap<String, Op> = failed.into_iter().map(|p| (p.key, p.op)).collect();
        back.extend(batches.flatten().map(|p| (p.key, p.op)));
        Err(back)
    }

    /// Cuts a sorted plan into txns of at most `max_txn_ops` ops and `MAX_TXN_BYTES`.
    fn split_batches(&self, plan: Vec<Planned>) -> Vec<Vec<Planned>> {
        let mut batches = Vec::new();
        let mut batch: Vec<Planned> = Vec::new();
        let mut bytes = 0;
        for next in plan {
            let size = next.key.len()
                + match &next.op {
                    Op::Put(v) => v.len(),
                    Op::Delete => 0,
                };
            if batch.len() >= self.config.max_txn_ops.max(1) || (!batch.is_empty() && bytes + size > MAX_TXN_BYTES) {
                batches.push(std::mem::take(&mut batch));
                bytes = 0;
            }
            bytes += size;
            batch.push(next);
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        batches
    }

    async fn write_batch(&mut self, batch: &[Planned]) -> Result<(), KvError> {
        let first = batch.first().map(|p| p.key.clone()).unwrap_or_default();
        if !self.gate.is_open() {
            return Err(KvError::Paused { key: first });
        }
        self.kv.txn(txn_for(batch)).await.map_err(|e| KvError::request("txn", first, e))?;
        self.record_written(batch);
        Ok(())
    }

    /// Books a txn that etcd applied.
    fn record_written(&mut self, batch: &[Planned]) {
        let stats = &self.shared.stats;
        stats.txns.fetch_add(1, Ordering::Relaxed);
        for p in batch {
            match &p.op {
                Op::Put(v) => {
                    stats.writes.fetch_add(1, Ordering::Relaxed);
                    self.etcd.insert(p.key.clone(), InEtcd { value: v.clone(), lease: p.lease });
                }
                Op::Delete => {
                    stats.deletes.fetch_add(1, Ordering::Relaxed);
                    self.etcd.remove(&p.key);
                }
            }
        }
        tracing::debug!(ops = batch.len(), "txn applied");
    }

    /// A put failed with "lease not found": find which of the batch's leases is gone
    /// and replace it (the keepalive task may not have noticed yet).
    async fn replace_lost_leases(&mut self, batch: &[Planned]) {
        let mut checked = HashSet::new();
        for p in batch {
            if !checked.insert(p.lease) {
                continue;
            }
            if let Ok(false) = self.leases.is_alive(p.lease).await {
                let index = self.leases.index_for_key(p.key.as_bytes());
                if let Err(e) = self.leases.replace_lost(index, p.lease).await {
                    self.count_error(&e, "lease replacement");
                }
            }
        }
        // The rewrite of keys on replaced leases happens through the lease watch.
    }

    /// Deletes stale keys and writes the canary. Errors are counted and logged here.
    async fn finish_initial_sync(&mut self) -> Result<(), ()> {
        // Stale: existed at start, still believed present, and not (re-)exported. Keys
        // with a queued op are left to that op.
        let stale: Vec<String> = {
            let p = self.shared.lock();
            self.found_at_start
                .iter()
                .filter(|k| !self.owned.contains(*k) && self.etcd.contains_key(*k) && !p.ops.contains_key(*k))
                .cloned()
                .collect()
        };
        if !stale.is_empty() {
            tracing::info!(stale = stale.len(), "deleting keys this store no longer owns");
            let mut plan: Vec<Planned> =
                stale.into_iter().map(|key| Planned { key, op: Op::Delete, lease: 0 }).collect();
            plan.sort_by(|a, b| a.key.cmp(&b.key));
            let n = plan.len() as u64;
            // On failure the stale set is recomputed on the next attempt.
            self.write_batches(plan).await.map_err(drop)?;
            self.shared.stats.stale_deleted.fetch_add(n, Ordering::Relaxed);
        }
        let canary = self.canary.clone();
        let lease = self.leases.lease_for_key(canary.as_bytes());
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        self.owned.insert(canary.clone());
        let written = self.write_batch(&[Planned { key: canary.clone(), op: Op::Put(now.into_bytes()), lease }]).await;
        match written {
            Ok(()) => {}
            // Not an error: written once the gate opens again.
            Err(KvError::Paused { .. }) => return Err(()),
            Err(e) => {
                self.count_error(&e, "synced canary write");
                return Err(());
            }
        }
        self.synced = true;
        self.shared.synced.send_replace(true);
        tracing::info!(canary = %canary, "initial export complete; synced canary written");
        Ok(())
    }
}
