//! Typed handles on the pinned maps, in domain terms (prefixes, identities, gateways) rather than raw
//! structs. Each handle owns an fd to the pinned map, so the agent can open them without loading programs
//! (after a restart) and tests can open them beside the loaded programs.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use ipnet::IpNet;

use super::types::*;
use super::BpfError;

/// The names of the maps this module wraps (pinned under the pin directory by these names).
pub mod names {
    pub const CONFIG: &str = "cw_config";
    pub const IPCACHE: &str = "cw_ipcache";
    pub const EGRESS_SRC: &str = "cw_egress_src";
    pub const EGRESS_POLICY: &str = "cw_egress_policy";
    pub const EGRESS_PLENS: &str = "cw_egress_plens";
    pub const EGRESS_GROUPS: &str = "cw_egress_groups";
    pub const EGRESS_CT: &str = "cw_egress_ct";
    pub const POLICY: &str = "cw_policy";
    pub const DROPS: &str = "cw_drops";
    /// Every map the steering and policy objects pin.
    pub const ALL: &[&str] =
        &[CONFIG, IPCACHE, EGRESS_SRC, EGRESS_POLICY, EGRESS_PLENS, EGRESS_GROUPS, EGRESS_CT, POLICY, DROPS];
}

fn open(pin_dir: &Path, name: &'static str) -> Result<Map, BpfError> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(|source| BpfError::Map { map: name, source })?;
    Map::from_map_data(data).map_err(|source| BpfError::Map { map: name, source })
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| BpfError::Map { map, source }
}

/// `ENOENT` from a delete or lookup: the entry was not there.
fn is_not_found(e: &MapError) -> bool {
    // aya 0.14 reports a lookup miss as KeyNotFound, but a delete miss as the raw syscall's ENOENT.
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(nix::libc::ENOENT),
        _ => false,
    }
}

fn be_u16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

// ---------------------------------------------------------------------------------------------------------------
// node config

/// What this node's programs need to know about the node itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's underlay IPv4: a gateway with this address is local.
    pub node_ipv4: Ipv4Addr,
    /// Ifindex of the VXLAN collect-metadata device steered packets are redirected to.
    pub vxlan_ifindex: u32,
    /// Whether `cw_from_remote` drops what the identity policy does not allow.
    pub enforce_policy: bool,
}

pub struct ConfigMap(Array<MapData, ConfigValue>);

