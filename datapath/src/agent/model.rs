//! Domain types of what the datapath holds, independent of how the BPF maps encode them.
//!
//! [`MapContents`] is both the desired state (what the agent computed) and the programmed state (what a
//! [`crate::agent::Datapath`] read back from the pinned maps): the planner diffs two of them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Reserved security identities (Cilium's numbering, which the store shares).
pub mod reserved {
    /// Unknown / outside the mesh.
    pub const WORLD: u32 = 2;
    /// A remote cluster's node.
    pub const REMOTE_NODE: u32 = 6;
}

/// A source class: the set of egress policies that select a pod. Pods selecting the same set share one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClassId(pub u32);

/// An egress target: one policy's gateway set (see [`EgressGroup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u32);

impl fmt::Display for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "class{}", self.0)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group{}", self.0)
    }
}

/// The value of one ipcache entry: who an address is and how to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub cluster_id: u32,
    /// The node to tunnel to; `None` for addresses reached directly (node IPs themselves).
    pub tunnel_endpoint: Option<IpAddr>,
    pub encrypt_key: u8,
}

/// What the LPM egress map says for (class, destination prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressVerdict {
    /// Steer to this group's gateways.
    Steer(GroupId),
    /// An excluded CIDR: route normally. Only present where it overrides a shorter steering prefix.
    Excluded,
}

/// One gateway of an [`EgressGroup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway {
    /// The gateway node's IP (tunnel destination).
    pub node_ip: IpAddr,
    /// The address it SNATs IPv4 traffic to; `None`: IPv4 traffic of this policy is dropped at this gateway.
    pub egress_v4: Option<Ipv4Addr>,
    /// The same for IPv6.
    pub egress_v6: Option<Ipv6Addr>,
}

/// A policy's gateway set, in the controller's order. A flow picks one by hash and conntrack pins it there.
/// Empty means "no healthy gateway": the datapath drops the traffic rather than let it leave with a pod IP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressGroup {
    pub gateways: Vec<Gateway>,
}

/// Most gateways one group entry holds (the BPF value is a fixed array; Isovalent also caps at 64).
pub const MAX_GATEWAYS: usize = 64;

/// Direction of an identity policy rule, seen from the local endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// Key of the identity policy map (traffic to and from remote clusters). Filled by the cross-cluster policy work;
/// the agent only carries it through the planner so that map is programmed like the others. `None` port or protocol
/// is the wildcard (the same shape as the BPF map's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// The remote peer's security identity.
    pub remote_identity: u32,
    pub dport: Option<u16>,
    pub proto: Option<u8>,
    pub direction: Direction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyVerdict {
    Allow,
    Deny,
}

/// A WireGuard public key (32 bytes; shown base64 like `wg`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WgKey(pub [u8; 32]);

impl WgKey {
    /// Parses the base64 form found in node records.
    pub fn from_base64(s: &str) -> Option<WgKey> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim()).ok()?;
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(WgKey(arr))
    }

    pub fn to_base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({})", self.to_base64())
    }
}

/// A WireGuard peer: one remote node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// UDP endpoint: the node's IP and the mesh's WireGuard port.
    pub endpoint: (IpAddr, u16),
    /// Sorted, normalized: the node's pod CIDRs and its node IPs as host prefixes.
    pub allowed_ips: Vec<IpNet>,
}

/// A route to a remote prefix, through the tunnel towards the node it lives behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub via_node: IpAddr,
}

/// Everything the agent programs: BPF maps, WireGuard peers and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapContents {
    pub ipcache: BTreeMap<IpNet, IpcacheValue>,
    pub identity_policy: BTreeMap<PolicyKey, PolicyVerdict>,
    /// Egress SRC map: source pod IP → class (one entry per selected pod).
    pub egress_src: BTreeMap<IpAddr, ClassId>,
    /// Egress LPM map: (class, destination prefix) → verdict (entries = classes × CIDRs, independent of pods).
    pub egress_lpm: BTreeMap<(ClassId, IpNet), EgressVerdict>,
    /// Egress GROUPS map.
    pub egress_groups: BTreeMap<GroupId, EgressGroup>,
    pub wg_peers: BTreeMap<WgKey, WgPeer>,
    pub routes: BTreeMap<IpNet, Route>,
}

/// Which map a count or an op concerns (also the `map` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapKind {
    Ipcache,
    IdentityPolicy,
    EgressSrc,
    EgressLpm,
    EgressGroups,
    WgPeers,
    Routes,
}

impl MapKind {
    pub const ALL: [MapKind; 7] = [
        MapKind::Ipcache,
        MapKind::IdentityPolicy,
        MapKind::EgressSrc,
        MapKind::EgressLpm,
        MapKind::EgressGroups,
        MapKind::WgPeers,
        MapKind::Routes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MapKind::Ipcache => "ipcache",
            MapKind::IdentityPolicy => "identity_policy",
            MapKind::EgressSrc => "egress_src",
            MapKind::EgressLpm => "egress_lpm",
            MapKind::EgressGroups => "egress_groups",
            MapKind::WgPeers => "wireguard_peers",
            MapKind::Routes => "routes",
        }
    }
}

impl MapContents {
    pub fn len(&self, map: MapKind) -> usize {
        match map {
            MapKind::Ipcache => self.ipcache.len(),
            MapKind::IdentityPolicy => self.identity_policy.len(),
            MapKind::EgressSrc => self.egress_src.len(),
            MapKind::EgressLpm => self.egress_lpm.len(),
            MapKind::EgressGroups => self.egress_groups.len(),
            MapKind::WgPeers => self.wg_peers.len(),
            MapKind::Routes => self.routes.len(),
        }
    }

    /// The egress verdict the datapath would reach for `src` → `dst`, by longest prefix match (what the BPF
    /// program does). Used by tests and `causeway egress status`-style debugging.
    pub fn egress_lookup(&self, src: IpAddr, dst: IpAddr) -> Option<EgressVerdict> {
        let class = *self.egress_src.get(&src)?;
        let max = if dst.is_ipv4() { 32 } else { 128 };
        (0..=max).rev().find_map(|len| {
            let net = IpNet::new(dst, len).ok()?.trunc();
            self.egress_lpm.get(&(class, net)).copied()
        })
    }
}

/// A host prefix (/32 or /128) for an address.
pub fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}
