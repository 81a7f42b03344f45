//! The sans-IO registration logic: who may register, what a request must look like, and what registering a host
//! changes (identity labels, ipcache entries and node record to write and withdraw, identity to release, mesh
//! address). No kube, etcd or gRPC types here; the adapter in `server.rs` gathers the inputs and carries out the
//! [`Plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use causeway_store::labels::{CLUSTER_LABEL, NAMESPACE_LABEL, SOURCE_K8S};
use causeway_store::{ClusterInfo, IpCacheEntry, LabelSet, Node, NodeAddress};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::export::node::valid_wireguard_key;

/// The CN a client certificate must carry to register (the `externalworkload` user `causeway clustermesh enable`
/// issues a certificate for).
pub const EXTERNAL_WORKLOAD_CN: &str = "externalworkload";

/// The namespace label an external workload gets when its object does not set one (as Cilium did).
pub const DEFAULT_NAMESPACE: &str = "default";

/// `Source` written into an external workload's node record: the record comes from a custom resource (the
/// ExternalWorkload), one of the sources Cilium knows (cluster nodes say `kubernetes`).
pub const NODE_SOURCE: &str = "custom-resource";

/// IPv4 ranges a mesh range may not touch: the tunnel would capture "this network", loopback, multicast or
/// reserved/broadcast traffic.
const RESERVED_V4: [(&str, Ipv4Addr, u8); 4] = [
    ("\"this network\"", Ipv4Addr::new(0, 0, 0, 0), 8),
    ("loopback", Ipv4Addr::new(127, 0, 0, 0), 8),
    ("multicast", Ipv4Addr::new(224, 0, 0, 0), 4),
    ("reserved and broadcast", Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// Why a registration is refused. Each maps to one gRPC status code in the adapter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "client certificate CN is {0:?}, not \"externalworkload\": only the external-workload certificate may register"
    )]
    NotExternalWorkload(String),
    #[error("no client certificate: registration needs the external-workload certificate (mTLS)")]
    NoClientCertificate,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(
        "no ExternalWorkload named {0:?} in this cluster: create it first (its name must be the host's name, its \
         labels become the host's identity)"
    )]
    UnknownWorkload(String),
    #[error("ExternalWorkload {0:?} is being deleted")]
    Deleting(String),
    #[error("address {ip} is already registered by external workload {owner:?}")]
    AddressInUse { ip: IpAddr, owner: String },
    #[error(
        "ExternalWorkload {0:?} has no spec.ipv4AllocCIDR: a host that registers a WireGuard key needs one (its first \
         usable address becomes the host's mesh address), e.g. 10.192.1.0/30"
    )]
    NoAllocCidr(String),
    #[error("spec.{field} {cidr:?} cannot be used: {why}")]
    BadAllocCidr { field: &'static str, cidr: String, why: String },
    #[error(
        "{what} overlaps {theirs} of external workload {owner:?}: ranges and addresses of two hosts must not overlap"
    )]
    Overlap { what: String, theirs: IpNet, owner: String },
    #[error(
        "a Node of this cluster is named {0:?}: the host's node record would replace that node's; give the \
         ExternalWorkload (and the host) another name"
    )]
    NodeNameTaken(String),
}

impl Refusal {
    /// The `result` label of `causeway_workload_registrations_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Refusal::NotExternalWorkload(_) | Refusal::NoClientCertificate => "denied",
            Refusal::Invalid(_) => "invalid",
            Refusal::UnknownWorkload(_) => "unknown_workload",
            Refusal::Deleting(_) => "deleting",
            Refusal::AddressInUse { .. } => "address_in_use",
            Refusal::NoAllocCidr(_) => "no_alloc_cidr",
            Refusal::BadAllocCidr { .. } => "bad_alloc_cidr",
            Refusal::Overlap { .. } => "overlap",
            Refusal::NodeNameTaken(_) => "node_name_taken",
        }
    }

    /// The reason of the `Ready=False` condition written into the object's status when this refusal concerns an
    /// object that exists; None for refusals about the caller (certificate) or a missing/deleting object.
    pub fn condition_reason(&self) -> Option<&'static str> {
        match self {
            Refusal::Invalid(_) => Some("InvalidRequest"),
            Refusal::AddressInUse { .. } => Some("AddressInUse"),
            Refusal::NoAllocCidr(_) => Some("NoAllocCIDR"),
            Refusal::BadAllocCidr { .. } => Some("InvalidAllocCIDR"),
            Refusal::Overlap { .. } => Some("AllocCIDROverlap"),
            Refusal::NodeNameTaken(_) => Some("NodeNameTaken"),
            Refusal::NotExternalWorkload(_)
            | Refusal::NoClientCertificate
            | Refusal::UnknownWorkload(_)
            | Refusal::Deleting(_) => None,
        }
    }
}

/// Checks the peer's certificate CN (None: no certificate, or no CN in it).
pub fn authorize(cn: Option<&str>, had_certificate: bool) -> Result<(), Refusal> {
    match cn {
        Some(EXTERNAL_WORKLOAD_CN) => Ok(()),
        Some(other) => Err(Refusal::NotExternalWorkload(other.chars().take(64).collect())),
        None if had_certificate => Err(Refusal::NotExternalWorkload(String::new())),
        None => Err(Refusal::NoClientCertificate),
    }
}

/// A validated registration request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    /// The host's WireGuard public key (standard base64 of 32 bytes): the host joins the mesh datapath.
    pub wireguard_key: Option<String>,
}

impl Request {
    /// The host's underlay addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips = vec![IpAddr::V4(self.ipv4)];
        ips.extend(self.ipv6.map(IpAddr::V6));
        ips
    }
}

/// Checks that `name` is a DNS subdomain (an object name). Done before anything else: the object is looked up by
/// it, and refusals of the other fields are written into that object's status.
pub fn parse_name(name: &str) -> Result<(), Refusal> {
    let short: String = name.chars().take(64).collect();
    if name.is_empty() || name.len() > 253 {
        return Err(Refusal::Invalid(format!("name {short:?} must be 1 to 253 characters")));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        return Err(Refusal::Invalid(format!(
            "name {short:?} is not a valid object name (lowercase letters, digits, '-' and '.')"
        )));
    }
    Ok(())
}