impl ConfigMap {
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Ok(Self(Array::try_from(open(pin_dir, names::CONFIG)?).map_err(map_err(names::CONFIG))?))
    }

    pub fn set(&mut self, cfg: NodeConfig) -> Result<(), BpfError> {
        let v = ConfigValue {
            node_ipv4: cfg.node_ipv4.octets(),
            vxlan_ifindex: cfg.vxlan_ifindex,
            flags: if cfg.enforce_policy { CFG_ENFORCE_POLICY } else { 0 },
            pad: 0,
        };
        self.0.set(0, v, 0).map_err(map_err(names::CONFIG))
    }

    pub fn get(&self) -> Result<NodeConfig, BpfError> {
        let v = self.0.get(&0, 0).map_err(map_err(names::CONFIG))?;
        Ok(NodeConfig {
            node_ipv4: Ipv4Addr::from(v.node_ipv4),
            vxlan_ifindex: v.vxlan_ifindex,
            enforce_policy: v.flags & CFG_ENFORCE_POLICY != 0,
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// ipcache

/// What the ipcache knows about a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcacheEntry {
    pub identity: u32,
    pub cluster_id: u16,
    /// The prefix is a node address rather than pods.
    pub is_node: bool,
    /// The entry came from another cluster of the mesh.
    pub remote_cluster: bool,
    /// Underlay IPv4 of the node hosting the address, if any.
    pub tunnel_endpoint: Option<Ipv4Addr>,
}

impl From<IpcacheEntry> for IpcacheValue {
    fn from(e: IpcacheEntry) -> Self {
        let mut flags = 0;
        if e.is_node {
            flags |= IPCACHE_F_NODE;
        }
        if e.remote_cluster {
            flags |= IPCACHE_F_REMOTE_CLUSTER;
        }
        IpcacheValue {
            identity: e.identity,
            cluster_id: e.cluster_id,
            flags,
            tunnel_endpoint: e.tunnel_endpoint.map(|a| a.octets()).unwrap_or([0; 4]),
        }
    }
}

impl From<IpcacheValue> for IpcacheEntry {
    fn from(v: IpcacheValue) -> Self {
        IpcacheEntry {
            identity: v.identity,
            cluster_id: v.cluster_id,
            is_node: v.flags & IPCACHE_F_NODE != 0,
            remote_cluster: v.flags & IPCACHE_F_REMOTE_CLUSTER != 0,
            tunnel_endpoint: (v.tunnel_endpoint != [0; 4]).then(|| Ipv4Addr::from(v.tunnel_endpoint)),
        }
    }
}

pub struct IpcacheMap(LpmTrie<MapData, IpcacheKeyData, IpcacheValue>);

impl IpcacheMap {
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Ok(Self(LpmTrie::try_from(open(pin_dir, names::IPCACHE)?).map_err(map_err(names::IPCACHE))?))
    }

    /// Insert or replace the entry for `prefix` (host bits are ignored).
    pub fn upsert(&mut self, prefix: IpNet, entry: IpcacheEntry) -> Result<(), BpfError> {
        let key = IpcacheKeyData::lpm_key(prefix.trunc());
        self.0.insert(&key, IpcacheValue::from(entry), 0).map_err(map_err(names::IPCACHE))
    }

    /// Remove `prefix`; `Ok(false)` if it was not there.
    pub fn delete(&mut self, prefix: IpNet) -> Result<bool, BpfError> {
        match self.0.remove(&IpcacheKeyData::lpm_key(prefix.trunc())) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(names::IPCACHE)(e)),
        }
    }

    /// Longest-prefix lookup of one address, as the programs do it.
    pub fn lookup(&self, ip: IpAddr) -> Result<Option<IpcacheEntry>, BpfError> {
        let net = IpNet::from(ip);
        match self.0.get(&IpcacheKeyData::lpm_key(net), 0) {
            Ok(v) => Ok(Some(v.into())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(names::IPCACHE)(e)),
        }
    }

    /// Every entry; entries with an unknown family or prefix length are skipped.
    pub fn entries(&self) -> Result<Vec<(IpNet, IpcacheEntry)>, BpfError> {
        let mut out = Vec::new();
        for kv in self.0.iter() {
            let (k, v) = kv.map_err(map_err(names::IPCACHE))?;
            let data = k.data();
            let Some(ip) = ip_from16(data.family, &data.addr) else { continue };
            let Some(plen) = k.prefix_len().checked_sub(IPCACHE_FIXED_BITS) else { continue };
            let Ok(net) = IpNet::new(ip, plen as u8) else { continue };
            out.push((net, v.into()));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// egress: source classes, (class, CIDR) policy, groups, flow pins

/// A source class: the pods selected by the same set of egress policies. Never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassId(pub u32);

/// An egress group (one policy's gateway set and egress IP). 1..=0xffffff: it travels as the VNI and in the
/// low 24 bits of the packet mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u32);

impl GroupId {
    pub fn is_valid(self) -> bool {
        self.0 != 0 && self.0 <= GROUP_ID_MASK
    }
    /// The packet mark steering sets for this group.
    pub fn mark(self) -> u32 {
        MARK_EGRESS | (self.0 & GROUP_ID_MASK)
    }
}

pub struct EgressSrcMap(HashMap<MapData, EgressSrcKey, u32>);

impl EgressSrcMap {
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Ok(Self(HashMap::try_from(open(pin_dir, names::EGRESS_SRC)?).map_err(map_err(names::EGRESS_SRC))?))
    }

    pub fn upsert(&mut self, pod: IpAddr, class: ClassId) -> Result<(), BpfError> {
        if class.0 == 0 {
            return Err(BpfError::Invalid("source class 0 is reserved".into()));
        }
        self.0.insert(EgressSrcKey::from(pod), class.0, 0).map_err(map_err(names::EGRESS_SRC))
    }

    pub fn delete(&mut self, pod: IpAddr) -> Result<bool, BpfError> {
        match self.0.remove(&EgressSrcKey::from(pod)) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(names::EGRESS_SRC)(e)),
        }
    }

    pub fn get(&self, pod: IpAddr) -> Result<Option<ClassId>, BpfError> {
        match self.0.get(&EgressSrcKey::from(pod), 0) {
            Ok(v) => Ok(Some(ClassId(v))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(names::EGRESS_SRC)(e)),
        }
    }

    pub fn entries(&self) -> Result<Vec<(IpAddr, ClassId)>, BpfError> {
        let mut out = Vec::new();
        for kv in self.0.iter() {
            let (k, v) = kv.map_err(map_err(names::EGRESS_SRC))?;
            if let Some(ip) = ip_from16(k.family, &k.addr) {
                out.push((ip, ClassId(v)));
            }
        }
        Ok(out)
    }
}

