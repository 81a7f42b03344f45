//! Sans-IO peer reconciliation: remote node records → desired WireGuard peers → the minimal device update.
//!
//! Node records come from the control plane (external data), so everything is validated here: keys must parse,
//! a node may not carry our own key, and two nodes may not claim the same allowed IP (WireGuard would silently
//! move the prefix to whichever peer was configured last, black-holing the other node's pods).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use wireguard_control::{DeviceUpdate, PeerConfig, PeerConfigBuilder};

use super::keys::{KeyError, PublicKey};

/// A remote node as the control plane describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node's name, only used in errors and logs.
    pub name: String,
    /// Its WireGuard public key, base64 as `wg pubkey` prints it.
    pub public_key: String,
    /// Where its WireGuard listens (underlay IP and UDP port).
    pub endpoint: SocketAddr,
    /// Its pods' CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// Its own addresses reachable through the tunnel (e.g. the router IP of its pod network).
    pub node_ips: Vec<IpAddr>,
}

/// One WireGuard peer as we want it (or as the device reports it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    /// Normalised (host bits cleared).
    pub allowed_ips: BTreeSet<IpNet>,
    /// Persistent keepalive in seconds; `None` is off (the UAPI's 0).
    pub keepalive: Option<u16>,
}

/// Why a node record could not become a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerSetError {
    #[error("node {node}: bad WireGuard public key: {source}")]
    InvalidKey {
        node: String,
        #[source]
        source: KeyError,
    },
    #[error("node {node} advertises this node's own public key")]
    OwnKey { node: String },
    #[error("nodes {first} and {second} advertise the same public key {key}")]
    DuplicateKey { key: PublicKey, first: String, second: String },
    #[error("allowed IP {cidr} is claimed by both {first} and {second}; {second} is not configured")]
    DuplicateAllowedIp { cidr: IpNet, first: String, second: String },
}

/// The set of peers of one WireGuard interface, keyed by public key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSet {
    peers: BTreeMap<PublicKey, PeerSpec>,
}

/// One change to a device's peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    Add(PeerSpec),
    Update { from: PeerSpec, to: PeerSpec },
    Remove(PublicKey),
}

/// How an implementation takes a change to an existing peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateStyle {
    /// Rewrite the peer in place (`replace_allowed_ips`), keeping its session: kernel WireGuard, wireguard-go.
    InPlace,
    /// Remove the peer and add it again in the same request. boringtun 0.7 panics its UAPI thread on a change to
    /// an existing peer ("Modifying existing peers is not yet supported"), so for it this is the only safe way;
    /// the peer re-handshakes (one round trip) afterwards.
    RemoveThenAdd,
}