/// Validates the raw request fields: `name` a DNS subdomain (an object name), `ipv4` a usable unicast IPv4
/// address, `ipv6` empty or a usable unicast IPv6 address, `wireguard_key` empty or standard base64 of 32 bytes.
pub fn parse_request(name: &str, ipv4: &str, ipv6: &str, wireguard_key: &str) -> Result<Request, Refusal> {
    parse_name(name)?;
    let v4: Ipv4Addr = ipv4.trim().parse().map_err(|_| {
        Refusal::Invalid(format!("ipv4 {:?} is not an IPv4 address", ipv4.chars().take(64).collect::<String>()))
    })?;
    if v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast() {
        return Err(Refusal::Invalid(format!("ipv4 {v4} is not a unicast address another host can reach")));
    }
    let v6 = match ipv6.trim() {
        "" => None,
        s => {
            let v6: Ipv6Addr = s.parse().map_err(|_| {
                Refusal::Invalid(format!("ipv6 {:?} is not an IPv6 address", s.chars().take(64).collect::<String>()))
            })?;
            if v6.is_unspecified() || v6.is_loopback() || v6.is_multicast() || v6.to_ipv4_mapped().is_some() {
                return Err(Refusal::Invalid(format!("ipv6 {v6} is not a unicast address another host can reach")));
            }
            Some(v6)
        }
    };
    let key = match wireguard_key.trim() {
        "" => None,
        k if valid_wireguard_key(k) => Some(k.to_string()),
        k => {
            return Err(Refusal::Invalid(format!(
                "wireguard_pub_key {:?} is not a WireGuard public key (standard base64 of 32 bytes, as `wg pubkey` \
                 prints it)",
                k.chars().take(64).collect::<String>()
            )))
        }
    };
    Ok(Request { name: name.to_string(), ipv4: v4, ipv6: v6, wireguard_key: key })
}

/// The registration an earlier process carried out, rebuilt from the object's status (its `ip`, `ipv6` and
/// `wireguardPublicKey`), so that a restarted apiserver exports registered hosts again without waiting for them
/// to re-register. None when the status holds no usable IPv4 address (never registered, or mangled); a mangled
/// key is dropped (the host is then exported without its node record until it registers again).
pub fn request_from_status(name: &str, ip: Option<&str>, ipv6: Option<&str>, key: Option<&str>) -> Option<Request> {
    let mut req = parse_request(name, ip?, ipv6.unwrap_or(""), "").ok()?;
    req.wireguard_key = key.map(str::trim).filter(|k| valid_wireguard_key(k)).map(str::to_string);
    Some(req)
}

/// The host's mesh address in its range: the first usable address, i.e. the one after the network address; a
/// /31 has no network or broadcast address (RFC 3021), so its first address, and a /32 is the address itself.
pub fn mesh_address(cidr: Ipv4Net) -> Ipv4Addr {
    match cidr.prefix_len() {
        31 | 32 => cidr.network(),
        _ => Ipv4Addr::from(u32::from(cidr.network()) + 1),
    }
}

/// Parses and checks `spec.ipv4AllocCIDR`: an IPv4 CIDR without host bits, clear of reserved ranges.
pub fn parse_alloc_cidr_v4(cidr: &str) -> Result<Ipv4Net, Refusal> {
    let bad =
        |why: String| Refusal::BadAllocCidr { field: "ipv4AllocCIDR", cidr: cidr.chars().take(64).collect(), why };
    let net: Ipv4Net = cidr.trim().parse().map_err(|_| bad("not an IPv4 CIDR such as 10.192.1.0/30".into()))?;
    if net.trunc() != net {
        return Err(bad(format!("it has host bits set (did you mean {}?)", net.trunc())));
    }
    for (what, addr, len) in RESERVED_V4 {
        let reserved = Ipv4Net::new(addr, len).unwrap_or_default();
        if reserved.contains(&net.network()) || net.contains(&reserved.network()) {
            return Err(bad(format!("it overlaps the {what} range {reserved}")));
        }
    }
    Ok(net)
}

/// Parses and checks `spec.ipv6AllocCIDR` (exported as the host's IPv6 pod CIDR when it joins the datapath).
pub fn parse_alloc_cidr_v6(cidr: &str) -> Result<Ipv6Net, Refusal> {
    let bad =
        |why: String| Refusal::BadAllocCidr { field: "ipv6AllocCIDR", cidr: cidr.chars().take(64).collect(), why };
    let net: Ipv6Net = cidr.trim().parse().map_err(|_| bad("not an IPv6 CIDR such as fd00:192::/64".into()))?;
    if net.trunc() != net {
        return Err(bad(format!("it has host bits set (did you mean {}?)", net.trunc())));
    }
    if net.prefix_len() < 8 || net.network().is_multicast() || net.network().is_loopback() {
        return Err(bad("it is not a unicast range a host can be given".into()));
    }
    Ok(net)
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A host in the mesh datapath: its key, its ranges and its mesh address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    pub wireguard_key: String,
    pub ipv4_cidr: Ipv4Net,
    pub ipv6_cidr: Option<Ipv6Net>,
    pub mesh_ipv4: Ipv4Addr,
}

impl Mesh {
    fn ranges(&self) -> Vec<IpNet> {
        let mut r = vec![IpNet::V4(self.ipv4_cidr)];
        r.extend(self.ipv6_cidr.map(IpNet::V6));
        r
    }
}

/// What the adapter read from the ExternalWorkload object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadObject {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `spec.ipv4AllocCIDR` / `spec.ipv6AllocCIDR` as written.
    pub ipv4_alloc_cidr: Option<String>,
    pub ipv6_alloc_cidr: Option<String>,
    /// Addresses in the object's status (`ip`, `ipv6`, `meshIPv4`: what the last registration exported, possibly
    /// by an earlier process).
    pub status_ips: Vec<IpAddr>,
    /// The status names a WireGuard key: a node record was exported for the host.
    pub status_keyed: bool,
    /// A Node of the cluster has the object's name (its node record has the same key as the host's would).
    pub node_name_taken: bool,
}

