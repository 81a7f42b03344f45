//! Index-style tests: apply inputs to the merged view, then check the view and the deltas it emitted.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use causeway_store::validate::RemoteEntry;
use causeway_store::values::PortConfig;
use causeway_store::{
    ClusterId, ClusterName, ClusterService, IpCacheEntry, Kind, LabelSet, MaxConnectedClusters, Node, NodeAddress,
    RemoteContext,
};

use super::*;
use crate::core::local::{ANNOTATION_AFFINITY, ANNOTATION_GLOBAL, ANNOTATION_SHARED};

const EAST: &str = "east";
const WEST: &str = "west";

fn ctx(name: &str, id: u32) -> RemoteContext {
    let mode = MaxConnectedClusters::C255;
    RemoteContext { name: ClusterName::new(name).unwrap(), id: ClusterId::new(id, mode).unwrap(), mode }
}

fn cluster_id(name: &str) -> u32 {
    if name == EAST {
        1
    } else {
        2
    }
}

/// A view with `east` (ID 1) and `west` (ID 2) validated and past their canaries.
fn view_with(cfg: CoreConfig, remotes: &[&str]) -> MergedView {
    let mut v = MergedView::new(cfg);
    for r in remotes {
        v.remote_added(r).unwrap();
        v.remote_connected(r).unwrap();
        v.remote_validated(ctx(r, cluster_id(r))).unwrap();
        v.canaries_ready(r).unwrap();
    }
    v
}

fn view() -> MergedView {
    view_with(CoreConfig::default(), &[EAST, WEST])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ip_entry(cluster: &str, addr: &str, local_id: u32) -> RemoteEntry {
    RemoteEntry::Ip(IpCacheEntry {
        ip: ip(addr),
        host_ip: Some(ip("192.168.0.1")),
        id: (cluster_id(cluster) << 16) + local_id,
        key: 0,
        metadata: String::new(),
        k8s_namespace: "shop".into(),
        k8s_pod_name: format!("pod-{addr}"),
        k8s_pod_uid: None,
        k8s_service_account: None,
        named_ports: vec![],
    })
}

fn ip_key(addr: &str) -> String {
    format!("cilium/state/ip/v1/default/{addr}")
}

fn service(cluster: &str, name: &str, backends: &[&str]) -> RemoteEntry {
    let ports: BTreeMap<String, PortConfig> =
        [("http".to_string(), PortConfig { protocol: "TCP".into(), port: 8080 })].into();
    RemoteEntry::Service(ClusterService {
        cluster: cluster.into(),
        namespace: "shop".into(),
        name: name.into(),
        frontends: BTreeMap::new(),
        backends: backends.iter().map(|b| (ip(b), ports.clone())).collect(),
        hostnames: BTreeMap::new(),
        zones: BTreeMap::new(),
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
        include_external: false,
        shared: true,
        cluster_id: cluster_id(cluster),
    })
}

fn svc_key_str(cluster: &str, name: &str) -> String {
    format!("cilium/state/services/v1/{cluster}/shop/{name}")
}

fn local(name: &str, ann: &[(&str, &str)], ready: u32) -> LocalService {
    let ann: BTreeMap<String, String> = ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    LocalService::from_annotations("shop", name, &ann, ready).0
}

fn global(name: &str) -> LocalService {
    local(name, &[(ANNOTATION_GLOBAL, "true")], 0)
}

fn node(cluster: &str, name: &str) -> RemoteEntry {
    RemoteEntry::Node(Node {
        name: name.into(),
        cluster: cluster.into(),
        addresses: vec![NodeAddress { kind: "InternalIP".into(), ip: ip("192.168.10.12") }],
        ipv4_alloc_cidr: Some("10.1.2.0/24".parse().unwrap()),
        ipv6_alloc_cidr: None,
        ipv4_health_ip: None,
        ipv4_ingress_ip: None,
        cluster_id: cluster_id(cluster),
        source: "custom-resource".into(),
        encryption_key: 0,
        labels: [(Node::ZONE_LABEL.to_string(), "eu-1a".to_string())].into(),
        annotations: BTreeMap::new(),
        wireguard_pub_key: "k".into(),
        boot_id: String::new(),
    })
}

fn identity(cluster: &str, local_id: u32) -> RemoteEntry {
    let labels = LabelSet::parse(&format!("k8s:app=a{local_id};k8s:io.cilium.k8s.policy.cluster={cluster};")).unwrap();
    RemoteEntry::Identity { id: (cluster_id(cluster) << 16) + local_id, labels }
}

fn skey(name: &str) -> ServiceKey {
    ServiceKey::new("shop", name)
}

fn backend_ips(v: &MergedView, name: &str) -> BTreeMap<String, Vec<IpAddr>> {
    v.service(&skey(name))
        .map(|s| {
            s.clusters.iter().map(|c| (c.cluster.to_string(), c.backends.iter().map(|b| b.ip).collect())).collect()
        })
        .unwrap_or_default()
}

fn kinds(deltas: &[Delta]) -> Vec<String> {
    deltas
        .iter()
        .map(|d| match &d.change {
            Change::Upsert(o) => format!("upsert {:?}", o.key()),
            Change::Delete(k) => format!("delete {k:?}"),
        })
        .collect()
}

#[test]
fn remote_life_cycle_states() {
    let mut v = MergedView::new(CoreConfig::default());
    v.remote_added(EAST).unwrap();
    assert_eq!(v.remote_status(EAST).unwrap().state, RemoteState::Connecting);
    v.remote_connected(EAST).unwrap();
    assert_eq!(v.remote_status(EAST).unwrap().state, RemoteState::WaitingForConfig);
    // Entries before validation are refused, not guessed at.
    assert!(matches!(v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)), Err(CoreError::NotValidated(_))));
    v.remote_validated(ctx(EAST, 1)).unwrap();
    assert_eq!(v.remote_status(EAST).unwrap().state, RemoteState::WaitingForCanaries);
    v.canaries_ready(EAST).unwrap();
    assert_eq!(v.remote_status(EAST).unwrap().state, RemoteState::Syncing);
    for k in [Kind::Nodes, Kind::Services, Kind::Ip] {
        v.list_done(EAST, k).unwrap();
    }
    assert_eq!(v.remote_status(EAST).unwrap().state, RemoteState::Syncing);
    v.list_done(EAST, Kind::Identities).unwrap();
    assert_eq!(v.remote_status(EAST).unwrap().state, RemoteState::Synced);
    assert!(matches!(v.remote_added("Bad_Name"), Err(CoreError::InvalidName { .. })));
    assert!(matches!(v.entry_delete("nowhere", &ip_key("10.0.0.1")), Err(CoreError::UnknownRemote(_))));
}

