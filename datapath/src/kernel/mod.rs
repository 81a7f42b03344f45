//! The kernel adapter of the node agent: [`KernelDatapath`] implements [`Datapath`] over the pinned BPF maps, the
//! SNAT conntrack maps, the WireGuard tunnel and the routes through it; [`install`] loads and attaches the programs
//! and creates the VXLAN collect-metadata device.
//!
//! ```text
//! AgentCore ─ Op ─► KernelDatapath ─► BpfMaps (ipcache, egress src/policy/groups, identity policy)   [pinned]
//!                                  ├► shadow journal (what the maps cannot hold; see shadow.rs)
//!                                  ├► wireguard::Tunnel (peers) + `ip route … dev <wg>` (routes)
//!                                  └◄ cw_drops, cw_egress_ct, cw_snat_fwd/rev (drops, conntrack, GC)
//! ```
//!
//! Everything here converts between the agent's domain types (`agent::model`) and the maps' `#[repr(C)]` types
//! (`bpf::types`, through `bpf::maps`); the conversions are plain functions, unit-tested without a kernel.

pub mod install;
pub mod shadow;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use ipnet::IpNet;
use thiserror::Error;
use tracing::{debug, warn};

use crate::agent::datapath::{Datapath, DatapathError, DropReason};
use crate::agent::gc::{CtEntry, CtKey, Proto, TcpSeen};
use crate::agent::model::{
    reserved, ClassId, Direction, EgressGroup, EgressVerdict, Gateway, GroupId, IpcacheValue, MapContents, PolicyKey,
    PolicyVerdict, Route, WgKey, WgPeer,
};
use crate::agent::plan::Op;
use crate::bpf::maps::{self as m, BpfMaps};
use crate::bpf::snat::{self, expiry, SnatEntry, SnatKey};
use crate::bpf::BpfError;
use crate::wireguard::keys::PublicKey;
use crate::wireguard::peers::{PeerSet, PeerSpec};
use crate::wireguard::Tunnel;

use self::shadow::{Journal, Record};

/// What can go wrong in the adapter (wrapped into [`DatapathError`] at the trait boundary).
#[derive(Debug, Error)]
pub enum KernelError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("SNAT map: {0}")]
    Snat(#[from] snat::SnatError),
    #[error("shadow journal {path}: {source}")]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("WireGuard: {0}")]
    Wireguard(#[from] crate::wireguard::Error),
    #[error("`ip {args}` failed: {reason}")]
    Ip { args: String, reason: String },
    #[error("{0} ops need a WireGuard tunnel, and this datapath was opened without one (--wireguard-interface)")]
    NoTunnel(&'static str),
}

/// How to open the adapter.
pub struct KernelConfig {
    /// The bpffs directory the programs pinned their maps in (the programs must have been loaded once).
    pub pin_dir: PathBuf,
    /// The shadow journal (a regular file; bpffs cannot hold one). Must survive agent restarts, like the pins.
    pub shadow_path: PathBuf,
    /// This node's IP: in an egress group, the gateway with this address is this node, and its egress IP is the
    /// one SNAT here translates to.
    pub local_ip: IpAddr,
    /// The node's WireGuard tunnel; without one, peer and route ops fail with [`KernelError::NoTunnel`].
    pub tunnel: Option<Tunnel>,
}

type SnatMap = BpfHashMap<MapData, SnatKey, SnatEntry>;

/// The agent's datapath over the real kernel.
pub struct KernelDatapath {
    pin_dir: PathBuf,
    local_ip: IpAddr,
    maps: BpfMaps,
    /// `cw_snat_fwd` / `cw_snat_rev`, on nodes where the SNAT object was loaded (gateways).
    snat: Option<(SnatMap, SnatMap)>,
    journal: Journal,
    tunnel: Option<Tunnel>,
    egress_plens: PlenUse,
}

/// Which (class, prefix) entries `cw_egress_policy` holds, counted per (family, prefix length), so that the delete
/// of the last entry of a length is noticed and the length dropped from `cw_egress_plens` (the program would
/// otherwise keep probing it on every packet). The adapter is the maps' only writer, so this mirror stays exact;
/// [`EgressPolicyMap::prune_prefix_lengths`](crate::bpf::maps::EgressPolicyMap::prune_prefix_lengths) recomputes
/// from the map itself, so a mirror that drifted would only cost a missed or extra prune.
#[derive(Debug, Default)]
pub struct PlenUse {
    keys: BTreeSet<(u32, IpNet)>,
    per_length: BTreeMap<(bool, u8), usize>,
}

impl PlenUse {
    pub fn from_entries(entries: impl IntoIterator<Item = (u32, IpNet)>) -> Self {
        let mut u = PlenUse::default();
        for (class, net) in entries {
            u.added(class, net);
        }
        u
    }

    /// Records an upserted entry (a second upsert of the same key counts once).
    pub fn added(&mut self, class: u32, net: IpNet) {
        let net = net.trunc();
        if self.keys.insert((class, net)) {
            *self.per_length.entry(length_of(&net)).or_default() += 1;
        }
    }

    /// Records a deleted entry; true when it was the last one of its family and prefix length.
    pub fn removed(&mut self, class: u32, net: IpNet) -> bool {
        let net = net.trunc();
        if !self.keys.remove(&(class, net)) {
            return false;
        }
        let len = length_of(&net);
        match self.per_length.get_mut(&len) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.per_length.remove(&len);
                true
            }
        }
    }
}

