//! The merged view: every remote's validated entries plus the local global services, as one state machine.
//!
//! Inputs are method calls (remote life cycle, entries, list completion, clock ticks); outputs are the view itself,
//! a list of deltas since the last [`MergedView::take_deltas`], and per-service change revisions for the kube
//! adapter. Nothing here does I/O or reads a clock.
//!
//! Staleness uses generations rather than flags: each remote has a generation per kind, bumped when that kind is
//! re-listed (reconnect or compaction). Every claim records the generation it was last seen in; when the list
//! completes, claims from older generations are the ones that did not come back and are swept. Re-listing an
//! unchanged value only refreshes the generation, so it never produces a delta.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_store::keys::KeyError;
use causeway_store::validate::RemoteEntry;
use causeway_store::{
    ClusterName, ClusterService, IpCacheEntry, Kind, LabelSet, Node, PortConfig, Rejected, RemoteContext, StoreKey,
};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::core::local::{LocalService, LocalWorkload};
use crate::core::model::{
    Affinity, Backend, Change, ClusterBackends, Delta, Frontend, GlobalServiceView, IdentityView, IpView, NodeView,
    ObjectKey, Port, Protocol, ServiceKey, Snapshot, ViewObject,
};
use crate::core::remote::{KindIdx, RemoteState, RemoteStatus};
use crate::core::slices::{desired_slices, DesiredSlice};

/// Settings of the merged view.
#[derive(Debug, Clone, Default)]
pub struct CoreConfig {
    /// `--cache-ttl`: revoke a disconnected remote's entries after this long. `None` keeps them until the remote
    /// reconnects or is removed.
    pub cache_ttl: Option<Duration>,
    /// External-workload mode: the remote that is the home cluster (identity-sync on a VM). With no local Services
    /// to define global services, the home cluster's exported services define them instead: their frontends are
    /// the home's ClusterIPs, and the home's backends are listed whether or not it shares them with other clusters
    /// (the VM is a member of the home cluster, not a peer). `None` in a cluster.
    pub home: Option<String>,
}

#[derive(Debug, Error)]
pub enum CoreError {
    #[error("remote {0:?} is not configured (it may have just been removed)")]
    UnknownRemote(String),
    #[error("remote name {name:?} is invalid: {source}")]
    InvalidName {
        name: String,
        #[source]
        source: causeway_store::cluster::ClusterError,
    },
    #[error("remote {0:?} has no accepted cluster config; its entries are ignored until it is validated")]
    NotValidated(String),
    #[error("remote {remote:?}: cannot use key {key:?}: {source}")]
    BadKey {
        remote: String,
        key: String,
        #[source]
        source: KeyError,
    },
    #[error("remote {remote:?}: key {key:?} does not belong to this remote or is not a state entry")]
    ForeignKey { remote: String, key: String },
}

type RemoteIdx = u16;

/// One remote's claim on an object: which remote, in which list generation it was last seen, whether its latest
/// value was refused (so this is the last good one).
#[derive(Debug)]
struct Claim<T> {
    remote: RemoteIdx,
    gen: u32,
    suspect: bool,
    value: Arc<T>,
}

/// An object several remotes may claim (an IP, in practice). The primary is the one in the view; the others wait,
/// in arrival order, and the next one is promoted when the primary goes away.
#[derive(Debug)]
struct Slot<T> {
    primary: Claim<T>,
    others: Vec<Claim<T>>,
}

enum Removed<T> {
    /// A non-primary claim went; the view does not change.
    Hidden,
    /// The primary went and the next claim took its place.
    Promoted(Arc<T>),
    /// The last claim went.
    Emptied,
}

struct UpsertOutcome<T> {
    /// The primary's new value, when the visible value changed.
    visible: Option<Arc<T>>,
    new_claim: bool,
    cleared_suspect: bool,
}

impl<T: PartialEq> Slot<T> {
    fn find_mut(&mut self, r: RemoteIdx) -> Option<&mut Claim<T>> {
        if self.primary.remote == r {
            return Some(&mut self.primary);
        }
        self.others.iter_mut().find(|c| c.remote == r)
    }

    fn upsert(&mut self, r: RemoteIdx, gen: u32, value: T) -> UpsertOutcome<T> {
        let is_primary = self.primary.remote == r;
        if let Some(c) = self.find_mut(r) {
            let cleared_suspect = std::mem::replace(&mut c.suspect, false);
            c.gen = gen;
            let mut visible = None;
            if *c.value != value {
                c.value = Arc::new(value);
                if is_primary {
                    visible = Some(c.value.clone());
                }
            }
            return UpsertOutcome { visible, new_claim: false, cleared_suspect };
        }
        self.others.push(Claim { remote: r, gen, suspect: false, value: Arc::new(value) });
        UpsertOutcome { visible: None, new_claim: true, cleared_suspect: false }
    }

    /// Removes `r`'s claim if `pred` holds for it; returns what that did to the view and whether it was suspect.
    fn remove_if(&mut self, r: RemoteIdx, pred: impl Fn(&Claim<T>) -> bool) -> Option<(Removed<T>, bool)> {
        if self.primary.remote == r {
            if !pred(&self.primary) {
                return None;
            }
            let suspect = self.primary.suspect;
            if self.others.is_empty() {
                return Some((Removed::Emptied, suspect));
            }
            self.primary = self.others.remove(0);
            return Some((Removed::Promoted(self.primary.value.clone()), suspect));
        }
        let i = self.others.iter().position(|c| c.remote == r && pred(c))?;
        let c = self.others.remove(i);
        Some((Removed::Hidden, c.suspect))
    }
}

/// A remote's service value, compacted.
#[derive(Debug, PartialEq)]
struct RemoteService {
    cluster: Arc<str>,
    shared: bool,
    backends: Arc<[Backend]>,
    /// The home cluster's ClusterIPs and ports (see [`CoreConfig::home`]); `None` for every other remote, whose
    /// frontends the local Service defines.
    home_frontends: Option<Arc<[Frontend]>>,
}

