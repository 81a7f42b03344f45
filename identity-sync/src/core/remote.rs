//! Per-remote state and status, as shown by `/status` and metrics.

use std::collections::BTreeMap;
use std::time::Instant;

use causeway_store::Kind;

/// Where a remote is in its life cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteState {
    /// Configured; no connection yet.
    Connecting,
    /// Connected; waiting for (or validating) the remote's cluster config.
    WaitingForConfig,
    /// Config accepted; waiting for the remote's "synced" canaries before watching.
    WaitingForCanaries,
    /// Listing: at least one kind's initial (or post-reconnect) list is not complete.
    Syncing,
    /// Every kind has been listed since the last (re)connect.
    Synced,
    /// Connection lost at `since`; entries are kept (until the cache TTL, if one is set).
    Disconnected { since: Instant },
    /// The remote's config was refused; its entries were drained.
    Rejected { reason: String },
}

impl RemoteState {
    /// Short name for metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            RemoteState::Connecting => "connecting",
            RemoteState::WaitingForConfig => "waiting_for_config",
            RemoteState::WaitingForCanaries => "waiting_for_canaries",
            RemoteState::Syncing => "syncing",
            RemoteState::Synced => "synced",
            RemoteState::Disconnected { .. } => "disconnected",
            RemoteState::Rejected { .. } => "rejected",
        }
    }
}

/// Entries a remote contributes, per kind (including ones hidden behind another remote's claim on the same IP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts {
    pub services: u64,
    pub nodes: u64,
    pub ipcache: u64,
    pub identities: u64,
}

impl KindCounts {
    pub fn get(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Services => self.services,
            Kind::Nodes => self.nodes,
            Kind::Ip => self.ipcache,
            Kind::Identities => self.identities,
            Kind::ServiceExports => 0,
        }
    }

    pub(crate) fn slot(&mut self, kind: KindIdx) -> &mut u64 {
        match kind {
            KindIdx::Services => &mut self.services,
            KindIdx::Nodes => &mut self.nodes,
            KindIdx::Ip => &mut self.ipcache,
            KindIdx::Identities => &mut self.identities,
        }
    }

    pub fn total(&self) -> u64 {
        self.services + self.nodes + self.ipcache + self.identities
    }
}

/// What status and metrics show for one remote.
#[derive(Debug, Clone)]
pub struct RemoteStatus {
    pub state: RemoteState,
    pub entries: KindCounts,
    /// Last problem seen with this remote (a refused value or config), for humans.
    pub last_error: Option<String>,
    /// Refused values, by [`causeway_store::Rejected::reason`].
    pub bad_values: BTreeMap<&'static str, u64>,
    /// Entries whose latest value was refused and which still hold their last good value.
    pub suspect_entries: u64,
    /// True once the cache TTL revoked the entries of this (disconnected) remote.
    pub revoked: bool,
}

impl RemoteStatus {
    pub(crate) fn new() -> Self {
        RemoteStatus {
            state: RemoteState::Connecting,
            entries: KindCounts::default(),
            last_error: None,
            bad_values: BTreeMap::new(),
            suspect_entries: 0,
            revoked: false,
        }
    }
}

/// The kinds the merged view holds, as a dense index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KindIdx {
    Services = 0,
    Nodes = 1,
    Ip = 2,
    Identities = 3,
}

impl KindIdx {
    pub(crate) const ALL: [KindIdx; 4] = [KindIdx::Services, KindIdx::Nodes, KindIdx::Ip, KindIdx::Identities];

    pub(crate) fn of(kind: Kind) -> Option<KindIdx> {
        match kind {
            Kind::Services => Some(KindIdx::Services),
            Kind::Nodes => Some(KindIdx::Nodes),
            Kind::Ip => Some(KindIdx::Ip),
            Kind::Identities => Some(KindIdx::Identities),
            // Service exports feed the MCS adapter, not this view.
            Kind::ServiceExports => None,
        }
    }
}
