//! The planner: (programmed, desired) → the minimal ordered list of operations that turns one into the other.
//!
//! Minimal: an entry whose value is already right produces no op, so planning the same desired state twice gives
//! nothing to do, and after a restart only the difference from the pinned maps is applied.
//!
//! Ordered make-before-break, so that a packet never meets a reference to something not yet (or no longer) there,
//! and sees either the old or the new verdict but never neither:
//!
//! 1. WireGuard peers added or updated, then routes added (a route never points into a tunnel with no peer); peers
//!    that gain allowed IPs before peers that only lose some, so a prefix moving between two peers (a joined host's
//!    Service CIDRs when their node changes) always has a peer;
//! 2. ipcache and identity-policy upserts;
//! 3. egress GROUPS upserts, then LPM upserts (which reference groups), then SRC upserts (which reference the LPM
//!    entries of their class) — a pod moves to its new class only once that class is complete;
//! 4. then the removals in reverse: SRC, LPM, GROUPS (nothing points to a group when it goes), identity policy,
//!    ipcache, routes, and WireGuard peers last.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::model::{
    ClassId, EgressGroup, EgressVerdict, GroupId, IpcacheValue, MapContents, MapKind, PolicyKey, PolicyVerdict, Route,
    WgKey, WgPeer,
};

/// One change to the datapath, in domain types. A [`crate::agent::Datapath`] carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    UpsertWgPeer(WgKey, WgPeer),
    AddRoute(IpNet, Route),
    UpsertIpcache(IpNet, IpcacheValue),
    UpsertIdentityPolicy(PolicyKey, PolicyVerdict),
    UpsertEgressGroup(GroupId, EgressGroup),
    UpsertEgressLpm(ClassId, IpNet, EgressVerdict),
    UpsertEgressSrc(IpAddr, ClassId),
    DeleteEgressSrc(IpAddr),
    DeleteEgressLpm(ClassId, IpNet),
    DeleteEgressGroup(GroupId),
    DeleteIdentityPolicy(PolicyKey),
    DeleteIpcache(IpNet),
    RemoveRoute(IpNet),
    RemoveWgPeer(WgKey),
}

impl Op {
    pub fn map(&self) -> MapKind {
        match self {
            Op::UpsertWgPeer(..) | Op::RemoveWgPeer(_) => MapKind::WgPeers,
            Op::AddRoute(..) | Op::RemoveRoute(_) => MapKind::Routes,
            Op::UpsertIpcache(..) | Op::DeleteIpcache(_) => MapKind::Ipcache,
            Op::UpsertIdentityPolicy(..) | Op::DeleteIdentityPolicy(_) => MapKind::IdentityPolicy,
            Op::UpsertEgressGroup(..) | Op::DeleteEgressGroup(_) => MapKind::EgressGroups,
            Op::UpsertEgressLpm(..) | Op::DeleteEgressLpm(..) => MapKind::EgressLpm,
            Op::UpsertEgressSrc(..) | Op::DeleteEgressSrc(_) => MapKind::EgressSrc,
        }
    }

    pub fn is_removal(&self) -> bool {
        matches!(
            self,
            Op::DeleteEgressSrc(_)
                | Op::DeleteEgressLpm(..)
                | Op::DeleteEgressGroup(_)
                | Op::DeleteIdentityPolicy(_)
                | Op::DeleteIpcache(_)
                | Op::RemoveRoute(_)
                | Op::RemoveWgPeer(_)
        )
    }