#[derive(Debug, Default)]
struct ServiceSlot {
    local: Option<LocalService>,
    /// One claim per remote; no conflicts possible, the remote is part of the store key.
    remotes: Vec<Claim<RemoteService>>,
    view: Option<Arc<GlobalServiceView>>,
}

type NodeKey = (Arc<str>, Box<str>);

struct Remote {
    name: Arc<str>,
    ctx: Option<RemoteContext>,
    status: RemoteStatus,
    /// List generation per kind; see the module comment.
    gen: [u32; 4],
    /// Whether the current generation of each kind has been listed completely.
    listed: [bool; 4],
}

impl Remote {
    fn bump(&mut self, k: KindIdx) {
        self.gen[k as usize] = self.gen[k as usize].wrapping_add(1);
        self.listed[k as usize] = false;
    }

    fn accepts_entries(&self) -> bool {
        self.ctx.is_some() && !matches!(self.status.state, RemoteState::Rejected { .. })
    }
}

/// Revision counter and pending deltas.
#[derive(Default)]
struct Log {
    revision: u64,
    pending: Vec<Delta>,
}

impl Log {
    fn emit(&mut self, change: Change) -> u64 {
        self.revision += 1;
        self.pending.push(Delta { revision: self.revision, change });
        self.revision
    }
}

/// Per-remote bookkeeping when claims disappear.
fn on_removed(remotes: &mut [Option<Remote>], r: RemoteIdx, k: KindIdx, suspect: bool) {
    if let Some(Some(rem)) = remotes.get_mut(r as usize) {
        let n = rem.status.entries.slot(k);
        *n = n.saturating_sub(1);
        if suspect {
            rem.status.suspect_entries = rem.status.suspect_entries.saturating_sub(1);
        }
    }
}

/// Carries out the removal of one claim on a multi-claim object (an IP or an identity): per-remote counts, then the
/// view change. Returns whether the slot still holds a claim (false: the caller drops it).
fn apply_removed<T>(
    remotes: &mut [Option<Remote>],
    log: &mut Log,
    r: RemoteIdx,
    k: KindIdx,
    (removed, suspect): (Removed<T>, bool),
    upsert: impl FnOnce(Arc<T>) -> ViewObject,
    delete: impl FnOnce() -> ObjectKey,
) -> bool {
    on_removed(remotes, r, k, suspect);
    match removed {
        Removed::Hidden => true,
        Removed::Promoted(v) => {
            log.emit(Change::Upsert(upsert(v)));
            true
        }
        Removed::Emptied => {
            log.emit(Change::Delete(delete()));
            false
        }
    }
}

/// The merged view. See the module docs.
pub struct MergedView {
    cfg: CoreConfig,
    remotes: Vec<Option<Remote>>,
    free: Vec<RemoteIdx>,
    by_name: HashMap<Arc<str>, RemoteIdx>,
    namespaces: HashSet<Arc<str>>,
    services: BTreeMap<ServiceKey, ServiceSlot>,
    /// Revision at which each service's merged form last changed (kept after it disappears, so the adapter learns
    /// to delete its slices). See [`MergedView::forget_service_changes_before`].
    service_changes: HashMap<ServiceKey, u64>,
    identities: HashMap<u32, Slot<IdentityView>>,
    ipcache: HashMap<IpAddr, Slot<IpView>>,
    nodes: BTreeMap<NodeKey, Claim<NodeView>>,
    /// The source slot that holds the local cluster's external workloads' claims (created on first use). It lives in
    /// `remotes` so that those claims queue and promote like any remote's, but it is not in `by_name`: no remote
    /// event can reach it, and it is never listed, swept, revoked or shown as a remote.
    local_source: Option<RemoteIdx>,
    /// Local external workloads as last applied, by object name, to know what an update or delete withdraws.
    local_workloads: BTreeMap<Box<str>, LocalWorkload>,
    /// Which local workload's entry holds each mesh address in the local source's claim.
    local_ip_holders: HashMap<IpAddr, Box<str>>,
    log: Log,
}

/// The store key of a deletion or refused value, reduced to what names the object here.
enum EntryKey {
    Service(ServiceKey),
    Node(Box<str>),
    Ip(IpAddr),
    Identity(u32),
}

impl EntryKey {
    fn kind(&self) -> KindIdx {
        match self {
            EntryKey::Service(_) => KindIdx::Services,
            EntryKey::Node(_) => KindIdx::Nodes,
            EntryKey::Ip(_) => KindIdx::Ip,
            EntryKey::Identity(_) => KindIdx::Identities,
        }
    }
}

impl MergedView {
    pub fn new(cfg: CoreConfig) -> Self {
        MergedView {
            cfg,
            remotes: Vec::new(),
            free: Vec::new(),
            by_name: HashMap::new(),
            namespaces: HashSet::new(),
            services: BTreeMap::new(),
            service_changes: HashMap::new(),
            identities: HashMap::new(),
            ipcache: HashMap::new(),
            nodes: BTreeMap::new(),
            local_source: None,
            local_workloads: BTreeMap::new(),
            local_ip_holders: HashMap::new(),
            log: Log::default(),
        }
    }

    // ---------------------------------------------------------------- lookups

    fn idx(&self, name: &str) -> Result<RemoteIdx, CoreError> {
        self.by_name.get(name).copied().ok_or_else(|| CoreError::UnknownRemote(name.to_string()))
    }

    fn remote_mut(&mut self, r: RemoteIdx) -> &mut Remote {
        // Indices come from `by_name`, which only holds live slots.
        self.remotes[r as usize].as_mut().expect("remote index points at a live slot")
    }