impl PeerSet {
    /// Peers for `nodes`, seen from the node whose public key is `local`. Strict: the first bad record is an
    /// error and nothing is returned.
    pub fn from_nodes(local: &PublicKey, nodes: &[NodeRecord], keepalive: Option<u16>) -> Result<Self, PeerSetError> {
        let (set, mut errors) = Self::from_nodes_lenient(local, nodes, keepalive);
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors.swap_remove(0))
        }
    }

    /// Peers for every valid record in `nodes`; bad records are left out and returned as errors, so one broken
    /// node record does not tear down the tunnels to all the others. Records are taken in name order, so when two
    /// nodes claim the same key or allowed IP, the one with the smaller name keeps it, whatever the input order.
    pub fn from_nodes_lenient(
        local: &PublicKey,
        nodes: &[NodeRecord],
        keepalive: Option<u16>,
    ) -> (Self, Vec<PeerSetError>) {
        let mut sorted: Vec<&NodeRecord> = nodes.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut set = PeerSet::default();
        let mut errors = Vec::new();
        let mut key_owner: BTreeMap<PublicKey, &str> = BTreeMap::new();
        let mut ip_owner: BTreeMap<IpNet, &str> = BTreeMap::new();
        let keepalive = keepalive.filter(|k| *k != 0);
        for node in sorted {
            let key = match node.public_key.parse::<PublicKey>() {
                Ok(key) => key,
                Err(source) => {
                    errors.push(PeerSetError::InvalidKey { node: node.name.clone(), source });
                    continue;
                }
            };
            if key == *local {
                errors.push(PeerSetError::OwnKey { node: node.name.clone() });
                continue;
            }
            if let Some(first) = key_owner.get(&key) {
                errors.push(PeerSetError::DuplicateKey { key, first: (*first).to_owned(), second: node.name.clone() });
                continue;
            }
            let allowed_ips: BTreeSet<IpNet> = node
                .pod_cidrs
                .iter()
                .map(IpNet::trunc)
                .chain(node.node_ips.iter().map(|ip| IpNet::from(*ip)))
                .collect();
            if let Some((cidr, first)) = allowed_ips.iter().find_map(|c| ip_owner.get(c).map(|o| (*c, *o))) {
                errors.push(PeerSetError::DuplicateAllowedIp {
                    cidr,
                    first: first.to_owned(),
                    second: node.name.clone(),
                });
                continue;
            }
            key_owner.insert(key, &node.name);
            for cidr in &allowed_ips {
                ip_owner.insert(*cidr, &node.name);
            }
            set.peers.insert(key, PeerSpec { public_key: key, endpoint: Some(node.endpoint), allowed_ips, keepalive });
        }
        (set, errors)
    }

    /// The peers a device reports (wireguard-control's view of the UAPI/netlink `get`).
    pub fn from_device(device: &wireguard_control::Device) -> Self {
        Self::from_peer_configs(device.peers.iter().map(|p| &p.config))
    }

    /// The peers described by wireguard-control peer configurations.
    pub fn from_peer_configs<'a>(configs: impl IntoIterator<Item = &'a PeerConfig>) -> Self {
        let peers = configs
            .into_iter()
            .map(|c| {
                let key = PublicKey::from_wg(&c.public_key);
                let allowed_ips = c
                    .allowed_ips
                    .iter()
                    // A prefix length the device should never report is dropped rather than trusted.
                    .filter_map(|a| IpNet::new(a.address, a.cidr).ok().map(|n| n.trunc()))
                    .collect();
                let spec = PeerSpec {
                    public_key: key,
                    endpoint: c.endpoint,
                    allowed_ips,
                    keepalive: c.persistent_keepalive_interval.filter(|k| *k != 0),
                };
                (key, spec)
            })
            .collect();
        PeerSet { peers }
    }

    /// A set from already-validated specs (e.g. what a device reports); a later duplicate key replaces an
    /// earlier one.
    pub fn from_specs(specs: impl IntoIterator<Item = PeerSpec>) -> Self {
        PeerSet { peers: specs.into_iter().map(|s| (s.public_key, s)).collect() }
    }

    pub fn get(&self, key: &PublicKey) -> Option<&PeerSpec> {
        self.peers.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &PeerSpec> {
        self.peers.values()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The changes that turn `self` (the device's current peers) into `desired`: removals first (they free
    /// allowed IPs), then updates, then additions. Empty when they already match, so applying is idempotent.
    pub fn diff(&self, desired: &PeerSet) -> Vec<PeerChange> {
        let mut removes = Vec::new();
        let mut updates = Vec::new();
        let mut adds = Vec::new();
        for key in self.peers.keys() {
            if !desired.peers.contains_key(key) {
                removes.push(PeerChange::Remove(*key));
            }
        }
        for (key, want) in &desired.peers {
            match self.peers.get(key) {
                None => adds.push(PeerChange::Add(want.clone())),
                Some(have) if !same_config(have, want) => {
                    updates.push(PeerChange::Update { from: have.clone(), to: want.clone() })
                }
                Some(_) => {}
            }
        }
        removes.into_iter().chain(updates).chain(adds).collect()
    }

    /// The routes to send through the interface: every allowed IP except those that contain a peer's endpoint
    /// address. Routing an endpoint into the tunnel would loop the encrypted UDP back into the tunnel itself (a
    /// node IP that is also the underlay address stays an allowed IP, so traffic from it is accepted, but keeps
    /// its underlay route).
    pub fn routes(&self) -> BTreeSet<IpNet> {
        let endpoints: Vec<IpAddr> = self.peers.values().filter_map(|p| p.endpoint.map(|e| e.ip())).collect();
        self.peers
            .values()
            .flat_map(|p| p.allowed_ips.iter())
            .filter(|net| !endpoints.iter().any(|ip| net.contains(ip)))
            .copied()
            .collect()
    }
}

fn same_config(have: &PeerSpec, want: &PeerSpec) -> bool {
    // A desired peer without an endpoint leaves whatever the device learnt (WireGuard roams to the last
    // authenticated source), so it is not a difference.
    let endpoint_ok = want.endpoint.is_none() || have.endpoint == want.endpoint;
    endpoint_ok && have.allowed_ips == want.allowed_ips && have.keepalive == want.keepalive
}

/// Routes to add and to delete to go from `installed` to `desired`.
pub fn route_changes(installed: &BTreeSet<IpNet>, desired: &BTreeSet<IpNet>) -> (Vec<IpNet>, Vec<IpNet>) {
    let add = desired.difference(installed).copied().collect();
    let del = installed.difference(desired).copied().collect();
    (add, del)
}

fn peer_builder(spec: &PeerSpec) -> PeerConfigBuilder {
    let mut b = PeerConfigBuilder::new(&spec.public_key.to_wg()).replace_allowed_ips();
    if let Some(endpoint) = spec.endpoint {
        b = b.set_endpoint(endpoint);
    }
    // 0 turns keepalive off, so an update from "on" to "off" is explicit.
    b = b.set_persistent_keepalive_interval(spec.keepalive.unwrap_or(0));
    for net in &spec.allowed_ips {
        b = b.add_allowed_ip(net.addr(), net.prefix_len());
    }
    b
}

/// Turns changes into wireguard-control updates, applied in order.
///
/// - [`UpdateStyle::InPlace`]: one update (a single UAPI `set` / netlink request) for everything.
/// - [`UpdateStyle::RemoveThenAdd`] (boringtun 0.7): one update per peer section. boringtun's UAPI parser does
///   not reset `remove`, `endpoint` or `persistent_keepalive_interval` between the peer sections of one request,
///   so after a `remove=true` section every following peer of that request would be removed too.
pub fn device_updates(changes: &[PeerChange], style: UpdateStyle) -> Vec<DeviceUpdate> {
    let mut sections: Vec<PeerConfigBuilder> = Vec::new();
    for change in changes {
        match change {
            PeerChange::Add(spec) => sections.push(peer_builder(spec)),
            PeerChange::Remove(key) => sections.push(PeerConfigBuilder::new(&key.to_wg()).remove()),
            PeerChange::Update { to, .. } => match style {
                UpdateStyle::InPlace => sections.push(peer_builder(to)),
                UpdateStyle::RemoveThenAdd => {
                    sections.push(PeerConfigBuilder::new(&to.public_key.to_wg()).remove());
                    sections.push(peer_builder(to));
                }
            },
        }
    }
    match style {
        UpdateStyle::InPlace if sections.is_empty() => Vec::new(),
        UpdateStyle::InPlace => vec![DeviceUpdate::new().add_peers(&sections)],
        UpdateStyle::RemoveThenAdd => sections.into_iter().map(|s| DeviceUpdate::new().add_peer(s)).collect(),
    }
}

/// The peers that `changes` leave without a session: every added peer, and with [`UpdateStyle::RemoveThenAdd`]
/// every updated one (boringtun recreates it). Each should be sent a handshake initiation at once (see
/// [`Tunnel::apply`](super::Tunnel::apply)): neither WireGuard nor boringtun starts one until a packet is routed to
/// the peer, so a peer that only ever receives (the restarted receiving side of a stream) would wait for the remote
/// side's KEEPALIVE + REKEY timeout (15 s) before its traffic flowed again.
pub fn peers_without_session(changes: &[PeerChange], style: UpdateStyle) -> Vec<&PeerSpec> {
    changes
        .iter()
        .filter_map(|change| match change {
            PeerChange::Add(spec) => Some(spec),
            PeerChange::Update { to, .. } if style == UpdateStyle::RemoveThenAdd => Some(to),
            PeerChange::Update { .. } | PeerChange::Remove(_) => None,
        })
        .collect()
}

/// Where to send the packet that makes the device start a handshake with peer `key` of `set`: an address inside
/// one of its allowed IPs that the device maps to that peer (no other peer holds a longer prefix containing it),
/// preferring a host prefix (a node IP) over the first host of a pod CIDR, and never the peer's endpoint address
/// (its underlay IP, which is also an allowed IP when it is a node IP). `None` when the peer has no such address; it
/// then handshakes on its first real packet, as before.
pub fn handshake_probe_address(set: &PeerSet, key: &PublicKey) -> Option<IpAddr> {
    let spec = set.get(key)?;
    let endpoint = spec.endpoint.map(|e| e.ip());
    let mut prefixes: Vec<&IpNet> = spec.allowed_ips.iter().collect();
    // Host prefixes first (longest prefix first), then the wider ones in their set order.
    prefixes.sort_by_key(|net| std::cmp::Reverse(net.prefix_len() == net.max_prefix_len()));
    prefixes.into_iter().filter_map(first_host).find(|addr| {
        Some(*addr) != endpoint
            && set
                .iter()
                .flat_map(|p| p.allowed_ips.iter().map(move |net| (net, p.public_key)))
                .filter(|(net, _)| net.contains(addr))
                .max_by_key(|(net, _)| net.prefix_len())
                .is_some_and(|(_, owner)| owner == *key)
    })
}

/// The address itself for a host prefix, else the one after the network address (the network address of a pod
/// CIDR is nobody's; the next one is usually the node's router IP).
fn first_host(net: &IpNet) -> Option<IpAddr> {
    match net.trunc() {
        IpNet::V4(n) if n.prefix_len() == 32 => Some(IpAddr::V4(n.addr())),
        IpNet::V6(n) if n.prefix_len() == 128 => Some(IpAddr::V6(n.addr())),
        IpNet::V4(n) => u32::from(n.network()).checked_add(1).map(|a| IpAddr::V4(a.into())),
        IpNet::V6(n) => u128::from(n.network()).checked_add(1).map(|a| IpAddr::V6(a.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::PrivateKey;
    use super::*;

    fn node(name: &str, key: &PublicKey, endpoint: &str, pods: &[&str], ips: &[&str]) -> NodeRecord {
        NodeRecord {
            name: name.to_owned(),
            public_key: key.to_string(),
            endpoint: endpoint.parse().expect("endpoint"),
            pod_cidrs: pods.iter().map(|p| p.parse().expect("cidr")).collect(),
            node_ips: ips.iter().map(|p| p.parse().expect("ip")).collect(),
        }
    }

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    #[test]
    fn nodes_become_peers_with_pod_cidrs_and_node_ips() {
        let (local, b, c) = (key(), key(), key());
        let nodes = [
            node("b", &b, "192.0.2.2:51820", &["10.244.2.0/24", "fd00:2::/64"], &["10.0.0.2"]),
            node("c", &c, "192.0.2.3:51820", &["10.244.3.7/24"], &[]),
        ];
        let set = PeerSet::from_nodes(&local, &nodes, Some(25)).expect("valid");
        assert_eq!(set.len(), 2);
        let pb = set.get(&b).expect("peer b");
        assert_eq!(pb.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        let want: BTreeSet<IpNet> =
            ["10.244.2.0/24", "fd00:2::/64", "10.0.0.2/32"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(pb.allowed_ips, want);
        assert_eq!(pb.keepalive, Some(25));
        // Host bits are cleared.
        assert!(set.get(&c).unwrap().allowed_ips.contains(&"10.244.3.0/24".parse().unwrap()));
    }

    #[test]
    fn diff_adds_updates_removes_minimally_and_is_idempotent() {
        let (local, b, c, d) = (key(), key(), key(), key());
        let before = PeerSet::from_nodes(
            &local,
            &[
                node("b", &b, "192.0.2.2:51820", &["10.244.2.0/24"], &[]),
                node("c", &c, "192.0.2.3:51820", &["10.244.3.0/24"], &[]),
            ],
            None,
        )
        .unwrap();
        let after = PeerSet::from_nodes(
            &local,
            &[
                // b unchanged, c gained a CIDR, d is new; nothing else.
                node("b", &b, "192.0.2.2:51820", &["10.244.2.0/24"], &[]),
                node("c", &c, "192.0.2.3:51820", &["10.244.3.0/24", "10.245.3.0/24"], &[]),
                node("d", &d, "192.0.2.4:51820", &["10.244.4.0/24"], &[]),
            ],
            None,
        )
        .unwrap();
        let changes = before.diff(&after);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(&changes[0], PeerChange::Update { to, .. } if to.public_key == c));
        assert!(matches!(&changes[1], PeerChange::Add(spec) if spec.public_key == d));
        assert!(after.diff(&after).is_empty(), "applying the same desired state again changes nothing");

        let removed = after.diff(&PeerSet::from_nodes(&local, &[], None).unwrap());
        assert_eq!(removed.len(), 3);
        assert!(removed.iter().all(|c| matches!(c, PeerChange::Remove(_))));
    }

    #[test]
    fn removes_come_before_adds_so_a_cidr_can_move_between_nodes() {
        let (local, b, c) = (key(), key(), key());
        let before =
            PeerSet::from_nodes(&local, &[node("b", &b, "192.0.2.2:1", &["10.244.2.0/24"], &[])], None).unwrap();
        let after =
            PeerSet::from_nodes(&local, &[node("c", &c, "192.0.2.3:1", &["10.244.2.0/24"], &[])], None).unwrap();
        let changes = before.diff(&after);
        assert_eq!(changes, vec![PeerChange::Remove(b), PeerChange::Add(after.get(&c).unwrap().clone())]);
    }

    #[test]
    fn keepalive_and_endpoint_changes_are_updates() {
        let (local, b) = (key(), key());
        let nodes = [node("b", &b, "192.0.2.2:51820", &["10.244.2.0/24"], &[])];
        let off = PeerSet::from_nodes(&local, &nodes, Some(0)).unwrap();
        assert_eq!(off.get(&b).unwrap().keepalive, None, "0 means off");
        let on = PeerSet::from_nodes(&local, &nodes, Some(10)).unwrap();
        assert_eq!(off.diff(&on).len(), 1);
        let moved =
            PeerSet::from_nodes(&local, &[node("b", &b, "192.0.2.9:51820", &["10.244.2.0/24"], &[])], Some(0)).unwrap();
        assert!(matches!(&off.diff(&moved)[..], [PeerChange::Update { .. }]));
    }

    #[test]
    fn bad_key_is_a_clear_error_and_lenient_mode_keeps_the_good_nodes() {
        let (local, b) = (key(), key());
        let mut bad = node("bad", &b, "192.0.2.9:1", &["10.244.9.0/24"], &[]);
        bad.public_key = "definitely not base64!".to_owned();
        let good = node("good", &b, "192.0.2.2:1", &["10.244.2.0/24"], &[]);
        let err = PeerSet::from_nodes(&local, &[bad.clone(), good.clone()], None).unwrap_err();
        assert!(matches!(&err, PeerSetError::InvalidKey { node, .. } if node == "bad"), "{err}");
        assert!(err.to_string().contains("node bad"), "{err}");

        let (set, errors) = PeerSet::from_nodes_lenient(&local, &[bad, good], None);
        assert_eq!(set.len(), 1);
        assert!(set.get(&b).is_some());
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn duplicate_allowed_ips_across_nodes_are_rejected_deterministically() {
        let (local, b, c) = (key(), key(), key());
        let nb = node("node-b", &b, "192.0.2.2:1", &["10.244.2.0/24"], &[]);
        // Same prefix written with host bits set: still the same allowed IP.
        let nc = node("node-c", &c, "192.0.2.3:1", &["10.244.3.0/24", "10.244.2.77/24"], &[]);
        for order in [vec![nb.clone(), nc.clone()], vec![nc.clone(), nb.clone()]] {
            let err = PeerSet::from_nodes(&local, &order, None).unwrap_err();
            assert_eq!(
                err,
                PeerSetError::DuplicateAllowedIp {
                    cidr: "10.244.2.0/24".parse().unwrap(),
                    first: "node-b".into(),
                    second: "node-c".into()
                }
            );
            let (set, errors) = PeerSet::from_nodes_lenient(&local, &order, None);
            assert_eq!(set.len(), 1);
            assert!(set.get(&b).is_some(), "the first node by name keeps the prefix");
            assert_eq!(errors.len(), 1);
        }
    }

    #[test]
    fn own_key_and_duplicate_keys_are_rejected() {
        let (local, b) = (key(), key());
        let err = PeerSet::from_nodes(&local, &[node("me", &local, "192.0.2.1:1", &[], &[])], None).unwrap_err();
        assert_eq!(err, PeerSetError::OwnKey { node: "me".into() });
        let err = PeerSet::from_nodes(
            &local,
            &[node("x", &b, "192.0.2.2:1", &["10.1.0.0/24"], &[]), node("y", &b, "192.0.2.3:1", &["10.2.0.0/24"], &[])],
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, PeerSetError::DuplicateKey { ref first, ref second, .. } if first == "x" && second == "y")
        );
    }

    #[test]
    fn routes_skip_prefixes_holding_a_peer_endpoint() {
        let (local, b) = (key(), key());
        let set = PeerSet::from_nodes(
            &local,
            &[node("b", &b, "192.0.2.2:51820", &["10.244.2.0/24"], &["192.0.2.2", "10.244.2.1"])],
            None,
        )
        .unwrap();
        let routes: Vec<String> = set.routes().iter().map(ToString::to_string).collect();
        assert_eq!(routes, vec!["10.244.2.0/24", "10.244.2.1/32"]);
        assert!(set.get(&b).unwrap().allowed_ips.contains(&"192.0.2.2/32".parse().unwrap()));
    }

    #[test]
    fn route_changes_are_set_differences() {
        let a: BTreeSet<IpNet> = ["10.0.1.0/24", "10.0.2.0/24"].iter().map(|s| s.parse().unwrap()).collect();
        let b: BTreeSet<IpNet> = ["10.0.2.0/24", "10.0.3.0/24"].iter().map(|s| s.parse().unwrap()).collect();
        let (add, del) = route_changes(&a, &b);
        assert_eq!(add, vec!["10.0.3.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(del, vec!["10.0.1.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(route_changes(&b, &b), (vec![], vec![]));
    }

    #[test]
    fn device_update_round_trips_through_from_device() {
        // What a device reports after an update is what diff() compares against: build the device view the
        // parser would produce and check that it diffs clean against the desired set.
        let (local, b) = (key(), key());
        let desired = PeerSet::from_nodes(
            &local,
            &[node("b", &b, "192.0.2.2:51820", &["10.244.2.0/24", "fd00::/64"], &["10.0.0.2"])],
            Some(5),
        )
        .unwrap();
        let spec = desired.get(&b).unwrap();
        let config = peer_builder(spec).into_peer_config();
        assert!(PeerSet::from_peer_configs([&config]).diff(&desired).is_empty());
    }

    #[test]
    fn added_and_recreated_peers_are_the_ones_without_a_session() {
        let (local, b, c, d) = (key(), key(), key(), key());
        let before = PeerSet::from_nodes(
            &local,
            &[node("b", &b, "192.0.2.2:1", &["10.0.2.0/24"], &[]), node("c", &c, "192.0.2.3:1", &["10.0.3.0/24"], &[])],
            None,
        )
        .unwrap();
        let after = PeerSet::from_nodes(
            &local,
            &[node("c", &c, "192.0.2.3:2", &["10.0.3.0/24"], &[]), node("d", &d, "192.0.2.4:1", &["10.0.4.0/24"], &[])],
            None,
        )
        .unwrap();
        // remove b (no session wanted), update c, add d.
        let changes = before.diff(&after);
        let keys = |style| peers_without_session(&changes, style).iter().map(|p| p.public_key).collect::<Vec<_>>();
        assert_eq!(keys(UpdateStyle::RemoveThenAdd), vec![c, d], "boringtun recreates an updated peer");
        assert_eq!(keys(UpdateStyle::InPlace), vec![d], "an in-place update keeps the session");
        assert!(peers_without_session(&after.diff(&after), UpdateStyle::RemoveThenAdd).is_empty());
    }

    #[test]
    fn handshake_probe_goes_to_an_address_the_device_maps_to_that_peer() {
        let (local, b, c, d, e) = (key(), key(), key(), key(), key());
        let set = PeerSet::from_nodes(
            &local,
            &[
                // A node IP (host prefix) is preferred over the pod CIDR; the endpoint address never.
                node("b", &b, "192.0.2.2:1", &["10.244.2.0/24"], &["192.0.2.2", "10.244.2.1"]),
                // Only a pod CIDR: its first host.
                node("c", &c, "192.0.2.3:1", &["10.244.3.0/24", "fd00:3::/64"], &[]),
                // A wide prefix whose first host is inside another peer's longer prefix: the next candidate.
                node("d", &d, "192.0.2.4:1", &["10.96.0.0/12", "10.244.4.0/24"], &[]),
                // Nothing but its underlay address: no probe, it handshakes on its first packet.
                node("e", &e, "192.0.2.5:1", &[], &["192.0.2.5"]),
            ],
            None,
        )
        .unwrap();
        // c also holds 10.96.0.0/24 (nested in d's /12; from_nodes only rejects identical prefixes).
        let mut spec_c = set.get(&c).unwrap().clone();
        spec_c.allowed_ips.insert("10.96.0.0/24".parse().unwrap());
        let set = PeerSet::from_specs(set.iter().filter(|p| p.public_key != c).cloned().chain([spec_c]));
        let probe = |k: &PublicKey| handshake_probe_address(&set, k).map(|a| a.to_string());
        assert_eq!(probe(&b).as_deref(), Some("10.244.2.1"));
        assert_eq!(probe(&c).as_deref(), Some("10.96.0.1"), "c's own longer prefix");
        assert_eq!(probe(&d).as_deref(), Some("10.244.4.1"), "10.96.0.1 belongs to c, the longer match");
        assert_eq!(probe(&e), None);
        assert_eq!(probe(&local), None, "not a peer");
        let v6 = PeerSet::from_nodes(&local, &[node("c", &c, "[fd00::9]:1", &["fd00:3::/64"], &[])], None).unwrap();
        assert_eq!(handshake_probe_address(&v6, &c).map(|a| a.to_string()).as_deref(), Some("fd00:3::1"));
    }

    #[test]
    fn boringtun_gets_one_peer_section_per_request() {
        let (local, b, c, d) = (key(), key(), key(), key());
        let before = PeerSet::from_nodes(
            &local,
            &[node("b", &b, "192.0.2.2:1", &["10.0.2.0/24"], &[]), node("c", &c, "192.0.2.3:1", &["10.0.3.0/24"], &[])],
            None,
        )
        .unwrap();
        let after = PeerSet::from_nodes(
            &local,
            &[node("c", &c, "192.0.2.3:2", &["10.0.3.0/24"], &[]), node("d", &d, "192.0.2.4:1", &["10.0.4.0/24"], &[])],
            None,
        )
        .unwrap();
        let changes = before.diff(&after);
        // remove b, update c (remove + add), add d
        assert_eq!(device_updates(&changes, UpdateStyle::RemoveThenAdd).len(), 4);
        assert_eq!(device_updates(&changes, UpdateStyle::InPlace).len(), 1);
        assert!(device_updates(&[], UpdateStyle::InPlace).is_empty());
    }
}