    /// Applies the op to an in-memory [`MapContents`] (the reference semantics every adapter must match).
    pub fn apply_to(&self, m: &mut MapContents) {
        match self.clone() {
            Op::UpsertWgPeer(k, v) => {
                m.wg_peers.insert(k, v);
            }
            Op::AddRoute(k, v) => {
                m.routes.insert(k, v);
            }
            Op::UpsertIpcache(k, v) => {
                m.ipcache.insert(k, v);
            }
            Op::UpsertIdentityPolicy(k, v) => {
                m.identity_policy.insert(k, v);
            }
            Op::UpsertEgressGroup(k, v) => {
                m.egress_groups.insert(k, v);
            }
            Op::UpsertEgressLpm(c, n, v) => {
                m.egress_lpm.insert((c, n), v);
            }
            Op::UpsertEgressSrc(k, v) => {
                m.egress_src.insert(k, v);
            }
            Op::DeleteEgressSrc(k) => {
                m.egress_src.remove(&k);
            }
            Op::DeleteEgressLpm(c, n) => {
                m.egress_lpm.remove(&(c, n));
            }
            Op::DeleteEgressGroup(k) => {
                m.egress_groups.remove(&k);
            }
            Op::DeleteIdentityPolicy(k) => {
                m.identity_policy.remove(&k);
            }
            Op::DeleteIpcache(k) => {
                m.ipcache.remove(&k);
            }
            Op::RemoveRoute(k) => {
                m.routes.remove(&k);
            }
            Op::RemoveWgPeer(k) => {
                m.wg_peers.remove(&k);
            }
        }
    }
}

/// Upserts (new or changed keys) and deletes (keys only in `cur`) of one map.
fn diff<'a, K: Ord + Clone, V: PartialEq + Clone>(
    cur: &'a BTreeMap<K, V>,
    want: &'a BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let ups = want.iter().filter(|(k, v)| cur.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let dels = cur.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
    (ups, dels)
}

