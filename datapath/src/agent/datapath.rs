//! The adapter boundary: what the agent needs from a datapath, in domain types.
//!
//! The real implementation (over the pinned aya maps, boringtun's UAPI and netlink routes) converts these types to
//! the maps' `#[repr(C)]` keys and values; [`InMemoryDatapath`] is the reference used by tests and `--dry-run`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use super::gc::{CtEntry, CtKey};
use super::model::{MapContents, MapKind};
use super::plan::Op;

/// Why the datapath dropped packets (the `reason` label of the drop metric). The same reasons, and labels, as the
/// BPF programs' drop counters (`enum cw_drop_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Short, truncated or otherwise malformed packet.
    Malformed,
    /// Denied by the identity policy map.
    PolicyDenied,
    /// An egress policy matched but its group has no gateway (or none for the packet's family).
    NoGateway,
    /// No free SNAT port toward the destination.
    SnatPortsExhausted,
    /// A reply or later packet with no SNAT state.
    SnatNoState,
    /// The tunnel could not take the packet.
    TunnelError,
    /// An L4 protocol the SNAT path does not handle.
    UnsupportedL4,
    /// Any other code the programs report.
    Other(u32),
}

impl DropReason {
    pub fn label(&self) -> String {
        match self {
            DropReason::Malformed => "malformed".into(),
            DropReason::PolicyDenied => "policy_denied".into(),
            DropReason::NoGateway => "no_gateway".into(),
            DropReason::SnatPortsExhausted => "snat_ports_exhausted".into(),
            DropReason::SnatNoState => "snat_no_state".into(),
            DropReason::TunnelError => "tunnel_error".into(),
            DropReason::UnsupportedL4 => "unsupported_l4".into(),
            DropReason::Other(c) => format!("code_{c}"),
        }
    }
}

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("{op} on the {map} map failed: {source}")]
    Op {
        map: &'static str,
        op: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the programmed state failed: {source}")]
    Read {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the agent drives. Methods are synchronous: map updates are single syscalls.
pub trait Datapath: Send {
    /// Everything currently programmed (read back from the pinned maps after a restart).
    fn read_programmed(&mut self) -> Result<MapContents, DatapathError>;
    /// Carries out one op. Must be idempotent (an upsert of the present value, a delete of an absent key: Ok).
    fn apply(&mut self, op: &Op) -> Result<(), DatapathError>;
    /// Cumulative drop counters since the programs were loaded.
    fn drop_counters(&mut self) -> Result<BTreeMap<DropReason, u64>, DatapathError>;
    /// Conntrack (and SNAT) entries, for GC and port accounting.
    fn conntrack(&mut self) -> Result<Vec<CtEntry>, DatapathError>;
    /// Deletes entries; returns how many were present.
    fn delete_conntrack(&mut self, keys: &[CtKey]) -> Result<usize, DatapathError>;
    /// Now, on the clock the datapath stamps `last_seen_ns` with (CLOCK_MONOTONIC for BPF's `bpf_ktime_get_ns`).
    fn now_ns(&self) -> u64;
}

#[derive(Debug, Default)]
struct Inner {
    maps: MapContents,
    conntrack: Vec<CtEntry>,
    drops: BTreeMap<DropReason, u64>,
    now_ns: u64,
    ops_applied: u64,
    /// Fail every op after this many more succeed (tests of partial application).
    fail_after: Option<u64>,
}

/// An in-memory datapath. Clones share state, so a test can hold one while the agent drives another.
#[derive(Debug, Clone, Default)]
pub struct InMemoryDatapath {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Error)]
#[error("injected failure")]
struct Injected;

impl InMemoryDatapath {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from `maps`, as if they were pinned by a previous agent.
    pub fn with_contents(maps: MapContents) -> Self {
        let d = Self::default();
        d.lock().maps = maps;
        d
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contents(&self) -> MapContents {
        self.lock().maps.clone()
    }

    pub fn ops_applied(&self) -> u64 {
        self.lock().ops_applied
    }

    pub fn set_now_ns(&self, now: u64) {
        self.lock().now_ns = now;
    }

    pub fn set_conntrack(&self, entries: Vec<CtEntry>) {
        self.lock().conntrack = entries;
    }

    pub fn add_drops(&self, reason: DropReason, n: u64) {
        *self.lock().drops.entry(reason).or_default() += n;
    }

    /// After `n` more successful ops, every op fails until [`InMemoryDatapath::heal`].
    pub fn fail_after(&self, n: u64) {
        self.lock().fail_after = Some(n);
    }

    pub fn heal(&self) {
        self.lock().fail_after = None;
    }
}

impl Datapath for InMemoryDatapath {
    fn read_programmed(&mut self) -> Result<MapContents, DatapathError> {
        Ok(self.contents())
    }

    fn apply(&mut self, op: &Op) -> Result<(), DatapathError> {
        let mut g = self.lock();
        if let Some(n) = g.fail_after.as_mut() {
            if *n == 0 {
                return Err(DatapathError::Op {
                    map: map_name(op.map()),
                    op: format!("{op:?}"),
                    source: Box::new(Injected),
                });
            }
            *n -= 1;
        }
        op.apply_to(&mut g.maps);
        g.ops_applied += 1;
        Ok(())
    }

    fn drop_counters(&mut self) -> Result<BTreeMap<DropReason, u64>, DatapathError> {
        Ok(self.lock().drops.clone())
    }

    fn conntrack(&mut self) -> Result<Vec<CtEntry>, DatapathError> {
        Ok(self.lock().conntrack.clone())
    }

    fn delete_conntrack(&mut self, keys: &[CtKey]) -> Result<usize, DatapathError> {
        let mut g = self.lock();
        let before = g.conntrack.len();
        g.conntrack.retain(|e| !keys.contains(&e.key()));
        Ok(before - g.conntrack.len())
    }

    fn now_ns(&self) -> u64 {
        self.lock().now_ns
    }
}

fn map_name(m: MapKind) -> &'static str {
    m.as_str()
}
