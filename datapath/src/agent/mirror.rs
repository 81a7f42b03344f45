//! The client side of a resumable snapshot + delta stream (MeshView.Watch and EgressAssignments.Watch share the
//! protocol), as a sans-IO state machine over decoded events.
//!
//! The mirror keeps the last committed view and the (epoch, revision) it corresponds to. A snapshot is collected
//! aside and replaces the view only at SNAPSHOT_END, so a reconnect never shows the planner a half-empty view (which
//! would delete map entries and drop traffic). The server signals "your resume point is gone" by simply starting a
//! fresh snapshot; the mirror handles a SNAPSHOT_BEGIN at any time the same way.
//!
//! Protocol violations (a gap in revisions, a delta from another epoch, a delta before any snapshot) are errors: the
//! caller drops the connection and resumes from [`Mirror::resume_point`], and the server either replays what was
//! missed or sends a snapshot. Nothing is applied from an event that violates the protocol.

use std::collections::BTreeMap;

use thiserror::Error;

/// The framing kinds shared by both streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    SnapshotBegin,
    SnapshotEnd,
    Upsert,
    Delete,
}

impl EventKind {
    /// From the proto enum value (identical numbering in mesh.proto and egress.proto).
    pub fn from_wire(v: i32) -> Option<EventKind> {
        match v {
            1 => Some(EventKind::SnapshotBegin),
            2 => Some(EventKind::SnapshotEnd),
            3 => Some(EventKind::Upsert),
            4 => Some(EventKind::Delete),
            _ => None,
        }
    }
}

/// What an event does to one object once decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Item<K, V> {
    Upsert(K, V),
    Delete(K),
    /// Nothing usable (no key could be read); the event still advances the revision.
    Nothing,
}

/// A decoded event. `rejects` lists what was wrong with the object, for logs and the rejected-input metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded<K, V> {
    pub kind: EventKind,
    pub revision: u64,
    pub epoch: u64,
    pub item: Item<K, V>,
    pub rejects: Vec<Reject>,
}

/// One piece of input the agent could not use. Bad input never stops the stream: the object (or the bad field of
/// it) is left out, and this says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Object kind ("ipcache", "node", "policy", ...).
    pub object: &'static str,
    /// Short machine-readable reason (a metric label).
    pub reason: &'static str,
    /// Human detail: which object, which value.
    pub detail: String,
}

impl Reject {
    pub fn new(object: &'static str, reason: &'static str, detail: impl Into<String>) -> Self {
        Reject { object, reason, detail: detail.into() }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("event kind {0} is not known to this agent")]
    UnknownKind(i32),
    #[error("a {0:?} event arrived before the first snapshot")]
    BeforeSnapshot(EventKind),
    #[error("a delta of epoch {got} arrived while the view is of epoch {have}; the server restarted")]
    EpochChanged { have: u64, got: u64 },
    #[error("revision jumped from {have} to {got}; deltas were missed")]
    Gap { have: u64, got: u64 },
    #[error("event at revision {got} inside a snapshot of revision {snapshot}")]
    SnapshotRevision { snapshot: u64, got: u64 },
    #[error("SNAPSHOT_END without SNAPSHOT_BEGIN")]
    EndWithoutBegin,
}

/// Result of applying one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The committed view changed.
    Changed,
    /// Nothing changed (a duplicate, an unchanged upsert, or a snapshot equal to the view).
    Unchanged,
    /// Collected into a snapshot in progress.
    Buffered,
}

struct Pending<K, V> {
    epoch: u64,
    revision: u64,
    objects: BTreeMap<K, V>,
}

/// The committed view of one stream.
pub struct Mirror<K, V> {
    view: BTreeMap<K, V>,
    epoch: u64,
    revision: u64,
    synced: bool,
    pending: Option<Pending<K, V>>,
}

impl<K: Ord + Clone, V: PartialEq> Default for Mirror<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Ord + Clone, V: PartialEq> Mirror<K, V> {
    pub fn new() -> Self {
        Mirror { view: BTreeMap::new(), epoch: 0, revision: 0, synced: false, pending: None }
    }