/// The ordered ops that turn `current` into `desired`.
pub fn plan(current: &MapContents, desired: &MapContents) -> Vec<Op> {
    let (peer_up, peer_del) = diff(&current.wg_peers, &desired.wg_peers);
    let (route_up, route_del) = diff(&current.routes, &desired.routes);
    let (ipc_up, ipc_del) = diff(&current.ipcache, &desired.ipcache);
    let (pol_up, pol_del) = diff(&current.identity_policy, &desired.identity_policy);
    let (grp_up, grp_del) = diff(&current.egress_groups, &desired.egress_groups);
    let (lpm_up, lpm_del) = diff(&current.egress_lpm, &desired.egress_lpm);
    let (src_up, src_del) = diff(&current.egress_src, &desired.egress_src);

    // Gainers first, in key order, then the rest in key order (a stable sort on "gains nothing").
    let mut peer_up = peer_up;
    peer_up.sort_by_key(|(k, v)| {
        let had = current.wg_peers.get(k).map(|p| p.allowed_ips.as_slice()).unwrap_or_default();
        !v.allowed_ips.iter().any(|a| !had.contains(a))
    });
    let mut ops = Vec::new();
    ops.extend(peer_up.into_iter().map(|(k, v)| Op::UpsertWgPeer(k, v)));
    ops.extend(route_up.into_iter().map(|(k, v)| Op::AddRoute(k, v)));
    ops.extend(ipc_up.into_iter().map(|(k, v)| Op::UpsertIpcache(k, v)));
    ops.extend(pol_up.into_iter().map(|(k, v)| Op::UpsertIdentityPolicy(k, v)));
    ops.extend(grp_up.into_iter().map(|(k, v)| Op::UpsertEgressGroup(k, v)));
    ops.extend(lpm_up.into_iter().map(|((c, n), v)| Op::UpsertEgressLpm(c, n, v)));
    ops.extend(src_up.into_iter().map(|(k, v)| Op::UpsertEgressSrc(k, v)));
    ops.extend(src_del.into_iter().map(Op::DeleteEgressSrc));
    ops.extend(lpm_del.into_iter().map(|(c, n)| Op::DeleteEgressLpm(c, n)));
    ops.extend(grp_del.into_iter().map(Op::DeleteEgressGroup));
    ops.extend(pol_del.into_iter().map(Op::DeleteIdentityPolicy));
    ops.extend(ipc_del.into_iter().map(Op::DeleteIpcache));
    ops.extend(route_del.into_iter().map(Op::RemoveRoute));
    ops.extend(peer_del.into_iter().map(Op::RemoveWgPeer));
    ops
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::agent::assignments::EgressPolicy;
    use crate::agent::classes::{self, EgressIds};
    use crate::agent::model::Gateway;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pol(dst: &[&str], sources: &[&str], gw: &str) -> EgressPolicy {
        EgressPolicy {
            generation: 1,
            destinations: dst.iter().map(|s| net(s)).collect(),
            excluded: vec![],
            sources: sources.iter().map(|s| ip(s)).collect(),
            gateways: vec![Gateway { node_ip: ip(gw), egress_v4: Some("192.0.2.1".parse().unwrap()), egress_v6: None }],
        }
    }

    fn egress(ps: &BTreeMap<String, EgressPolicy>, ids: &mut EgressIds, cur: &MapContents) -> MapContents {
        let e = classes::compute(ps, ids, cur);
        MapContents { egress_src: e.src, egress_lpm: e.lpm, egress_groups: e.groups, ..cur.clone() }
    }

    /// Applies ops one by one and checks, after every single op, that no entry refers to something missing.
    fn apply_checking_references(cur: &mut MapContents, ops: &[Op]) {
        for op in ops {
            op.apply_to(cur);
            let classes: BTreeSet<ClassId> = cur.egress_lpm.keys().map(|(c, _)| *c).collect();
            for (ip, c) in &cur.egress_src {
                assert!(classes.contains(c), "after {op:?}: pod {ip} points to {c} which has no LPM entries");
            }
            for ((c, n), v) in &cur.egress_lpm {
                if let EgressVerdict::Steer(g) = v {
                    assert!(cur.egress_groups.contains_key(g), "after {op:?}: ({c}, {n}) points to missing {g}");
                }
            }
            for (n, r) in &cur.routes {
                assert!(
                    cur.wg_peers.values().any(|p| p.endpoint.0 == r.via_node),
                    "after {op:?}: route {n} via {} has no peer",
                    r.via_node
                );
            }
        }
    }

    #[test]
    fn same_desired_twice_is_no_ops() {
        let mut ps = BTreeMap::new();
        ps.insert("a".into(), pol(&["198.51.100.0/24"], &["10.0.0.1"], "192.168.0.1"));
        let mut ids = EgressIds::default();
        let mut cur = MapContents::default();
        cur.ipcache.insert(
            net("10.2.0.1/32"),
            IpcacheValue { identity: 7, cluster_id: 2, tunnel_endpoint: None, encrypt_key: 0 },
        );
        let want = egress(&ps, &mut ids, &cur);
        let ops = plan(&MapContents::default(), &want);
        assert_eq!(ops.len(), 4, "{ops:?}");
        let mut programmed = MapContents::default();
        apply_checking_references(&mut programmed, &ops);
        assert_eq!(programmed, want);
        assert!(plan(&programmed, &want).is_empty());
        let again = egress(&ps, &mut ids, &programmed);
        assert!(plan(&programmed, &again).is_empty());
    }

    #[test]
    fn ordering_never_leaves_dangling_references() {
        let mut ids = EgressIds::default();
        let mut programmed = MapContents::default();
        // A sequence of policy changes: create, move pods between classes, replace a policy, delete everything.
        let mut steps: Vec<BTreeMap<String, EgressPolicy>> = Vec::new();
        let mut s = BTreeMap::new();
        s.insert("a".to_string(), pol(&["198.51.100.0/24"], &["10.0.0.1", "10.0.0.2"], "192.168.0.1"));
        steps.push(s.clone());
        s.insert("b".to_string(), pol(&["203.0.113.0/24"], &["10.0.0.2", "10.0.0.3"], "192.168.0.2"));
        steps.push(s.clone());
        s.remove("a");
        s.insert("c".to_string(), pol(&["192.0.2.0/24", "100.64.0.0/10"], &["10.0.0.1"], "192.168.0.3"));
        steps.push(s.clone());
        steps.push(BTreeMap::new());
        for ps in &steps {
            let want = egress(ps, &mut ids, &programmed);
            let ops = plan(&programmed, &want);
            apply_checking_references(&mut programmed, &ops);
            assert_eq!(programmed, want);
        }
        assert_eq!(programmed, MapContents::default());
    }

    #[test]
    fn a_prefix_moving_between_peers_is_never_without_one() {
        let svc = net("10.96.0.0/16");
        let peer = |last: u8, extra: bool| {
            let mut allowed = vec![net(&format!("10.2.{last}.0/24"))];
            if extra {
                allowed.push(svc);
            }
            allowed.sort();
            WgPeer { endpoint: (ip(&format!("192.168.1.{last}")), 51871), allowed_ips: allowed }
        };
        // Both directions, so the peer that loses the prefix sorts first once and last once.
        for (from, to) in [(1u8, 2u8), (2, 1)] {
            let mut cur = MapContents::default();
            cur.wg_peers.insert(WgKey([from; 32]), peer(from, true));
            cur.wg_peers.insert(WgKey([to; 32]), peer(to, false));
            let mut want = MapContents::default();
            want.wg_peers.insert(WgKey([from; 32]), peer(from, false));
            want.wg_peers.insert(WgKey([to; 32]), peer(to, true));
            let ops = plan(&cur, &want);
            assert!(matches!(&ops[0], Op::UpsertWgPeer(k, _) if *k == WgKey([to; 32])), "gainer first: {ops:?}");
            let mut m = cur.clone();
            for op in &ops {
                op.apply_to(&mut m);
                assert!(m.wg_peers.values().any(|p| p.allowed_ips.contains(&svc)), "after {op:?}: {svc} has no peer");
            }
            assert_eq!(m, want);
        }
    }

    #[test]
    fn ops_come_in_make_before_break_order() {
        let mut cur = MapContents::default();
        let peer = WgPeer { endpoint: (ip("192.168.1.1"), 51871), allowed_ips: vec![net("10.2.0.0/24")] };
        cur.wg_peers.insert(WgKey([1; 32]), peer.clone());
        cur.routes.insert(net("10.2.0.0/24"), Route { via_node: ip("192.168.1.1") });
        cur.egress_groups.insert(GroupId(1), EgressGroup::default());
        cur.egress_lpm.insert((ClassId(1), net("198.51.100.0/24")), EgressVerdict::Steer(GroupId(1)));
        cur.egress_src.insert(ip("10.0.0.1"), ClassId(1));
        let mut want = MapContents::default();
        let peer2 = WgPeer { endpoint: (ip("192.168.1.2"), 51871), allowed_ips: vec![net("10.3.0.0/24")] };
        want.wg_peers.insert(WgKey([2; 32]), peer2);
        want.routes.insert(net("10.3.0.0/24"), Route { via_node: ip("192.168.1.2") });
        want.egress_groups.insert(GroupId(2), EgressGroup::default());
        want.egress_lpm.insert((ClassId(2), net("198.51.100.0/24")), EgressVerdict::Steer(GroupId(2)));
        want.egress_src.insert(ip("10.0.0.1"), ClassId(2));
        let ops = plan(&cur, &want);
        let kinds: Vec<String> =
            ops.iter().map(|o| format!("{o:?}").split('(').next().unwrap_or_default().to_string()).collect();
        assert_eq!(
            kinds,
            vec![
                "UpsertWgPeer",
                "AddRoute",
                "UpsertEgressGroup",
                "UpsertEgressLpm",
                "UpsertEgressSrc",
                "DeleteEgressLpm",
                "DeleteEgressGroup",
                "RemoveRoute",
                "RemoveWgPeer"
            ]
        );
        let mut m = cur.clone();
        apply_checking_references(&mut m, &ops);
        assert_eq!(m, want);
    }
}