/// The identity labels of an external workload: its object's labels as `k8s:` labels, the namespace label (the
/// object's own `io.kubernetes.pod.namespace` label, or `default`), and this cluster's name as the cluster label
/// (an object's own cluster label is ignored: a host cannot claim another cluster's identity).
pub fn identity_labels(cluster: &str, labels: &BTreeMap<String, String>) -> (LabelSet, String) {
    let namespace = labels.get(NAMESPACE_LABEL).cloned().unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let mut set = LabelSet::new();
    for (k, v) in labels {
        if k != NAMESPACE_LABEL && k != CLUSTER_LABEL {
            set.insert(SOURCE_K8S, k, v);
        }
    }
    set.insert(SOURCE_K8S, NAMESPACE_LABEL, &namespace);
    set.insert(SOURCE_K8S, CLUSTER_LABEL, cluster);
    (set, namespace)
}

/// The ipcache entry of one of the host's addresses, named by its namespace label and object name as a pod would
/// be. `host_ip` is where the address lives: the underlay address itself, or for the mesh address the host's
/// underlay IPv4 (the WireGuard endpoint).
pub fn ipcache_entry(ip: IpAddr, host_ip: IpAddr, id: u32, namespace: &str, name: &str) -> IpCacheEntry {
    IpCacheEntry {
        ip,
        host_ip: Some(host_ip),
        id,
        key: 0,
        metadata: String::new(),
        k8s_namespace: namespace.to_string(),
        k8s_pod_name: name.to_string(),
        k8s_pod_uid: None,
        k8s_service_account: None,
        named_ports: Vec::new(),
    }
}

/// The node record of a host in the mesh datapath, in the shape cluster nodes are exported in (see
/// `export::node::store_node`): its underlay addresses as internal IPs, its ranges as pod CIDRs, its WireGuard key.
/// Node agents and peers turn it into a WireGuard peer whose allowed IPs are the ranges.
pub fn node_record(cluster: &ClusterInfo, req: &Request, mesh: &Mesh, labels: &BTreeMap<String, String>) -> Node {
    Node {
        name: req.name.clone(),
        cluster: cluster.name.to_string(),
        addresses: req.ips().into_iter().map(|ip| NodeAddress { kind: "InternalIP".to_string(), ip }).collect(),
        ipv4_alloc_cidr: Some(IpNet::V4(mesh.ipv4_cidr)),
        ipv6_alloc_cidr: mesh.ipv6_cidr.map(IpNet::V6),
        ipv4_health_ip: None,
        ipv4_ingress_ip: None,
        cluster_id: cluster.id.get(),
        source: NODE_SOURCE.to_string(),
        encryption_key: 0,
        labels: labels.clone(),
        annotations: BTreeMap::new(),
        wireguard_pub_key: mesh.wireguard_key.clone(),
        boot_id: String::new(),
    }
}

/// One registered host, as this process exported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub labels: LabelSet,
    pub id: u32,
    /// The registration as carried out.
    pub request: Request,
    /// Its place in the mesh datapath, when it registered a key.
    pub mesh: Option<Mesh>,
    /// Every address with an ipcache entry: underlay addresses, then the mesh address.
    pub ips: Vec<IpAddr>,
}

impl Registered {
    /// The object as the core should see it to re-plan this registration (e.g. after the object's labels
    /// changed): with the ranges the host registered with, not ones edited into the spec since. A host learns a
    /// new mesh address only by registering again.
    pub fn pinned(&self, mut object: WorkloadObject) -> WorkloadObject {
        if let Some(m) = &self.mesh {
            object.ipv4_alloc_cidr = Some(m.ipv4_cidr.to_string());
            object.ipv6_alloc_cidr = m.ipv6_cidr.map(|n| n.to_string());
        }
        object
    }

    /// What the host holds: its underlay addresses (as host routes) and its ranges.
    fn claims(&self) -> Vec<IpNet> {
        let mut c: Vec<IpNet> = self.request.ips().into_iter().map(IpNet::from).collect();
        c.extend(self.mesh.iter().flat_map(Mesh::ranges));
        c
    }
}

/// What registering a host changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub request: Request,
    pub labels: LabelSet,
    pub namespace: String,
    /// The identity this process already holds for `labels` (same labels as last time): no new acquisition.
    pub reuse_id: Option<u32>,
    /// The host's place in the mesh datapath (node record, mesh address) when it registered a key.
    pub mesh: Option<Mesh>,
    /// Addresses exported for this host before that it no longer has: their ipcache entries are withdrawn.
    pub withdraw: Vec<IpAddr>,
    /// The host had a node record and registered without a key now: the record is withdrawn.
    pub withdraw_node: bool,
    /// The label set this process held for the host before, when its labels changed: released after the new one
    /// is acquired.
    pub release: Option<LabelSet>,
}

impl Plan {
    /// Every address that gets an ipcache entry: underlay addresses (IPv4 first), then the mesh address.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips = self.request.ips();
        ips.extend(self.mesh.as_ref().map(|m| IpAddr::V4(m.mesh_ipv4)));
        ips
    }

    /// The ipcache entries to write, with identity `id`: underlay addresses are their own host IP, the mesh address
    /// lives behind the underlay IPv4.
    pub fn ipcache_entries(&self, id: u32) -> Vec<IpCacheEntry> {
        let name = self.request.name.as_str();
        let mut out: Vec<IpCacheEntry> =
            self.request.ips().into_iter().map(|ip| ipcache_entry(ip, ip, id, &self.namespace, name)).collect();
        if let Some(m) = &self.mesh {
            let underlay = IpAddr::V4(self.request.ipv4);
            out.push(ipcache_entry(IpAddr::V4(m.mesh_ipv4), underlay, id, &self.namespace, name));
        }
        out
    }
}

/// Every host registered with this process: which host owns which exported address and which ranges, so that two
/// hosts never share an address or overlapping ranges.
#[derive(Debug, Default)]
pub struct Registry {
    hosts: BTreeMap<String, Registered>,
    owners: BTreeMap<IpAddr, String>,
    /// The cluster's Service CIDRs: a host's range may not overlap them (they are routed to cluster nodes).
    service_cidrs: Vec<IpNet>,
}