#[test]
fn merges_two_clusters_into_slices() {
    let mut v = view();
    v.local_service_upsert(global("cart"));
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1", "10.1.0.2", "fd00::1"])).unwrap();
    v.entry_upsert(WEST, service(WEST, "cart", &["10.2.0.1"])).unwrap();

    let ips = backend_ips(&v, "cart");
    assert_eq!(ips["east"], vec![ip("10.1.0.1"), ip("10.1.0.2"), ip("fd00::1")]);
    assert_eq!(ips["west"], vec![ip("10.2.0.1")]);

    let slices = v.desired_slices(&skey("cart"));
    // east: one IPv4 and one IPv6 slice; west: one IPv4 slice.
    assert_eq!(slices.len(), 3);
    let east_v4 = slices
        .iter()
        .find(|s| s.source_cluster == "east" && s.address_type == AddressType::IPv4)
        .expect("east IPv4 slice");
    assert_eq!(east_v4.endpoints.len(), 2);
    assert_eq!(east_v4.labels[slices::LABEL_SERVICE_NAME], "cart");
    assert_eq!(east_v4.labels[slices::LABEL_SOURCE_CLUSTER], "east");
    assert_eq!(east_v4.labels[slices::LABEL_MANAGED_BY], "identity-sync.causeway.io");
    assert_eq!(east_v4.ports, vec![SlicePort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }]);
    assert!(slices.iter().any(|s| s.source_cluster == "east" && s.address_type == AddressType::IPv6));
    // Names are deterministic and distinct.
    let again = v.desired_slices(&skey("cart"));
    assert_eq!(slices, again);
    let mut names: Vec<_> = slices.iter().map(|s| s.name.clone()).collect();
    names.dedup();
    assert_eq!(names.len(), 3);
}

#[test]
fn local_service_not_global_ignores_remote() {
    let mut v = view();
    v.local_service_upsert(local("cart", &[], 0));
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1"])).unwrap();
    assert!(v.service(&skey("cart")).is_none());
    assert!(v.desired_slices(&skey("cart")).is_empty());
    assert!(v.take_deltas().is_empty());

    // Marking it global merges what was already held.
    v.local_service_upsert(global("cart"));
    assert_eq!(backend_ips(&v, "cart")["east"], vec![ip("10.1.0.1")]);
    // No local service at all: nothing either.
    v.entry_upsert(EAST, service(EAST, "other", &["10.1.0.9"])).unwrap();
    assert!(v.service(&skey("other")).is_none());
}

