//! The whole core against the in-memory datapath: events in, map contents out.

use std::net::IpAddr;

use causeway_api::v1::egress_watch_event::Kind as EKind;
use causeway_api::v1::watch_event::{Kind, Object};

use super::*;
use crate::agent::datapath::{DropReason, InMemoryDatapath};
use crate::agent::gc::{CtEntry, Proto, TcpSeen};
use crate::agent::model::{EgressVerdict, WgKey};

const EPOCH: u64 = 11;

fn local() -> LocalNode {
    LocalNode::new("node-a", "192.168.0.1".parse().unwrap(), 51871)
}

fn mesh_ev(kind: Kind, rev: u64, object: Option<Object>) -> pb::WatchEvent {
    pb::WatchEvent { kind: kind as i32, revision: rev, epoch: EPOCH, object }
}

fn ipc(ip: &str, identity: u32) -> Object {
    Object::Ipcache(pb::IpCacheEntry {
        ip: ip.into(),
        identity,
        host_ip: "192.168.1.1".into(),
        cluster: "west".into(),
        cluster_id: 2,
        ..Default::default()
    })
}

fn node(name: &str, ip: &str, cidr: &str, key: u8) -> Object {
    Object::Node(pb::Node {
        cluster: "west".into(),
        name: name.into(),
        cluster_id: 2,
        internal_ips: vec![ip.into()],
        pod_cidrs: vec![cidr.into()],
        zone: String::new(),
        wireguard_pub_key: WgKey([key; 32]).to_base64(),
    })
}

fn policy(name: &str, dst: &[&str], excl: &[&str], sources: &[&str], gw: &str) -> pb::EgressPolicyAssignment {
    pb::EgressPolicyAssignment {
        name: name.into(),
        generation: 1,
        destination_cidrs: dst.iter().map(|s| s.to_string()).collect(),
        excluded_cidrs: excl.iter().map(|s| s.to_string()).collect(),
        source_ips: sources.iter().map(|s| s.to_string()).collect(),
        groups: vec![pb::EgressGroupAssignment {
            egress_ips: vec!["192.0.2.10".into()],
            gateways: vec![pb::GatewayAssignment { node_ip: gw.into(), egress_ips: vec![] }],
        }],
    }
}

fn egress_ev(kind: EKind, rev: u64, p: Option<pb::EgressPolicyAssignment>) -> pb::EgressWatchEvent {
    pb::EgressWatchEvent { kind: kind as i32, revision: rev, epoch: EPOCH, policy: p }
}

fn feed_mesh_snapshot(core: &mut AgentCore, rev: u64, objects: Vec<Object>) {
    core.on_mesh_event(&mesh_ev(Kind::SnapshotBegin, rev, None)).unwrap();
    for o in objects {
        core.on_mesh_event(&mesh_ev(Kind::Upsert, rev, Some(o))).unwrap();
    }
    core.on_mesh_event(&mesh_ev(Kind::SnapshotEnd, rev, None)).unwrap();
}

fn feed_egress_snapshot(core: &mut AgentCore, rev: u64, ps: Vec<pb::EgressPolicyAssignment>) {
    core.on_egress_event(&egress_ev(EKind::SnapshotBegin, rev, None)).unwrap();
    for p in ps {
        core.on_egress_event(&egress_ev(EKind::Upsert, rev, Some(p))).unwrap();
    }
    core.on_egress_event(&egress_ev(EKind::SnapshotEnd, rev, None)).unwrap();
}

