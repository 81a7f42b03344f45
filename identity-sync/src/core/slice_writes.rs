//! When to write which EndpointSlice, as a plain state machine: the kube adapter asks [`SliceWrites::start`] for
//! writes, runs them concurrently, and reports each outcome with [`SliceWrites::finished`].
//!
//! Rules (each has a test below):
//! - **One write per slice in flight.** A slice's versions reach the API server in the order they were decided,
//!   never an older one after a newer one.
//! - **Coalescing.** A slice that changes while its write is in flight is written again afterwards, with its
//!   latest version only; the versions in between are never sent.
//! - **Concurrency.** Up to `max_in_flight` writes run at once, across slices, so 8 source clusters changing at
//!   once cost one request's latency, not eight. Slices waiting for a slot go in the order they became dirty.
//! - **No pass barrier.** A slice is written as soon as it changed and a slot is free; a slow write of one slice
//!   does not hold back the others (the earlier writer applied every changed slice of a pass one after another
//!   and started passes at least 50 ms apart, which put ~50 ms on the median change; `bench propagation-e2e`).
//! - **Retries.** A failed write is retried after a per-slice backoff; a conflict (409) after a short pause,
//!   since another writer just updated the object and a fresh apply usually succeeds.
//! - **Restart safety.** Slices found at startup (content unknown) are re-applied when desired, and deleted only
//!   after [`SliceWrites::allow_cleanup`] (every remote settled), so a restart does not drop backends of remotes
//!   that are merely not re-imported yet.
//!
//! Time is a value passed in; there is no clock, no sleep and no I/O here.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::slices::DesiredSlice;

/// `(namespace, name)` of a slice.
pub type SliceKey = (String, String);

/// Every slice the core wants, by key.
pub type DesiredMap = Arc<BTreeMap<SliceKey, DesiredSlice>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Create or update the slice to exactly this content (server-side apply).
    Apply(DesiredSlice),
    Delete,
}

/// One request for the adapter to carry out; hand it back to [`SliceWrites::finished`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: SliceKey,
    pub op: WriteOp,
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// 409 from the API server: the object changed under us; retried after [`WriteConfig::conflict_retry`].
    Conflict,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteConfig {
    /// Writes in flight at once, over all slices.
    pub max_in_flight: usize,
    /// Least time between the starts of two writes of one slice; changes within it coalesce. Zero: a slice is
    /// rewritten as soon as its previous write finished (writes in flight already coalesce).
    pub min_gap: Duration,
    /// First retry delay after a failure; doubles per consecutive failure up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub conflict_retry: Duration,
}

impl Default for WriteConfig {
    fn default() -> Self {
        WriteConfig {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            min_gap: Duration::ZERO,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
            conflict_retry: Duration::from_millis(20),
        }
    }
}

/// Enough for one write per source cluster of a mesh of this size to run at once; small enough not to flood the
/// API server (kube's own EndpointSlice controller runs 5 workers by default).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

#[derive(Debug)]
pub struct SliceWrites {
    cfg: WriteConfig,
    desired: DesiredMap,
    /// What the API server holds, as far as we know: every write that succeeded.
    written: BTreeMap<SliceKey, DesiredSlice>,
    /// Slices listed at startup, content unknown.
    found: BTreeSet<SliceKey>,
    cleanup_found: bool,
    in_flight: BTreeSet<SliceKey>,
    queue: VecDeque<SliceKey>,
    queued: BTreeSet<SliceKey>,
    /// Slices that must not be written before the given time (backoff after a failure, or `min_gap`).
    not_before: BTreeMap<SliceKey, Instant>,
    failures: BTreeMap<SliceKey, u32>,
    last_start: BTreeMap<SliceKey, Instant>,
    synced_taken: bool,
}

impl SliceWrites {
    pub fn new(cfg: WriteConfig, found: BTreeSet<SliceKey>) -> Self {
        SliceWrites {
            cfg: WriteConfig { max_in_flight: cfg.max_in_flight.max(1), ..cfg },
            desired: Arc::new(BTreeMap::new()),
            written: BTreeMap::new(),
            found,
            cleanup_found: false,
            in_flight: BTreeSet::new(),
            queue: VecDeque::new(),
            queued: BTreeSet::new(),
            not_before: BTreeMap::new(),
            failures: BTreeMap::new(),
            last_start: BTreeMap::new(),
            synced_taken: false,
        }
    }