#[test]
fn local_frontends_reach_the_view_and_only_their_changes_emit() {
    let fe = |addr: &str, port: u16| Frontend {
        ip: ip(addr),
        ports: vec![Port { name: "http".into(), protocol: Protocol::Tcp, port }],
    };
    let mut v = view();
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1"])).unwrap();
    v.local_service_upsert(global("cart").with_frontends(vec![fe("10.96.0.10", 80), fe("fd00:96::10", 80)]));
    assert_eq!(v.service(&skey("cart")).unwrap().frontends, vec![fe("10.96.0.10", 80), fe("fd00:96::10", 80)]);
    v.take_deltas();

    // Unchanged re-apply: nothing.
    v.local_service_upsert(global("cart").with_frontends(vec![fe("10.96.0.10", 80), fe("fd00:96::10", 80)]));
    assert!(v.take_deltas().is_empty());

    // A port change: exactly one service delta, carrying the new frontends.
    v.local_service_upsert(global("cart").with_frontends(vec![fe("10.96.0.10", 8080), fe("fd00:96::10", 8080)]));
    let d = v.take_deltas();
    assert_eq!(kinds(&d), vec![format!("upsert {:?}", ObjectKey::Service(skey("cart")))]);
    let Change::Upsert(ViewObject::Service(s)) = &d[0].change else { panic!("{d:?}") };
    assert_eq!(s.frontends, vec![fe("10.96.0.10", 8080), fe("fd00:96::10", 8080)]);
    assert_eq!(backend_ips(&v, "cart")["east"], vec![ip("10.1.0.1")]);
}

#[test]
fn non_shared_local_service_still_uses_remote_backends() {
    let mut v = view();
    let svc = local("cart", &[(ANNOTATION_GLOBAL, "true"), (ANNOTATION_SHARED, "false")], 3);
    assert!(svc.global && !svc.shared);
    v.local_service_upsert(svc);
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1"])).unwrap();
    assert_eq!(backend_ips(&v, "cart")["east"], vec![ip("10.1.0.1")]);
    // A remote value that is not shared is not merged.
    let RemoteEntry::Service(mut s) = service(WEST, "cart", &["10.2.0.1"]) else { unreachable!() };
    s.shared = false;
    v.entry_upsert(WEST, RemoteEntry::Service(s)).unwrap();
    assert!(!backend_ips(&v, "cart").contains_key("west"));
}

#[test]
fn affinity_prefers_one_side_and_falls_back() {
    let mut v = view();
    let with = |aff: &str, ready| local("cart", &[(ANNOTATION_GLOBAL, "true"), (ANNOTATION_AFFINITY, aff)], ready);
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1"])).unwrap();

    // local affinity with ready local backends: remote slices absent.
    v.local_service_upsert(with("local", 2));
    assert_eq!(v.service(&skey("cart")).unwrap().affinity, Affinity::Local);
    assert!(backend_ips(&v, "cart").is_empty());
    assert!(v.desired_slices(&skey("cart")).is_empty());

    // No ready local backend: fall back to remote.
    v.local_service_upsert(with("local", 0));
    assert_eq!(backend_ips(&v, "cart")["east"], vec![ip("10.1.0.1")]);
    assert_eq!(v.desired_slices(&skey("cart")).len(), 1);

    // Local recovers: remote withdrawn again.
    v.local_service_upsert(with("local", 1));
    assert!(v.desired_slices(&skey("cart")).is_empty());

    // remote / none affinity: remote backends regardless of local health.
    v.local_service_upsert(with("remote", 5));
    assert_eq!(v.desired_slices(&skey("cart")).len(), 1);
    v.local_service_upsert(with("none", 5));
    assert_eq!(v.desired_slices(&skey("cart")).len(), 1);
}

#[test]
fn disconnect_keeps_entries() {
    let mut v = view();
    let t0 = Instant::now();
    v.local_service_upsert(global("cart"));
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1"])).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 5)).unwrap();
    v.entry_upsert(EAST, node(EAST, "n1")).unwrap();
    v.take_deltas();
    v.disconnected(EAST, t0).unwrap();
    v.tick(t0 + Duration::from_secs(86_400));
    assert!(matches!(v.remote_status(EAST).unwrap().state, RemoteState::Disconnected { .. }));
    assert!(v.ip(&ip("10.1.0.1")).is_some());
    assert!(v.node(EAST, "n1").is_some());
    assert_eq!(backend_ips(&v, "cart")["east"], vec![ip("10.1.0.1")]);
    assert!(v.take_deltas().is_empty());
    assert_eq!(v.next_deadline(), None);
}

