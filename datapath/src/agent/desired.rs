//! The desired state: everything the maps, WireGuard and the routing table should hold, computed from the two
//! mirrored streams and the node's own configuration. A pure function of its inputs (plus the id assignments that
//! keep egress ids stable).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

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
        LocalNode { name: "me".into(), ip: "192.168.0.1".parse().unwrap(), wireguard_port: 51871 }
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
}