    fn remote(&self, r: RemoteIdx) -> &Remote {
        self.remotes[r as usize].as_ref().expect("remote index points at a live slot")
    }

    fn accepting(&self, name: &str) -> Result<RemoteIdx, CoreError> {
        let r = self.idx(name)?;
        if !self.remote(r).accepts_entries() {
            return Err(CoreError::NotValidated(name.to_string()));
        }
        Ok(r)
    }

    fn intern_namespace(&mut self, ns: &str) -> Arc<str> {
        if let Some(a) = self.namespaces.get(ns) {
            return a.clone();
        }
        let a: Arc<str> = ns.into();
        self.namespaces.insert(a.clone());
        a
    }

    // ---------------------------------------------------------------- remote life cycle

    /// A remote was configured (a file appeared in the remotes directory).
    pub fn remote_added(&mut self, name: &str) -> Result<(), CoreError> {
        let valid =
            ClusterName::new(name).map_err(|source| CoreError::InvalidName { name: name.to_string(), source })?;
        if self.by_name.contains_key(name) {
            return Ok(());
        }
        let name: Arc<str> = valid.as_str().into();
        let remote =
            Remote { name: name.clone(), ctx: None, status: RemoteStatus::new(), gen: [0; 4], listed: [false; 4] };
        let r = match self.free.pop() {
            Some(r) => {
                self.remotes[r as usize] = Some(remote);
                r
            }
            None => {
                self.remotes.push(Some(remote));
                // Far beyond 511 remotes; a u16 index keeps claims small.
                (self.remotes.len() - 1) as RemoteIdx
            }
        };
        self.by_name.insert(name.clone(), r);
        info!(cluster = %name, "remote added");
        Ok(())
    }

    /// A remote's configuration went away: drain everything it contributed.
    pub fn remote_removed(&mut self, name: &str) -> Result<(), CoreError> {
        let r = self.idx(name)?;
        self.drain(r);
        self.by_name.remove(name);
        self.remotes[r as usize] = None;
        self.free.push(r);
        info!(cluster = %name, "remote removed; its entries were drained");
        Ok(())
    }

    /// The connection to the remote's etcd is up; the adapter now reads its cluster config.
    pub fn remote_connected(&mut self, name: &str) -> Result<(), CoreError> {
        let r = self.idx(name)?;
        let rem = self.remote_mut(r);
        if rem.ctx.is_none() && !matches!(rem.status.state, RemoteState::Rejected { .. }) {
            rem.status.state = RemoteState::WaitingForConfig;
        }
        Ok(())
    }

    /// The remote's cluster config passed `validate_cluster_config`: a session starts, and every kind is expected
    /// to be listed afresh (entries held from before are stale until listed again; see [`MergedView::list_done`]).
    /// A changed ID or mode invalidates what was validated against the old one, so those entries are drained first.
    pub fn remote_validated(&mut self, ctx: RemoteContext) -> Result<(), CoreError> {
        let r = self.idx(ctx.name.as_str())?;
        let changed = matches!(&self.remote(r).ctx, Some(old) if *old != ctx);
        if changed {
            warn!(cluster = %ctx.name, id = ctx.id.get(), "remote cluster config changed; draining entries validated against the old one");
            self.drain(r);
        }
        let rem = self.remote_mut(r);
        if matches!(rem.status.state, RemoteState::Rejected { .. }) {
            rem.status.last_error = None;
        }
        rem.ctx = Some(ctx);
        for k in KindIdx::ALL {
            rem.bump(k);
        }
        rem.status.revoked = false;
        rem.status.state = RemoteState::WaitingForCanaries;
        Ok(())
    }

    /// The remote's cluster config was refused. Its entries can no longer be trusted and are drained.
    pub fn remote_rejected(&mut self, name: &str, reason: impl Into<String>) -> Result<(), CoreError> {
        let r = self.idx(name)?;
        let reason = reason.into();
        warn!(cluster = %name, %reason, "remote rejected; draining its entries");
        self.drain(r);
        let rem = self.remote_mut(r);
        rem.ctx = None;
        rem.status.last_error = Some(reason.clone());
        rem.status.state = RemoteState::Rejected { reason };
        Ok(())
    }

    /// The remote's canaries exist (or it does not use them): the adapter starts watching its prefixes.
    pub fn canaries_ready(&mut self, name: &str) -> Result<(), CoreError> {
        let r = self.accepting(name)?;
        let rem = self.remote_mut(r);
        if matches!(rem.status.state, RemoteState::WaitingForCanaries) {
            rem.status.state = RemoteState::Syncing;
        }
        Ok(())
    }

    /// The connection was lost. Entries are kept: a remote's failure must not withdraw working backends.
    pub fn disconnected(&mut self, name: &str, now: Instant) -> Result<(), CoreError> {
        let r = self.idx(name)?;
        let rem = self.remote_mut(r);
        match rem.status.state {
            RemoteState::Disconnected { .. } | RemoteState::Rejected { .. } => {}
            _ => {
                info!(cluster = %name, "remote disconnected; keeping its entries");
                rem.status.state = RemoteState::Disconnected { since: now };
            }
        }
        Ok(())
    }

    /// The connection is back and every kind will be re-listed: everything held becomes stale until it comes back.
    pub fn reconnected(&mut self, name: &str) -> Result<(), CoreError> {
        let r = self.idx(name)?;
        let rem = self.remote_mut(r);
        for k in KindIdx::ALL {
            rem.bump(k);
        }
        rem.status.revoked = false;
        rem.status.state = if rem.ctx.is_some() { RemoteState::Syncing } else { RemoteState::WaitingForConfig };
        info!(cluster = %name, "remote reconnected; re-listing");
        Ok(())
    }