#[test]
fn reconnect_sweeps_only_what_did_not_come_back_without_flapping() {
    let mut v = view();
    let t0 = Instant::now();
    v.local_service_upsert(global("cart"));
    v.local_service_upsert(global("gone"));
    for (a, id) in [("10.1.0.1", 1), ("10.1.0.2", 2), ("10.1.0.3", 3)] {
        v.entry_upsert(EAST, ip_entry(EAST, a, id)).unwrap();
    }
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1"])).unwrap();
    v.entry_upsert(EAST, service(EAST, "gone", &["10.1.0.3"])).unwrap();
    v.entry_upsert(EAST, node(EAST, "n1")).unwrap();
    v.entry_upsert(EAST, identity(EAST, 1)).unwrap();
    for k in [Kind::Nodes, Kind::Services, Kind::Ip, Kind::Identities] {
        v.list_done(EAST, k).unwrap();
    }
    v.take_deltas();
    let rev = v.revision();

    v.disconnected(EAST, t0).unwrap();
    v.reconnected(EAST).unwrap();
    assert_eq!(v.remote_status(EAST).unwrap().state, RemoteState::Syncing);

    // Partial re-list of ipcache: .1 unchanged, .2 changed, .3 missing.
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.2", 22)).unwrap();
    // Nothing is swept before the list is complete.
    assert!(v.ip(&ip("10.1.0.3")).is_some());
    v.list_done(EAST, Kind::Ip).unwrap();
    let d = v.take_deltas();
    assert_eq!(
        kinds(&d),
        vec![
            format!("upsert {:?}", ObjectKey::Ip(ip("10.1.0.2"))),
            format!("delete {:?}", ObjectKey::Ip(ip("10.1.0.3")))
        ]
    );
    assert_eq!(d[0].revision, rev + 1);
    assert_eq!(v.ip(&ip("10.1.0.2")).unwrap().identity, (1 << 16) + 22);
    assert!(v.ip(&ip("10.1.0.3")).is_none());
    assert_eq!(v.remote_status(EAST).unwrap().entries.ipcache, 2);

    // Other kinds were not touched by the ipcache sweep.
    assert!(v.node(EAST, "n1").is_some());
    assert!(v.service(&skey("gone")).unwrap().clusters.len() == 1);

    // Services: "cart" comes back unchanged (no delta), "gone" does not.
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1"])).unwrap();
    assert!(v.take_deltas().is_empty(), "an unchanged re-listed service must not flap");
    v.list_done(EAST, Kind::Services).unwrap();
    let d = v.take_deltas();
    assert_eq!(kinds(&d), vec![format!("upsert {:?}", ObjectKey::Service(skey("gone")))]);
    assert!(v.service(&skey("gone")).unwrap().clusters.is_empty());
    assert_eq!(v.services_changed_since(rev), vec![skey("gone")]);

    // Nodes and identities come back unchanged: no deltas, and the remote is synced.
    v.entry_upsert(EAST, node(EAST, "n1")).unwrap();
    v.entry_upsert(EAST, identity(EAST, 1)).unwrap();
    v.list_done(EAST, Kind::Nodes).unwrap();
    v.list_done(EAST, Kind::Identities).unwrap();
    assert!(v.take_deltas().is_empty());
    assert_eq!(v.remote_status(EAST).unwrap().state, RemoteState::Synced);
}

#[test]
fn relist_after_compaction_sweeps_one_kind() {
    let mut v = view();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.2", 2)).unwrap();
    v.entry_upsert(EAST, node(EAST, "n1")).unwrap();
    v.list_done(EAST, Kind::Ip).unwrap();
    v.take_deltas();
    v.relist_started(EAST, Kind::Ip).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.2", 2)).unwrap();
    v.list_done(EAST, Kind::Ip).unwrap();
    assert_eq!(kinds(&v.take_deltas()), vec![format!("delete {:?}", ObjectKey::Ip(ip("10.1.0.1")))]);
    assert!(v.node(EAST, "n1").is_some());
}

#[test]
fn cache_ttl_revokes_disconnected_remote_with_fake_time() {
    let mut v = view_with(CoreConfig { cache_ttl: Some(Duration::from_secs(60)), ..Default::default() }, &[EAST, WEST]);
    let t0 = Instant::now();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    v.entry_upsert(WEST, ip_entry(WEST, "10.2.0.1", 1)).unwrap();
    v.take_deltas();
    v.disconnected(EAST, t0).unwrap();
    assert_eq!(v.next_deadline(), Some(t0 + Duration::from_secs(60)));
    v.tick(t0 + Duration::from_secs(59));
    assert!(v.ip(&ip("10.1.0.1")).is_some());
    v.tick(t0 + Duration::from_secs(60));
    assert!(v.ip(&ip("10.1.0.1")).is_none());
    assert!(v.ip(&ip("10.2.0.1")).is_some(), "another remote is untouched");
    assert!(v.remote_status(EAST).unwrap().revoked);
    assert_eq!(v.next_deadline(), None);
    assert_eq!(kinds(&v.take_deltas()), vec![format!("delete {:?}", ObjectKey::Ip(ip("10.1.0.1")))]);
    // A second tick does nothing more.
    v.tick(t0 + Duration::from_secs(120));
    assert!(v.take_deltas().is_empty());
    // Reconnecting brings entries back through the list.
    v.reconnected(EAST).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    assert!(v.ip(&ip("10.1.0.1")).is_some());
    assert!(!v.remote_status(EAST).unwrap().revoked);
}

