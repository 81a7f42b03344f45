//! The write gate: one switch that pauses every lease-attached write of a writer while its
//! etcd is being re-created after a reset.
//!
//! Why: when etcd comes back empty, its users, roles, auth and the cluster config are gone
//! too. A writer that simply retried its failed puts ("lease not found") on a fresh lease
//! would put state keys into an etcd that has no cluster config yet (readers must find the
//! config first) and no auth (anyone could write). So from the moment a reset is suspected
//! until the owner's reset sequence is done, writes wait at the gate:
//!
//! * **closed** by whoever notices first: the [`crate::ResetDetector`]'s owner, or the
//!   [`crate::LeasePool`] when a lease is lost and the marker key is gone too (see
//!   [`crate::LeasePool::guard_resets`]);
//! * **opened** by the owner once its reset sequence (users and roles, auth, cluster
//!   config, fresh leases) is complete.
//!
//! Each close counts as one reset ([`WriteGate::resets`]). A [`crate::SyncStore`] that
//! passes the gate after a reset it has not handled yet re-lists its prefix and re-writes
//! everything first (the same work as [`crate::SyncStore::resync_all`]), so "resume with a
//! resync" needs no extra call from the owner.

use std::fmt;

use tokio::sync::watch;

/// The gate's state, as published to writers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateState {
    /// Writes may go out.
    pub open: bool,
    /// Bumped by every open and every close: a check-then-close can tell whether anything
    /// happened in between ([`WriteGate::close_if_unchanged`]).
    pub generation: u64,
    /// Number of closes so far: the resets writers must resync after.
    pub resets: u64,
    /// Why the gate was last closed.
    pub reason: Option<String>,
}

/// A shared open/closed switch for writes; cheap to clone (all clones are one gate).
#[derive(Clone)]
pub struct WriteGate {
    state: watch::Sender<GateState>,
}

impl fmt::Debug for WriteGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteGate").field("state", &*self.state.borrow()).finish()
    }
}

impl Default for WriteGate {
    fn default() -> Self {
        Self::new()
    }
}

impl WriteGate {
    /// An open gate that has seen no reset.
    pub fn new() -> Self {
        Self { state: watch::Sender::new(GateState { open: true, generation: 0, resets: 0, reason: None }) }
    }

    /// The current state.
    pub fn state(&self) -> GateState {
        self.state.borrow().clone()
    }

    /// Whether writes may go out now.
    pub fn is_open(&self) -> bool {
        self.state.borrow().open
    }

    /// Number of closes so far.
    pub fn resets(&self) -> u64 {
        self.state.borrow().resets
    }

    /// See [`GateState::generation`].
    pub fn generation(&self) -> u64 {
        self.state.borrow().generation
    }

    /// Closes the gate (a reset is suspected); returns false if it was closed already (the
    /// reason of the first close is kept).
    pub fn close(&self, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        self.state.send_if_modified(|s| {
            if !s.open {
                return false;
            }
            s.open = false;
            s.generation += 1;
            s.resets += 1;
            tracing::warn!(reason = %reason, "etcd writes paused until the reset sequence is done");
            s.reason = Some(reason);
            true
        })
    }

    /// Closes the gate only if nothing opened or closed it since `generation` was read; for a
    /// check (e.g. "is the marker gone?") whose answer may be outdated once it arrives.
    pub fn close_if_unchanged(&self, generation: u64, reason: impl Into<String>) -> bool {
        if self.generation() != generation {
            return false;
        }
        self.close(reason)
    }

    /// Opens the gate: the reset sequence is complete; writers resume (and resync).
    pub fn open(&self) {
        self.state.send_if_modified(|s| {
            if s.open {
                return false;
            }
            s.open = true;
            s.generation += 1;
            tracing::info!(resets = s.resets, "etcd writes resumed");
            true
        });
    }

    /// A receiver of state changes.
    pub fn subscribe(&self) -> watch::Receiver<GateState> {
        self.state.subscribe()
    }

    /// Waits until the gate is open; returns the state seen then.
    pub async fn wait_open(&self) -> GateState {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let state = rx.wait_for(|s| s.open).await.map(|s| s.clone());
        state.unwrap_or_else(|_| self.state())
    }

    /// Waits until the gate is closed; returns the reason.
    pub async fn wait_closed(&self) -> String {
        let mut rx = self.state.subscribe();
        let state = rx.wait_for(|s| !s.open).await.map(|s| s.clone());
        state.unwrap_or_else(|_| self.state()).reason.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_counts_resets_once_and_open_releases_waiters() {
        let gate = WriteGate::new();
        assert!(gate.is_open());
        let g0 = gate.generation();
        assert!(gate.close("marker gone"));
        assert!(!gate.close("again"), "a second close while closed is the same reset");
        assert_eq!(gate.resets(), 1);
        assert_eq!(gate.state().reason.as_deref(), Some("marker gone"));
        assert_eq!(gate.wait_closed().await, "marker gone");

        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_open().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "writers wait while the gate is closed");
        gate.open();
        let seen = waiter.await.expect("waiter");
        assert!(seen.open);
        assert_eq!(seen.resets, 1);
        assert!(gate.generation() > g0 + 1);
    }

    #[test]
    fn close_if_unchanged_ignores_a_stale_check() {
        let gate = WriteGate::new();
        let before = gate.generation();
        gate.close("reset");
        gate.open();
        // A check started before that reset sequence must not close the gate again.
        assert!(!gate.close_if_unchanged(before, "marker gone (stale look)"));
        assert!(gate.is_open());
        assert!(gate.close_if_unchanged(gate.generation(), "marker gone"));
        assert_eq!(gate.resets(), 2);
    }
}