    /// One kind is being re-listed without a disconnect (the watch hit a compacted revision).
    pub fn relist_started(&mut self, name: &str, kind: Kind) -> Result<(), CoreError> {
        let r = self.idx(name)?;
        let Some(k) = KindIdx::of(kind) else { return Ok(()) };
        let rem = self.remote_mut(r);
        rem.bump(k);
        if rem.status.state == RemoteState::Synced {
            rem.status.state = RemoteState::Syncing;
        }
        Ok(())
    }

    /// The list of `kind` is complete: sweep what did not come back and maybe become Synced.
    pub fn list_done(&mut self, name: &str, kind: Kind) -> Result<(), CoreError> {
        let r = self.accepting(name)?;
        let Some(k) = KindIdx::of(kind) else { return Ok(()) };
        let gen = self.remote(r).gen[k as usize];
        let before = self.log.revision;
        self.sweep(r, k, move |c| c.gen != gen);
        let swept = self.log.revision - before;
        let rem = self.remote_mut(r);
        rem.listed[k as usize] = true;
        if matches!(rem.status.state, RemoteState::WaitingForCanaries) {
            rem.status.state = RemoteState::Syncing;
        }
        if rem.status.state == RemoteState::Syncing && rem.listed.iter().all(|l| *l) {
            rem.status.state = RemoteState::Synced;
            info!(cluster = %name, "remote synced");
        }
        if swept > 0 {
            info!(cluster = %name, %kind, view_changes = swept, "swept entries that did not come back after re-list");
        }
        Ok(())
    }

    /// Advances time: revokes the entries of remotes disconnected for longer than the cache TTL.
    pub fn tick(&mut self, now: Instant) {
        let Some(ttl) = self.cfg.cache_ttl else { return };
        let due: Vec<RemoteIdx> = self
            .by_name
            .values()
            .copied()
            .filter(|r| {
                let rem = self.remote(*r);
                matches!(rem.status.state, RemoteState::Disconnected { since } if !rem.status.revoked && now.saturating_duration_since(since) >= ttl)
            })
            .collect();
        for r in due {
            self.drain(r);
            let rem = self.remote_mut(r);
            rem.status.revoked = true;
            warn!(cluster = %rem.name, ttl = ?ttl, "remote disconnected for longer than the cache TTL; revoked its entries");
        }
    }