#[test]
fn removing_a_remote_drains_it() {
    let mut v = view();
    v.local_service_upsert(global("cart"));
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1"])).unwrap();
    v.entry_upsert(WEST, service(WEST, "cart", &["10.2.0.1"])).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    v.entry_upsert(EAST, node(EAST, "n1")).unwrap();
    v.entry_upsert(EAST, identity(EAST, 1)).unwrap();
    v.take_deltas();
    v.remote_removed(EAST).unwrap();
    assert!(v.remote_status(EAST).is_none());
    assert_eq!(v.ipcache_len(), 0);
    assert_eq!(v.nodes_len(), 0);
    assert_eq!(v.identities_len(), 0);
    assert_eq!(backend_ips(&v, "cart").keys().collect::<Vec<_>>(), vec!["west"]);
    assert_eq!(v.take_deltas().len(), 4);
    // Late events for the removed remote are errors the adapter can log, not panics.
    assert!(v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).is_err());
    // Re-adding reuses the slot cleanly.
    v.remote_added(EAST).unwrap();
    v.remote_validated(ctx(EAST, 1)).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    assert_eq!(&*v.ip(&ip("10.1.0.1")).unwrap().cluster, EAST);
}

#[test]
fn rejected_or_changed_config_drains() {
    let mut v = view();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    v.remote_validated(ctx(EAST, 1)).unwrap();
    assert!(v.ip(&ip("10.1.0.1")).is_some(), "same config: kept");
    v.remote_validated(ctx(EAST, 3)).unwrap();
    assert!(v.ip(&ip("10.1.0.1")).is_none(), "new ID: entries validated against the old one are drained");

    v.remote_validated(ctx(WEST, 2)).unwrap();
    v.entry_upsert(WEST, ip_entry(WEST, "10.2.0.1", 1)).unwrap();
    v.remote_rejected(WEST, "cluster ID 2 already used").unwrap();
    assert!(v.ip(&ip("10.2.0.1")).is_none());
    assert!(matches!(v.remote_status(WEST).unwrap().state, RemoteState::Rejected { .. }));
    assert!(v.entry_upsert(WEST, ip_entry(WEST, "10.2.0.1", 1)).is_err());
}

#[test]
fn ip_conflict_first_owner_stays_then_next_is_promoted() {
    let mut v = view();
    v.entry_upsert(EAST, ip_entry(EAST, "10.9.0.1", 1)).unwrap();
    v.entry_upsert(WEST, ip_entry(WEST, "10.9.0.1", 7)).unwrap();
    assert_eq!(&*v.ip(&ip("10.9.0.1")).unwrap().cluster, EAST);
    assert_eq!(v.take_deltas().len(), 1, "the second claim is queued, not visible");
    // An update of the hidden claim changes nothing visible.
    v.entry_upsert(WEST, ip_entry(WEST, "10.9.0.1", 8)).unwrap();
    assert!(v.take_deltas().is_empty());
    v.entry_delete(EAST, &ip_key("10.9.0.1")).unwrap();
    let owner = v.ip(&ip("10.9.0.1")).unwrap();
    assert_eq!((&*owner.cluster, owner.identity, owner.cluster_id), (WEST, (2 << 16) + 8, 2));
    assert_eq!(kinds(&v.take_deltas()), vec![format!("upsert {:?}", ObjectKey::Ip(ip("10.9.0.1")))]);
    v.entry_delete(WEST, &ip_key("10.9.0.1")).unwrap();
    assert!(v.ip(&ip("10.9.0.1")).is_none());
    assert_eq!(v.remote_status(EAST).unwrap().entries.ipcache, 0);
    assert_eq!(v.remote_status(WEST).unwrap().entries.ipcache, 0);
}

#[test]
fn bad_values_are_counted_and_never_enter_the_view() {
    let mut v = view();
    let c = ctx(EAST, 1);
    // Bad JSON for a new key: counted, not in the view.
    let key = ip_key("10.1.0.7");
    let err = c.decode(&key, b"{\"IP\": \"10.1.0.7\"").unwrap_err();
    v.entry_rejected(EAST, &key, &err).unwrap();
    assert!(v.ip(&ip("10.1.0.7")).is_none());
    // Another cluster's identity range: refused.
    let stolen = format!("{{\"IP\": \"10.1.0.8\", \"ID\": {}}}", (2 << 16) + 1);
    let err = c.decode(&ip_key("10.1.0.8"), stolen.as_bytes()).unwrap_err();
    v.entry_rejected(EAST, &ip_key("10.1.0.8"), &err).unwrap();
    assert!(v.ip(&ip("10.1.0.8")).is_none());
    let st = v.remote_status(EAST).unwrap();
    assert_eq!(st.bad_values.get("malformed"), Some(&1));
    assert_eq!(st.bad_values.get("identity_out_of_range"), Some(&1));
    assert!(st.last_error.as_deref().unwrap_or("").contains("10.1.0.8"));
    assert_eq!(st.suspect_entries, 0);
    assert!(v.take_deltas().is_empty());

    // A bad write over a good value keeps the last good value, marked suspect, with no delta.
    let good = format!("{{\"IP\": \"10.1.0.9\", \"ID\": {}}}", (1 << 16) + 1);
    v.entry_upsert(EAST, c.decode(&ip_key("10.1.0.9"), good.as_bytes()).unwrap()).unwrap();
    v.take_deltas();
    let err = c.decode(&ip_key("10.1.0.9"), b"garbage").unwrap_err();
    v.entry_rejected(EAST, &ip_key("10.1.0.9"), &err).unwrap();
    assert_eq!(v.ip(&ip("10.1.0.9")).unwrap().identity, (1 << 16) + 1);
    assert_eq!(v.remote_status(EAST).unwrap().suspect_entries, 1);
    assert!(v.take_deltas().is_empty());
    // It survives a re-list in which the key still holds the bad value...
    v.relist_started(EAST, Kind::Ip).unwrap();
    v.entry_rejected(EAST, &ip_key("10.1.0.9"), &err).unwrap();
    v.list_done(EAST, Kind::Ip).unwrap();
    assert!(v.ip(&ip("10.1.0.9")).is_some());
    assert_eq!(v.remote_status(EAST).unwrap().suspect_entries, 1);
    // ...and a good value clears the mark.
    v.entry_upsert(EAST, c.decode(&ip_key("10.1.0.9"), good.as_bytes()).unwrap()).unwrap();
    assert_eq!(v.remote_status(EAST).unwrap().suspect_entries, 0);
    assert!(v.take_deltas().is_empty(), "same value as before the bad write: no flap");
    // Deleting a key that never held a good value is harmless.
    v.entry_delete(EAST, &ip_key("10.1.0.7")).unwrap();
    assert!(matches!(v.entry_delete(EAST, "cilium/state/nodes/v1/west/n1"), Err(CoreError::ForeignKey { .. })));
}

