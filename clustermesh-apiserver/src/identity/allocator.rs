//! The sans-IO identity allocator: no kube, no etcd, no clock.
//!
//! Rules it enforces:
//! - the same label set always maps to the same ID while the ID is alive;
//! - an ID is reference counted by its users; at zero users it becomes *idle*;
//! - an idle ID is garbage after the grace period; [`IdentityAllocator::collect_garbage`] hands it out for
//!   deletion, and only [`IdentityAllocator::confirm_deleted`] makes the number free again;
//! - a live ID, or one still awaiting deletion, is never handed to another label set;
//! - IDs come from `range.first_allocatable()..=range.last`; fresh IDs are picked with a cursor that moves
//!   forward, so a freed number is reused only after the cursor wraps around.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use causeway_store::{IdentityRange, LabelSet};
use chrono::{DateTime, Utc};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AllocError {
    #[error(
        "identity range {first}..={last} is exhausted: {live} identities are live and {pending} await deletion; \
         remove unused label sets (pods with unique labels) or shorten the identity GC grace period"
    )]
    Exhausted { first: u32, last: u32, live: usize, pending: usize },
    #[error("label set {labels:?} holds no identity, so it cannot be released")]
    NotAllocated { labels: String },
}

/// Result of [`IdentityAllocator::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocated {
    pub id: u32,
    /// The ID was picked just now: the caller must persist it before using it, and call
    /// [`IdentityAllocator::abort`] if persisting fails.
    pub newly_created: bool,
}

/// Result of [`IdentityAllocator::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub id: u32,
    /// Users left; 0 means the identity is now idle and its grace period has started.
    pub remaining: u64,
}

/// What [`IdentityAllocator::restore`] did with each persisted identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: Vec<u32>,
    /// IDs outside this cluster's allocatable range: ignored (never deleted, never reused from here).
    pub out_of_range: Vec<u32>,
    /// A second ID for a label set that already had one: queued for deletion; the lower ID wins.
    pub duplicates: Vec<u32>,
}

#[derive(Debug, Clone)]
struct Entry {
    labels: LabelSet,
    refs: u64,
    /// When the last user went away; `None` while in use.
    idle_since: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct IdentityAllocator {
    range: IdentityRange,
    grace: Duration,
    by_labels: HashMap<LabelSet, u32>,
    by_id: BTreeMap<u32, Entry>,
    /// Handed out by `collect_garbage`, not yet confirmed deleted: not reusable.
    pending_delete: BTreeSet<u32>,
    cursor: u32,
}

impl IdentityAllocator {
    pub fn new(range: IdentityRange, grace: Duration) -> Self {
        IdentityAllocator {
            range,
            grace,
            by_labels: HashMap::new(),
            by_id: BTreeMap::new(),
            pending_delete: BTreeSet::new(),
            cursor: range.first_allocatable(),
        }
    }

    pub fn range(&self) -> IdentityRange {
        self.range
    }

    fn first(&self) -> u32 {
        self.range.first_allocatable()
    }

    fn allocatable(&self, id: u32) -> bool {
        (self.first()..=self.range.last).contains(&id)
    }

    /// Loads persisted identities after a restart. Every restored identity starts idle at `now`, so it gets a full
    /// grace period for its users to come back before it can be collected.
    pub fn restore(
        &mut self,
        persisted: impl IntoIterator<Item = (u32, LabelSet)>,
        now: DateTime<Utc>,
    ) -> RestoreReport {
        let mut items: Vec<(u32, LabelSet)> = persisted.into_iter().collect();
        items.sort_by_key(|(id, _)| *id);
        let mut report = RestoreReport::default();
        for (id, labels) in items {
            if !self.allocatable(id) {
                report.out_of_range.push(id);
                continue;
            }
            if self.by_id.contains_key(&id) || self.pending_delete.contains(&id) {
                continue;
            }
            if self.by_labels.contains_key(&labels) {
                self.pending_delete.insert(id);
                report.duplicates.push(id);
                continue;
            }
            self.by_labels.insert(labels.clone(), id);
            self.by_id.insert(id, Entry { labels, refs: 0, idle_since: Some(now) });
            report.restored.push(id);
        }
        // Continue after the highest restored ID so that recently freed numbers are not reused first.
        if let Some(max) = report.restored.iter().max() {
            self.cursor = self.after(*max);
        }
        report
    }