    /// When [`MergedView::tick`] next has work to do, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let ttl = self.cfg.cache_ttl?;
        self.remotes
            .iter()
            .flatten()
            .filter_map(|rem| match rem.status.state {
                RemoteState::Disconnected { since } if !rem.status.revoked => Some(since + ttl),
                _ => None,
            })
            .min()
    }

    // ---------------------------------------------------------------- entries

    /// A validated entry from `remote` (from `RemoteContext::decode`). The entry names its own key (decode checked
    /// that key and value agree), so no key is passed.
    pub fn entry_upsert(&mut self, remote: &str, entry: RemoteEntry) -> Result<(), CoreError> {
        let r = self.accepting(remote)?;
        let rem = self.remote_mut(r);
        if matches!(rem.status.state, RemoteState::WaitingForCanaries) {
            rem.status.state = RemoteState::Syncing;
        }
        match entry {
            RemoteEntry::Ip(e) => self.upsert_ip(r, e),
            RemoteEntry::Identity { id, labels } => self.upsert_identity(r, id, &labels),
            RemoteEntry::Node(n) => self.upsert_node(r, n),
            RemoteEntry::Service(s) => self.upsert_service(r, s),
        }
        Ok(())
    }

    /// `key` was deleted from the remote's store.
    pub fn entry_delete(&mut self, remote: &str, key: &str) -> Result<(), CoreError> {
        let r = self.accepting(remote)?;
        let k = self.entry_key(r, key)?;
        let kind = k.kind();
        match k {
            EntryKey::Ip(ip) => self.release_ip(r, ip),
            EntryKey::Identity(id) => {
                let MergedView { identities, remotes, log, .. } = self;
                if let Some(outcome) = identities.get_mut(&id).and_then(|slot| slot.remove_if(r, |_| true)) {
                    if !apply_removed(remotes, log, r, kind, outcome, ViewObject::Identity, || ObjectKey::Identity(id))
                    {
                        identities.remove(&id);
                    }
                }
            }
            EntryKey::Node(name) => {
                let key = (self.remote(r).name.clone(), name);
                self.release_node(r, key);
            }
            EntryKey::Service(key) => self.remove_service_claim(r, &key, |_| true),
        }
        Ok(())
    }

    /// Drops `r`'s claim on an IP, promoting the next claim if it was the visible one.
    fn release_ip(&mut self, r: RemoteIdx, ip: IpAddr) {
        let MergedView { ipcache, remotes, log, .. } = self;
        if let Some(outcome) = ipcache.get_mut(&ip).and_then(|slot| slot.remove_if(r, |_| true)) {
            if !apply_removed(remotes, log, r, KindIdx::Ip, outcome, ViewObject::Ip, || ObjectKey::Ip(ip)) {
                ipcache.remove(&ip);
            }
        }
    }

    /// Drops `r`'s claim on a node.
    fn release_node(&mut self, r: RemoteIdx, key: NodeKey) {
        if self.nodes.get(&key).is_some_and(|c| c.remote == r) {
            if let Some(c) = self.nodes.remove(&key) {
                on_removed(&mut self.remotes, r, KindIdx::Nodes, c.suspect);
                self.log.emit(Change::Delete(ObjectKey::Node { cluster: key.0, name: key.1 }));
            }
        }
    }

    /// A value from `remote` failed validation. It never enters the view and is counted by reason.
    ///
    /// If the key held a valid value, that last good value is kept and marked suspect (Cilium instead treats a bad
    /// value as absent). A transient bad write (a writer bug, a half-rolled-out schema change) would otherwise
    /// withdraw working backends and pod identities, which drops traffic; keeping the old value cannot widen what the
    /// remote may claim, because it was validated against the same remote's range and name. The suspect value still
    /// goes when the key is deleted, the remote is removed or rejected, or the cache TTL revokes it.
    pub fn entry_rejected(&mut self, remote: &str, key: &str, rejected: &Rejected) -> Result<(), CoreError> {
        let r = self.idx(remote)?;
        {
            let rem = self.remote_mut(r);
            *rem.status.bad_values.entry(rejected.reason()).or_insert(0) += 1;
            rem.status.last_error = Some(format!("{key}: {rejected}"));
        }
        warn!(cluster = %remote, key, reason = rejected.reason(), error = %rejected, "refused a value from remote");
        if !self.remote(r).accepts_entries() {
            return Ok(());
        }
        let Ok(k) = self.entry_key(r, key) else { return Ok(()) };
        let kind = k.kind();
        let gen = self.remote(r).gen[kind as usize];
        // The key exists in the remote, so a re-list in progress must not sweep its last good value.
        let mark = |c: &mut bool, g: &mut u32| {
            *g = gen;
            !std::mem::replace(c, true)
        };
        let newly = match k {
            EntryKey::Ip(ip) => {
                self.ipcache.get_mut(&ip).and_then(|s| s.find_mut(r)).map(|c| mark(&mut c.suspect, &mut c.gen))
            }
            EntryKey::Identity(id) => {
                self.identities.get_mut(&id).and_then(|s| s.find_mut(r)).map(|c| mark(&mut c.suspect, &mut c.gen))
            }
            EntryKey::Node(name) => {
                let key = (self.remote(r).name.clone(), name);
                self.nodes.get_mut(&key).map(|c| mark(&mut c.suspect, &mut c.gen))
            }
            EntryKey::Service(key) => self
                .services
                .get_mut(&key)
                .and_then(|s| s.remotes.iter_mut().find(|c| c.remote == r))
                .map(|c| mark(&mut c.suspect, &mut c.gen)),
        };
        if newly == Some(true) {
            self.remote_mut(r).status.suspect_entries += 1;
        }
        Ok(())
    }

    fn entry_key(&self, r: RemoteIdx, key: &str) -> Result<EntryKey, CoreError> {
        let rem = self.remote(r);
        let parsed = StoreKey::parse(key).map_err(|source| CoreError::BadKey {
            remote: rem.name.to_string(),
            key: key.to_string(),
            source,
        })?;
        let foreign = || CoreError::ForeignKey { remote: rem.name.to_string(), key: key.to_string() };
        match parsed {
            StoreKey::Ip { ip } => Ok(EntryKey::Ip(ip)),
            StoreKey::Identity { id } => Ok(EntryKey::Identity(id)),
            StoreKey::Node { cluster, name } if *cluster == *rem.name => Ok(EntryKey::Node(name.into())),
            StoreKey::Service { cluster, namespace, name } if *cluster == *rem.name => {
                Ok(EntryKey::Service(ServiceKey::new(&namespace, &name)))
            }
            _ => Err(foreign()),
        }
    }

    fn new_claim_counted(&mut self, r: RemoteIdx, k: KindIdx, new_claim: bool, cleared_suspect: bool) {
        let rem = self.remote_mut(r);
        if new_claim {
            *rem.status.entries.slot(k) += 1;
        }
        if cleared_suspect {
            rem.status.suspect_entries = rem.status.suspect_entries.saturating_sub(1);
        }
    }

    fn upsert_ip(&mut self, r: RemoteIdx, e: IpCacheEntry) {
        let namespace = self.intern_namespace(&e.k8s_namespace);
        let rem = self.remote(r);
        let gen = rem.gen[KindIdx::Ip as usize];
        let view = IpView {
            ip: e.ip,
            identity: e.id,
            host_ip: e.host_ip,
            encrypt_key: e.key,
            cluster_id: rem.ctx.as_ref().map(|c| c.id.get()).unwrap_or(0),
            cluster: rem.name.clone(),
            namespace,
            pod_name: e.k8s_pod_name.into_boxed_str(),
        };
        self.claim_ip(r, gen, view);
    }

    /// Records `r`'s claim on an IP; the view changes when it is (or replaces) the visible one.
    fn claim_ip(&mut self, r: RemoteIdx, gen: u32, view: IpView) {
        let ip = view.ip;
        let (visible, new_claim, cleared) = match self.ipcache.get_mut(&ip) {
            Some(slot) => {
                let o = slot.upsert(r, gen, view);
                if o.new_claim {
                    debug!(cluster = %self.remote(r).name, %ip, "IP already claimed by another remote; queued behind it");
                }
                (o.visible, o.new_claim, o.cleared_suspect)
            }
            None => {
                let value = Arc::new(view);
                self.ipcache.insert(
                    ip,
                    Slot {
                        primary: Claim { remote: r, gen, suspect: false, value: value.clone() },
                        others: Vec::new(),
                    },
                );
                (Some(value), true, false)
            }
        };
        self.new_claim_counted(r, KindIdx::Ip, new_claim, cleared);
        if let Some(v) = visible {
            self.log.emit(Change::Upsert(ViewObject::Ip(v)));
        }
    }

    fn upsert_identity(&mut self, r: RemoteIdx, id: u32, labels: &LabelSet) {
        let rem = self.remote(r);
        let gen = rem.gen[KindIdx::Identities as usize];
        let view = IdentityView { id, cluster: rem.name.clone(), labels: labels.to_string().into_boxed_str() };
        let (visible, new_claim, cleared) = match self.identities.get_mut(&id) {
            Some(slot) => {
                let o = slot.upsert(r, gen, view);
                (o.visible, o.new_claim, o.cleared_suspect)
            }
            None => {
                let value = Arc::new(view);
                self.identities.insert(
                    id,
                    Slot {
                        primary: Claim { remote: r, gen, suspect: false, value: value.clone() },
                        others: Vec::new(),
                    },
                );
                (Some(value), true, false)
            }
        };
        self.new_claim_counted(r, KindIdx::Identities, new_claim, cleared);
        if let Some(v) = visible {
            self.log.emit(Change::Upsert(ViewObject::Identity(v)));
        }
    }

    fn upsert_node(&mut self, r: RemoteIdx, n: Node) {
        let rem = self.remote(r);
        let gen = rem.gen[KindIdx::Nodes as usize];
        let view = NodeView {
            cluster: rem.name.clone(),
            cluster_id: n.cluster_id,
            internal_ips: n.internal_ips().collect(),
            pod_cidrs: n.pod_cidrs().collect(),
            zone: n.zone().map(Into::into),
            wireguard_pub_key: n.wireguard_pub_key.as_str().into(),
            name: n.name.into_boxed_str(),
        };
        self.claim_node(r, gen, view);
    }

    /// Records `r`'s claim on a node. Node keys include the cluster name, so only the local workloads' source and
    /// a remote named like the local cluster could meet here; the remote task refuses such a remote, and should one
    /// slip through, the first claim is kept.
    fn claim_node(&mut self, r: RemoteIdx, gen: u32, view: NodeView) {
        let key: NodeKey = (view.cluster.clone(), view.name.clone());
        let (visible, new_claim, cleared) = match self.nodes.get_mut(&key) {
            Some(c) if c.remote != r => {
                warn!(cluster = %key.0, node = %key.1, "node already claimed by another source; ignoring this claim");
                return;
            }
            Some(c) => {
                c.gen = gen;
                let cleared = std::mem::replace(&mut c.suspect, false);
                if *c.value != view {
                    c.value = Arc::new(view);
                    (Some(c.value.clone()), false, cleared)
                } else {
                    (None, false, cleared)
                }
            }
            None => {
                let value = Arc::new(view);
                self.nodes.insert(key, Claim { remote: r, gen, suspect: false, value: value.clone() });
                (Some(value), true, false)
            }
        };
        self.new_claim_counted(r, KindIdx::Nodes, new_claim, cleared);
        if let Some(v) = visible {
            self.log.emit(Change::Upsert(ViewObject::Node(v)));
        }
    }

    fn upsert_service(&mut self, r: RemoteIdx, s: ClusterService) {
        let gen = self.remote(r).gen[KindIdx::Services as usize];
        let key = ServiceKey::new(&s.namespace, &s.name);
        let name = self.remote(r).name.clone();
        let home = self.cfg.home.as_deref() == Some(&*name);
        let value = compact_service(name, s, home);
        let mut outcome = (false, false);
        self.update_service(&key, |slot| match slot.remotes.iter_mut().find(|c| c.remote == r) {
            Some(c) => {
                c.gen = gen;
                outcome.1 = std::mem::replace(&mut c.suspect, false);
                if *c.value != value {
                    c.value = Arc::new(value);
                }
            }
            None => {
                outcome.0 = true;
                slot.remotes.push(Claim { remote: r, gen, suspect: false, value: Arc::new(value) });
            }
        });
        self.new_claim_counted(r, KindIdx::Services, outcome.0, outcome.1);
    }

    fn remove_service_claim(&mut self, r: RemoteIdx, key: &ServiceKey, pred: impl Fn(&Claim<RemoteService>) -> bool) {
        let mut removed = None;
        self.update_service(key, |slot| {
            if let Some(i) = slot.remotes.iter().position(|c| c.remote == r && pred(c)) {
                removed = Some(slot.remotes.remove(i).suspect);
            }
        });
        if let Some(suspect) = removed {
            on_removed(&mut self.remotes, r, KindIdx::Services, suspect);
        }
    }

    // ---------------------------------------------------------------- local services

    /// A local Service was added or changed (see [`LocalService::from_annotations`]).
    pub fn local_service_upsert(&mut self, svc: LocalService) {
        let key = svc.key.clone();
        self.update_service(&key, |slot| slot.local = Some(svc));
    }

    /// A local Service was deleted.
    pub fn local_service_delete(&mut self, namespace: &str, name: &str) {
        let key = ServiceKey::new(namespace, name);
        if self.services.contains_key(&key) {
            self.update_service(&key, |slot| slot.local = None);
        }
    }

    /// Applies `f` to a service's slot, recomputes its merged form and emits a delta only if that changed.
    fn update_service(&mut self, key: &ServiceKey, f: impl FnOnce(&mut ServiceSlot)) {
        let slot = self.services.entry(key.clone()).or_default();
        f(slot);
        let new = merge_service(key, slot);
        let changed = match (&slot.view, &new) {
            (None, None) => false,
            (Some(old), Some(new)) => **old != *new,
            _ => true,
        };
        if changed {
            let rev = match new {
                Some(v) => {
                    let v = Arc::new(v);
                    slot.view = Some(v.clone());
                    self.log.emit(Change::Upsert(ViewObject::Service(v)))
                }
                None => {
                    slot.view = None;
                    self.log.emit(Change::Delete(ObjectKey::Service(key.clone())))
                }
            };
            self.service_changes.insert(key.clone(), rev);
        }
        if slot.local.is_none() && slot.remotes.is_empty() {
            self.services.remove(key);
        }
    }

    // ---------------------------------------------------------------- local external workloads

    fn local_source(&mut self, cluster: &Arc<str>) -> RemoteIdx {
        if let Some(r) = self.local_source {
            return r;
        }
        let mut status = RemoteStatus::new();
        status.state = RemoteState::Synced;
        // Never listed or swept: the kube adapter withdraws what is gone itself (see `local_workload_delete`).
        let source = Remote { name: cluster.clone(), ctx: None, status, gen: [0; 4], listed: [true; 4] };
        let r = match self.free.pop() {
            Some(r) => {
                self.remotes[r as usize] = Some(source);
                r
            }
            None => {
                self.remotes.push(Some(source));
                (self.remotes.len() - 1) as RemoteIdx
            }
        };
        self.local_source = Some(r);
        r
    }

    /// A local external workload is (still) ready to be peered with: its node and its mesh address enter the view,
    /// replacing what an earlier version of the same object contributed. Unchanged input emits nothing.
    ///
    /// Two workloads claiming one mesh address (a misconfiguration: their ranges must not overlap) do not take it
    /// from each other: the first keeps it, the other's entry waits and takes over when the first lets go.
    pub fn local_workload_upsert(&mut self, w: LocalWorkload) {
        let r = self.local_source(&w.node.cluster);
        let name = w.node.name.clone();
        let (ip, node) = (w.ip.clone(), w.node.clone());
        let old = self.local_workloads.insert(name.clone(), w);
        if let Some(old) = old {
            if old.ip == ip && old.node == node {
                return;
            }
            if old.ip.ip != ip.ip {
                self.local_ip_withdraw(r, &name, old.ip.ip);
            }
            let old_node = (old.node.cluster.clone(), old.node.name.clone());
            if old_node != (node.cluster.clone(), node.name.clone()) {
                self.release_node(r, old_node);
            }
        }
        self.claim_node(r, 0, node);
        match self.local_ip_holders.get(&ip.ip) {
            Some(holder) if *holder != name => {
                warn!(workload = %name, holder = %holder, ip = %ip.ip, "mesh address already used by another external workload; keeping that one's entry");
            }
            _ => {
                self.local_ip_holders.insert(ip.ip, name);
                self.claim_ip(r, 0, ip);
            }
        }
    }

    /// `name` no longer holds `ip`: hand it to another local workload waiting for it, or withdraw it.
    fn local_ip_withdraw(&mut self, r: RemoteIdx, name: &str, ip: IpAddr) {
        if self.local_ip_holders.get(&ip).is_none_or(|h| &**h != name) {
            return;
        }
        let next = self.local_workloads.iter().find(|(n, w)| &***n != name && w.ip.ip == ip);
        match next.map(|(n, w)| (n.clone(), w.ip.clone())) {
            Some((n, view)) => {
                self.local_ip_holders.insert(ip, n);
                self.claim_ip(r, 0, view);
            }
            None => {
                self.local_ip_holders.remove(&ip);
                self.release_ip(r, ip);
            }
        }
    }

    /// A local external workload is gone or no longer usable (deleted, not Ready, a field missing or invalid):
    /// withdraw its node and its mesh address.
    pub fn local_workload_delete(&mut self, name: &str) {
        let Some(old) = self.local_workloads.remove(name) else { return };
        let Some(r) = self.local_source else { return };
        self.local_ip_withdraw(r, name, old.ip.ip);
        self.release_node(r, (old.node.cluster.clone(), old.node.name.clone()));
    }

    /// Local external workloads currently in the view.
    pub fn local_workloads_len(&self) -> usize {
        self.local_workloads.len()
    }

    // ---------------------------------------------------------------- sweeping

    /// Removes `r`'s claims of kind `k` for which `pred` holds, emitting the view changes.
    fn sweep(&mut self, r: RemoteIdx, k: KindIdx, pred: impl Fn(&ClaimMeta) -> bool) {
        let meta = |gen, suspect| ClaimMeta { gen, suspect };
        let MergedView { ipcache, identities, nodes, remotes, log, .. } = self;
        match k {
            KindIdx::Ip => ipcache.retain(|ip, slot| match slot.remove_if(r, |c| pred(&meta(c.gen, c.suspect))) {
                None => true,
                Some(outcome) => apply_removed(remotes, log, r, k, outcome, ViewObject::Ip, || ObjectKey::Ip(*ip)),
            }),
            KindIdx::Identities => {
                identities.retain(|id, slot| match slot.remove_if(r, |c| pred(&meta(c.gen, c.suspect))) {
                    None => true,
                    Some(outcome) => {
                        apply_removed(remotes, log, r, k, outcome, ViewObject::Identity, || ObjectKey::Identity(*id))
                    }
                })
            }
            KindIdx::Nodes => nodes.retain(|(cluster, name), c| {
                if c.remote != r || !pred(&meta(c.gen, c.suspect)) {
                    return true;
                }
                on_removed(remotes, r, k, c.suspect);
                log.emit(Change::Delete(ObjectKey::Node { cluster: cluster.clone(), name: name.clone() }));
                false
            }),
            KindIdx::Services => {
                let keys: Vec<ServiceKey> = self
                    .services
                    .iter()
                    .filter(|(_, s)| s.remotes.iter().any(|c| c.remote == r && pred(&meta(c.gen, c.suspect))))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in keys {
                    self.remove_service_claim(r, &key, |c| pred(&meta(c.gen, c.suspect)));
                }
            }
        }
    }

    /// Removes everything `r` contributed.
    fn drain(&mut self, r: RemoteIdx) {
        for k in KindIdx::ALL {
            self.sweep(r, k, |_| true);
        }
    }

    // ---------------------------------------------------------------- outputs

    /// Current view revision: the revision of the last delta emitted.
    pub fn revision(&self) -> u64 {
        self.log.revision
    }

    /// Deltas emitted since the last call, in revision order. Call after each batch of inputs; the stream hub does.
    pub fn take_deltas(&mut self) -> Vec<Delta> {
        std::mem::take(&mut self.log.pending)
    }

    /// The whole view at the current revision. Cheap: objects are shared pointers.
    pub fn snapshot(&self) -> Snapshot {
        let mut objects =
            Vec::with_capacity(self.nodes.len() + self.identities.len() + self.ipcache.len() + self.services.len());
        objects.extend(self.nodes.values().map(|c| ViewObject::Node(c.value.clone())));
        objects.extend(self.identities.values().map(|s| ViewObject::Identity(s.primary.value.clone())));
        objects.extend(self.ipcache.values().map(|s| ViewObject::Ip(s.primary.value.clone())));
        objects.extend(self.services.values().filter_map(|s| s.view.clone()).map(ViewObject::Service));
        Snapshot { revision: self.log.revision, objects }
    }

    /// Services whose merged form changed after revision `since` (including ones that stopped being merged, whose
    /// slices must be deleted). Sorted.
    pub fn services_changed_since(&self, since: u64) -> Vec<ServiceKey> {
        let mut out: Vec<ServiceKey> =
            self.service_changes.iter().filter(|(_, rev)| **rev > since).map(|(k, _)| k.clone()).collect();
        out.sort();
        out
    }

    /// Drops change records at or before `rev` for services that no longer exist, once the adapter has acted on
    /// them, so churn in service names does not grow memory.
    pub fn forget_service_changes_before(&mut self, rev: u64) {
        let services = &self.services;
        self.service_changes.retain(|k, r| *r > rev || services.get(k).is_some_and(|s| s.view.is_some()));
    }

    /// The merged form of one global service, if the local cluster has it global.
    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<GlobalServiceView>> {
        self.services.get(key).and_then(|s| s.view.as_ref())
    }

    /// Every merged global service.
    pub fn services(&self) -> impl Iterator<Item = &Arc<GlobalServiceView>> {
        self.services.values().filter_map(|s| s.view.as_ref())
    }

    /// The EndpointSlices the local cluster should hold for `key`; empty means "delete every slice identity-sync
    /// manages for this service".
    pub fn desired_slices(&self, key: &ServiceKey) -> Vec<DesiredSlice> {
        self.service(key).map(|v| desired_slices(v)).unwrap_or_default()
    }

    pub fn ip(&self, ip: &IpAddr) -> Option<&Arc<IpView>> {
        self.ipcache.get(ip).map(|s| &s.primary.value)
    }

    pub fn ipcache_len(&self) -> usize {
        self.ipcache.len()
    }

    pub fn identity(&self, id: u32) -> Option<&Arc<IdentityView>> {
        self.identities.get(&id).map(|s| &s.primary.value)
    }

    pub fn identities_len(&self) -> usize {
        self.identities.len()
    }

    pub fn node(&self, cluster: &str, name: &str) -> Option<&Arc<NodeView>> {
        self.nodes.get(&(Arc::<str>::from(cluster), Box::<str>::from(name))).map(|c| &c.value)
    }

    pub fn nodes_len(&self) -> usize {
        self.nodes.len()
    }

    pub fn remote_status(&self, name: &str) -> Option<&RemoteStatus> {
        self.by_name.get(name).map(|r| &self.remote(*r).status)
    }

    /// Every configured remote and its status, sorted by name.
    pub fn remotes(&self) -> Vec<(Arc<str>, &RemoteStatus)> {
        let local = self.local_source.map(|r| r as usize);
        let mut v: Vec<_> = self
            .remotes
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != local)
            .filter_map(|(_, r)| r.as_ref())
            .map(|r| (r.name.clone(), &r.status))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// What sweep predicates may look at.