/// What a (class, destination prefix) entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressAction {
    /// Steer through this group's gateways.
    Steer(GroupId),
    /// An excluded CIDR: leave the traffic alone (the longest prefix wins, so it carves a hole).
    Excluded,
}

/// The (class, destination prefix) policy: a hash of masked prefixes plus the per-family list of prefix lengths
/// in use, which the program walks longest first (see maps.h for why not an LPM trie).
pub struct EgressPolicyMap {
    entries: HashMap<MapData, EgressPolicyKey, EgressPolicyValue>,
    plens: HashMap<MapData, u32, EgressPlens>,
}

impl EgressPolicyMap {
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Ok(Self {
            entries: HashMap::try_from(open(pin_dir, names::EGRESS_POLICY)?).map_err(map_err(names::EGRESS_POLICY))?,
            plens: HashMap::try_from(open(pin_dir, names::EGRESS_PLENS)?).map_err(map_err(names::EGRESS_PLENS))?,
        })
    }

    pub fn upsert(&mut self, class: ClassId, dest: IpNet, action: EgressAction) -> Result<(), BpfError> {
        let value = match action {
            EgressAction::Steer(g) if g.is_valid() => EgressPolicyValue { group_id: g.0, flags: 0 },
            EgressAction::Steer(g) => return Err(BpfError::Invalid(format!("egress group id {} out of range", g.0))),
            EgressAction::Excluded => EgressPolicyValue { group_id: 0, flags: EGRESS_F_EXCLUDED },
        };
        let key = EgressPolicyKey::new(class.0, dest);
        // The length first: an entry the programs cannot see would be a silent miss.
        let family = u32::from(key.family);
        let have = self.plens_of(family)?;
        if !have.lengths().contains(&key.prefixlen) {
            let list = EgressPlens::from_lengths(have.lengths().iter().copied().chain([key.prefixlen]));
            self.plens.insert(family, list, 0).map_err(map_err(names::EGRESS_PLENS))?;
        }
        self.entries.insert(key, value, 0).map_err(map_err(names::EGRESS_POLICY))
    }

    /// Remove an entry. Its prefix length stays marked in use (costing the programs one extra lookup for that
    /// length) until [`Self::prune_prefix_lengths`].
    pub fn delete(&mut self, class: ClassId, dest: IpNet) -> Result<bool, BpfError> {
        match self.entries.remove(&EgressPolicyKey::new(class.0, dest)) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(names::EGRESS_POLICY)(e)),
        }
    }

    fn plens_of(&self, family: u32) -> Result<EgressPlens, BpfError> {
        match self.plens.get(&family, 0) {
            Ok(p) => Ok(p),
            Err(e) if is_not_found(&e) => Ok(EgressPlens::default()),
            Err(e) => Err(map_err(names::EGRESS_PLENS)(e)),
        }
    }

    /// Recompute the prefix lengths in use from the entries (after a batch of deletes). Call it from the same
    /// task that inserts: a length dropped here while an insert of that length is under way would hide it.
    pub fn prune_prefix_lengths(&mut self) -> Result<(), BpfError> {
        let mut used: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        for k in self.entries.keys() {
            let k = k.map_err(map_err(names::EGRESS_POLICY))?;
            used[usize::from(k.family == FAMILY_V6)].push(k.prefixlen);
        }
        for (family, want) in [(FAMILY_V4, &used[0]), (FAMILY_V6, &used[1])] {
            let family = u32::from(family);
            let want = EgressPlens::from_lengths(want.iter().copied());
            if self.plens_of(family)? != want {
                self.plens.insert(family, want, 0).map_err(map_err(names::EGRESS_PLENS))?;
            }
        }
        Ok(())
    }

    /// The prefix lengths the programs will try for a family, longest first.
    pub fn prefix_lengths(&self, v6: bool) -> Result<Vec<u8>, BpfError> {
        let family = u32::from(if v6 { FAMILY_V6 } else { FAMILY_V4 });
        Ok(self.plens_of(family)?.lengths().to_vec())
    }

    pub fn entries(&self) -> Result<Vec<(ClassId, IpNet, EgressAction)>, BpfError> {
        let mut out = Vec::new();
        for kv in self.entries.iter() {
            let (k, v) = kv.map_err(map_err(names::EGRESS_POLICY))?;
            let Some(ip) = ip_from16(k.family, &k.addr) else { continue };
            let Ok(net) = IpNet::new(ip, k.prefixlen) else { continue };
            let action = if v.flags & EGRESS_F_EXCLUDED != 0 {
                EgressAction::Excluded
            } else {
                EgressAction::Steer(GroupId(v.group_id))
            };
            out.push((ClassId(k.class_id), net, action));
        }
        Ok(out)
    }
}

