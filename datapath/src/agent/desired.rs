//! The desired state: everything the maps, WireGuard and the routing table should hold, computed from the two
//! mirrored streams and the node's own configuration. A pure function of its inputs (plus the id assignments that
//! keep egress ids stable).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use super::assignments::EgressPolicy;
use super::classes::{self, EgressIds};
use super::mesh::{MeshKey, MeshObject, RemoteNode};
use super::mirror::Reject;
use super::model::{host_net, reserved, IpcacheValue, MapContents, PolicyKey, PolicyVerdict, Route, WgKey, WgPeer};

/// What the agent knows about its own node.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub name: String,
    /// This node's IP; a node record carrying it is this node and is skipped.
    pub ip: IpAddr,
    /// UDP port every mesh node's WireGuard listens on.
    pub wireguard_port: u16,
    /// A joined host's address inside the mesh (`--mesh-ipv4`): a service CIDR holding it is refused.
    pub mesh_ipv4: Option<Ipv4Addr>,
    /// A joined host's route to its home cluster's Services (`--service-cidrs`, `--home-cluster`).
    pub service_routes: Option<ServiceRoutes>,
}

impl LocalNode {
    /// A cluster node: no mesh address, no service routes.
    pub fn new(name: impl Into<String>, ip: IpAddr, wireguard_port: u16) -> Self {
        LocalNode { name: name.into(), ip, wireguard_port, mesh_ipv4: None, service_routes: None }
    }
}

/// A host outside the cluster (an external workload) has no service proxy of its own: its home cluster's Service
/// CIDRs go through the tunnel to one node of that cluster, whose proxy translates the ClusterIPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoutes {
    /// The cluster whose nodes may carry the CIDRs (node records of that cluster name).
    pub home_cluster: String,
    pub cidrs: Vec<IpNet>,
}

/// Inputs of one computation.
pub struct Inputs<'a> {
    pub mesh: &'a BTreeMap<MeshKey, MeshObject>,
    pub egress: &'a BTreeMap<String, EgressPolicy>,
    /// From the cross-cluster policy work; empty until it lands.
    pub identity_policy: &'a BTreeMap<PolicyKey, PolicyVerdict>,
    pub local: &'a LocalNode,
}

/// The desired map contents and what had to be left out to get there (conflicts between inputs).
#[derive(Debug, Default)]
pub struct DesiredState {
    pub maps: MapContents,
    pub conflicts: Vec<Reject>,
}

impl DesiredState {
    /// `current` is what is programmed now; it is only used to keep egress ids where they are.
    pub fn compute(inputs: &Inputs<'_>, ids: &mut EgressIds, current: &MapContents) -> DesiredState {
        let mut d = DesiredState::default();
        d.mesh(inputs);
        let e = classes::compute(inputs.egress, ids, current);
        d.maps.egress_src = e.src;
        d.maps.egress_lpm = e.lpm;
        d.maps.egress_groups = e.groups;
        d.maps.identity_policy = inputs.identity_policy.clone();
        d
    }

    fn mesh(&mut self, inputs: &Inputs<'_>) {
        let claimed = self.nodes(inputs);
        self.service_routes(inputs, &claimed);
    }