    fn after(&self, id: u32) -> u32 {
        if id >= self.range.last {
            self.first()
        } else {
            id + 1
        }
    }

    /// Takes one reference on the identity of `labels`, allocating a fresh ID when it has none.
    pub fn acquire(&mut self, labels: &LabelSet, _now: DateTime<Utc>) -> Result<Allocated, AllocError> {
        if let Some(&id) = self.by_labels.get(labels) {
            if let Some(e) = self.by_id.get_mut(&id) {
                e.refs += 1;
                e.idle_since = None;
                return Ok(Allocated { id, newly_created: false });
            }
        }
        let id = self.next_free()?;
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, Entry { labels: labels.clone(), refs: 1, idle_since: None });
        self.cursor = self.after(id);
        Ok(Allocated { id, newly_created: true })
    }

    fn next_free(&self) -> Result<u32, AllocError> {
        let size = u64::from(self.range.last - self.first()) + 1;
        if (self.by_id.len() + self.pending_delete.len()) as u64 >= size {
            return Err(self.exhausted());
        }
        let mut id = self.cursor;
        for _ in 0..size {
            if !self.by_id.contains_key(&id) && !self.pending_delete.contains(&id) {
                return Ok(id);
            }
            id = self.after(id);
        }
        Err(self.exhausted())
    }

    fn exhausted(&self) -> AllocError {
        AllocError::Exhausted {
            first: self.first(),
            last: self.range.last,
            live: self.by_id.len(),
            pending: self.pending_delete.len(),
        }
    }

    /// Undoes an [`acquire`](Self::acquire) that returned `newly_created` and could not be persisted: the ID is
    /// forgotten as if never picked. Does nothing unless `id` is the one `labels` holds.
    pub fn abort(&mut self, labels: &LabelSet, id: u32) {
        if self.by_labels.get(labels) == Some(&id) {
            self.by_labels.remove(labels);
            self.by_id.remove(&id);
        }
    }