impl Registry {
    pub fn new(service_cidrs: Vec<IpNet>) -> Self {
        Registry { service_cidrs, ..Default::default() }
    }

    pub fn get(&self, name: &str) -> Option<&Registered> {
        self.hosts.get(name)
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Hosts in the mesh datapath (with a node record).
    pub fn meshed(&self) -> usize {
        self.hosts.values().filter(|h| h.mesh.is_some()).count()
    }

    /// The host's mesh place from the object's ranges, or why it has none.
    fn mesh(&self, req: &Request, key: &str, object: &WorkloadObject) -> Result<Mesh, Refusal> {
        let v4 = object.ipv4_alloc_cidr.as_deref().map(str::trim).filter(|s| !s.is_empty());
        let v4 = parse_alloc_cidr_v4(v4.ok_or_else(|| Refusal::NoAllocCidr(req.name.clone()))?)?;
        let v6 = match object.ipv6_alloc_cidr.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => Some(parse_alloc_cidr_v6(s)?),
            None => None,
        };
        let mesh = Mesh { wireguard_key: key.to_string(), ipv4_cidr: v4, ipv6_cidr: v6, mesh_ipv4: mesh_address(v4) };
        for range in mesh.ranges() {
            let field = if range.addr().is_ipv4() { "ipv4AllocCIDR" } else { "ipv6AllocCIDR" };
            let bad = |why: String| Refusal::BadAllocCidr { field, cidr: range.to_string(), why };
            if let Some(ip) = req.ips().into_iter().find(|ip| range.contains(ip)) {
                return Err(bad(format!(
                    "it contains the host's own address {ip}: the tunnel would have to carry its own packets"
                )));
            }
            if let Some(svc) = self.service_cidrs.iter().find(|s| overlaps(s, &range)) {
                return Err(bad(format!("it overlaps the cluster's Service CIDR {svc}")));
            }
        }
        Ok(mesh)
    }

    /// Decides a registration: refuses unknown or deleting objects, a key without a usable range, and addresses or
    /// ranges another host holds; otherwise says what to export and what to withdraw.
    pub fn plan(&self, cluster: &str, req: &Request, object: Option<&WorkloadObject>) -> Result<Plan, Refusal> {
        let object = object.ok_or_else(|| Refusal::UnknownWorkload(req.name.clone()))?;
        if object.deleting {
            return Err(Refusal::Deleting(req.name.clone()));
        }
        for ip in req.ips() {
            if let Some(owner) = self.owners.get(&ip).filter(|o| **o != req.name) {
                return Err(Refusal::AddressInUse { ip, owner: owner.clone() });
            }
        }
        let mesh = match &req.wireguard_key {
            Some(_) if object.node_name_taken => return Err(Refusal::NodeNameTaken(req.name.clone())),
            Some(key) => Some(self.mesh(req, key, object)?),
            None => None,
        };
        let mut mine: Vec<(String, IpNet)> =
            req.ips().into_iter().map(|ip| (format!("address {ip}"), ip.into())).collect();
        for range in mesh.iter().flat_map(Mesh::ranges) {
            let field = if range.addr().is_ipv4() { "ipv4AllocCIDR" } else { "ipv6AllocCIDR" };
            mine.push((format!("spec.{field} {range}"), range));
        }
        for (owner, host) in self.hosts.iter().filter(|(n, _)| **n != req.name) {
            for theirs in host.claims() {
                if let Some((what, _)) = mine.iter().find(|(_, m)| overlaps(m, &theirs)) {
                    return Err(Refusal::Overlap { what: what.clone(), theirs, owner: owner.clone() });
                }
            }
        }
        let (labels, namespace) = identity_labels(cluster, &object.labels);
        let previous = self.hosts.get(&req.name);
        let mut plan = Plan {
            request: req.clone(),
            labels,
            namespace,
            reuse_id: None,
            mesh,
            withdraw: Vec::new(),
            withdraw_node: false,
            release: None,
        };
        let ips = plan.ips();
        let before: BTreeSet<IpAddr> =
            previous.iter().flat_map(|p| p.ips.iter().copied()).chain(object.status_ips.iter().copied()).collect();
        plan.withdraw = before
            .into_iter()
            .filter(|ip| !ips.contains(ip))
            // An address another host registered since is that host's entry now.
            .filter(|ip| self.owners.get(ip).is_none_or(|o| *o == req.name))
            .collect();
        plan.withdraw_node = plan.mesh.is_none() && (previous.is_some_and(|p| p.mesh.is_some()) || object.status_keyed);
        (plan.reuse_id, plan.release) = match previous {
            Some(p) if p.labels == plan.labels => (Some(p.id), None),
            Some(p) => (None, Some(p.labels.clone())),
            None => (None, None),
        };
        Ok(plan)
    }

    /// The object of a registered host was deleted: forgets the host and returns what it held (addresses to
    /// withdraw, node record, label set to release). None when this process never registered it.
    pub fn forget(&mut self, name: &str) -> Option<Registered> {
        let gone = self.hosts.remove(name)?;
        for ip in &gone.ips {
            if self.owners.get(ip).is_some_and(|o| o == name) {
                self.owners.remove(ip);
            }
        }
        Some(gone)
    }