#[test]
fn services_changed_since_tracks_disappearance() {
    let mut v = view();
    v.local_service_upsert(global("a"));
    v.local_service_upsert(global("b"));
    v.entry_upsert(EAST, service(EAST, "a", &["10.1.0.1"])).unwrap();
    let rev = v.revision();
    v.entry_upsert(EAST, service(EAST, "b", &["10.1.0.2"])).unwrap();
    assert_eq!(v.services_changed_since(rev), vec![skey("b")]);
    let rev = v.revision();
    v.local_service_delete("shop", "a");
    assert_eq!(v.services_changed_since(rev), vec![skey("a")]);
    assert!(v.desired_slices(&skey("a")).is_empty());
    let rev2 = v.revision();
    v.forget_service_changes_before(rev2);
    assert!(v.services_changed_since(0).iter().all(|k| *k != skey("a")));
    assert!(v.services_changed_since(0).contains(&skey("b")));
    // The remote deleting its service leaves the local global service with no remote backends.
    let rev = v.revision();
    v.entry_delete(EAST, &svc_key_str(EAST, "b")).unwrap();
    assert_eq!(v.services_changed_since(rev), vec![skey("b")]);
    assert!(v.service(&skey("b")).unwrap().clusters.is_empty());
    // East still exports "a" (held even though the local "a" is gone).
    assert_eq!(v.remote_status(EAST).unwrap().entries.services, 1);
}

#[test]
fn snapshot_holds_everything_at_the_current_revision() {
    let mut v = view();
    v.local_service_upsert(global("cart"));
    v.entry_upsert(EAST, service(EAST, "cart", &["10.1.0.1"])).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    v.entry_upsert(EAST, node(EAST, "n1")).unwrap();
    v.entry_upsert(EAST, identity(EAST, 1)).unwrap();
    let s = v.snapshot();
    assert_eq!(s.revision, v.revision());
    assert_eq!(s.objects.len(), 4);
    let n = v.node(EAST, "n1").unwrap();
    assert_eq!(n.zone.as_deref(), Some("eu-1a"));
    assert_eq!(n.pod_cidrs, vec!["10.1.2.0/24".parse::<ipnet::IpNet>().unwrap()]);
}

/// Catches pathological slowness (quadratic paths, per-entry cloning) in a debug build; no timing assertion.
#[test]
fn imports_100k_ipcache_entries() {
    let mut v = view();
    for i in 0..100_000u32 {
        let a = std::net::Ipv4Addr::from(0x0a01_0000 + i);
        let e = RemoteEntry::Ip(IpCacheEntry {
            ip: a.into(),
            host_ip: Some(ip("192.168.0.1")),
            id: (1 << 16) + 1 + (i % 60_000),
            key: 0,
            metadata: String::new(),
            k8s_namespace: format!("ns-{}", i % 50),
            k8s_pod_name: format!("pod-{i}"),
            k8s_pod_uid: None,
            k8s_service_account: None,
            named_ports: vec![],
        });
        v.entry_upsert(EAST, e).unwrap();
    }
    v.list_done(EAST, Kind::Ip).unwrap();
    assert_eq!(v.ipcache_len(), 100_000);
    assert_eq!(v.take_deltas().len(), 100_000);
    assert_eq!(v.snapshot().objects.len(), 100_000);
    // Re-listing half of them unchanged is silent; the other half is swept.
    v.disconnected(EAST, Instant::now()).unwrap();
    v.reconnected(EAST).unwrap();
    for i in 0..50_000u32 {
        let a = std::net::Ipv4Addr::from(0x0a01_0000 + i);
        let e = RemoteEntry::Ip(IpCacheEntry {
            ip: a.into(),
            host_ip: Some(ip("192.168.0.1")),
            id: (1 << 16) + 1 + (i % 60_000),
            key: 0,
            metadata: String::new(),
            k8s_namespace: format!("ns-{}", i % 50),
            k8s_pod_name: format!("pod-{i}"),
            k8s_pod_uid: None,
            k8s_service_account: None,
            named_ports: vec![],
        });
        v.entry_upsert(EAST, e).unwrap();
    }
    assert!(v.take_deltas().is_empty());
    v.list_done(EAST, Kind::Ip).unwrap();
    assert_eq!(v.ipcache_len(), 50_000);
    assert_eq!(v.take_deltas().len(), 50_000);
    v.remote_removed(EAST).unwrap();
}