/// An egress group as SNAT and steering see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressGroup {
    /// The source address after SNAT; its family is the family of the traffic the group serves.
    pub egress_ip: IpAddr,
    /// Healthy gateway nodes (underlay IPv4), in the controller's order; empty = drop (no gateway).
    pub gateways: Vec<Ipv4Addr>,
}

impl TryFrom<&EgressGroup> for EgressGroupValue {
    type Error = BpfError;
    fn try_from(g: &EgressGroup) -> Result<Self, BpfError> {
        if g.gateways.len() > MAX_GATEWAYS {
            return Err(BpfError::Invalid(format!(
                "{} gateways in one egress group, at most {MAX_GATEWAYS}",
                g.gateways.len()
            )));
        }
        let (family, egress_ip) = addr16(g.egress_ip);
        let mut gateways = [[0u8; 4]; MAX_GATEWAYS];
        for (slot, gw) in gateways.iter_mut().zip(&g.gateways) {
            *slot = gw.octets();
        }
        Ok(EgressGroupValue { egress_ip, family, n_gateways: g.gateways.len() as u8, pad: 0, gateways })
    }
}

impl EgressGroupValue {
    /// The domain view; `None` if the family byte is unknown.
    pub fn to_group(&self) -> Option<EgressGroup> {
        let n = usize::from(self.n_gateways).min(MAX_GATEWAYS);
        Some(EgressGroup {
            egress_ip: ip_from16(self.family, &self.egress_ip)?,
            gateways: self.gateways[..n].iter().map(|g| Ipv4Addr::from(*g)).collect(),
        })
    }
}

pub struct EgressGroupsMap(HashMap<MapData, u32, EgressGroupValue>);

impl EgressGroupsMap {
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Ok(Self(HashMap::try_from(open(pin_dir, names::EGRESS_GROUPS)?).map_err(map_err(names::EGRESS_GROUPS))?))
    }

    pub fn upsert(&mut self, id: GroupId, group: &EgressGroup) -> Result<(), BpfError> {
        if !id.is_valid() {
            return Err(BpfError::Invalid(format!("egress group id {} out of range", id.0)));
        }
        let v = EgressGroupValue::try_from(group)?;
        self.0.insert(id.0, v, 0).map_err(map_err(names::EGRESS_GROUPS))
    }

    pub fn delete(&mut self, id: GroupId) -> Result<bool, BpfError> {
        match self.0.remove(&id.0) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(names::EGRESS_GROUPS)(e)),
        }
    }

    pub fn get(&self, id: GroupId) -> Result<Option<EgressGroup>, BpfError> {
        match self.0.get(&id.0, 0) {
            Ok(v) => Ok(v.to_group()),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(names::EGRESS_GROUPS)(e)),
        }
    }

    pub fn entries(&self) -> Result<Vec<(GroupId, EgressGroup)>, BpfError> {
        let mut out = Vec::new();
        for kv in self.0.iter() {
            let (k, v) = kv.map_err(map_err(names::EGRESS_GROUPS))?;
            if let Some(g) = v.to_group() {
                out.push((GroupId(k), g));
            }
        }
        Ok(out)
    }
}