pub(crate) struct ClaimMeta {
    gen: u32,
    #[allow(dead_code)]
    suspect: bool,
}

/// A store port map as the view's ports (sorted by name, as the map is). Validation refused any other protocol.
fn ports_of(ports: BTreeMap<String, PortConfig>) -> Vec<Port> {
    ports
        .into_iter()
        .filter_map(|(name, p)| {
            Protocol::parse(&p.protocol).map(|protocol| Port { name: name.into(), protocol, port: p.port })
        })
        .collect()
}

fn compact_service(cluster: Arc<str>, s: ClusterService, home: bool) -> RemoteService {
    let ClusterService { backends, zones, hostnames, shared, frontends, .. } = s;
    let home_frontends = home.then(|| {
        frontends.into_iter().map(|(ip, ports)| Frontend { ip, ports: ports_of(ports) }).collect::<Vec<_>>().into()
    });
    let backends: Vec<Backend> = backends
        .into_iter()
        .map(|(ip, ports)| Backend {
            ip,
            ports: ports_of(ports),
            zone: zones.get(&ip).map(|z| z.zone.as_str()).filter(|z| !z.is_empty()).map(Into::into),
            hostname: hostnames.get(&ip).map(|h| h.as_str()).filter(|h| !h.is_empty()).map(Into::into),
        })
        .collect();
    RemoteService { cluster, shared, backends: backends.into(), home_frontends }
}