    /// Node records → ipcache entries, WireGuard peers and routes. Returns the pod CIDRs the nodes claimed.
    fn nodes(&mut self, inputs: &Inputs<'_>) -> BTreeSet<IpNet> {
        let maps = &mut self.maps;
        // Pod IPs first: an explicit ipcache entry beats anything derived from node records.
        for (k, v) in inputs.mesh {
            if let (MeshKey::Ip(net), MeshObject::Ip(ip)) = (k, v) {
                maps.ipcache.insert(
                    *net,
                    IpcacheValue {
                        identity: ip.identity,
                        cluster_id: ip.cluster_id,
                        tunnel_endpoint: ip.host_ip,
                        encrypt_key: ip.encrypt_key,
                    },
                );
            }
        }
        // Nodes in key order (cluster, name): when two claim the same CIDR or key, the first keeps it, on every node.
        let mut claimed: BTreeSet<IpNet> = BTreeSet::new();
        let mut keys: BTreeMap<WgKey, String> = BTreeMap::new();
        for (k, v) in inputs.mesh {
            let (MeshKey::Node { cluster, name }, MeshObject::Node(n)) = (k, v) else { continue };
            if n.internal_ips.contains(&inputs.local.ip) {
                continue;
            }
            let who = format!("node {cluster}/{name}");
            let Some(endpoint) = endpoint_ip(n, inputs.local.ip) else {
                self.conflicts.push(Reject::new("node", "no_internal_ip", who));
                continue;
            };
            for ip in &n.internal_ips {
                maps.ipcache.entry(host_net(*ip)).or_insert(IpcacheValue {
                    identity: reserved::REMOTE_NODE,
                    cluster_id: n.cluster_id,
                    tunnel_endpoint: None,
                    encrypt_key: 0,
                });
            }
            let mut cidrs = Vec::new();
            for cidr in &n.pod_cidrs {
                if claimed.iter().any(|c| c.contains(cidr) || cidr.contains(c)) {
                    self.conflicts.push(Reject::new("node", "overlapping_pod_cidr", format!("{who}: {cidr}")));
                    continue;
                }
                claimed.insert(*cidr);
                cidrs.push(*cidr);
                // The whole pod range tunnels to the node even before (or without) a per-pod entry; a pod entry is
                // a longer prefix and wins. Identity "world" until the pod's own entry says better.
                maps.ipcache.entry(*cidr).or_insert(IpcacheValue {
                    identity: reserved::WORLD,
                    cluster_id: n.cluster_id,
                    tunnel_endpoint: Some(endpoint),
                    encrypt_key: 0,
                });
            }
            let Some(key) = n.wg_key else { continue };
            if let Some(owner) = keys.get(&key) {
                self.conflicts.push(Reject::new(
                    "node",
                    "duplicate_wireguard_key",
                    format!("{who} has the key of {owner}; left without a peer"),
                ));
                continue;
            }
            keys.insert(key, who);
            // Node IPs are allowed inside the tunnel but never routed into it: the tunnel's own packets go there.
            let mut allowed: Vec<IpNet> =
                cidrs.iter().copied().chain(n.internal_ips.iter().map(|ip| host_net(*ip))).collect();
            allowed.sort();
            allowed.dedup();
            for cidr in &cidrs {
                maps.routes.insert(*cidr, Route { via_node: endpoint });
            }
            maps.wg_peers
                .insert(key, WgPeer { endpoint: (endpoint, inputs.local.wireguard_port), allowed_ips: allowed });
        }
        claimed
    }

    /// Routes the home cluster's Service CIDRs to ONE of its nodes: the first by name among those that became a
    /// WireGuard peer here, so every restart and every host picks the same node while it exists, and the CIDRs move
    /// to the next one when it goes. A CIDR that overlaps a pod CIDR, holds a node's endpoint (the tunnel's own
    /// packets would loop into it) or this host's own addresses is refused.
    fn service_routes(&mut self, inputs: &Inputs<'_>, claimed: &BTreeSet<IpNet>) {
        let Some(sr) = &inputs.local.service_routes else { return };
        if sr.cidrs.is_empty() {
            return;
        }
        let chosen = inputs.mesh.iter().find_map(|(k, v)| {
            let (MeshKey::Node { cluster, name }, MeshObject::Node(n)) = (k, v) else { return None };
            if *cluster != sr.home_cluster || n.internal_ips.contains(&inputs.local.ip) {
                return None;
            }
            let key = n.wg_key?;
            // The peer must be this node's (a duplicate key left it without one).
            let peer = self.maps.wg_peers.get(&key)?;
            let endpoint = endpoint_ip(n, inputs.local.ip)?;
            (peer.endpoint.0 == endpoint).then(|| (name.clone(), key, endpoint))
        });
        let Some((name, key, endpoint)) = chosen else {
            self.conflicts.push(Reject::new(
                "service_cidrs",
                "no_home_node",
                format!("no node of cluster {} with a WireGuard key: Service CIDRs not routed", sr.home_cluster),
            ));
            return;
        };
        let own: Vec<IpAddr> = std::iter::once(inputs.local.ip).chain(inputs.local.mesh_ipv4.map(IpAddr::V4)).collect();
        let endpoints: Vec<IpAddr> = self.maps.wg_peers.values().map(|p| p.endpoint.0).collect();
        let mut added = Vec::new();
        for cidr in sr.cidrs.iter().map(IpNet::trunc) {
            let reason = if claimed.iter().any(|c| c.contains(&cidr) || cidr.contains(c)) {
                Some("overlapping_pod_cidr")
            } else if endpoints.iter().chain(&own).any(|ip| cidr.contains(ip)) {
                Some("service_cidr_holds_node_ip")
            } else {
                None
            };
            if let Some(reason) = reason {
                self.conflicts.push(Reject::new("service_cidrs", reason, format!("{cidr} (home node {name})")));
                continue;
            }
            self.maps.routes.insert(cidr, Route { via_node: endpoint });
            added.push(cidr);
        }
        if let Some(peer) = self.maps.wg_peers.get_mut(&key) {
            peer.allowed_ips.extend(added);
            peer.allowed_ips.sort();
            peer.allowed_ips.dedup();
        }
    }
}

