//! The agent's state machine: stream events in, datapath ops out. No I/O of its own; the caller feeds it events
//! and hands it a [`Datapath`] to reconcile into.
//!
//! It refuses to program anything until every enabled stream has delivered its first snapshot: an agent that
//! restarted with pinned maps full of live entries must not plan against an empty view, which would delete them.

use std::collections::BTreeMap;

use causeway_api::v1 as pb;
use tracing::{debug, info, warn};

use super::assignments::{self, EgressMirror};
use super::classes::EgressIds;
use super::datapath::{Datapath, DatapathError};
use super::desired::{DesiredState, Inputs, LocalNode};
use super::gc::{GcPolicy, SnatUsage};
use super::mesh::{self, MeshMirror};
use super::mirror::{Applied, Decoded, Mirror, Reject, StreamError};
use super::model::{MapContents, MapKind, PolicyKey, PolicyVerdict};
use super::plan::{plan, Op};

/// Which input stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StreamKind {
    Mesh,
    Egress,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Mesh => "meshview",
            StreamKind::Egress => "egress",
        }
    }
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// (map, is_removal) → ops applied.
    pub applied: BTreeMap<(MapKind, bool), u64>,
    /// Entries per map after the reconcile.
    pub sizes: BTreeMap<MapKind, usize>,
    pub conflicts: Vec<Reject>,
    pub egress_classes: usize,
}

impl ReconcileReport {
    pub fn total_ops(&self) -> u64 {
        self.applied.values().sum()
    }
}

/// What one GC pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub scanned: usize,
    pub deleted: usize,
    pub snat: SnatUsage,
}

pub struct AgentCore {
    local: LocalNode,
    mesh: MeshMirror,
    egress: EgressMirror,
    mesh_enabled: bool,
    egress_enabled: bool,
    identity_policy: BTreeMap<PolicyKey, PolicyVerdict>,
    ids: EgressIds,
    /// What the datapath holds, as far as we know; `None` after a failure or at start: read it back first.
    programmed: Option<MapContents>,
    dirty: bool,
    rejects: BTreeMap<(StreamKind, &'static str), u64>,
}

impl AgentCore {
    /// `egress_enabled`: wait for the egress stream's snapshot too before programming. The mesh stream is enabled.
    pub fn new(local: LocalNode, egress_enabled: bool) -> Self {
        Self::with_streams(local, true, egress_enabled)
    }

    /// Chooses which streams must deliver a snapshot before programming. An egress-only node (a gateway outside the
    /// mesh, no identity-sync) runs with `mesh_enabled == false`: its mesh view stays empty, and that empty view is
    /// the truth rather than "not known yet".
    pub fn with_streams(local: LocalNode, mesh_enabled: bool, egress_enabled: bool) -> Self {
        AgentCore {
            local,
            mesh: Mirror::new(),
            egress: Mirror::new(),
            mesh_enabled,
            egress_enabled,
            identity_policy: BTreeMap::new(),
            ids: EgressIds::default(),
            programmed: None,
            dirty: true,
            rejects: BTreeMap::new(),
        }
    }

    pub fn local(&self) -> &LocalNode {
        &self.local
    }

    pub fn mesh(&self) -> &MeshMirror {
        &self.mesh
    }

    pub fn egress(&self) -> &EgressMirror {
        &self.egress
    }

    /// (epoch, revision) to resume `stream` from.
    pub fn resume_point(&self, stream: StreamKind) -> (u64, u64) {
        match stream {
            StreamKind::Mesh => self.mesh.resume_point(),
            StreamKind::Egress => self.egress.resume_point(),
        }
    }

    /// Inputs that could not be used, by stream and reason (cumulative).
    pub fn rejects(&self) -> &BTreeMap<(StreamKind, &'static str), u64> {
        &self.rejects
    }

    /// True once every enabled stream has delivered a snapshot.
    pub fn ready_to_program(&self) -> bool {
        (!self.mesh_enabled || self.mesh.synced()) && (!self.egress_enabled || self.egress.synced())
    }

    /// True when the next [`AgentCore::reconcile`] has work to do.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// Sets the identity policy map's desired content (the cross-cluster policy work's output).
    pub fn set_identity_policy(&mut self, p: BTreeMap<PolicyKey, PolicyVerdict>) {
        if p != self.identity_policy {
            self.identity_policy = p;
            self.dirty = true;
        }
    }

    pub fn on_mesh_event(&mut self, ev: &pb::WatchEvent) -> Result<Applied, StreamError> {
        let d = mesh::decode(ev)?;
        self.apply(StreamKind::Mesh, d, |s| &mut s.mesh)
    }

    pub fn on_egress_event(&mut self, ev: &pb::EgressWatchEvent) -> Result<Applied, StreamError> {
        let d = assignments::decode(ev)?;
        self.apply(StreamKind::Egress, d, |s| &mut s.egress)
    }