#[test]
fn a_new_session_via_validation_sweeps_what_was_not_relisted() {
    let mut v = view();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.2", 2)).unwrap();
    v.list_done(EAST, Kind::Ip).unwrap();
    v.take_deltas();
    v.disconnected(EAST, Instant::now()).unwrap();
    // The adapter re-validates the (unchanged) config when a new session starts.
    v.remote_validated(ctx(EAST, 1)).unwrap();
    v.entry_upsert(EAST, ip_entry(EAST, "10.1.0.1", 1)).unwrap();
    assert!(v.take_deltas().is_empty());
    v.list_done(EAST, Kind::Ip).unwrap();
    assert_eq!(kinds(&v.take_deltas()), vec![format!("delete {:?}", ObjectKey::Ip(ip("10.1.0.2")))]);
}

fn workload(name: &str, mesh: &str, key: &str) -> LocalWorkload {
    LocalWorkload {
        node: NodeView {
            cluster: "home".into(),
            cluster_id: 5,
            name: name.into(),
            internal_ips: vec![ip("192.168.50.10")],
            pod_cidrs: vec!["10.192.1.0/30".parse().unwrap()],
            zone: None,
            wireguard_pub_key: key.into(),
        },
        ip: IpView {
            ip: ip(mesh),
            identity: (5 << 16) + 9,
            host_ip: Some(ip("192.168.50.10")),
            encrypt_key: 0,
            cluster_id: 5,
            cluster: "home".into(),
            namespace: "default".into(),
            pod_name: name.into(),
        },
    }
}

#[test]
fn local_workloads_enter_change_and_leave_the_view() {
    let mut v = view();
    v.take_deltas();
    let node_key = ObjectKey::Node { cluster: "home".into(), name: "vm-1".into() };
    v.local_workload_upsert(workload("vm-1", "10.192.1.1", "k1"));
    assert_eq!(
        kinds(&v.take_deltas()),
        vec![format!("upsert {node_key:?}"), format!("upsert {:?}", ObjectKey::Ip(ip("10.192.1.1")))]
    );
    assert_eq!(&*v.node("home", "vm-1").unwrap().wireguard_pub_key, "k1");
    assert_eq!(v.ip(&ip("10.192.1.1")).unwrap().identity, (5 << 16) + 9);
    // The local source is not a remote.
    assert_eq!(v.remotes().iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>(), vec![EAST, WEST]);
    // Unchanged: nothing.
    v.local_workload_upsert(workload("vm-1", "10.192.1.1", "k1"));
    assert!(v.take_deltas().is_empty());
    // A new key: the node only. A new mesh address: the old one goes, the new one comes.
    v.local_workload_upsert(workload("vm-1", "10.192.1.1", "k2"));
    assert_eq!(kinds(&v.take_deltas()), vec![format!("upsert {node_key:?}")]);
    v.local_workload_upsert(workload("vm-1", "10.192.1.2", "k2"));
    assert_eq!(
        kinds(&v.take_deltas()),
        vec![
            format!("delete {:?}", ObjectKey::Ip(ip("10.192.1.1"))),
            format!("upsert {:?}", ObjectKey::Ip(ip("10.192.1.2")))
        ]
    );
    // Snapshots carry it.
    let snap = v.snapshot();
    assert!(snap.objects.iter().any(|o| o.key() == node_key));
    // Gone: both deleted; deleting again or an unknown name is a no-op.
    v.local_workload_delete("vm-1");
    assert_eq!(
        kinds(&v.take_deltas()),
        vec![format!("delete {:?}", ObjectKey::Ip(ip("10.192.1.2"))), format!("delete {node_key:?}")]
    );
    v.local_workload_delete("vm-1");
    v.local_workload_delete("never");
    assert!(v.take_deltas().is_empty());
    assert_eq!((v.nodes_len(), v.ipcache_len(), v.local_workloads_len()), (0, 0, 0));
}