/// The flow a gateway pin is keyed by: the 5-tuple, or the 3-tuple (ports 0) for fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Host order; ICMP echo: the identifier as sport, dport 0.
    pub sport: u16,
    pub dport: u16,
}

impl FlowTuple {
    fn key(&self) -> Result<EgressCtKey, BpfError> {
        let (family, saddr) = addr16(self.src);
        let (dfamily, daddr) = addr16(self.dst);
        if family != dfamily {
            return Err(BpfError::Invalid("flow with mixed address families".into()));
        }
        Ok(EgressCtKey {
            family,
            proto: self.proto,
            sport: self.sport.to_be_bytes(),
            dport: self.dport.to_be_bytes(),
            pad: 0,
            saddr,
            daddr,
        })
    }
}

/// A flow's pinned gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowPin {
    pub gateway: Ipv4Addr,
    pub group: GroupId,
    /// `CLOCK_MONOTONIC` (bpf_ktime_get_ns) of the flow's last packet.
    pub last_seen_ns: u64,
}

pub struct EgressCtMap(HashMap<MapData, EgressCtKey, EgressCtValue>);

impl EgressCtMap {
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Ok(Self(HashMap::try_from(open(pin_dir, names::EGRESS_CT)?).map_err(map_err(names::EGRESS_CT))?))
    }

    pub fn get(&self, flow: &FlowTuple) -> Result<Option<FlowPin>, BpfError> {
        match self.0.get(&flow.key()?, 0) {
            Ok(v) => Ok(Some(FlowPin {
                gateway: Ipv4Addr::from(v.gateway),
                group: GroupId(v.group_id),
                last_seen_ns: v.last_seen_ns,
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(names::EGRESS_CT)(e)),
        }
    }

    pub fn delete(&mut self, flow: &FlowTuple) -> Result<bool, BpfError> {
        match self.0.remove(&flow.key()?) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(names::EGRESS_CT)(e)),
        }
    }

    pub fn entries(&self) -> Result<Vec<(FlowTuple, FlowPin)>, BpfError> {
        let mut out = Vec::new();
        for kv in self.0.iter() {
            let (k, v) = kv.map_err(map_err(names::EGRESS_CT))?;
            let (Some(src), Some(dst)) = (ip_from16(k.family, &k.saddr), ip_from16(k.family, &k.daddr)) else {
                continue;
            };
            out.push((
                FlowTuple { proto: k.proto, src, dst, sport: be_u16(k.sport), dport: be_u16(k.dport) },
                FlowPin {
                    gateway: Ipv4Addr::from(v.gateway),
                    group: GroupId(v.group_id),
                    last_seen_ns: v.last_seen_ns,
                },
            ));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// identity policy

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

/// One identity policy rule. `None` port or protocol is the wildcard; the programs try the exact
/// (port, protocol), then any port, then any protocol, and the first rule found decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyRule {
    pub remote_identity: u32,
    pub dport: Option<u16>,
    pub proto: Option<u8>,
    pub direction: Direction,
}

impl PolicyRule {
    fn key(&self) -> Result<PolicyKey, BpfError> {
        if self.dport.is_some() && self.proto.is_none() {
            // The lookup order never tries {port, any protocol}: such a rule could never match.
            return Err(BpfError::Invalid("a policy rule with a port needs a protocol".into()));
        }
        Ok(PolicyKey {
            identity: self.remote_identity,
            dport: self.dport.unwrap_or(0),
            proto: self.proto.unwrap_or(0),
            direction: match self.direction {
                Direction::Ingress => DIR_INGRESS,
                Direction::Egress => DIR_EGRESS,
            },
        })
    }
}

pub struct PolicyMap(HashMap<MapData, PolicyKey, PolicyValue>);

impl PolicyMap {
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Ok(Self(HashMap::try_from(open(pin_dir, names::POLICY)?).map_err(map_err(names::POLICY))?))
    }

    pub fn upsert(&mut self, rule: PolicyRule, verdict: Verdict) -> Result<(), BpfError> {
        let v = PolicyValue {
            verdict: match verdict {
                Verdict::Allow => VERDICT_ALLOW,
                Verdict::Deny => VERDICT_DENY,
            },
            pad: [0; 3],
        };
        self.0.insert(rule.key()?, v, 0).map_err(map_err(names::POLICY))
    }

    pub fn delete(&mut self, rule: PolicyRule) -> Result<bool, BpfError> {
        match self.0.remove(&rule.key()?) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(names::POLICY)(e)),
        }
    }

    pub fn entries(&self) -> Result<Vec<(PolicyRule, Verdict)>, BpfError> {
        let mut out = Vec::new();
        for kv in self.0.iter() {
            let (k, v) = kv.map_err(map_err(names::POLICY))?;
            let verdict = match v.verdict {
                VERDICT_ALLOW => Verdict::Allow,
                VERDICT_DENY => Verdict::Deny,
                _ => continue,
            };
            let direction = if k.direction == DIR_EGRESS { Direction::Egress } else { Direction::Ingress };
            out.push((
                PolicyRule {
                    remote_identity: k.identity,
                    dport: (k.dport != 0).then_some(k.dport),
                    proto: (k.proto != 0).then_some(k.proto),
                    direction,
                },
                verdict,
            ));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// drop counters

/// `enum cw_drop_reason` (causeway.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    Malformed = 0,
    PolicyDenied = 1,
    NoGateway = 2,
    SnatPortsExhausted = 3,
    SnatNoState = 4,
    TunnelError = 5,
    UnsupportedL4 = 6,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::PolicyDenied,
        DropReason::NoGateway,
        DropReason::SnatPortsExhausted,
        DropReason::SnatNoState,
        DropReason::TunnelError,
        DropReason::UnsupportedL4,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::NoGateway => "no_gateway",
            DropReason::SnatPortsExhausted => "snat_ports_exhausted",
            DropReason::SnatNoState => "snat_no_state",
            DropReason::TunnelError => "tunnel_error",
            DropReason::UnsupportedL4 => "unsupported_l4",
        }
    }
}