    fn apply<K: Ord + Clone, V: PartialEq>(
        &mut self,
        stream: StreamKind,
        d: Decoded<K, V>,
        mirror: impl FnOnce(&mut Self) -> &mut Mirror<K, V>,
    ) -> Result<Applied, StreamError> {
        for r in &d.rejects {
            warn!(stream = stream.as_str(), object = r.object, reason = r.reason, detail = %r.detail, "input left out");
            *self.rejects.entry((stream, r.reason)).or_default() += 1;
        }
        let kind = d.kind;
        let revision = d.revision;
        let applied = mirror(self).apply(d).inspect_err(|e| {
            warn!(stream = stream.as_str(), error = %e, "stream protocol error; reconnecting");
        })?;
        if applied == Applied::Changed {
            self.dirty = true;
        }
        if matches!(kind, super::mirror::EventKind::SnapshotEnd) {
            info!(stream = stream.as_str(), revision, "snapshot received");
        }
        Ok(applied)
    }

    pub fn on_disconnected(&mut self, stream: StreamKind) {
        match stream {
            StreamKind::Mesh => self.mesh.disconnected(),
            StreamKind::Egress => self.egress.disconnected(),
        }
    }

    /// Forget what we believe is programmed; the next reconcile reads it back (after a datapath error).
    pub fn invalidate(&mut self) {
        self.programmed = None;
        self.dirty = true;
    }

    /// Computes the desired state and applies the difference. Does nothing before every stream is synced or when
    /// nothing changed. On an op failure the ops before it stay applied, and the next call reads the datapath back
    /// and plans again from what is really there.
    pub fn reconcile(&mut self, dp: &mut dyn Datapath) -> Result<ReconcileReport, DatapathError> {
        if !self.ready_to_program() || !self.dirty {
            return Ok(ReconcileReport::default());
        }
        let current = match self.programmed.take() {
            Some(c) => c,
            None => {
                let c = dp.read_programmed()?;
                info!(
                    ipcache = c.ipcache.len(),
                    egress_src = c.egress_src.len(),
                    wg_peers = c.wg_peers.len(),
                    "read back the programmed datapath state"
                );
                c
            }
        };
        let inputs = Inputs {
            mesh: self.mesh.view(),
            egress: self.egress.view(),
            identity_policy: &self.identity_policy,
            local: &self.local,
        };
        let desired = DesiredState::compute(&inputs, &mut self.ids, &current);
        for c in &desired.conflicts {
            debug!(object = c.object, reason = c.reason, detail = %c.detail, "conflicting input resolved");
        }
        let ops = plan(&current, &desired.maps);
        let mut report =
            ReconcileReport { conflicts: desired.conflicts, egress_classes: self.ids.classes(), ..Default::default() };
        let mut now = current;
        for op in &ops {
            if let Err(e) = dp.apply(op) {
                warn!(error = %e, "datapath op failed; will read the datapath back and retry");
                // `now` holds what did get applied, but the failed op may have half-happened: re-read next time.
                self.programmed = None;
                self.dirty = true;
                return Err(e);
            }
            op.apply_to(&mut now);
            *report.applied.entry((op.map(), op.is_removal())).or_default() += 1;
        }
        debug_assert_eq!(now, desired.maps);
        if !ops.is_empty() {
            info!(ops = ops.len(), "datapath reconciled");
        }
        report.sizes = MapKind::ALL.iter().map(|m| (*m, now.len(*m))).collect();
        self.programmed = Some(now);
        self.dirty = false;
        Ok(report)
    }

    /// The ops a reconcile would apply now, without applying them (for `--dry-run` logs and tests).
    pub fn preview(&mut self, current: &MapContents) -> Vec<Op> {
        let inputs = Inputs {
            mesh: self.mesh.view(),
            egress: self.egress.view(),
            identity_policy: &self.identity_policy,
            local: &self.local,
        };
        let mut ids = self.ids.clone();
        plan(current, &DesiredState::compute(&inputs, &mut ids, current).maps)
    }

    /// One conntrack GC pass, plus SNAT port accounting over what survives.
    pub fn gc(&mut self, dp: &mut dyn Datapath, policy: &GcPolicy) -> Result<GcReport, DatapathError> {
        let now = dp.now_ns();
        let entries = dp.conntrack()?;
        let expired = policy.sweep(&entries, now);
        let deleted = if expired.is_empty() { 0 } else { dp.delete_conntrack(&expired)? };
        let gone: std::collections::HashSet<_> = expired.into_iter().collect();
        let live = entries.iter().filter(|e| !gone.contains(&e.key()));
        Ok(GcReport { scanned: entries.len(), deleted, snat: SnatUsage::from_entries(live) })
    }
}

#[cfg(test)]
mod tests;