/// The merge rule for one service.
fn merge_service(key: &ServiceKey, slot: &ServiceSlot) -> Option<GlobalServiceView> {
    // The local Service defines a global service; on an external workload (no local Services) the home cluster's
    // exported service does (see `CoreConfig::home`).
    let home = slot.remotes.iter().find_map(|c| c.value.home_frontends.as_ref());
    let (affinity, frontends, local_preferred) = match (slot.local.as_ref().filter(|l| l.global), home) {
        // Remote backends are exported only when ready or serving, so "healthy" means "listed".
        (Some(l), _) => (l.affinity, l.frontends.clone(), l.affinity == Affinity::Local && l.ready_local_endpoints > 0),
        (None, Some(home)) => (Affinity::None, home.to_vec(), false),
        (None, None) => return None,
    };
    let mut clusters: Vec<ClusterBackends> = Vec::new();
    if !local_preferred {
        for c in &slot.remotes {
            // A remote marks a service it does not share; its backends are not for us (the home's are: a VM is one
            // of the home cluster's members).
            let usable = c.value.shared || c.value.home_frontends.is_some();
            if !usable || c.value.backends.is_empty() {
                continue;
            }
            clusters.push(ClusterBackends { cluster: c.value.cluster.clone(), backends: c.value.backends.to_vec() });
        }
    }
    clusters.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    Some(GlobalServiceView { key: key.clone(), affinity, frontends, clusters })
}