pub struct DropsMap(PerCpuArray<MapData, u64>);

impl DropsMap {
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Ok(Self(PerCpuArray::try_from(open(pin_dir, names::DROPS)?).map_err(map_err(names::DROPS))?))
    }

    /// Drops for one reason, summed over CPUs.
    pub fn count(&self, reason: DropReason) -> Result<u64, BpfError> {
        let per_cpu = self.0.get(&(reason as u32), 0).map_err(map_err(names::DROPS))?;
        Ok(per_cpu.iter().sum())
    }

    /// All reasons with their totals.
    pub fn counts(&self) -> Result<Vec<(DropReason, u64)>, BpfError> {
        DropReason::ALL.iter().map(|&r| Ok((r, self.count(r)?))).collect()
    }
}

/// Every map, opened from the pin directory.
pub struct BpfMaps {
    pub config: ConfigMap,
    pub ipcache: IpcacheMap,
    pub egress_src: EgressSrcMap,
    pub egress_policy: EgressPolicyMap,
    pub egress_groups: EgressGroupsMap,
    pub egress_ct: EgressCtMap,
    pub policy: PolicyMap,
    pub drops: DropsMap,
}

impl BpfMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Ok(Self {
            config: ConfigMap::open(pin_dir)?,
            ipcache: IpcacheMap::open(pin_dir)?,
            egress_src: EgressSrcMap::open(pin_dir)?,
            egress_policy: EgressPolicyMap::open(pin_dir)?,
            egress_groups: EgressGroupsMap::open(pin_dir)?,
            egress_ct: EgressCtMap::open(pin_dir)?,
            policy: PolicyMap::open(pin_dir)?,
            drops: DropsMap::open(pin_dir)?,
        })
    }
}