    /// The latest desired set. Slices that now differ from what was written are queued; earlier versions still
    /// queued are superseded (the write takes the latest when it starts).
    pub fn set_desired(&mut self, desired: DesiredMap) {
        let old = std::mem::replace(&mut self.desired, desired);
        if Arc::ptr_eq(&old, &self.desired) {
            return;
        }
        let desired = self.desired.clone();
        for (k, s) in desired.iter() {
            // Unchanged since the last call: already queued, in flight or written.
            if old.get(k) == Some(s) {
                continue;
            }
            self.enqueue_if_needed(k);
        }
        for k in old.keys() {
            if !desired.contains_key(k) {
                self.enqueue_if_needed(k);
            }
        }
    }

    /// Every remote has settled: slices found at startup and no longer desired may now be deleted.
    pub fn allow_cleanup(&mut self) {
        if self.cleanup_found {
            return;
        }
        self.cleanup_found = true;
        let found: Vec<SliceKey> = self.found.iter().cloned().collect();
        for k in &found {
            self.enqueue_if_needed(k);
        }
    }

    /// Writes to start now, at most as many as there are free slots.
    pub fn start(&mut self, now: Instant) -> Vec<Write> {
        let due: Vec<SliceKey> = self.not_before.iter().filter(|(_, t)| **t <= now).map(|(k, _)| k.clone()).collect();
        for k in due {
            self.not_before.remove(&k);
            self.enqueue_if_needed(&k);
        }
        let mut out = Vec::new();
        while self.in_flight.len() < self.cfg.max_in_flight {
            let Some(key) = self.queue.pop_front() else { break };
            self.queued.remove(&key);
            // In flight: re-checked when it finishes. Waiting: re-queued when due.
            if self.in_flight.contains(&key) || self.not_before.contains_key(&key) {
                continue;
            }
            if let Some(last) = self.last_start.get(&key) {
                if !self.cfg.min_gap.is_zero() && *last + self.cfg.min_gap > now {
                    self.not_before.insert(key, *last + self.cfg.min_gap);
                    continue;
                }
            }
            let Some(op) = self.needed(&key) else { continue };
            self.in_flight.insert(key.clone());
            if !self.cfg.min_gap.is_zero() {
                self.last_start.insert(key.clone(), now);
            }
            out.push(Write { key, op });
        }
        out
    }

    /// A write from [`SliceWrites::start`] ended.
    pub fn finished(&mut self, write: Write, outcome: Outcome, now: Instant) {
        let Write { key, op } = write;
        self.in_flight.remove(&key);
        match outcome {
            Outcome::Done => {
                self.failures.remove(&key);
                self.found.remove(&key);
                match op {
                    WriteOp::Apply(s) => {
                        self.written.insert(key.clone(), s);
                    }
                    WriteOp::Delete => {
                        self.written.remove(&key);
                        self.last_start.remove(&key);
                    }
                }
            }
            Outcome::Conflict | Outcome::Failed => {
                let n = self.failures.entry(key.clone()).or_insert(0);
                *n = n.saturating_add(1);
                let delay = if outcome == Outcome::Conflict {
                    self.cfg.conflict_retry
                } else {
                    let factor = 1u32.checked_shl(n.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
                    self.cfg.retry_min.saturating_mul(factor).min(self.cfg.retry_max)
                };
                self.not_before.insert(key.clone(), now + delay);
            }
        }
        self.enqueue_if_needed(&key);
    }

    /// When [`SliceWrites::start`] should next be called even if nothing else happens (a retry or a gap is due).
    pub fn next_wake(&self) -> Option<Instant> {
        self.not_before.values().min().copied()
    }

    /// True exactly once: the first time every desired slice is written, nothing is pending or failing, and
    /// cleanup of found slices was allowed and done. The found set is forgotten then.
    pub fn take_synced(&mut self) -> bool {
        if self.synced_taken {
            return false;
        }
        if self.cleanup_found && self.idle() {
            self.synced_taken = true;
            self.found.clear();
            return true;
        }
        false
    }

    /// Nothing queued, in flight or waiting for a retry.
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty() && self.not_before.is_empty()
    }