fn standard(core: &mut AgentCore) {
    feed_mesh_snapshot(
        core,
        5,
        vec![ipc("10.2.1.5", 70001), ipc("10.2.1.6", 70002), node("w1", "192.168.1.1", "10.2.1.0/24", 1)],
    );
    feed_egress_snapshot(
        core,
        3,
        vec![
            policy("billing", &["203.0.113.0/24"], &["203.0.113.128/25"], &["10.1.0.5", "10.1.0.6"], "192.168.0.7"),
            policy("reports", &["198.51.100.0/24"], &[], &["10.1.0.6"], "192.168.0.8"),
        ],
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn nothing_is_programmed_until_both_streams_are_synced() {
    // A datapath holding entries from a previous run: an early reconcile against a partial view would wipe them.
    let mut pinned = MapContents::default();
    pinned.ipcache.insert(
        "10.9.9.9/32".parse().unwrap(),
        crate::agent::model::IpcacheValue { identity: 9, cluster_id: 3, tunnel_endpoint: None, encrypt_key: 0 },
    );
    let mut dp = InMemoryDatapath::with_contents(pinned.clone());
    let mut core = AgentCore::new(local(), true);
    assert!(core.reconcile(&mut dp).unwrap().applied.is_empty());
    feed_mesh_snapshot(&mut core, 5, vec![ipc("10.2.1.5", 70001)]);
    assert!(!core.ready_to_program());
    assert_eq!(core.reconcile(&mut dp).unwrap().total_ops(), 0);
    assert_eq!(dp.contents(), pinned);
    feed_egress_snapshot(&mut core, 1, vec![]);
    let r = core.reconcile(&mut dp).unwrap();
    assert_eq!(r.total_ops(), 2, "one upsert, one stale delete: {r:?}");
    assert_eq!(dp.contents().ipcache.keys().map(ToString::to_string).collect::<Vec<_>>(), vec!["10.2.1.5/32"]);
}

#[test]
fn streams_become_map_contents_and_reconcile_is_idempotent() {
    let mut dp = InMemoryDatapath::new();
    let mut core = AgentCore::new(local(), true);
    standard(&mut core);
    let r = core.reconcile(&mut dp).unwrap();
    assert!(r.total_ops() > 0);
    let m = dp.contents();
    assert_eq!(m.ipcache.len(), 4, "2 pods, the node's pod CIDR and its IP: {:?}", m.ipcache);
    assert_eq!(m.wg_peers.len(), 1);
    assert_eq!(m.routes.len(), 1);
    // Two classes: {billing} (10.1.0.5) and {billing, reports} (10.1.0.6).
    assert_eq!(r.egress_classes, 2);
    assert_eq!(m.egress_src.len(), 2);
    assert_eq!(m.egress_groups.len(), 2);
    let g_billing = m.egress_lookup(ip("10.1.0.5"), ip("203.0.113.1"));
    assert!(matches!(g_billing, Some(EgressVerdict::Steer(_))));
    assert_eq!(m.egress_lookup(ip("10.1.0.5"), ip("203.0.113.200")), Some(EgressVerdict::Excluded));
    assert_eq!(m.egress_lookup(ip("10.1.0.5"), ip("198.51.100.1")), None);
    assert!(matches!(m.egress_lookup(ip("10.1.0.6"), ip("198.51.100.1")), Some(EgressVerdict::Steer(_))));
    assert_eq!(r.sizes[&MapKind::EgressSrc], 2);

    // Nothing changed: no work, not even a plan.
    assert!(!core.dirty());
    let before = dp.ops_applied();
    assert_eq!(core.reconcile(&mut dp).unwrap().total_ops(), 0);
    // A duplicate delta changes nothing either.
    core.on_mesh_event(&mesh_ev(Kind::Upsert, 6, Some(ipc("10.2.1.5", 70001)))).unwrap();
    assert_eq!(core.reconcile(&mut dp).unwrap().total_ops(), 0);
    assert_eq!(dp.ops_applied(), before);
    assert!(core.preview(&dp.contents()).is_empty());
}

#[test]
fn deltas_change_only_what_they_touch() {
    let mut dp = InMemoryDatapath::new();
    let mut core = AgentCore::new(local(), true);
    standard(&mut core);
    core.reconcile(&mut dp).unwrap();
    let before = dp.contents();
    // A new pod joins billing: exactly one SRC upsert, into billing's existing class.
    let mut p = policy(
        "billing",
        &["203.0.113.0/24"],
        &["203.0.113.128/25"],
        &["10.1.0.5", "10.1.0.6", "10.1.0.7"],
        "192.168.0.7",
    );
    core.on_egress_event(&egress_ev(EKind::Upsert, 4, Some(p.clone()))).unwrap();
    let r = core.reconcile(&mut dp).unwrap();
    assert_eq!(r.applied, BTreeMap::from([((MapKind::EgressSrc, false), 1)]));
    let after = dp.contents();
    assert_eq!(after.egress_src[&ip("10.1.0.7")], before.egress_src[&ip("10.1.0.5")]);
    // An ipcache delete.
    core.on_mesh_event(&mesh_ev(Kind::Delete, 6, Some(ipc("10.2.1.6", 0)))).unwrap();
    let r = core.reconcile(&mut dp).unwrap();
    assert_eq!(r.applied, BTreeMap::from([((MapKind::Ipcache, true), 1)]));
    // The gateway changes: one GROUPS upsert, no LPM or SRC churn.
    p.groups[0].gateways[0].node_ip = "192.168.0.9".into();
    core.on_egress_event(&egress_ev(EKind::Upsert, 5, Some(p))).unwrap();
    let r = core.reconcile(&mut dp).unwrap();
    assert_eq!(r.applied, BTreeMap::from([((MapKind::EgressGroups, false), 1)]));
    // The policy goes away: its pods leave; the shared class is renumbered only for the pod that had both.
    core.on_egress_event(&egress_ev(
        EKind::Delete,
        6,
        Some(pb::EgressPolicyAssignment { name: "billing".into(), ..Default::default() }),
    ))
    .unwrap();
    core.reconcile(&mut dp).unwrap();
    let m = dp.contents();
    assert_eq!(m.egress_src.keys().copied().collect::<Vec<_>>(), vec![ip("10.1.0.6")]);
    assert_eq!(m.egress_groups.len(), 1);
    assert!(matches!(m.egress_lookup(ip("10.1.0.6"), ip("198.51.100.1")), Some(EgressVerdict::Steer(_))));
    assert_eq!(m.egress_lookup(ip("10.1.0.6"), ip("203.0.113.1")), None);
}

#[test]
fn a_restarted_agent_applies_nothing_when_the_maps_are_right() {
    let dp0 = InMemoryDatapath::new();
    let mut first = AgentCore::new(local(), true);
    standard(&mut first);
    first.reconcile(&mut dp0.clone()).unwrap();
    let pinned = dp0.contents();

    // A new process: fresh core, fresh id assignments, the same maps (pinned in bpffs).
    let mut dp = InMemoryDatapath::with_contents(pinned.clone());
    let mut second = AgentCore::new(local(), true);
    standard(&mut second);
    let r = second.reconcile(&mut dp).unwrap();
    assert_eq!(r.total_ops(), 0, "{r:?}");
    assert_eq!(dp.ops_applied(), 0);
    assert_eq!(dp.contents(), pinned);

    // And if something changed while it was down, only that is applied.
    let mut third = AgentCore::new(local(), true);
    feed_mesh_snapshot(&mut third, 9, vec![ipc("10.2.1.5", 70001), node("w1", "192.168.1.1", "10.2.1.0/24", 1)]);
    feed_egress_snapshot(
        &mut third,
        3,
        vec![
            policy("billing", &["203.0.113.0/24"], &["203.0.113.128/25"], &["10.1.0.5", "10.1.0.6"], "192.168.0.7"),
            policy("reports", &["198.51.100.0/24"], &[], &["10.1.0.6"], "192.168.0.8"),
        ],
    );
    let r = third.reconcile(&mut dp).unwrap();
    assert_eq!(r.applied, BTreeMap::from([((MapKind::Ipcache, true), 1)]));
}

#[test]
fn a_failed_op_is_recovered_by_reading_back() {
    let mut dp = InMemoryDatapath::new();
    let mut core = AgentCore::new(local(), true);
    standard(&mut core);
    dp.fail_after(3);
    assert!(core.reconcile(&mut dp).is_err());
    assert!(core.dirty());
    assert_eq!(dp.ops_applied(), 3);
    dp.heal();
    core.reconcile(&mut dp).unwrap();
    let mut fresh = AgentCore::new(local(), true);
    standard(&mut fresh);
    let mut reference = InMemoryDatapath::new();
    fresh.reconcile(&mut reference).unwrap();
    assert_eq!(dp.contents(), reference.contents());
}

#[test]
fn a_resnapshot_removes_what_is_gone() {
    let mut dp = InMemoryDatapath::new();
    let mut core = AgentCore::new(local(), false);
    feed_mesh_snapshot(&mut core, 5, vec![ipc("10.2.1.5", 70001), node("w1", "192.168.1.1", "10.2.1.0/24", 1)]);
    core.reconcile(&mut dp).unwrap();
    assert_eq!(dp.contents().wg_peers.len(), 1);
    // The server restarted (new epoch) and no longer has the node.
    core.on_mesh_event(&pb::WatchEvent { kind: Kind::SnapshotBegin as i32, revision: 2, epoch: 99, object: None })
        .unwrap();
    core.on_mesh_event(&pb::WatchEvent {
        kind: Kind::Upsert as i32,
        revision: 2,
        epoch: 99,
        object: Some(ipc("10.2.1.5", 70001)),
    })
    .unwrap();
    // Mid-snapshot: nothing to do yet, the old view stands.
    assert_eq!(core.reconcile(&mut dp).unwrap().total_ops(), 0);
    core.on_mesh_event(&pb::WatchEvent { kind: Kind::SnapshotEnd as i32, revision: 2, epoch: 99, object: None })
        .unwrap();
    core.reconcile(&mut dp).unwrap();
    let m = dp.contents();
    assert!(m.wg_peers.is_empty() && m.routes.is_empty());
    assert_eq!(m.ipcache.len(), 1);
    assert_eq!(core.resume_point(StreamKind::Mesh), (99, 2));
}

#[test]
fn garbage_input_is_counted_and_skipped() {
    let mut dp = InMemoryDatapath::new();
    let mut core = AgentCore::new(local(), true);
    feed_mesh_snapshot(&mut core, 5, vec![ipc("not-an-ip", 1), ipc("10.2.1.5", 70001), ipc("10.2.1.6", 0)]);
    feed_egress_snapshot(
        &mut core,
        1,
        vec![policy("p", &["300.0.0.0/8", "203.0.113.0/24"], &[], &["10.1.0.5", "x"], "192.168.0.7")],
    );
    // Protocol errors: a gap and an unknown kind; the view is unchanged by them.
    assert!(core.on_mesh_event(&mesh_ev(Kind::Upsert, 9, Some(ipc("10.2.1.9", 5)))).is_err());
    assert!(core.on_mesh_event(&pb::WatchEvent { kind: 77, revision: 6, epoch: EPOCH, object: None }).is_err());
    core.reconcile(&mut dp).unwrap();
    let m = dp.contents();
    assert_eq!(m.ipcache.len(), 1);
    assert_eq!(m.egress_src.len(), 1);
    assert_eq!(m.egress_lpm.len(), 1);
    let r = core.rejects();
    assert_eq!(r[&(StreamKind::Mesh, "bad_ip")], 1);
    assert_eq!(r[&(StreamKind::Mesh, "zero_identity")], 1);
    assert_eq!(r[&(StreamKind::Egress, "bad_destination_cidr")], 1);
    assert_eq!(r[&(StreamKind::Egress, "bad_source_ip")], 1);
}

#[test]
fn gc_deletes_expired_entries_and_counts_snat_ports() {
    let mut dp = InMemoryDatapath::new();
    let mut core = AgentCore::new(local(), false);
    const S: u64 = 1_000_000_000;
    dp.set_now_ns(10_000 * S);
    let e = |port: u16, proto: Proto, last: u64| CtEntry {
        proto,
        src: (ip("10.1.0.5"), port),
        dst: (ip("203.0.113.5"), 443),
        tcp: TcpSeen { syn: true, established: true, ..Default::default() },
        last_seen_ns: last,
        snat: Some((ip("192.0.2.10"), 30_000 + port)),
    };
    dp.set_conntrack(vec![e(1, Proto::Tcp, 9_000 * S), e(2, Proto::Udp, 9_000 * S), e(3, Proto::Udp, 9_999 * S)]);
    dp.add_drops(DropReason::NoGateway, 4);
    let r = core.gc(&mut dp, &GcPolicy::default()).unwrap();
    assert_eq!((r.scanned, r.deleted), (3, 1));
    assert_eq!(r.snat.in_use[&(ip("192.0.2.10"), ip("203.0.113.5"))], 2);
    assert_eq!(dp.conntrack().unwrap().len(), 2);
    assert_eq!(dp.drop_counters().unwrap()[&DropReason::NoGateway], 4);
}

#[test]
fn identity_policy_is_carried_through_the_planner() {
    use crate::agent::model::{Direction, PolicyKey, PolicyVerdict};
    let mut dp = InMemoryDatapath::new();
    let mut core = AgentCore::new(local(), false);
    feed_mesh_snapshot(&mut core, 1, vec![]);
    core.reconcile(&mut dp).unwrap();
    let key = PolicyKey { remote_identity: 70001, dport: Some(443), proto: Some(6), direction: Direction::Ingress };
    core.set_identity_policy(BTreeMap::from([(key, PolicyVerdict::Allow)]));
    let r = core.reconcile(&mut dp).unwrap();
    assert_eq!(r.applied, BTreeMap::from([((MapKind::IdentityPolicy, false), 1)]));
    assert_eq!(dp.contents().identity_policy[&key], PolicyVerdict::Allow);
    // Setting the same rules again is no work.
    core.set_identity_policy(BTreeMap::from([(key, PolicyVerdict::Allow)]));
    assert!(!core.dirty());
    core.set_identity_policy(BTreeMap::new());
    let r = core.reconcile(&mut dp).unwrap();
    assert_eq!(r.applied, BTreeMap::from([((MapKind::IdentityPolicy, true), 1)]));
}

#[test]
fn an_egress_only_node_programs_once_the_egress_stream_is_synced() {
    // No identity-sync: the mesh view is empty by definition, not "unknown", so only the egress snapshot is waited
    // for. The egress entries are programmed; nothing mesh-derived appears.
    let mut dp = InMemoryDatapath::new();
    let mut core = AgentCore::with_streams(local(), false, true);
    assert!(!core.ready_to_program(), "the egress snapshot is still missing");
    assert_eq!(core.reconcile(&mut dp).unwrap().total_ops(), 0);
    feed_egress_snapshot(&mut core, 2, vec![policy("billing", &["203.0.113.0/24"], &[], &["10.1.0.5"], "192.168.0.1")]);
    assert!(core.ready_to_program());
    let r = core.reconcile(&mut dp).unwrap();
    assert!(r.total_ops() > 0);
    let m = dp.contents();
    assert_eq!(m.egress_src.len(), 1);
    assert_eq!(m.egress_groups.len(), 1);
    assert!(m.ipcache.is_empty() && m.wg_peers.is_empty() && m.routes.is_empty());
}