/// The node IP to reach a node at: the first of the local node's family, else the first.
fn endpoint_ip(n: &RemoteNode, local: IpAddr) -> Option<IpAddr> {
    n.internal_ips.iter().find(|ip| ip.is_ipv4() == local.is_ipv4()).or(n.internal_ips.first()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::mesh::RemoteIp;

    fn local() -> LocalNode {
        LocalNode::new("me", "192.168.0.1".parse().unwrap(), 51871)
    }

    fn node(ips: &[&str], cidrs: &[&str], key: Option<u8>) -> MeshObject {
        MeshObject::Node(RemoteNode {
            cluster_id: 2,
            internal_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            pod_cidrs: cidrs.iter().map(|s| s.parse().unwrap()).collect(),
            zone: None,
            wg_key: key.map(|b| WgKey([b; 32])),
        })
    }

    fn nk(name: &str) -> MeshKey {
        MeshKey::Node { cluster: "west".into(), name: name.into() }
    }

    fn compute(mesh: &BTreeMap<MeshKey, MeshObject>) -> DesiredState {
        let l = local();
        let egress = BTreeMap::new();
        let pol = BTreeMap::new();
        let inputs = Inputs { mesh, egress: &egress, identity_policy: &pol, local: &l };
        DesiredState::compute(&inputs, &mut EgressIds::default(), &MapContents::default())
    }

    #[test]
    fn nodes_become_peers_routes_and_ipcache_entries() {
        let mut mesh = BTreeMap::new();
        mesh.insert(nk("w1"), node(&["192.168.1.1", "fd00::1"], &["10.2.1.0/24", "fd02:1::/64"], Some(1)));
        mesh.insert(
            MeshKey::Ip("10.2.1.5/32".parse().unwrap()),
            MeshObject::Ip(RemoteIp {
                identity: 70001,
                host_ip: Some("192.168.1.1".parse().unwrap()),
                cluster_id: 2,
                encrypt_key: 1,
            }),
        );
        // This node's own record is skipped.
        mesh.insert(nk("me"), node(&["192.168.0.1"], &["10.1.0.0/24"], Some(9)));
        let d = compute(&mesh);
        assert!(d.conflicts.is_empty(), "{:?}", d.conflicts);
        let peer = &d.maps.wg_peers[&WgKey([1; 32])];
        assert_eq!(peer.endpoint, ("192.168.1.1".parse().unwrap(), 51871));
        assert_eq!(peer.allowed_ips.len(), 4);
        assert_eq!(d.maps.wg_peers.len(), 1);
        assert_eq!(d.maps.routes.len(), 2, "pod CIDRs only, never node IPs");
        assert_eq!(d.maps.ipcache[&"10.2.1.5/32".parse().unwrap()].identity, 70001);
        assert_eq!(d.maps.ipcache[&"10.2.1.0/24".parse().unwrap()].identity, reserved::WORLD);
        assert_eq!(d.maps.ipcache[&"192.168.1.1/32".parse().unwrap()].identity, reserved::REMOTE_NODE);
        assert!(!d.maps.ipcache.contains_key(&"10.1.0.0/24".parse().unwrap()));
    }

    #[test]
    fn conflicting_nodes_resolve_by_key_order() {
        let mut mesh = BTreeMap::new();
        mesh.insert(nk("a"), node(&["192.168.1.1"], &["10.2.0.0/16"], Some(1)));
        // Overlaps a's CIDR and reuses its key.
        mesh.insert(nk("b"), node(&["192.168.1.2"], &["10.2.5.0/24", "10.3.0.0/24"], Some(1)));
        mesh.insert(nk("c"), node(&[], &["10.4.0.0/24"], Some(3)));
        let d = compute(&mesh);
        let reasons: Vec<&str> = d.conflicts.iter().map(|r| r.reason).collect();
        assert_eq!(reasons, vec!["overlapping_pod_cidr", "duplicate_wireguard_key", "no_internal_ip"]);
        assert_eq!(d.maps.wg_peers.len(), 1);
        assert_eq!(d.maps.routes.keys().map(ToString::to_string).collect::<Vec<_>>(), vec!["10.2.0.0/16"]);
        // b's non-overlapping CIDR still tunnels (unencrypted peers are not the agent's to invent).
        assert_eq!(
            d.maps.ipcache[&"10.3.0.0/24".parse().unwrap()].tunnel_endpoint,
            Some("192.168.1.2".parse().unwrap())
        );
    }

    fn host(cidrs: &[&str]) -> LocalNode {
        LocalNode {
            mesh_ipv4: Some("10.192.0.1".parse().unwrap()),
            service_routes: Some(ServiceRoutes {
                home_cluster: "east".into(),
                cidrs: cidrs.iter().map(|s| s.parse().unwrap()).collect(),
            }),
            ..local()
        }
    }

    fn compute_as(l: &LocalNode, mesh: &BTreeMap<MeshKey, MeshObject>) -> DesiredState {
        let egress = BTreeMap::new();
        let pol = BTreeMap::new();
        let inputs = Inputs { mesh, egress: &egress, identity_policy: &pol, local: l };
        DesiredState::compute(&inputs, &mut EgressIds::default(), &MapContents::default())
    }

    fn in_cluster(cluster: &str, name: &str) -> MeshKey {
        MeshKey::Node { cluster: cluster.into(), name: name.into() }
    }

    /// Which node's peer carries `cidr`, and where the route points.
    fn carrier(d: &DesiredState, cidr: &str) -> Option<(WgKey, IpAddr)> {
        let net: IpNet = cidr.parse().unwrap();
        let route = d.maps.routes.get(&net)?;
        let holders: Vec<WgKey> =
            d.maps.wg_peers.iter().filter(|(_, p)| p.allowed_ips.contains(&net)).map(|(k, _)| *k).collect();
        assert_eq!(holders.len(), 1, "exactly one peer carries {cidr}: {holders:?}");
        assert_eq!(d.maps.wg_peers[&holders[0]].endpoint.0, route.via_node, "the route follows the peer");
        Some((holders[0], route.via_node))
    }

    #[test]
    fn service_cidrs_go_to_the_first_home_node_by_name() {
        let mut mesh = BTreeMap::new();
        mesh.insert(in_cluster("east", "node-b"), node(&["192.168.2.2"], &["10.2.2.0/24"], Some(2)));
        mesh.insert(in_cluster("east", "node-a"), node(&["192.168.2.1"], &["10.2.1.0/24"], Some(1)));
        // Sorts first overall, but is not in the home cluster.
        mesh.insert(in_cluster("aaa", "node-0"), node(&["192.168.9.1"], &["10.9.0.0/24"], Some(9)));
        // First by name in the home cluster, but without a key: it cannot carry anything.
        mesh.insert(in_cluster("east", "node-0"), node(&["192.168.2.9"], &["10.2.9.0/24"], None));
        let l = host(&["10.96.0.0/16", "fd00:96::/112"]);
        let d = compute_as(&l, &mesh);
        assert!(d.conflicts.is_empty(), "{:?}", d.conflicts);
        assert_eq!(carrier(&d, "10.96.0.0/16"), Some((WgKey([1; 32]), "192.168.2.1".parse().unwrap())));
        assert_eq!(carrier(&d, "fd00:96::/112"), Some((WgKey([1; 32]), "192.168.2.1".parse().unwrap())));
        // The chosen node keeps its own pod CIDR and node IP; the others carry no Service CIDR.
        let a = &d.maps.wg_peers[&WgKey([1; 32])].allowed_ips;
        assert!(a.contains(&"10.2.1.0/24".parse().unwrap()) && a.contains(&"192.168.2.1/32".parse().unwrap()));
        assert_eq!(d.maps.wg_peers[&WgKey([2; 32])].allowed_ips.len(), 2);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "allowed IPs stay sorted: {a:?}");
        // Same inputs, same answer (whatever the insertion order was).
        assert_eq!(compute_as(&l, &mesh).maps, d.maps);
    }

    #[test]
    fn service_cidrs_move_when_their_node_goes_and_vanish_with_the_last() {
        let mut mesh = BTreeMap::new();
        mesh.insert(in_cluster("east", "node-a"), node(&["192.168.2.1"], &["10.2.1.0/24"], Some(1)));
        mesh.insert(in_cluster("east", "node-b"), node(&["192.168.2.2"], &["10.2.2.0/24"], Some(2)));
        let l = host(&["10.96.0.0/16"]);
        let before = compute_as(&l, &mesh);
        assert_eq!(carrier(&before, "10.96.0.0/16").map(|c| c.0), Some(WgKey([1; 32])));

        mesh.remove(&in_cluster("east", "node-a"));
        let after = compute_as(&l, &mesh);
        assert_eq!(carrier(&after, "10.96.0.0/16"), Some((WgKey([2; 32]), "192.168.2.2".parse().unwrap())));
        // What the planner makes of it: node-a's peer goes, node-b's peer is updated, the route points elsewhere.
        let ops = crate::agent::plan(&before.maps, &after.maps);
        assert!(ops.contains(&crate::agent::Op::RemoveWgPeer(WgKey([1; 32]))), "{ops:?}");
        assert!(ops.iter().any(|o| matches!(o, crate::agent::Op::UpsertWgPeer(k, p)
            if *k == WgKey([2; 32]) && p.allowed_ips.contains(&"10.96.0.0/16".parse().unwrap()))));
        assert!(ops.iter().any(|o| matches!(o, crate::agent::Op::AddRoute(n, r)
            if *n == "10.96.0.0/16".parse::<IpNet>().unwrap() && r.via_node == "192.168.2.2".parse::<IpAddr>().unwrap())));

        mesh.remove(&in_cluster("east", "node-b"));
        let none = compute_as(&l, &mesh);
        assert!(none.maps.routes.is_empty() && none.maps.wg_peers.is_empty());
        let reasons: Vec<&str> = none.conflicts.iter().map(|r| r.reason).collect();
        assert_eq!(reasons, vec!["no_home_node"]);
    }

    #[test]
    fn service_cidrs_overlapping_pod_cidrs_or_node_addresses_are_refused() {
        let mut mesh = BTreeMap::new();
        mesh.insert(in_cluster("east", "node-a"), node(&["192.168.2.1"], &["10.2.1.0/24"], Some(1)));
        // A pod CIDR of another cluster counts too.
        mesh.insert(in_cluster("west", "w1"), node(&["192.168.3.1"], &["10.3.0.0/24"], Some(3)));
        let l = host(&["10.2.0.0/16", "10.3.0.128/25", "192.168.2.0/24", "10.192.0.0/24", "10.96.0.0/16"]);
        let d = compute_as(&l, &mesh);
        let reasons: Vec<&str> = d.conflicts.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            vec![
                "overlapping_pod_cidr",
                "overlapping_pod_cidr",
                "service_cidr_holds_node_ip",
                "service_cidr_holds_node_ip"
            ]
        );
        assert_eq!(
            d.maps.routes.keys().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["10.2.1.0/24", "10.3.0.0/24", "10.96.0.0/16"]
        );
        assert_eq!(carrier(&d, "10.96.0.0/16").map(|c| c.0), Some(WgKey([1; 32])));
        // The pod CIDRs stay with their own nodes.
        assert_eq!(d.maps.routes[&"10.3.0.0/24".parse().unwrap()].via_node, "192.168.3.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_home_node_left_without_a_peer_is_not_chosen() {
        let mut mesh = BTreeMap::new();
        // "aaa/x" keeps key 1; "east/node-a" reuses it and gets no peer, so node-b carries the CIDRs.
        mesh.insert(in_cluster("aaa", "x"), node(&["192.168.9.1"], &["10.9.0.0/24"], Some(1)));
        mesh.insert(in_cluster("east", "node-a"), node(&["192.168.2.1"], &["10.2.1.0/24"], Some(1)));
        mesh.insert(in_cluster("east", "node-b"), node(&["192.168.2.2"], &["10.2.2.0/24"], Some(2)));
        let d = compute_as(&host(&["10.96.0.0/16"]), &mesh);
        assert_eq!(carrier(&d, "10.96.0.0/16").map(|c| c.0), Some(WgKey([2; 32])));
        // A cluster node (no --service-cidrs) routes nothing extra.
        let plain = compute_as(&local(), &mesh);
        assert!(!plain.maps.routes.contains_key(&"10.96.0.0/16".parse().unwrap()));
    }
}