    /// Some slice's last write failed and waits for its retry.
    pub fn failing(&self) -> bool {
        !self.failures.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Everything written successfully, as the API server holds it.
    pub fn written(&self) -> &BTreeMap<SliceKey, DesiredSlice> {
        &self.written
    }

    /// What `key` needs now, if anything.
    fn needed(&self, key: &SliceKey) -> Option<WriteOp> {
        match self.desired.get(key) {
            Some(s) => (self.written.get(key) != Some(s)).then(|| WriteOp::Apply(s.clone())),
            None => (self.written.contains_key(key) || (self.cleanup_found && self.found.contains(key)))
                .then_some(WriteOp::Delete),
        }
    }

    fn enqueue_if_needed(&mut self, key: &SliceKey) {
        if self.queued.contains(key) || self.in_flight.contains(key) || self.not_before.contains_key(key) {
            return;
        }
        if self.needed(key).is_some() {
            self.queued.insert(key.clone());
            self.queue.push_back(key.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::slices::{AddressType, SliceEndpoint};

    fn key(n: u32) -> SliceKey {
        ("shop".to_string(), format!("cart-c{n}-v4-00000000"))
    }

    fn slice(n: u32, version: u8) -> DesiredSlice {
        DesiredSlice {
            name: key(n).1,
            namespace: "shop".into(),
            service: "cart".into(),
            source_cluster: format!("c{n}"),
            address_type: AddressType::IPv4,
            labels: BTreeMap::new(),
            ports: Vec::new(),
            endpoints: vec![SliceEndpoint {
                address: std::net::IpAddr::from([10, n as u8, 0, version]),
                hostname: None,
                zone: None,
            }],
        }
    }

    fn desired(items: &[(u32, u8)]) -> DesiredMap {
        Arc::new(items.iter().map(|(n, v)| (key(*n), slice(*n, *v))).collect())
    }

    fn version(w: &Write) -> Option<u8> {
        match &w.op {
            WriteOp::Apply(s) => s.endpoints.first().map(|e| match e.address {
                std::net::IpAddr::V4(a) => a.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            }),
            WriteOp::Delete => None,
        }
    }

    fn cfg(max: usize) -> WriteConfig {
        WriteConfig { max_in_flight: max, ..WriteConfig::default() }
    }

    #[test]
    fn changed_slices_are_written_concurrently_up_to_the_bound() {
        let t0 = Instant::now();
        let mut w = SliceWrites::new(cfg(8), BTreeSet::new());
        w.set_desired(desired(&(0..10).map(|n| (n, 1)).collect::<Vec<_>>()));
        let first = w.start(t0);
        // Eight at once, not one after another; the other two wait for a slot.
        assert_eq!(first.len(), 8);
        assert_eq!(w.in_flight(), 8);
        assert!(w.start(t0).is_empty(), "no slot is free");
        let done = first.into_iter().next().unwrap_or_else(|| panic!("no write"));
        w.finished(done, Outcome::Done, t0);
        assert_eq!(w.start(t0).len(), 1, "a freed slot is used at once");
    }

    #[test]
    fn one_write_per_slice_in_flight_and_only_the_latest_version_follows() {
        let t0 = Instant::now();
        let mut w = SliceWrites::new(cfg(8), BTreeSet::new());
        w.set_desired(desired(&[(1, 1)]));
        let v1 = w.start(t0);
        assert_eq!(v1.iter().map(version).collect::<Vec<_>>(), vec![Some(1)]);
        // Two more versions while v1 is in flight: nothing starts for this slice.
        w.set_desired(desired(&[(1, 2)]));
        assert!(w.start(t0).is_empty());
        w.set_desired(desired(&[(1, 3)]));
        assert!(w.start(t0).is_empty());
        for x in v1 {
            w.finished(x, Outcome::Done, t0);
        }
        // v2 was superseded before it could be sent: v3 follows directly.
        let next = w.start(t0);
        assert_eq!(next.iter().map(version).collect::<Vec<_>>(), vec![Some(3)]);
        for x in next {
            w.finished(x, Outcome::Done, t0);
        }
        assert!(w.start(t0).is_empty());
        assert_eq!(w.written().get(&key(1)), Some(&slice(1, 3)));
    }

    #[test]
    fn slices_wait_for_a_slot_in_the_order_they_changed() {
        let t0 = Instant::now();
        let mut w = SliceWrites::new(cfg(1), BTreeSet::new());
        w.set_desired(desired(&[(5, 1)]));
        let a = w.start(t0);
        w.set_desired(desired(&[(5, 1), (3, 1)]));
        w.set_desired(desired(&[(5, 1), (3, 1), (1, 1)]));
        for x in a {
            w.finished(x, Outcome::Done, t0);
        }
        let b = w.start(t0);
        assert_eq!(b.first().map(|x| x.key.clone()), Some(key(3)));
    }

    #[test]
    fn removed_slices_are_deleted_and_unchanged_ones_left_alone() {
        let t0 = Instant::now();
        let mut w = SliceWrites::new(cfg(8), BTreeSet::new());
        w.set_desired(desired(&[(1, 1), (2, 1)]));
        for x in w.start(t0) {
            w.finished(x, Outcome::Done, t0);
        }
        w.set_desired(desired(&[(1, 1)]));
        let writes = w.start(t0);
        assert_eq!(writes, vec![Write { key: key(2), op: WriteOp::Delete }]);
        for x in writes {
            w.finished(x, Outcome::Done, t0);
        }
        assert!(w.written().contains_key(&key(1)) && !w.written().contains_key(&key(2)));
        assert!(w.idle());
    }

    #[test]
    fn failures_back_off_per_slice_and_conflicts_retry_quickly() {
        let t0 = Instant::now();
        let c = cfg(8);
        let mut w = SliceWrites::new(c, BTreeSet::new());
        w.set_desired(desired(&[(1, 1), (2, 1)]));
        let mut writes = w.start(t0);
        writes.sort_by(|a, b| a.key.cmp(&b.key));
        let mut it = writes.into_iter();
        let (a, b) = (it.next().unwrap_or_else(|| panic!()), it.next().unwrap_or_else(|| panic!()));
        w.finished(a, Outcome::Failed, t0);
        w.finished(b, Outcome::Conflict, t0);
        assert!(w.failing());
        assert_eq!(w.next_wake(), Some(t0 + c.conflict_retry));
        assert!(w.start(t0).is_empty(), "nothing is retried before its time");
        let retry = w.start(t0 + c.conflict_retry);
        assert_eq!(retry.iter().map(|x| x.key.clone()).collect::<Vec<_>>(), vec![key(2)]);
        for x in retry {
            w.finished(x, Outcome::Done, t0 + c.conflict_retry);
        }
        // The failed one comes back after the backoff, then twice as late after a second failure.
        let again = w.start(t0 + c.retry_min);
        assert_eq!(again.len(), 1);
        let t1 = t0 + c.retry_min;
        for x in again {
            w.finished(x, Outcome::Failed, t1);
        }
        assert_eq!(w.next_wake(), Some(t1 + c.retry_min * 2));
        for x in w.start(t1 + c.retry_min * 2) {
            w.finished(x, Outcome::Done, t1 + c.retry_min * 2);
        }
        assert!(!w.failing() && w.idle());
        assert_eq!(w.written().len(), 2);
    }

    #[test]
    fn found_slices_are_reapplied_and_deleted_only_after_cleanup_is_allowed() {
        let t0 = Instant::now();
        let stale = ("shop".to_string(), "cart-gone-v4-00000000".to_string());
        let mut w = SliceWrites::new(cfg(8), BTreeSet::from([key(1), stale.clone()]));
        w.set_desired(desired(&[(1, 1)]));
        let writes = w.start(t0);
        assert_eq!(writes.iter().map(version).collect::<Vec<_>>(), vec![Some(1)], "found and desired: re-applied");
        for x in writes {
            w.finished(x, Outcome::Done, t0);
        }
        assert!(!w.take_synced(), "cleanup not allowed yet");
        assert!(w.start(t0).is_empty(), "the stale slice stays until every remote has settled");
        w.allow_cleanup();
        let writes = w.start(t0);
        assert_eq!(writes, vec![Write { key: stale, op: WriteOp::Delete }]);
        assert!(!w.take_synced(), "not synced while the delete is in flight");
        for x in writes {
            w.finished(x, Outcome::Done, t0);
        }
        assert!(w.take_synced());
        assert!(!w.take_synced(), "reported once");
    }

    #[test]
    fn min_gap_coalesces_changes_of_one_slice() {
        let t0 = Instant::now();
        let gap = Duration::from_millis(50);
        let mut w = SliceWrites::new(WriteConfig { min_gap: gap, ..cfg(8) }, BTreeSet::new());
        w.set_desired(desired(&[(1, 1)]));
        for x in w.start(t0) {
            w.finished(x, Outcome::Done, t0);
        }
        let t1 = t0 + Duration::from_millis(10);
        w.set_desired(desired(&[(1, 2)]));
        assert!(w.start(t1).is_empty());
        assert_eq!(w.next_wake(), Some(t0 + gap));
        w.set_desired(desired(&[(1, 3)]));
        let writes = w.start(t0 + gap);
        assert_eq!(writes.iter().map(version).collect::<Vec<_>>(), vec![Some(3)]);
    }
}