#[test]
fn local_workload_and_remote_claiming_one_ip_queue_like_remotes() {
    let mut v = view();
    v.entry_upsert(EAST, ip_entry(EAST, "10.192.1.1", 1)).unwrap();
    v.take_deltas();
    v.local_workload_upsert(workload("vm-1", "10.192.1.1", "k1"));
    // The node appears; the address stays east's.
    assert_eq!(&*v.ip(&ip("10.192.1.1")).unwrap().cluster, EAST);
    // Removing the remote promotes the workload's claim; removing the remote entirely does not touch it.
    v.remote_removed(EAST).unwrap();
    assert_eq!(&*v.ip(&ip("10.192.1.1")).unwrap().cluster, "home");
    assert!(v.node("home", "vm-1").is_some());
    v.local_workload_delete("vm-1");
    assert!(v.ip(&ip("10.192.1.1")).is_none());
}

fn with_frontend(e: RemoteEntry, frontend: &str, shared: bool) -> RemoteEntry {
    let RemoteEntry::Service(mut s) = e else { panic!("not a service") };
    let ports: BTreeMap<String, PortConfig> =
        [("http".to_string(), PortConfig { protocol: "TCP".into(), port: 80 })].into();
    s.frontends = [(ip(frontend), ports)].into();
    s.shared = shared;
    RemoteEntry::Service(s)
}

#[test]
fn on_an_external_workload_the_home_clusters_services_define_the_global_services() {
    // EAST is the home: its services (even unshared) are global services with its ClusterIPs as frontends; WEST
    // (another remote) adds its shared backends, never defines a service.
    let mut v = view_with(CoreConfig { home: Some(EAST.into()), ..Default::default() }, &[EAST, WEST]);
    v.entry_upsert(EAST, with_frontend(service(EAST, "cart", &["10.1.0.5"]), "10.96.0.20", false)).unwrap();
    v.entry_upsert(WEST, service(WEST, "cart", &["10.2.0.5"])).unwrap();
    v.entry_upsert(WEST, service(WEST, "west-only", &["10.2.0.6"])).unwrap();
    let cart = v.service(&skey("cart")).unwrap();
    assert_eq!(cart.frontends.len(), 1);
    assert_eq!((cart.frontends[0].ip, cart.frontends[0].ports[0].port), (ip("10.96.0.20"), 80));
    assert_eq!(
        backend_ips(&v, "cart"),
        BTreeMap::from([(EAST.to_string(), vec![ip("10.1.0.5")]), (WEST.to_string(), vec![ip("10.2.0.5")])])
    );
    assert!(v.service(&skey("west-only")).is_none());
    // The home withdrawing it removes the service.
    v.entry_delete(EAST, &svc_key_str(EAST, "cart")).unwrap();
    assert!(v.service(&skey("cart")).is_none());

    // In a cluster (no home), the same inputs define nothing without a local global Service.
    let mut v = view();
    v.entry_upsert(EAST, with_frontend(service(EAST, "cart", &["10.1.0.5"]), "10.96.0.20", true)).unwrap();
    assert!(v.service(&skey("cart")).is_none());
    v.local_service_upsert(global("cart"));
    assert!(v.service(&skey("cart")).unwrap().frontends.is_empty(), "the local Service's frontends, not east's");
}

#[test]
fn two_local_workloads_on_one_mesh_address_do_not_take_it_from_each_other() {
    let mut v = view();
    let a = workload("vm-a", "10.192.1.1", "ka");
    let mut b = workload("vm-b", "10.192.1.1", "kb");
    b.ip.identity += 1;
    v.local_workload_upsert(a.clone());
    v.local_workload_upsert(b.clone());
    assert_eq!(&*v.ip(&ip("10.192.1.1")).unwrap().pod_name, "vm-a");
    // vm-b's own updates leave vm-a's entry alone; vm-a's update shows.
    b.node.wireguard_pub_key = "kb2".into();
    v.local_workload_upsert(b.clone());
    assert_eq!(&*v.ip(&ip("10.192.1.1")).unwrap().pod_name, "vm-a");
    // vm-a goes: vm-b takes the address over, with its identity.
    v.take_deltas();
    v.local_workload_delete("vm-a");
    let now = v.ip(&ip("10.192.1.1")).unwrap();
    assert_eq!((&*now.pod_name, now.identity), ("vm-b", b.ip.identity));
    assert_eq!(
        kinds(&v.take_deltas()),
        vec![
            format!("upsert {:?}", ObjectKey::Ip(ip("10.192.1.1"))),
            format!("delete {:?}", ObjectKey::Node { cluster: "home".into(), name: "vm-a".into() })
        ]
    );
    // vm-b moving elsewhere frees it.
    v.local_workload_upsert(workload("vm-b", "10.192.1.2", "kb2"));
    assert!(v.ip(&ip("10.192.1.1")).is_none());
    assert_eq!(&*v.ip(&ip("10.192.1.2")).unwrap().pod_name, "vm-b");
}