fn length_of(net: &IpNet) -> (bool, u8) {
    (matches!(net, IpNet::V6(_)), net.prefix_len())
}

impl std::fmt::Debug for KernelDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDatapath").field("pin_dir", &self.pin_dir).field("local_ip", &self.local_ip).finish()
    }
}

fn dp_err<'a>(map: &'static str, op: &'a Op) -> impl FnOnce(KernelError) -> DatapathError + 'a {
    move |e| DatapathError::Op { map, op: format!("{op:?}"), source: Box::new(e) }
}

fn read_err(e: impl Into<KernelError>) -> DatapathError {
    DatapathError::Read { source: Box::new(e.into()) }
}

fn open_snat_map(pin_dir: &Path, name: &'static str) -> Result<Option<SnatMap>, KernelError> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(|source| BpfError::Map { map: name, source })?;
    let map = Map::from_map_data(data).map_err(|source| BpfError::Map { map: name, source })?;
    Ok(Some(BpfHashMap::try_from(map).map_err(|source| BpfError::Map { map: name, source })?))
}

impl KernelDatapath {
    /// Opens the pinned maps (and the SNAT maps if this node loaded SNAT) and the shadow journal.
    pub fn open(cfg: KernelConfig) -> Result<Self, KernelError> {
        let maps = BpfMaps::open(&cfg.pin_dir)?;
        let snat = match (open_snat_map(&cfg.pin_dir, snat::MAP_FWD)?, open_snat_map(&cfg.pin_dir, snat::MAP_REV)?) {
            (Some(f), Some(r)) => Some((f, r)),
            _ => None,
        };
        let journal = Journal::open(&cfg.shadow_path)
            .map_err(|source| KernelError::Journal { path: cfg.shadow_path.clone(), source })?;
        let egress_plens =
            PlenUse::from_entries(maps.egress_policy.entries()?.into_iter().map(|(class, net, _)| (class.0, net)));
        Ok(Self { pin_dir: cfg.pin_dir, local_ip: cfg.local_ip, maps, snat, journal, tunnel: cfg.tunnel, egress_plens })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn tunnel(&self) -> Option<&Tunnel> {
        self.tunnel.as_ref()
    }

    /// Takes the tunnel out (e.g. to shut it down cleanly on exit).
    pub fn take_tunnel(&mut self) -> Option<Tunnel> {
        self.tunnel.take()
    }

    fn journal(&mut self, r: Record) -> Result<(), KernelError> {
        let path = self.journal.path().to_owned();
        self.journal.append(r).map_err(|source| KernelError::Journal { path, source })
    }

    fn apply_inner(&mut self, op: &Op) -> Result<(), KernelError> {
        match op {
            Op::UpsertIpcache(net, v) => {
                let entry = ipcache_entry(v)?;
                self.journal(Record::Ipcache(*net, Some(*v)))?;
                self.maps.ipcache.upsert(*net, entry)?;
            }
            Op::DeleteIpcache(net) => {
                self.maps.ipcache.delete(*net)?;
                self.journal(Record::Ipcache(*net, None))?;
            }
            Op::UpsertIdentityPolicy(k, v) => self.maps.policy.upsert(policy_rule(k), verdict(*v))?,
            Op::DeleteIdentityPolicy(k) => {
                self.maps.policy.delete(policy_rule(k))?;
            }
            Op::UpsertEgressGroup(id, g) => {
                let value = group_value(self.local_ip, g)?;
                self.journal(Record::Group(*id, Some(g.clone())))?;
                self.maps.egress_groups.upsert(m::GroupId(id.0), &value)?;
            }
            Op::DeleteEgressGroup(id) => {
                self.maps.egress_groups.delete(m::GroupId(id.0))?;
                self.journal(Record::Group(*id, None))?;
            }
            Op::UpsertEgressLpm(class, net, v) => {
                let action = match v {
                    EgressVerdict::Steer(g) => m::EgressAction::Steer(m::GroupId(g.0)),
                    EgressVerdict::Excluded => m::EgressAction::Excluded,
                };
                self.maps.egress_policy.upsert(m::ClassId(class.0), *net, action)?;
                self.egress_plens.added(class.0, *net);
            }
            Op::DeleteEgressLpm(class, net) => {
                self.maps.egress_policy.delete(m::ClassId(class.0), *net)?;
                if self.egress_plens.removed(class.0, *net) {
                    // The last entry of this prefix length went: stop the program probing it.
                    self.maps.egress_policy.prune_prefix_lengths()?;
                    debug!(prefix_len = net.prefix_len(), "egress prefix length no longer in use, pruned");
                }
            }
            Op::UpsertEgressSrc(ip, class) => self.maps.egress_src.upsert(*ip, m::ClassId(class.0))?,
            Op::DeleteEgressSrc(ip) => {
                self.maps.egress_src.delete(*ip)?;
            }
            Op::UpsertWgPeer(key, peer) => {
                let tunnel = self.tunnel.as_mut().ok_or(KernelError::NoTunnel("WireGuard peer"))?;
                let mut specs: BTreeMap<PublicKey, PeerSpec> =
                    tunnel.peers()?.iter().map(|p| (p.public_key, p.clone())).collect();
                let spec = PeerSpec {
                    public_key: PublicKey::from_bytes(key.0),
                    endpoint: Some(SocketAddr::new(peer.endpoint.0, peer.endpoint.1)),
                    allowed_ips: peer.allowed_ips.iter().map(|n| n.trunc()).collect(),
                    keepalive: None,
                };
                specs.insert(spec.public_key, spec);
                tunnel.apply(&PeerSet::from_specs(specs.into_values()))?;
            }
            Op::RemoveWgPeer(key) => {
                let tunnel = self.tunnel.as_mut().ok_or(KernelError::NoTunnel("WireGuard peer"))?;
                let gone = PublicKey::from_bytes(key.0);
                let specs: Vec<PeerSpec> = tunnel.peers()?.iter().filter(|p| p.public_key != gone).cloned().collect();
                tunnel.apply(&PeerSet::from_specs(specs))?;
            }
            Op::AddRoute(net, r) => {
                let ifname = self.tunnel.as_ref().ok_or(KernelError::NoTunnel("route"))?.ifname().to_owned();
                self.journal(Record::Route(*net, Some(*r)))?;
                ip(&["route", "replace", &net.trunc().to_string(), "dev", &ifname])?;
            }
            Op::RemoveRoute(net) => {
                let ifname = self.tunnel.as_ref().ok_or(KernelError::NoTunnel("route"))?.ifname().to_owned();
                // Already gone is fine: the goal is that it is not there.
                if let Err(e) = ip(&["route", "del", &net.trunc().to_string(), "dev", &ifname]) {
                    debug!(error = %e, "route already absent");
                }
                self.journal(Record::Route(*net, None))?;
            }
        }
        Ok(())
    }

    fn read_inner(&mut self) -> Result<MapContents, KernelError> {
        let shadow = &self.journal.state;
        let mut c = MapContents::default();
        for (net, entry) in self.maps.ipcache.entries()? {
            // The shadow carries what the map cannot (encryption key, IPv6 endpoint), if the map still agrees.
            let v = match shadow.ipcache.get(&net) {
                Some(s) if ipcache_entry(s).ok() == Some(entry) => *s,
                _ => ipcache_from_entry(&entry),
            };
            c.ipcache.insert(net, v);
        }
        for (rule, v) in self.maps.policy.entries()? {
            let key = PolicyKey {
                remote_identity: rule.remote_identity,
                dport: rule.dport,
                proto: rule.proto,
                direction: match rule.direction {
                    m::Direction::Ingress => Direction::Ingress,
                    m::Direction::Egress => Direction::Egress,
                },
            };
            let v = match v {
                m::Verdict::Allow => PolicyVerdict::Allow,
                m::Verdict::Deny => PolicyVerdict::Deny,
            };
            c.identity_policy.insert(key, v);
        }
        for (ip, class) in self.maps.egress_src.entries()? {
            c.egress_src.insert(ip, ClassId(class.0));
        }
        for (class, net, action) in self.maps.egress_policy.entries()? {
            let v = match action {
                m::EgressAction::Steer(g) => EgressVerdict::Steer(GroupId(g.0)),
                m::EgressAction::Excluded => EgressVerdict::Excluded,
            };
            c.egress_lpm.insert((ClassId(class.0), net), v);
        }
        for (id, g) in self.maps.egress_groups.entries()? {
            let id = GroupId(id.0);
            let v = match shadow.groups.get(&id) {
                Some(s) if group_value(self.local_ip, s).ok().as_ref() == Some(&g) => s.clone(),
                _ => group_from_bpf(&g),
            };
            c.egress_groups.insert(id, v);
        }
        if let Some(t) = &self.tunnel {
            for p in t.peers()?.iter() {
                let Some(ep) = p.endpoint else { continue };
                let mut allowed: Vec<IpNet> = p.allowed_ips.iter().copied().collect();
                allowed.sort();
                c.wg_peers.insert(
                    WgKey(*p.public_key.as_bytes()),
                    WgPeer { endpoint: (ep.ip(), ep.port()), allowed_ips: allowed },
                );
            }
            for net in routes_on(t.ifname())? {
                // The kernel route says only "dev wg": the next node comes from the shadow, else from the peer whose
                // allowed IPs cover the prefix.
                let via = shadow.routes.get(&net).map(|r| r.via_node).or_else(|| {
                    c.wg_peers.values().find(|p| p.allowed_ips.iter().any(|a| a.contains(&net))).map(|p| p.endpoint.0)
                });
                if let Some(via_node) = via {
                    c.routes.insert(net, Route { via_node });
                }
            }
        }
        Ok(c)
    }

    fn conntrack_inner(&mut self) -> Result<Vec<CtEntry>, KernelError> {
        let mut out = Vec::new();
        // Flow pins of the steering program (source nodes). They carry no TCP state: a TCP pin is reported as
        // established so that GC keeps it for the long timeout (deleting a live flow's pin could move it to
        // another gateway, whose SNAT would break it).
        for (flow, pin) in self.maps.egress_ct.entries()? {
            let proto = expiry::proto(flow.proto);
            out.push(CtEntry {
                proto,
                src: (flow.src, flow.sport),
                dst: (flow.dst, flow.dport),
                tcp: TcpSeen { established: proto == Proto::Tcp, ..Default::default() },
                last_seen_ns: pin.last_seen_ns,
                snat: None,
            });
        }
        if let Some((fwd, rev)) = &self.snat {
            let revs: std::collections::HashMap<SnatKey, SnatEntry> = collect(rev)?.into_iter().collect();
            for (k, e) in collect(fwd)? {
                let rk = expiry::reverse_key(&k, &e);
                let r = revs.get(&rk).filter(|r| expiry::owns(&k, r));
                let state = e.tcp_state | r.map(|r| r.tcp_state).unwrap_or(0);
                out.push(CtEntry {
                    proto: expiry::proto(k.proto),
                    src: (k.src(), k.src_port()),
                    dst: (k.dst(), k.dst_port()),
                    tcp: expiry::tcp_seen(state),
                    last_seen_ns: e.last_seen_ns.max(r.map(|r| r.last_seen_ns).unwrap_or(0)),
                    snat: Some((e.ip(k.family), e.port())),
                });
            }
        }
        Ok(out)
    }

    fn delete_conntrack_inner(&mut self, keys: &[CtKey]) -> Result<usize, KernelError> {
        let mut n = 0;
        let wanted: BTreeSet<&CtKey> = keys.iter().collect();
        for (flow, _) in self.maps.egress_ct.entries()? {
            let k =
                CtKey { proto: expiry::proto(flow.proto), src: (flow.src, flow.sport), dst: (flow.dst, flow.dport) };
            if wanted.contains(&k) && self.maps.egress_ct.delete(&flow)? {
                n += 1;
            }
        }
        if let Some((fwd, rev)) = &mut self.snat {
            for (k, e) in collect(fwd)? {
                let ck =
                    CtKey { proto: expiry::proto(k.proto), src: (k.src(), k.src_port()), dst: (k.dst(), k.dst_port()) };
                if !wanted.contains(&ck) {
                    continue;
                }
                // Reverse first: once it is gone no reply is translated to a flow that is about to vanish.
                let rk = expiry::reverse_key(&k, &e);
                if let Ok(r) = rev.get(&rk, 0) {
                    if expiry::owns(&k, &r) {
                        remove(rev, &rk)?;
                    }
                }
                if remove(fwd, &k)? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

fn collect(map: &SnatMap) -> Result<Vec<(SnatKey, SnatEntry)>, KernelError> {
    let mut out = Vec::new();
    for item in map.iter() {
        match item {
            Ok(kv) => out.push(kv),
            // Deleted by the datapath (LRU) between get_next_key and lookup.
            Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => continue,
            Err(source) => return Err(BpfError::Map { map: "cw_snat", source }.into()),
        }
    }
    Ok(out)
}

fn remove(map: &mut SnatMap, key: &SnatKey) -> Result<bool, KernelError> {
    match map.remove(key) {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(false),
        // aya 0.14 reports a delete miss (e.g. the entry went by LRU a moment ago) as the syscall's ENOENT.
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(false),
        Err(source) => Err(BpfError::Map { map: "cw_snat", source }.into()),
    }
}

impl Datapath for KernelDatapath {
    fn read_programmed(&mut self) -> Result<MapContents, DatapathError> {
        self.read_inner().map_err(read_err)
    }

    fn apply(&mut self, op: &Op) -> Result<(), DatapathError> {
        self.apply_inner(op).map_err(dp_err(op.map().as_str(), op))
    }

    fn drop_counters(&mut self) -> Result<BTreeMap<DropReason, u64>, DatapathError> {
        let counts = self.maps.drops.counts().map_err(read_err)?;
        Ok(counts.into_iter().map(|(r, n)| (drop_reason(r), n)).collect())
    }

    fn conntrack(&mut self) -> Result<Vec<CtEntry>, DatapathError> {
        self.conntrack_inner().map_err(read_err)
    }

    fn delete_conntrack(&mut self, keys: &[CtKey]) -> Result<usize, DatapathError> {
        self.delete_conntrack_inner(keys).map_err(|e| DatapathError::Op {
            map: "conntrack",
            op: format!("delete {} entries", keys.len()),
            source: Box::new(e),
        })
    }

    fn now_ns(&self) -> u64 {
        snat::monotonic_ns()
    }
}

// -------------------------------------------------------------------------------------------------------------
// conversions (pure)

pub fn drop_reason(r: m::DropReason) -> DropReason {
    match r {
        m::DropReason::Malformed => DropReason::Malformed,
        m::DropReason::PolicyDenied => DropReason::PolicyDenied,
        m::DropReason::NoGateway => DropReason::NoGateway,
        m::DropReason::SnatPortsExhausted => DropReason::SnatPortsExhausted,
        m::DropReason::SnatNoState => DropReason::SnatNoState,
        m::DropReason::TunnelError => DropReason::TunnelError,
        m::DropReason::UnsupportedL4 => DropReason::UnsupportedL4,
    }
}

fn policy_rule(k: &PolicyKey) -> m::PolicyRule {
    m::PolicyRule {
        remote_identity: k.remote_identity,
        dport: k.dport,
        proto: k.proto,
        direction: match k.direction {
            Direction::Ingress => m::Direction::Ingress,
            Direction::Egress => m::Direction::Egress,
        },
    }
}

fn verdict(v: PolicyVerdict) -> m::Verdict {
    match v {
        PolicyVerdict::Allow => m::Verdict::Allow,
        PolicyVerdict::Deny => m::Verdict::Deny,
    }
}

/// The ipcache map's view of a domain entry. Every entry the agent programs comes from the mesh stream, i.e. from
/// a remote cluster; node addresses carry the reserved remote-node identity. The map's tunnel endpoint is IPv4
/// (the VXLAN underlay); an IPv6 endpoint is kept only in the shadow.
pub fn ipcache_entry(v: &IpcacheValue) -> Result<m::IpcacheEntry, KernelError> {
    let cluster_id = u16::try_from(v.cluster_id)
        .map_err(|_| KernelError::Invalid(format!("cluster id {} does not fit the ipcache's 16 bits", v.cluster_id)))?;
    Ok(m::IpcacheEntry {
        identity: v.identity,
        cluster_id,
        is_node: v.identity == reserved::REMOTE_NODE,
        remote_cluster: true,
        tunnel_endpoint: match v.tunnel_endpoint {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        },
    })
}

/// A domain entry decoded from the map alone (no shadow): encryption key unknown (0).
pub fn ipcache_from_entry(e: &m::IpcacheEntry) -> IpcacheValue {
    IpcacheValue {
        identity: e.identity,
        cluster_id: u32::from(e.cluster_id),
        tunnel_endpoint: e.tunnel_endpoint.map(IpAddr::V4),
        encrypt_key: 0,
    }
}

/// The map's view of an egress group on the node `local`. The map holds one egress IP per group: the one *this*
/// node SNATs to if it is one of the gateways (IPv4 preferred), else the first gateway's (only SNAT reads it, and
/// SNAT runs on gateways). Gateways are IPv4 underlay addresses (the VXLAN tunnel key); IPv6-only gateways are
/// skipped. A group with no usable gateway keeps `n_gateways == 0`, which the programs drop as "no gateway".
pub fn group_value(local: IpAddr, g: &EgressGroup) -> Result<m::EgressGroup, KernelError> {
    let gateways: Vec<Ipv4Addr> = g
        .gateways
        .iter()
        .filter_map(|gw| match gw.node_ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .collect();
    if gateways.len() > crate::bpf::types::MAX_GATEWAYS {
        return Err(KernelError::Invalid(format!(
            "{} gateways in one egress group, the datapath holds at most {}",
            gateways.len(),
            crate::bpf::types::MAX_GATEWAYS
        )));
    }
    let pick = |gw: &Gateway| gw.egress_v4.map(IpAddr::V4).or(gw.egress_v6.map(IpAddr::V6));
    let egress_ip = g
        .gateways
        .iter()
        .find(|gw| gw.node_ip == local)
        .and_then(pick)
        .or_else(|| g.gateways.iter().find_map(pick))
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    Ok(m::EgressGroup { egress_ip, gateways })
}

/// A domain group decoded from the map alone: every gateway is given the one egress IP the map holds.
pub fn group_from_bpf(g: &m::EgressGroup) -> EgressGroup {
    let (v4, v6) = match g.egress_ip {
        IpAddr::V4(a) if a.is_unspecified() => (None, None),
        IpAddr::V4(a) => (Some(a), None),
        IpAddr::V6(a) => (None, Some(a)),
    };
    EgressGroup {
        gateways: g
            .gateways
            .iter()
            .map(|gw| Gateway { node_ip: IpAddr::V4(*gw), egress_v4: v4, egress_v6: v6 })
            .collect(),
    }
}

/// Runs `ip` in the calling thread's network namespace.
pub(crate) fn ip(args: &[&str]) -> Result<String, KernelError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| KernelError::Ip { args: args.join(" "), reason: e.to_string() })?;
    if !out.status.success() {
        return Err(KernelError::Ip {
            args: args.join(" "),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prefixes routed through `ifname` (main table), IPv4 and IPv6.
fn routes_on(ifname: &str) -> Result<Vec<IpNet>, KernelError> {
    let mut out = Vec::new();
    for fam in ["-4", "-6"] {
        let text = match ip(&[fam, "route", "show", "dev", ifname]) {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "listing routes through the tunnel");
                continue;
            }
        };
        for line in text.lines() {
            let Some(dst) = line.split_whitespace().next() else { continue };
            // Host routes print without a prefix length; link-local and multicast are the kernel's own.
            let net = dst.parse::<IpNet>().ok().or_else(|| dst.parse::<IpAddr>().ok().map(IpNet::from));
            if let Some(net) = net {
                if !matches!(net, IpNet::V6(n) if n.addr().segments()[0] & 0xff00 == 0xff00 || n.addr().segments()[0] == 0xfe80)
                {
                    out.push(net);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(node: &str, v4: Option<&str>) -> Gateway {
        Gateway { node_ip: node.parse().unwrap(), egress_v4: v4.map(|s| s.parse().unwrap()), egress_v6: None }
    }

    #[test]
    fn group_takes_the_local_gateways_egress_ip() {
        let g = EgressGroup {
            gateways: vec![gw("192.168.0.2", Some("203.0.113.2")), gw("192.168.0.3", Some("203.0.113.3"))],
        };
        let on_gw3 = group_value("192.168.0.3".parse().unwrap(), &g).unwrap();
        assert_eq!(on_gw3.egress_ip, "203.0.113.3".parse::<IpAddr>().unwrap());
        assert_eq!(on_gw3.gateways, vec!["192.168.0.2".parse::<Ipv4Addr>().unwrap(), "192.168.0.3".parse().unwrap()]);
        let on_source = group_value("192.168.0.9".parse().unwrap(), &g).unwrap();
        assert_eq!(on_source.egress_ip, "203.0.113.2".parse::<IpAddr>().unwrap());
        // Decoded without a shadow: the gateways survive, the egress IP is the one the map holds.
        let back = group_from_bpf(&on_gw3);
        assert_eq!(back.gateways.len(), 2);
        assert!(back.gateways.iter().all(|g| g.egress_v4 == Some("203.0.113.3".parse().unwrap())));
        let empty = group_value("192.168.0.3".parse().unwrap(), &EgressGroup::default()).unwrap();
        assert!(empty.gateways.is_empty());
        assert_eq!(group_from_bpf(&empty), EgressGroup::default());
        let too_many = EgressGroup { gateways: (0..9).map(|i| gw(&format!("10.0.0.{i}"), None)).collect() };
        assert!(group_value("10.0.0.1".parse().unwrap(), &too_many).is_err());
    }

    #[test]
    fn plen_use_reports_the_last_entry_of_a_length() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let mut u = PlenUse::from_entries([(1, n("203.0.113.0/24")), (2, n("198.51.100.0/24")), (1, n("10.0.0.0/8"))]);
        u.added(1, n("203.0.113.0/24")); // the same key again counts once
        u.added(3, n("2001:db8::/24")); // same length, other family: counted apart
        assert!(!u.removed(1, n("203.0.113.0/24")), "another /24 remains");
        assert!(!u.removed(1, n("203.0.113.0/24")), "already gone: nothing to prune");
        assert!(u.removed(2, n("198.51.100.7/24")), "the last IPv4 /24 (given unmasked)");
        assert!(u.removed(3, n("2001:db8::/24")), "the last IPv6 /24");
        assert!(!u.removed(9, n("10.0.0.0/8")), "never added under class 9");
        assert!(u.removed(1, n("10.0.0.0/8")));
    }

    #[test]
    fn ipcache_projection() {
        let v = IpcacheValue {
            identity: reserved::REMOTE_NODE,
            cluster_id: 7,
            tunnel_endpoint: Some("192.168.1.1".parse().unwrap()),
            encrypt_key: 3,
        };
        let e = ipcache_entry(&v).unwrap();
        assert!(e.is_node && e.remote_cluster);
        assert_eq!(ipcache_from_entry(&e), IpcacheValue { encrypt_key: 0, ..v });
        assert!(ipcache_entry(&IpcacheValue { cluster_id: 70_000, ..v }).is_err());
        let v6 = IpcacheValue { tunnel_endpoint: Some("fd00::1".parse().unwrap()), ..v };
        assert_eq!(ipcache_entry(&v6).unwrap().tunnel_endpoint, None);
    }
}