    /// The committed view.
    pub fn view(&self) -> &BTreeMap<K, V> {
        &self.view
    }

    /// True once a snapshot was committed: only then may the agent program anything from this stream.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// (epoch, revision) to put in the next Watch request; (0, 0) asks for a snapshot.
    pub fn resume_point(&self) -> (u64, u64) {
        if self.synced {
            (self.epoch, self.revision)
        } else {
            (0, 0)
        }
    }

    /// The connection ended: a half-received snapshot is useless (the next connection starts over).
    pub fn disconnected(&mut self) {
        self.pending = None;
    }

    pub fn apply(&mut self, ev: Decoded<K, V>) -> Result<Applied, StreamError> {
        match ev.kind {
            EventKind::SnapshotBegin => {
                self.pending = Some(Pending { epoch: ev.epoch, revision: ev.revision, objects: BTreeMap::new() });
                Ok(Applied::Buffered)
            }
            EventKind::SnapshotEnd => {
                let p = self.pending.take().ok_or(StreamError::EndWithoutBegin)?;
                if p.revision != ev.revision || p.epoch != ev.epoch {
                    return Err(StreamError::SnapshotRevision { snapshot: p.revision, got: ev.revision });
                }
                let changed = !self.synced || p.objects != self.view;
                self.view = p.objects;
                self.epoch = p.epoch;
                self.revision = p.revision;
                self.synced = true;
                Ok(if changed { Applied::Changed } else { Applied::Unchanged })
            }
            EventKind::Upsert | EventKind::Delete => {
                if let Some(p) = &mut self.pending {
                    if ev.revision != p.revision || ev.epoch != p.epoch {
                        let snapshot = p.revision;
                        self.pending = None;
                        return Err(StreamError::SnapshotRevision { snapshot, got: ev.revision });
                    }
                    apply_item(&mut p.objects, ev.item);
                    return Ok(Applied::Buffered);
                }
                if !self.synced {
                    return Err(StreamError::BeforeSnapshot(ev.kind));
                }
                if ev.epoch != self.epoch {
                    return Err(StreamError::EpochChanged { have: self.epoch, got: ev.epoch });
                }
                if ev.revision <= self.revision {
                    // Already applied (a replay overlapping what we had); applying again is harmless but pointless.
                    return Ok(Applied::Unchanged);
                }
                if ev.revision != self.revision + 1 {
                    return Err(StreamError::Gap { have: self.revision, got: ev.revision });
                }
                self.revision = ev.revision;
                Ok(if apply_item(&mut self.view, ev.item) { Applied::Changed } else { Applied::Unchanged })
            }
        }
    }
}