    /// Records that `id` is already taken by `labels` elsewhere (for example, a persisted object this allocator
    /// did not know about). It joins as an idle identity, so it is never handed to other labels.
    pub fn insert_existing(&mut self, id: u32, labels: LabelSet, now: DateTime<Utc>) {
        if self.by_id.contains_key(&id) || !self.allocatable(id) {
            return;
        }
        if self.by_labels.contains_key(&labels) {
            self.pending_delete.insert(id);
            return;
        }
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, Entry { labels, refs: 0, idle_since: Some(now) });
    }

    /// Blocks `id` (a persisted record that is not a valid identity of this cluster): it is never allocated,
    /// and the next [`collect_garbage`](Self::collect_garbage) hands it out for deletion.
    pub fn block(&mut self, id: u32) {
        if !self.by_id.contains_key(&id) && self.allocatable(id) {
            self.pending_delete.insert(id);
        }
    }

    /// Drops one reference. At zero the identity turns idle and its grace period starts at `now`.
    pub fn release(&mut self, labels: &LabelSet, now: DateTime<Utc>) -> Result<Released, AllocError> {
        let not_allocated = || AllocError::NotAllocated { labels: labels.to_string() };
        let id = *self.by_labels.get(labels).ok_or_else(not_allocated)?;
        let e = self.by_id.get_mut(&id).ok_or_else(not_allocated)?;
        if e.refs == 0 {
            return Err(not_allocated());
        }
        e.refs -= 1;
        if e.refs == 0 {
            e.idle_since = Some(now);
        }
        Ok(Released { id, remaining: e.refs })
    }

    /// Identities idle for longer than the grace period, plus any earlier ones whose deletion was not yet
    /// confirmed. They no longer map from their labels (a new acquire gets a fresh ID), and their numbers stay
    /// blocked until [`confirm_deleted`](Self::confirm_deleted).
    pub fn collect_garbage(&mut self, now: DateTime<Utc>) -> Vec<u32> {
        let grace = chrono::Duration::from_std(self.grace).unwrap_or(chrono::Duration::MAX);
        let expired: Vec<u32> = self
            .by_id
            .iter()
            .filter(|(_, e)| e.refs == 0 && e.idle_since.is_some_and(|t| now.signed_duration_since(t) > grace))
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            if let Some(e) = self.by_id.remove(id) {
                self.by_labels.remove(&e.labels);
            }
            self.pending_delete.insert(*id);
        }
        self.pending_delete.iter().copied().collect()
    }

    /// The persisted record of `id` is gone; the number may be allocated again.
    pub fn confirm_deleted(&mut self, id: u32) {
        self.pending_delete.remove(&id);
    }

    pub fn get(&self, labels: &LabelSet) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    pub fn labels_of(&self, id: u32) -> Option<&LabelSet> {
        self.by_id.get(&id).map(|e| &e.labels)
    }

    pub fn refs(&self, id: u32) -> u64 {
        self.by_id.get(&id).map_or(0, |e| e.refs)
    }

    /// Every live identity (in use or idle within grace), by ID.
    pub fn live(&self) -> impl Iterator<Item = (u32, &LabelSet)> {
        self.by_id.iter().map(|(id, e)| (*id, &e.labels))
    }

    pub fn pending_deletion(&self) -> impl Iterator<Item = u32> + '_ {
        self.pending_delete.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_store::{ClusterId, MaxConnectedClusters};
    use chrono::TimeZone;

    const GRACE: Duration = Duration::from_secs(600);

    /// A fake clock: `t(s)` is `s` seconds after a fixed epoch.
    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).single().expect("valid timestamp")
    }

    fn labels(app: &str) -> LabelSet {
        LabelSet::parse(&format!("k8s:app={app};k8s:io.cilium.k8s.policy.cluster=east;")).expect("labels")
    }

    fn east() -> IdentityRange {
        ClusterId::new(1, MaxConnectedClusters::C255).expect("id").identity_range(MaxConnectedClusters::C255)
    }

    #[test]
    fn same_labels_same_id_and_first_id_skips_range_base() {
        let mut a = IdentityAllocator::new(east(), GRACE);
        let x = a.acquire(&labels("cart"), t(0)).unwrap();
        assert_eq!(x, Allocated { id: 65537, newly_created: true });
        let again = a.acquire(&labels("cart"), t(1)).unwrap();
        assert_eq!(again, Allocated { id: 65537, newly_created: false });
        let y = a.acquire(&labels("web"), t(2)).unwrap();
        assert_eq!(y.id, 65538);
        assert_eq!(a.refs(65537), 2);
        assert_eq!(a.labels_of(65538), Some(&labels("web")));
    }

    #[test]
    fn refcounts_and_gc_only_after_grace() {
        let mut a = IdentityAllocator::new(east(), GRACE);
        let id = a.acquire(&labels("cart"), t(0)).unwrap().id;
        a.acquire(&labels("cart"), t(0)).unwrap();
        assert_eq!(a.release(&labels("cart"), t(10)).unwrap(), Released { id, remaining: 1 });
        assert!(a.collect_garbage(t(10_000)).is_empty(), "still one user");
        assert_eq!(a.release(&labels("cart"), t(100)).unwrap(), Released { id, remaining: 0 });
        assert!(a.release(&labels("cart"), t(100)).is_err(), "no user left to release");
        assert!(a.collect_garbage(t(100 + 600)).is_empty(), "exactly at grace is not past it");
        // Re-acquire within grace: same ID, grace cancelled.
        assert_eq!(a.acquire(&labels("cart"), t(650)).unwrap(), Allocated { id, newly_created: false });
        a.release(&labels("cart"), t(700)).unwrap();
        assert!(a.collect_garbage(t(1300)).is_empty());
        assert_eq!(a.collect_garbage(t(1301)), vec![id]);
        assert_eq!(a.get(&labels("cart")), None);
    }

    #[test]
    fn collected_id_is_not_reused_until_deletion_is_confirmed() {
        let range = IdentityRange { first: 100, last: 102 }; // allocatable: 101, 102
        let mut a = IdentityAllocator::new(range, GRACE);
        let old = a.acquire(&labels("a"), t(0)).unwrap().id;
        a.acquire(&labels("b"), t(0)).unwrap();
        a.release(&labels("a"), t(0)).unwrap();
        assert_eq!(a.collect_garbage(t(601)), vec![old]);
        // The number awaits deletion, so even a full range does not hand it out.
        let err = a.acquire(&labels("c"), t(602)).unwrap_err();
        assert_eq!(err, AllocError::Exhausted { first: 101, last: 102, live: 1, pending: 1 });
        // Deletion failed: the next pass returns it again.
        assert_eq!(a.collect_garbage(t(700)), vec![old]);
        a.confirm_deleted(old);
        assert_eq!(a.acquire(&labels("c"), t(701)).unwrap(), Allocated { id: old, newly_created: true });
    }

    #[test]
    fn live_ids_are_never_reused_and_cursor_moves_forward() {
        let mut a = IdentityAllocator::new(IdentityRange { first: 100, last: 110 }, GRACE);
        let ids: Vec<u32> = (0..5).map(|i| a.acquire(&labels(&format!("p{i}")), t(0)).unwrap().id).collect();
        assert_eq!(ids, vec![101, 102, 103, 104, 105]);
        a.release(&labels("p1"), t(0)).unwrap();
        a.collect_garbage(t(601));
        a.confirm_deleted(102);
        // The freed 102 is not reused first; the cursor continues.
        assert_eq!(a.acquire(&labels("new"), t(602)).unwrap().id, 106);
        let mut seen: BTreeSet<u32> = a.live().map(|(id, _)| id).collect();
        for i in 0..5 {
            let id = a.acquire(&labels(&format!("more{i}")), t(603)).unwrap().id;
            assert!(seen.insert(id), "{id} handed out twice");
        }
        assert!(seen.contains(&102), "after wrapping, the freed number is used again");
    }

    #[test]
    fn exhaustion_names_the_range() {
        let mut a = IdentityAllocator::new(IdentityRange { first: 200, last: 203 }, GRACE);
        for i in 0..3 {
            a.acquire(&labels(&format!("p{i}")), t(0)).unwrap();
        }
        let err = a.acquire(&labels("one-too-many"), t(0)).unwrap_err();
        assert!(err.to_string().contains("201..=203 is exhausted"), "{err}");
        // Existing label sets still work when the range is full.
        assert_eq!(a.acquire(&labels("p0"), t(0)).unwrap().id, 201);
    }

    #[test]
    fn restore_after_restart_keeps_ids() {
        let mut before = IdentityAllocator::new(east(), GRACE);
        let cart = before.acquire(&labels("cart"), t(0)).unwrap().id;
        let web = before.acquire(&labels("web"), t(0)).unwrap().id;
        let persisted: Vec<(u32, LabelSet)> = before.live().map(|(id, l)| (id, l.clone())).collect();

        let mut after = IdentityAllocator::new(east(), GRACE);
        let report = after.restore(persisted, t(5000));
        assert_eq!(report.restored, vec![cart, web]);
        assert_eq!(after.acquire(&labels("web"), t(5001)).unwrap(), Allocated { id: web, newly_created: false });
        // New labels continue after the restored IDs.
        assert_eq!(after.acquire(&labels("api"), t(5001)).unwrap().id, web + 1);
        // Restored but unclaimed: a full grace period from the restart, then garbage.
        assert!(after.collect_garbage(t(5600)).is_empty());
        assert_eq!(after.collect_garbage(t(5601)), vec![cart]);
    }

    #[test]
    fn restore_ignores_foreign_ids_and_queues_duplicates() {
        let mut a = IdentityAllocator::new(east(), GRACE);
        let report = a.restore(
            [
                (65536, labels("base")),        // the range base value is never an identity
                (131072, labels("west-range")), // cluster 2's range
                (65540, labels("cart")),
                (65539, labels("cart")),
            ],
            t(0),
        );
        assert_eq!(report.restored, vec![65539]);
        assert_eq!(report.out_of_range, vec![65536, 131072]);
        assert_eq!(report.duplicates, vec![65540]);
        assert_eq!(a.collect_garbage(t(1)), vec![65540], "duplicates go straight to deletion");
        assert!(a.acquire(&labels("x"), t(1)).unwrap().id != 65540);
    }

    #[test]
    fn abort_and_insert_existing_route_around_a_taken_id() {
        let mut a = IdentityAllocator::new(east(), GRACE);
        let first = a.acquire(&labels("cart"), t(0)).unwrap();
        // Persisting failed: the object already exists with other labels.
        a.abort(&labels("cart"), first.id);
        a.insert_existing(first.id, labels("someone-else"), t(0));
        let second = a.acquire(&labels("cart"), t(0)).unwrap();
        assert!(second.newly_created && second.id != first.id);
        assert_eq!(a.get(&labels("someone-else")), Some(first.id));
        a.block(65600);
        assert!(a.collect_garbage(t(0)).contains(&65600));
    }
}