    /// Records a carried-out plan.
    pub fn commit(&mut self, plan: &Plan, id: u32) {
        let name = plan.request.name.as_str();
        if let Some(old) = self.hosts.get(name) {
            for ip in &old.ips {
                if self.owners.get(ip).is_some_and(|o| o == name) {
                    self.owners.remove(ip);
                }
            }
        }
        let ips = plan.ips();
        for ip in &ips {
            self.owners.insert(*ip, name.to_string());
        }
        let registered =
            Registered { labels: plan.labels.clone(), id, request: plan.request.clone(), mesh: plan.mesh.clone(), ips };
        self.hosts.insert(name.to_string(), registered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_store::MaxConnectedClusters;

    /// A WireGuard public key as `wg pubkey` prints it (32 bytes, standard base64).
    const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY2: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn object(name: &str, pairs: &[(&str, &str)]) -> WorkloadObject {
        WorkloadObject { name: name.into(), labels: labels(pairs), ..Default::default() }
    }

    fn with_cidr(mut o: WorkloadObject, v4: &str) -> WorkloadObject {
        o.ipv4_alloc_cidr = Some(v4.into());
        o
    }

    fn req(name: &str, v4: &str, v6: &str) -> Request {
        parse_request(name, v4, v6, "").expect("valid request")
    }

    fn keyed(name: &str, v4: &str, key: &str) -> Request {
        parse_request(name, v4, "", key).expect("valid request")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn only_the_external_workload_certificate_is_authorized() {
        assert_eq!(authorize(Some("externalworkload"), true), Ok(()));
        assert_eq!(authorize(Some("remote-west"), true), Err(Refusal::NotExternalWorkload("remote-west".into())));
        assert_eq!(authorize(Some("root"), true), Err(Refusal::NotExternalWorkload("root".into())));
        assert_eq!(authorize(None, true), Err(Refusal::NotExternalWorkload(String::new())));
        assert_eq!(authorize(None, false), Err(Refusal::NoClientCertificate));
    }

    #[test]
    fn requests_are_validated() {
        let ok = req("db-vm-1.example", "192.0.2.7", " 2001:db8::7 ");
        assert_eq!(ok.ips(), vec![ip("192.0.2.7"), ip("2001:db8::7")]);
        assert_eq!(req("vm", "10.0.0.1", "").ipv6, None);
        assert_eq!(req("vm", "10.0.0.1", "").wireguard_key, None);
        assert_eq!(
            parse_request("vm", "10.0.0.1", "", &format!(" {KEY}\n")).map(|r| r.wireguard_key),
            Ok(Some(KEY.into()))
        );
        for (name, v4, v6, key, expect) in [
            ("", "10.0.0.1", "", "", "1 to 253"),
            ("VM", "10.0.0.1", "", "", "not a valid object name"),
            ("vm_1", "10.0.0.1", "", "", "not a valid object name"),
            ("-vm", "10.0.0.1", "", "", "not a valid object name"),
            ("vm..x", "10.0.0.1", "", "", "not a valid object name"),
            ("vm", "", "", "", "not an IPv4 address"),
            ("vm", "2001:db8::1", "", "", "not an IPv4 address"),
            ("vm", "10.0.0.256", "", "", "not an IPv4 address"),
            ("vm", "0.0.0.0", "", "", "not a unicast"),
            ("vm", "127.0.0.1", "", "", "not a unicast"),
            ("vm", "224.0.0.1", "", "", "not a unicast"),
            ("vm", "10.0.0.1", "10.0.0.2", "", "not an IPv6 address"),
            ("vm", "10.0.0.1", "::1", "", "not a unicast"),
            ("vm", "10.0.0.1", "::ffff:10.0.0.1", "", "not a unicast"),
            // 31 bytes, 33 bytes, URL-safe alphabet, not base64 at all.
            ("vm", "10.0.0.1", "", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8A==", "not a WireGuard public key"),
            ("vm", "10.0.0.1", "", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8DgA", "not a WireGuard public key"),
            ("vm", "10.0.0.1", "", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg_", "not a WireGuard public key"),
            ("vm", "10.0.0.1", "", "not a key", "not a WireGuard public key"),
        ] {
            match parse_request(name, v4, v6, key) {
                Err(Refusal::Invalid(why)) => assert!(why.contains(expect), "{name}/{v4}/{v6}/{key}: {why}"),
                other => panic!("{name}/{v4}/{v6}/{key}: expected Invalid({expect}), got {other:?}"),
            }
        }
        assert!(parse_request(&"a".repeat(254), "10.0.0.1", "", "").is_err());
    }

    #[test]
    fn the_mesh_address_is_the_first_usable_address_of_the_range() {
        for (cidr, mesh) in [
            ("10.192.1.0/30", "10.192.1.1"),
            ("10.192.1.0/24", "10.192.1.1"),
            ("10.192.1.4/30", "10.192.1.5"),
            ("10.192.1.6/31", "10.192.1.6"),
            ("10.192.1.9/32", "10.192.1.9"),
            ("10.0.0.0/8", "10.0.0.1"),
        ] {
            let net = parse_alloc_cidr_v4(cidr).unwrap_or_else(|e| panic!("{cidr}: {e}"));
            assert_eq!(mesh_address(net).to_string(), mesh, "{cidr}");
            assert!(net.contains(&mesh_address(net)), "{cidr}");
        }
    }

    #[test]
    fn unusable_ranges_are_refused_with_the_reason() {
        for (cidr, expect) in [
            ("10.192.1.0", "not an IPv4 CIDR"),
            ("10.192.1.0/33", "not an IPv4 CIDR"),
            ("fd00::/64", "not an IPv4 CIDR"),
            ("garbage", "not an IPv4 CIDR"),
            ("10.192.1.5/30", "did you mean 10.192.1.4/30"),
            ("127.0.0.0/30", "loopback"),
            ("0.0.0.0/0", "\"this network\""),
            ("224.0.0.0/24", "multicast"),
            ("255.255.255.255/32", "broadcast"),
        ] {
            match parse_alloc_cidr_v4(cidr) {
                Err(r @ Refusal::BadAllocCidr { .. }) => assert!(r.to_string().contains(expect), "{cidr}: {r}"),
                other => panic!("{cidr}: expected BadAllocCidr({expect}), got {other:?}"),
            }
        }
        assert!(parse_alloc_cidr_v6("fd00:192::/64").is_ok());
        assert!(parse_alloc_cidr_v6("fd00:192::1/64").is_err());
        assert!(parse_alloc_cidr_v6("10.0.0.0/24").is_err());
        assert!(parse_alloc_cidr_v6("ff02::/16").is_err());
    }

    #[test]
    fn a_key_needs_a_usable_range_clear_of_the_host_and_the_services() {
        let reg = Registry::new(vec!["10.96.0.0/12".parse().expect("cidr")]);
        let o = object("vm", &[("app", "x")]);
        let r = keyed("vm", "192.0.2.7", KEY);
        assert_eq!(reg.plan("east", &r, Some(&o)), Err(Refusal::NoAllocCidr("vm".into())));
        assert_eq!(reg.plan("east", &r, Some(&with_cidr(o.clone(), " "))), Err(Refusal::NoAllocCidr("vm".into())));
        let refusal = |cidr: &str| reg.plan("east", &r, Some(&with_cidr(o.clone(), cidr))).expect_err(cidr);
        assert!(refusal("10.192.1.1/30").to_string().contains("host bits"));
        assert!(refusal("192.0.2.0/24").to_string().contains("the host's own address 192.0.2.7"));
        assert!(refusal("10.100.0.0/30").to_string().contains("Service CIDR 10.96.0.0/12"));
        assert!(refusal("10.0.0.0/8").to_string().contains("Service CIDR 10.96.0.0/12"));
        for cidr in ["10.192.1.1/30", "192.0.2.0/24", "10.100.0.0/30"] {
            assert_eq!(refusal(cidr).metric_label(), "bad_alloc_cidr");
            assert_eq!(refusal(cidr).condition_reason(), Some("InvalidAllocCIDR"));
        }
        // Without a key the range is not looked at.
        assert!(reg.plan("east", &req("vm", "192.0.2.7", ""), Some(&with_cidr(o, "192.0.2.0/24"))).is_ok());
    }

    #[test]
    fn a_keyed_host_may_not_take_a_cluster_node_s_name() {
        let reg = Registry::default();
        let mut o = with_cidr(object("worker-1", &[]), "10.192.1.0/30");
        o.node_name_taken = true;
        let refused = reg.plan("east", &keyed("worker-1", "192.0.2.7", KEY), Some(&o));
        assert_eq!(refused, Err(Refusal::NodeNameTaken("worker-1".into())));
        // Without a key there is no node record to clash.
        assert!(reg.plan("east", &req("worker-1", "192.0.2.7", ""), Some(&o)).is_ok());
    }

    #[test]
    fn a_keyed_registration_exports_the_mesh_address_behind_the_underlay() {
        let reg = Registry::default();
        let o = with_cidr(object("vm", &[("app", "x")]), "10.192.1.0/30");
        let p = reg.plan("east", &keyed("vm", "192.0.2.7", KEY), Some(&o)).expect("plan");
        let mesh = p.mesh.clone().expect("mesh");
        assert_eq!((mesh.mesh_ipv4.to_string(), mesh.wireguard_key.as_str()), ("10.192.1.1".into(), KEY));
        assert_eq!(p.ips(), vec![ip("192.0.2.7"), ip("10.192.1.1")]);
        let entries = p.ipcache_entries(65540);
        assert_eq!(
            entries.iter().map(|e| (e.ip, e.host_ip, e.id)).collect::<Vec<_>>(),
            vec![(ip("192.0.2.7"), Some(ip("192.0.2.7")), 65540), (ip("10.192.1.1"), Some(ip("192.0.2.7")), 65540)]
        );
        let cluster = ClusterInfo::new("east", 7, MaxConnectedClusters::C255).expect("cluster");
        let node = node_record(&cluster, &p.request, &mesh, &o.labels);
        assert_eq!((node.name.as_str(), node.cluster.as_str(), node.cluster_id), ("vm", "east", 7));
        assert_eq!(node.internal_ips().collect::<Vec<_>>(), vec![ip("192.0.2.7")]);
        assert_eq!(node.ipv4_alloc_cidr, Some("10.192.1.0/30".parse().expect("cidr")));
        assert_eq!(node.wireguard_pub_key, KEY);
        // It passes the checks a peer applies to node records.
        let raw = serde_json::to_string(&node).expect("json");
        let back: Node = serde_json::from_str(&raw).expect("parses");
        assert_eq!(back, node);
    }

    #[test]
    fn ranges_of_two_hosts_may_not_overlap() {
        let mut reg = Registry::default();
        let a = with_cidr(object("a", &[("app", "x")]), "10.192.1.0/30");
        let p = reg.plan("east", &keyed("a", "192.0.2.1", KEY), Some(&a)).expect("plan");
        reg.commit(&p, 65540);
        // Same range, a containing range, a range inside it: refused, naming the other host and its range.
        for cidr in ["10.192.1.0/30", "10.192.0.0/16", "10.192.1.2/31", "10.192.1.3/32"] {
            let b = with_cidr(object("b", &[("app", "y")]), cidr);
            let refused = reg.plan("east", &keyed("b", "192.0.2.2", KEY2), Some(&b)).expect_err(cidr);
            assert_eq!(
                refused,
                Refusal::Overlap {
                    what: format!("spec.ipv4AllocCIDR {cidr}"),
                    theirs: "10.192.1.0/30".parse().expect("cidr"),
                    owner: "a".into()
                },
                "{cidr}"
            );
            assert!(refused.to_string().contains("external workload \"a\""), "{refused}");
            assert_eq!(refused.condition_reason(), Some("AllocCIDROverlap"));
        }
        // The neighbouring range is fine.
        let b = with_cidr(object("b", &[("app", "y")]), "10.192.1.4/30");
        let pb = reg.plan("east", &keyed("b", "192.0.2.2", KEY2), Some(&b)).expect("disjoint range");
        reg.commit(&pb, 65541);
        // A host (keyed or not) whose address lies in another host's range is refused too.
        let c = object("c", &[]);
        assert!(matches!(
            reg.plan("east", &req("c", "10.192.1.2", ""), Some(&c)),
            Err(Refusal::Overlap { owner, .. }) if owner == "a"
        ));
        // A range containing another host's underlay address is refused.
        let d = with_cidr(object("d", &[]), "192.0.2.0/30");
        assert!(matches!(
            reg.plan("east", &keyed("d", "198.51.100.1", KEY), Some(&d)),
            Err(Refusal::Overlap { owner, .. }) if owner == "a"
        ));
        // The host itself may register again with its range (idempotent), or move to a new one.
        let again = reg.plan("east", &keyed("a", "192.0.2.1", KEY), Some(&a)).expect("same range again");
        assert_eq!((again.withdraw.clone(), again.withdraw_node), (vec![], false));
        assert_eq!(again.reuse_id, Some(65540));
        // Once a is gone, its range is free.
        reg.forget("a");
        let b2 = with_cidr(object("b2", &[]), "10.192.1.0/30");
        assert!(reg.plan("east", &keyed("b2", "192.0.2.9", KEY), Some(&b2)).is_ok());
    }

    #[test]
    fn a_changed_range_or_a_dropped_key_replaces_the_old_records() {
        let mut reg = Registry::default();
        let o = with_cidr(object("vm", &[("app", "x")]), "10.192.1.0/30");
        let p = reg.plan("east", &keyed("vm", "192.0.2.7", KEY), Some(&o)).expect("plan");
        reg.commit(&p, 65540);
        assert_eq!(reg.meshed(), 1);
        // New range: the old mesh address is withdrawn; the node record is rewritten, not withdrawn.
        let o2 = with_cidr(o.clone(), "10.192.2.0/30");
        let p2 = reg.plan("east", &keyed("vm", "192.0.2.7", KEY2), Some(&o2)).expect("plan");
        assert_eq!((p2.withdraw.clone(), p2.withdraw_node), (vec![ip("10.192.1.1")], false));
        assert_eq!(p2.mesh.as_ref().map(|m| m.wireguard_key.as_str()), Some(KEY2));
        reg.commit(&p2, 65540);
        // No key any more: mesh address and node record go.
        let p3 = reg.plan("east", &req("vm", "192.0.2.7", ""), Some(&o2)).expect("plan");
        assert_eq!((p3.withdraw.clone(), p3.withdraw_node, p3.mesh.clone()), (vec![ip("10.192.2.1")], true, None));
        reg.commit(&p3, 65540);
        assert_eq!(reg.meshed(), 0);
        let p4 = reg.plan("east", &req("vm", "192.0.2.7", ""), Some(&o2)).expect("plan");
        assert!(!p4.withdraw_node, "nothing to withdraw twice");
    }

    #[test]
    fn a_keyed_status_from_an_earlier_process_is_restored_and_withdrawn() {
        let r = request_from_status("vm", Some("192.0.2.7"), None, Some(KEY)).expect("request");
        assert_eq!(r.wireguard_key.as_deref(), Some(KEY));
        assert_eq!(
            request_from_status("vm", Some("192.0.2.7"), None, Some("mangled")).and_then(|r| r.wireguard_key),
            None
        );
        // The earlier process exported a node record and a mesh address; the host now registers without a key.
        let reg = Registry::default();
        let mut o = with_cidr(object("vm", &[]), "10.192.1.0/30");
        o.status_ips = vec![ip("192.0.2.7"), ip("10.192.1.1")];
        o.status_keyed = true;
        let p = reg.plan("east", &req("vm", "192.0.2.7", ""), Some(&o)).expect("plan");
        assert_eq!((p.withdraw.clone(), p.withdraw_node), (vec![ip("10.192.1.1")], true));
    }

    #[test]
    fn a_relabel_replans_on_the_registered_range() {
        let mut reg = Registry::default();
        let o = with_cidr(object("vm", &[("app", "x")]), "10.192.1.0/30");
        let p = reg.plan("east", &keyed("vm", "192.0.2.7", KEY), Some(&o)).expect("plan");
        reg.commit(&p, 65540);
        // The spec's range was edited and the labels changed; the host has not registered again.
        let edited = with_cidr(object("vm", &[("app", "y")]), "10.192.9.0/30");
        let known = reg.get("vm").expect("registered");
        let p2 = reg.plan("east", &known.request, Some(&known.pinned(edited))).expect("plan");
        assert_eq!(p2.mesh, p.mesh);
        assert_eq!(p2.withdraw, Vec::<IpAddr>::new());
        assert_eq!(p2.release, Some(p.labels.clone()));
    }

    #[test]
    fn identity_labels_are_the_object_labels_in_a_namespace_and_this_cluster() {
        let (set, ns) = identity_labels("east", &labels(&[("app", "postgres"), (CLUSTER_LABEL, "west")]));
        assert_eq!(ns, "default");
        assert_eq!(
            set.to_string(),
            "k8s:app=postgres;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=default;"
        );
        let (set, ns) = identity_labels("east", &labels(&[("app", "postgres"), (NAMESPACE_LABEL, "legacy")]));
        assert_eq!(ns, "legacy");
        assert_eq!(set.get(NAMESPACE_LABEL).map(|l| l.value.as_str()), Some("legacy"));
        assert_eq!(set.cluster(), Some("east"));
    }

    #[test]
    fn unknown_and_deleting_objects_are_refused() {
        let reg = Registry::default();
        let r = req("vm", "10.0.0.1", "");
        assert_eq!(reg.plan("east", &r, None), Err(Refusal::UnknownWorkload("vm".into())));
        let mut o = object("vm", &[("app", "x")]);
        o.deleting = true;
        assert_eq!(reg.plan("east", &r, Some(&o)), Err(Refusal::Deleting("vm".into())));
        assert_eq!(Refusal::Deleting("vm".into()).condition_reason(), None);
    }

    #[test]
    fn first_registration_exports_every_address_and_acquires() {
        let reg = Registry::default();
        let p = reg.plan("east", &req("vm", "10.0.0.1", "fd00::1"), Some(&object("vm", &[("app", "x")]))).unwrap();
        assert_eq!(p.ips(), vec![ip("10.0.0.1"), ip("fd00::1")]);
        assert_eq!((p.reuse_id, p.release.clone(), p.withdraw.clone(), p.mesh.clone()), (None, None, vec![], None));
        assert!(!p.withdraw_node);
        assert_eq!(p.namespace, "default");
        let hosts: Vec<_> = p.ipcache_entries(65540).into_iter().map(|e| (e.ip, e.host_ip)).collect();
        assert_eq!(hosts, vec![(ip("10.0.0.1"), Some(ip("10.0.0.1"))), (ip("fd00::1"), Some(ip("fd00::1")))]);
    }

    #[test]
    fn reregistration_with_a_new_address_withdraws_the_old_one_and_keeps_the_identity() {
        let mut reg = Registry::default();
        let o = object("vm", &[("app", "x")]);
        let p = reg.plan("east", &req("vm", "10.0.0.1", ""), Some(&o)).unwrap();
        reg.commit(&p, 65540);
        let p2 = reg.plan("east", &req("vm", "10.0.0.2", ""), Some(&o)).unwrap();
        assert_eq!(p2.withdraw, vec![ip("10.0.0.1")]);
        assert_eq!(p2.reuse_id, Some(65540));
        assert_eq!(p2.release, None);
        reg.commit(&p2, 65540);
        // The old address is free for another host now.
        let other = object("vm2", &[("app", "y")]);
        assert!(reg.plan("east", &req("vm2", "10.0.0.1", ""), Some(&other)).is_ok());
        // Same request again: nothing to withdraw.
        assert_eq!(reg.plan("east", &req("vm", "10.0.0.2", ""), Some(&o)).unwrap().withdraw, Vec::<IpAddr>::new());
    }

    #[test]
    fn addresses_in_the_status_from_an_earlier_process_are_withdrawn() {
        let reg = Registry::default();
        let mut o = object("vm", &[("app", "x")]);
        o.status_ips = vec![ip("10.0.0.9"), ip("10.0.0.1")];
        let p = reg.plan("east", &req("vm", "10.0.0.1", ""), Some(&o)).unwrap();
        assert_eq!(p.withdraw, vec![ip("10.0.0.9")]);
        assert!(!p.withdraw_node);
    }

    #[test]
    fn an_address_held_by_another_host_is_refused_and_never_withdrawn() {
        let mut reg = Registry::default();
        let a = with_cidr(object("a", &[("app", "x")]), "10.192.1.0/30");
        let p = reg.plan("east", &keyed("a", "10.0.0.1", KEY), Some(&a)).unwrap();
        reg.commit(&p, 65540);
        let b = object("b", &[("app", "y")]);
        assert_eq!(
            reg.plan("east", &req("b", "10.0.0.1", ""), Some(&b)),
            Err(Refusal::AddressInUse { ip: ip("10.0.0.1"), owner: "a".into() })
        );
        // a's mesh address is a's too.
        assert_eq!(
            reg.plan("east", &req("b", "10.192.1.1", ""), Some(&b)),
            Err(Refusal::AddressInUse { ip: ip("10.192.1.1"), owner: "a".into() })
        );
        // b's stale status names a's addresses: they are not b's to withdraw.
        let mut b_stale = b.clone();
        b_stale.status_ips = vec![ip("10.0.0.1"), ip("10.192.1.1")];
        assert_eq!(reg.plan("east", &req("b", "10.0.0.2", ""), Some(&b_stale)).unwrap().withdraw, Vec::<IpAddr>::new());
    }

    #[test]
    fn changed_labels_acquire_a_new_identity_and_release_the_old() {
        let mut reg = Registry::default();
        let p = reg.plan("east", &req("vm", "10.0.0.1", ""), Some(&object("vm", &[("app", "x")]))).unwrap();
        reg.commit(&p, 65540);
        let p2 = reg.plan("east", &req("vm", "10.0.0.1", ""), Some(&object("vm", &[("app", "z")]))).unwrap();
        assert_eq!(p2.reuse_id, None);
        assert_eq!(p2.release, Some(p.labels.clone()));
        assert_ne!(p2.labels, p.labels);
    }

    #[test]
    fn a_registered_host_replans_with_its_request() {
        let mut reg = Registry::default();
        let r = parse_request("vm", "10.0.0.1", "fd00::1", KEY).expect("valid");
        let p = reg.plan("east", &r, Some(&with_cidr(object("vm", &[("app", "x")]), "10.192.1.0/30"))).unwrap();
        reg.commit(&p, 65540);
        assert_eq!(reg.get("vm").map(|h| h.request.clone()), Some(r));
    }

    #[test]
    fn forgetting_a_host_frees_its_addresses() {
        let mut reg = Registry::default();
        let o = with_cidr(object("vm", &[("app", "x")]), "10.192.1.0/30");
        let p = reg.plan("east", &parse_request("vm", "10.0.0.1", "fd00::1", KEY).expect("valid"), Some(&o)).unwrap();
        reg.commit(&p, 65540);
        let gone = reg.forget("vm").expect("registered");
        assert_eq!((gone.id, gone.ips.len(), gone.labels.clone()), (65540, 3, p.labels.clone()));
        assert!(gone.mesh.is_some());
        assert!(reg.is_empty());
        assert_eq!(reg.forget("vm"), None);
        assert!(reg.plan("east", &req("other", "10.0.0.1", ""), Some(&object("other", &[]))).is_ok());
        assert!(reg.plan("east", &req("other", "10.192.1.1", ""), Some(&object("other", &[]))).is_ok());
    }

    #[test]
    fn a_registration_is_rebuilt_from_a_status() {
        assert_eq!(request_from_status("vm", Some("10.0.0.1"), None, None), Some(req("vm", "10.0.0.1", "")));
        assert_eq!(
            request_from_status("vm", Some("10.0.0.1"), Some("fd00::1"), None),
            Some(req("vm", "10.0.0.1", "fd00::1"))
        );
        assert_eq!(request_from_status("vm", None, Some("fd00::1"), Some(KEY)), None);
        assert_eq!(request_from_status("vm", Some("garbage"), None, None), None);
    }

    #[test]
    fn ipcache_entry_names_the_host() {
        let e = ipcache_entry(ip("10.192.1.1"), ip("10.0.0.1"), 65540, "legacy", "vm");
        assert_eq!(
            (e.id, e.host_ip, e.k8s_namespace.as_str(), e.k8s_pod_name.as_str()),
            (65540, Some(ip("10.0.0.1")), "legacy", "vm")
        );
    }

    #[test]
    fn refusals_have_metric_labels_and_reasons_for_existing_objects() {
        assert_eq!(Refusal::NoAllocCidr("vm".into()).metric_label(), "no_alloc_cidr");
        assert_eq!(Refusal::NoAllocCidr("vm".into()).condition_reason(), Some("NoAllocCIDR"));
        assert_eq!(Refusal::Invalid("x".into()).condition_reason(), Some("InvalidRequest"));
        assert_eq!(
            Refusal::AddressInUse { ip: ip("10.0.0.1"), owner: "a".into() }.condition_reason(),
            Some("AddressInUse")
        );
        assert_eq!(Refusal::UnknownWorkload("vm".into()).condition_reason(), None);
        assert_eq!(Refusal::NoClientCertificate.condition_reason(), None);
    }
}