/// Returns whether the map changed.
fn apply_item<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, item: Item<K, V>) -> bool {
    match item {
        Item::Upsert(k, v) => match map.get(&k) {
            Some(old) if *old == v => false,
            _ => {
                map.insert(k, v);
                true
            }
        },
        Item::Delete(k) => map.remove(&k).is_some(),
        Item::Nothing => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, revision: u64, epoch: u64, item: Item<u32, &'static str>) -> Decoded<u32, &'static str> {
        Decoded { kind, revision, epoch, item, rejects: vec![] }
    }

    fn snapshot(m: &mut Mirror<u32, &'static str>, rev: u64, epoch: u64, objs: &[(u32, &'static str)]) -> Applied {
        assert_eq!(m.apply(ev(EventKind::SnapshotBegin, rev, epoch, Item::Nothing)), Ok(Applied::Buffered));
        for (k, v) in objs {
            assert_eq!(m.apply(ev(EventKind::Upsert, rev, epoch, Item::Upsert(*k, v))), Ok(Applied::Buffered));
        }
        m.apply(ev(EventKind::SnapshotEnd, rev, epoch, Item::Nothing)).expect("snapshot end")
    }

    #[test]
    fn snapshot_replaces_view_only_at_end() {
        let mut m = Mirror::new();
        assert_eq!(m.resume_point(), (0, 0));
        assert_eq!(snapshot(&mut m, 5, 7, &[(1, "a"), (2, "b")]), Applied::Changed);
        assert_eq!(m.resume_point(), (7, 5));
        // A second snapshot (the server lost our resume point): the old view stays visible until its end.
        m.apply(ev(EventKind::SnapshotBegin, 9, 7, Item::Nothing)).unwrap();
        m.apply(ev(EventKind::Upsert, 9, 7, Item::Upsert(2, "b"))).unwrap();
        assert_eq!(m.view().len(), 2, "half a snapshot is not committed");
        m.apply(ev(EventKind::SnapshotEnd, 9, 7, Item::Nothing)).unwrap();
        assert_eq!(m.view().keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(m.resume_point(), (7, 9));
        // The same content again is no change.
        assert_eq!(snapshot(&mut m, 10, 7, &[(2, "b")]), Applied::Unchanged);
    }

    #[test]
    fn deltas_apply_in_order_and_duplicates_are_ignored() {
        let mut m = Mirror::new();
        snapshot(&mut m, 3, 1, &[(1, "a")]);
        assert_eq!(m.apply(ev(EventKind::Upsert, 4, 1, Item::Upsert(2, "b"))), Ok(Applied::Changed));
        assert_eq!(m.apply(ev(EventKind::Upsert, 4, 1, Item::Upsert(2, "b"))), Ok(Applied::Unchanged));
        assert_eq!(m.apply(ev(EventKind::Upsert, 5, 1, Item::Upsert(2, "b"))), Ok(Applied::Unchanged));
        assert_eq!(m.apply(ev(EventKind::Delete, 6, 1, Item::Delete(1))), Ok(Applied::Changed));
        assert_eq!(m.apply(ev(EventKind::Delete, 7, 1, Item::Delete(1))), Ok(Applied::Unchanged));
        assert_eq!(m.resume_point(), (1, 7));
        assert_eq!(m.view().get(&2), Some(&"b"));
    }

    #[test]
    fn protocol_violations_are_errors_and_change_nothing() {
        let mut m: Mirror<u32, &'static str> = Mirror::new();
        assert_eq!(
            m.apply(ev(EventKind::Upsert, 1, 1, Item::Upsert(1, "a"))),
            Err(StreamError::BeforeSnapshot(EventKind::Upsert))
        );
        assert_eq!(m.apply(ev(EventKind::SnapshotEnd, 1, 1, Item::Nothing)), Err(StreamError::EndWithoutBegin));
        snapshot(&mut m, 3, 1, &[(1, "a")]);
        assert_eq!(
            m.apply(ev(EventKind::Upsert, 5, 1, Item::Upsert(2, "b"))),
            Err(StreamError::Gap { have: 3, got: 5 })
        );
        assert_eq!(
            m.apply(ev(EventKind::Upsert, 4, 2, Item::Upsert(2, "b"))),
            Err(StreamError::EpochChanged { have: 1, got: 2 })
        );
        // Inside a snapshot, an event of another revision aborts the snapshot.
        m.apply(ev(EventKind::SnapshotBegin, 8, 1, Item::Nothing)).unwrap();
        assert!(m.apply(ev(EventKind::Upsert, 9, 1, Item::Upsert(3, "c"))).is_err());
        assert_eq!(m.apply(ev(EventKind::SnapshotEnd, 8, 1, Item::Nothing)), Err(StreamError::EndWithoutBegin));
        assert_eq!(m.view().len(), 1);
        assert_eq!(m.resume_point(), (1, 3));
    }

    #[test]
    fn a_disconnect_mid_snapshot_keeps_the_old_view() {
        let mut m = Mirror::new();
        snapshot(&mut m, 3, 1, &[(1, "a")]);
        m.apply(ev(EventKind::SnapshotBegin, 9, 2, Item::Nothing)).unwrap();
        m.disconnected();
        assert_eq!(m.resume_point(), (1, 3));
        assert_eq!(m.view().get(&1), Some(&"a"));
        assert_eq!(EventKind::from_wire(0), None);
        assert_eq!(EventKind::from_wire(4), Some(EventKind::Delete));
    }
}
