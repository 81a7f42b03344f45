//! Index tests: apply objects, then check what the store should hold.

use std::collections::HashMap;

use causeway_store::{ClusterInfo, LabelSet, MaxConnectedClusters, StoreKey};

use super::model::*;
use super::{Change, Exporter, IdentityRequest};
use crate::metrics::Metrics;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// An exporter for cluster `east` (ID 7) plus a toy allocator that numbers label sets in order of first request.
struct Harness {
    ex: Exporter,
    metrics: Metrics,
    ids: HashMap<LabelSet, u32>,
    released: Vec<LabelSet>,
    next: u32,
}

impl Harness {
    fn new() -> Self {
        let metrics = Metrics::default();
        let cluster = ClusterInfo::new("east", 7, MaxConnectedClusters::C255).expect("valid cluster");
        Harness {
            ex: Exporter::new(cluster, metrics.clone()),
            metrics,
            ids: HashMap::new(),
            released: Vec::new(),
            next: (7 << 16) + 19,
        }
    }

    /// Carries out identity requests, then takes the resulting store changes.
    fn sync(&mut self) -> Vec<Change> {
        for req in self.ex.take_identity_requests() {
            match req {
                IdentityRequest::Acquire(l) => {
                    let next = &mut self.next;
                    let id = *self.ids.entry(l.clone()).or_insert_with(|| {
                        *next += 1;
                        *next - 1
                    });
                    self.ex.identity_resolved(&l, id);
                }
                IdentityRequest::Release(l) => self.released.push(l),
            }
        }
        self.ex.take_changes()
    }

    fn get(&self, key: &str) -> Option<&str> {
        let key = StoreKey::parse(key).expect("test key parses");
        self.ex.entries().get(&key).map(String::as_str)
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> =
            self.ex.entries().keys().map(|k| k.to_string()).filter(|k| k.starts_with(prefix)).collect();
        keys.sort();
        keys
    }
}

fn ns(name: &str, l: &[(&str, &str)]) -> NamespaceInput {
    NamespaceInput { name: name.to_string(), labels: labels(l) }
}

fn pod(ns: &str, name: &str, app: &str, ips: &[&str], created: i64) -> PodInput {
    PodInput {
        namespace: ns.to_string(),
        name: name.to_string(),
        labels: labels(&[("app", app)]),
        created: Some(created),
        host_network: false,
        phase: Some("Running".to_string()),
        pod_ips: ips.iter().map(|s| s.to_string()).collect(),
        host_ip: Some("192.168.10.12".to_string()),
        container_ports: vec![],
    }
}

const CART_IDENTITY: &str = "k8s:app=cart;k8s:io.cilium.k8s.namespace.labels.team=payments;\
    k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=shop;";

#[test]
fn pod_exports_identity_and_ipcache_for_both_families() {
    let mut h = Harness::new();
    h.ex.apply_namespace(ns("shop", &[("team", "payments")]));
    let mut p = pod("shop", "cart-7f9c-x2", "cart", &["10.1.2.33", "fd00::21"], 100);
    p.container_ports = vec![
        ContainerPortInput { name: Some("http".into()), port: 8080, protocol: None },
        ContainerPortInput { name: Some("dns".into()), port: 53, protocol: Some("UDP".into()) },
        ContainerPortInput { name: None, port: 9000, protocol: None },
    ];
    h.ex.apply_pod(p);
    let changes = h.sync();
    assert_eq!(changes.len(), 3, "{changes:?}");

    assert_eq!(h.get("cilium/state/identities/v1/id/458771"), Some(CART_IDENTITY));
    assert_eq!(
        h.get("cilium/state/ip/v1/default/10.1.2.33"),
        Some(
            r#"{"IP":"10.1.2.33","HostIP":"192.168.10.12","ID":458771,"Key":0,"Metadata":"","K8sNamespace":"shop","K8sPodName":"cart-7f9c-x2","NamedPorts":[{"Name":"dns","Port":53,"Protocol":"UDP"},{"Name":"http","Port":8080,"Protocol":"TCP"}]}"#
        )
    );
    let v6 = h.get("cilium/state/ip/v1/default/fd00::21").expect("IPv6 entry");
    assert!(v6.starts_with(r#"{"IP":"fd00::21","HostIP":"192.168.10.12","ID":458771,"#), "{v6}");
    assert_eq!(h.metrics.exported_entries.get_or_create(&crate::metrics::KindLabels { kind: "ip".into() }).get(), 2);

    // Re-applying the same pod writes nothing.
    h.ex.apply_pod(pod("shop", "cart-7f9c-x2", "cart", &["10.1.2.33", "fd00::21"], 100));
    // (the named ports differ now, so only the ipcache entries change, not the identity)
    let changes = h.sync();
    assert!(changes.iter().all(|c| matches!(c.key(), StoreKey::Ip { .. })), "{changes:?}");
    h.ex.apply_pod(pod("shop", "cart-7f9c-x2", "cart", &["10.1.2.33", "fd00::21"], 100));
    assert_eq!(h.sync(), vec![]);

    // Deleting withdraws the pod's entries and releases the identity, which stays exported while it is live in
    // the allocator (idle within its grace period: peers may still see traffic from it)...
    h.ex.delete_pod("shop", "cart-7f9c-x2");
    let changes = h.sync();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(changes.iter().all(|c| matches!(c, Change::Delete { key: StoreKey::Ip { .. } })));
    assert_eq!(h.released.len(), 1);
    assert_eq!(h.released[0].to_string(), CART_IDENTITY);
    assert_eq!(h.get("cilium/state/identities/v1/id/458771"), Some(CART_IDENTITY));
    // ...until the allocator's GC collects it.
    h.ex.identities_collected([458771]);
    let changes = h.sync();
    assert_eq!(changes, vec![Change::Delete { key: StoreKey::Identity { id: 458771 } }]);
    assert!(h.ex.entries().is_empty());
}

#[test]
fn pod_waits_for_its_namespace() {
    let mut h = Harness::new();
    h.ex.apply_pod(pod("shop", "a", "cart", &["10.1.2.33"], 1));
    assert!(h.ex.take_identity_requests().is_empty(), "no identity before the namespace's labels are known");
    assert_eq!(h.ex.take_changes(), vec![]);
    h.ex.apply_namespace(ns("shop", &[("team", "payments")]));
    assert_eq!(h.sync().len(), 2);
    assert!(h.get("cilium/state/ip/v1/default/10.1.2.33").is_some());
}

#[test]
fn ipcache_waits_for_the_identity() {
    let mut h = Harness::new();
    h.ex.apply_namespace(ns("shop", &[]));
    h.ex.apply_pod(pod("shop", "a", "cart", &["10.1.2.33"], 1));
    let reqs = h.ex.take_identity_requests();
    assert!(matches!(reqs.as_slice(), [IdentityRequest::Acquire(_)]), "{reqs:?}");
    assert_eq!(h.ex.take_changes(), vec![], "an entry without an ID would be wrong, so nothing is written yet");
    assert_eq!(h.ex.pending_identities().len(), 1);
    let IdentityRequest::Acquire(l) = &reqs[0] else { unreachable!() };
    h.ex.identity_resolved(l, (7 << 16) + 5);
    assert_eq!(h.ex.take_changes().len(), 2);
    // An ID outside the cluster's range is refused.
    h.ex.identity_resolved(l, 5);
    assert_eq!(h.ex.take_changes(), vec![]);
    assert_eq!(h.metrics.error_count("identity_allocation"), 1);
}

#[test]
fn host_network_ipless_and_terminal_pods_are_skipped() {
    let mut h = Harness::new();
    h.ex.apply_namespace(ns("shop", &[]));
    let mut hostnet = pod("shop", "hostnet", "x", &["192.168.10.12"], 1);
    hostnet.host_network = true;
    h.ex.apply_pod(hostnet);
    h.ex.apply_pod(pod("shop", "pending", "x", &[], 1));
    let mut done = pod("shop", "done", "x", &["10.1.2.40"], 1);
    done.phase = Some("Succeeded".into());
    h.ex.apply_pod(done);
    assert_eq!(h.sync(), vec![]);

    // A running pod that fails is withdrawn.
    h.ex.apply_pod(pod("shop", "job", "x", &["10.1.2.41"], 1));
    assert_eq!(h.sync().len(), 2);
    let mut failed = pod("shop", "job", "x", &["10.1.2.41"], 1);
    failed.phase = Some("Failed".into());
    h.ex.apply_pod(failed);
    h.sync();
    assert_eq!(h.keys("cilium/state/ip/"), Vec::<String>::new(), "the failed pod's entry is withdrawn");
    assert_eq!(h.keys("cilium/state/identities/").len(), 1, "its identity lives on until the allocator collects it");
}

#[test]
fn pods_with_one_label_set_share_an_identity() {
    let mut h = Harness::new();
    h.ex.apply_namespace(ns("shop", &[]));
    h.ex.apply_pod(pod("shop", "a", "cart", &["10.1.2.1"], 1));
    h.ex.apply_pod(pod("shop", "b", "cart", &["10.1.2.2"], 2));
    h.ex.apply_pod(pod("shop", "c", "web", &["10.1.2.3"], 3));
    h.sync();
    assert_eq!(h.keys("cilium/state/identities/").len(), 2);
    assert_eq!(h.ids.len(), 2);
    h.ex.delete_pod("shop", "a");
    h.sync();
    assert_eq!(h.keys("cilium/state/identities/").len(), 2, "b still uses the cart identity");
    assert!(h.released.is_empty());
    h.ex.delete_pod("shop", "b");
    h.sync();
    assert_eq!(h.keys("cilium/state/identities/").len(), 2, "released, but live until collected");
    assert_eq!(h.released.len(), 1);
    let cart = h.ids[&h.released[0]];
    h.ex.identities_collected([cart]);
    h.sync();
    assert_eq!(h.keys("cilium/state/identities/").len(), 1);
}

#[test]
fn namespace_label_change_moves_its_pods_only() {
    let mut h = Harness::new();
    h.ex.apply_namespace(ns("shop", &[("team", "a")]));
    h.ex.apply_namespace(ns("other", &[]));
    h.ex.apply_pod(pod("shop", "a", "cart", &["10.1.2.1"], 1));
    h.ex.apply_pod(pod("other", "b", "cart", &["10.1.3.1"], 1));
    h.sync();
    let before_other = h.get("cilium/state/ip/v1/default/10.1.3.1").map(str::to_string);
    h.ex.apply_namespace(ns("shop", &[("team", "b")]));
    let changes = h.sync();
    // New identity and the shop pod's entry rewritten; nothing else (the old identity is released, and stays
    // exported until the allocator collects it).
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(h.released.len(), 1);
    assert!(h.released[0].to_string().contains("team=a"));
    assert_eq!(h.get("cilium/state/ip/v1/default/10.1.3.1").map(str::to_string), before_other);
    let old = h.ids[&h.released[0]];
    h.ex.identities_collected([old]);
    h.sync();
    let ids = h.keys("cilium/state/identities/");
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().any(|k| h.get(k).is_some_and(|v| v.contains("team=b"))));
    assert!(!ids.iter().any(|k| h.get(k).is_some_and(|v| v.contains("team=a"))));
}

#[test]
fn ip_conflict_first_owner_wins_then_next_is_promoted() {
    let mut h = Harness::new();
    h.ex.apply_namespace(ns("shop", &[]));
    h.ex.apply_pod(pod("shop", "new", "web", &["10.1.2.9"], 200));
    h.ex.apply_pod(pod("shop", "old", "cart", &["10.1.2.9"], 100));
    h.sync();
    let entry = h.get("cilium/state/ip/v1/default/10.1.2.9").expect("entry");
    assert!(entry.contains(r#""K8sPodName":"old""#), "the older pod owns the IP: {entry}");
    assert_eq!(h.metrics.ip_conflicts.get(), 1);

    // A later update of the loser changes nothing.
    let mut newer = pod("shop", "new", "web", &["10.1.2.9"], 200);
    newer.labels.insert("v".into(), "2".into());
    h.ex.apply_pod(newer);
    let changes = h.sync();
    assert!(changes.iter().all(|c| !matches!(c.key(), StoreKey::Ip { .. })), "{changes:?}");

    h.ex.delete_pod("shop", "old");
    h.sync();
    let entry = h.get("cilium/state/ip/v1/default/10.1.2.9").expect("entry survives");
    assert!(entry.contains(r#""K8sPodName":"new""#), "the next claimant is promoted: {entry}");
    h.ex.delete_pod("shop", "new");
    h.sync();
    assert!(h.get("cilium/state/ip/v1/default/10.1.2.9").is_none());
}

#[test]
fn same_creation_time_breaks_ties_by_name() {
    let mut h = Harness::new();
    h.ex.apply_namespace(ns("shop", &[]));
    h.ex.apply_pod(pod("shop", "b", "x", &["10.1.2.9"], 5));
    h.ex.apply_pod(pod("shop", "a", "x", &["10.1.2.9"], 5));
    h.sync();
    assert!(h.get("cilium/state/ip/v1/default/10.1.2.9").is_some_and(|v| v.contains(r#""K8sPodName":"a""#)));
}

#[test]
fn pod_ip_change_withdraws_the_old_ip() {
    let mut h = Harness::new();
    h.ex.apply_namespace(ns("shop", &[]));
    h.ex.apply_pod(pod("shop", "a", "x", &["10.1.2.1"], 1));
    h.sync();
    h.ex.apply_pod(pod("shop", "a", "x", &["10.1.2.2", "not-an-ip"], 1));
    h.sync();
    assert_eq!(h.keys("cilium/state/ip/"), vec!["cilium/state/ip/v1/default/10.1.2.2"]);
    assert_eq!(h.metrics.error_count("invalid_object"), 1);
}

const WG_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn node() -> NodeInput {
    NodeInput {
        name: "east-node-2".into(),
        labels: labels(&[("topology.kubernetes.io/zone", "eu-1a")]),
        addresses: vec![
            NodeAddressInput { kind: "Hostname".into(), address: "east-node-2".into() },
            NodeAddressInput { kind: "InternalIP".into(), address: "192.168.10.12".into() },
            NodeAddressInput { kind: "ExternalIP".into(), address: "2001:db8::12".into() },
        ],
        pod_cidrs: vec!["10.1.2.0/24".into(), "fd00:1:2::/64".into()],
        wireguard_pub_key: Some(WG_KEY.into()),
        boot_id: Some("3f1c-boot".into()),
    }
}

#[test]
fn node_exact_json() {
    let mut h = Harness::new();
    h.ex.apply_node(node());
    h.sync();
    assert_eq!(
        h.get("cilium/state/nodes/v1/east/east-node-2"),
        Some(
            r#"{"Name":"east-node-2","Cluster":"east","IPAddresses":[{"Type":"InternalIP","IP":"192.168.10.12"},{"Type":"ExternalIP","IP":"2001:db8::12"}],"IPv4AllocCIDR":{"IP":"10.1.2.0","Mask":"////AA=="},"IPv6AllocCIDR":{"IP":"fd00:1:2::","Mask":"//////////8AAAAAAAAAAA=="},"IPv4HealthIP":"","IPv4IngressIP":"","ClusterID":7,"Source":"kubernetes","EncryptionKey":0,"Labels":{"topology.kubernetes.io/zone":"eu-1a"},"Annotations":{},"WireguardPubKey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","BootID":"3f1c-boot"}"#
        )
    );
    h.ex.delete_node("east-node-2");
    h.sync();
    assert!(h.ex.entries().is_empty());
}

#[test]
fn invalid_wireguard_key_is_omitted_and_counted() {
    let mut h = Harness::new();
    for bad in ["not base64!", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHg==" /* 31 bytes */] {
        let mut n = node();
        n.wireguard_pub_key = Some(bad.into());
        h.ex.apply_node(n);
        h.sync();
        let v = h.get("cilium/state/nodes/v1/east/east-node-2").expect("node still exported");
        assert!(v.contains(r#""WireguardPubKey":"""#), "{v}");
    }
    assert_eq!(h.metrics.error_count("invalid_wireguard_key"), 2);
    // The value still passes a reader's validation.
    let ctx = causeway_store::RemoteContext {
        name: causeway_store::ClusterName::new("east").expect("name"),
        id: causeway_store::ClusterId::new(7, MaxConnectedClusters::C255).expect("id"),
        mode: MaxConnectedClusters::C255,
    };
    let v = h.get("cilium/state/nodes/v1/east/east-node-2").expect("node");
    ctx.decode("cilium/state/nodes/v1/east/east-node-2", v.as_bytes()).expect("reader accepts our node");
}

fn global_service() -> ServiceInput {
    ServiceInput {
        namespace: "shop".into(),
        name: "cart".into(),
        labels: labels(&[("app", "cart")]),
        annotations: labels(&[("service.cilium.io/global", "true")]),
        selector: labels(&[("app", "cart")]),
        cluster_ips: vec!["10.96.12.4".into()],
        ports: vec![ServicePortInput {
            name: Some("http".into()),
            port: 80,
            protocol: Some("TCP".into()),
            app_protocol: None,
        }],
        ..Default::default()
    }
}

/// A ServiceExport created at 2026-11-23T10:00:00Z.
fn export(namespace: &str, name: &str) -> ServiceExportInput {
    ServiceExportInput {
        namespace: namespace.into(),
        name: name.into(),
        created: Some(1_795_428_000),
        ..Default::default()
    }
}

fn slice(name: &str, endpoints: Vec<EndpointInput>) -> EndpointSliceInput {
    EndpointSliceInput {
        namespace: "shop".into(),
        name: name.into(),
        service_name: Some("cart".into()),
        ports: vec![SlicePortInput { name: Some("http".into()), port: Some(8080), protocol: Some("TCP".into()) }],
        endpoints,
    }
}

fn ep(ip: &str, ready: Option<bool>, serving: Option<bool>) -> EndpointInput {
    EndpointInput { addresses: vec![ip.into()], ready, serving, ..Default::default() }
}

const CART_KEY: &str = "cilium/state/services/v1/east/shop/cart";

#[test]
fn global_service_exact_json() {
    let mut h = Harness::new();
    h.ex.apply_service(global_service());
    h.ex.apply_slice(slice("cart-abc", vec![ep("10.1.3.17", Some(true), None)]));
    h.sync();
    assert_eq!(
        h.get(CART_KEY),
        Some(
            r#"{"cluster":"east","namespace":"shop","name":"cart","frontends":{"10.96.12.4":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.1.3.17":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{"app":"cart"},"selector":{"app":"cart"},"includeExternal":false,"shared":true,"clusterID":7}"#
        )
    );
}

#[test]
fn backends_merge_slices_and_follow_conditions() {
    let mut h = Harness::new();
    h.ex.apply_service(global_service());
    let mut hosted = ep("10.1.3.1", None, None); // ready unset: ready
    hosted.hostname = Some("cart-0".into());
    hosted.zone = Some("eu-1a".into());
    hosted.for_zones = vec!["eu-1a".into()];
    h.ex.apply_slice(slice(
        "cart-a",
        vec![
            hosted,
            ep("10.1.3.2", Some(false), Some(true)), // terminating but serving
            ep("10.1.3.3", Some(false), Some(false)),
            ep("10.1.3.4", Some(false), None),
        ],
    ));
    let mut v6 = slice("cart-b", vec![ep("fd00::17", Some(true), None)]);
    v6.ports[0].port = Some(8443);
    h.ex.apply_slice(v6);
    // A slice of another service does not leak in.
    let mut other = slice("web-a", vec![ep("10.1.4.1", Some(true), None)]);
    other.service_name = Some("web".into());
    h.ex.apply_slice(other);
    h.sync();

    let svc: causeway_store::ClusterService =
        serde_json::from_str(h.get(CART_KEY).expect("exported")).expect("valid JSON");
    let backends: Vec<String> = svc.backends.keys().map(|ip| ip.to_string()).collect();
    assert_eq!(backends, vec!["10.1.3.1", "10.1.3.2", "fd00::17"]);
    assert_eq!(svc.backends[&"fd00::17".parse().expect("ip")]["http"].port, 8443);
    assert_eq!(svc.hostnames.get(&"10.1.3.1".parse().expect("ip")).map(String::as_str), Some("cart-0"));
    let json = h.get(CART_KEY).expect("exported");
    assert!(json.contains(r#""hostnames":{"10.1.3.1":"cart-0"}"#), "{json}");
    assert!(json.contains(r#""zones":{"10.1.3.1":{"zone":"eu-1a","forZones":[{"name":"eu-1a"}]}}"#), "{json}");

    // Removing a slice removes its backends only.
    h.ex.delete_slice("shop", "cart-b");
    h.sync();
    let svc: causeway_store::ClusterService =
        serde_json::from_str(h.get(CART_KEY).expect("exported")).expect("valid JSON");
    assert_eq!(svc.backends.len(), 2);
}

#[test]
fn only_global_shared_services_are_exported() {
    let mut h = Harness::new();
    let mut local = global_service();
    local.annotations.clear();
    h.ex.apply_service(local);
    assert_eq!(h.sync(), vec![]);

    let mut not_shared = global_service();
    not_shared.annotations.insert("service.cilium.io/shared".into(), "false".into());
    h.ex.apply_service(not_shared);
    assert_eq!(h.sync(), vec![]);

    let mut legacy = global_service();
    legacy.annotations = labels(&[("io.cilium/global-service", "true")]);
    h.ex.apply_service(legacy);
    assert_eq!(h.sync().len(), 1);

    // Turning the annotation off withdraws the entry.
    let mut legacy_unshared = global_service();
    legacy_unshared.annotations =
        labels(&[("io.cilium/global-service", "true"), ("io.cilium/shared-service", "false")]);
    h.ex.apply_service(legacy_unshared);
    assert!(matches!(h.sync().as_slice(), [Change::Delete { .. }]));

    h.ex.apply_service(global_service());
    h.sync();
    h.ex.delete_service("shop", "cart");
    assert!(matches!(h.sync().as_slice(), [Change::Delete { .. }]));
}

#[test]
fn headless_service_has_no_frontends() {
    let mut h = Harness::new();
    let mut svc = global_service();
    svc.cluster_ips = vec!["None".into()];
    h.ex.apply_service(svc);
    h.ex.apply_slice(slice("cart-a", vec![ep("10.1.3.1", Some(true), None)]));
    h.sync();
    let json = h.get(CART_KEY).expect("exported");
    assert!(json.contains(r#""frontends":{},"backends":{"10.1.3.1""#), "{json}");
}

#[test]
fn slices_arriving_before_their_service_are_kept() {
    let mut h = Harness::new();
    h.ex.apply_slice(slice("cart-a", vec![ep("10.1.3.1", Some(true), None)]));
    assert_eq!(h.sync(), vec![]);
    h.ex.apply_service(global_service());
    h.sync();
    assert!(h.get(CART_KEY).is_some_and(|v| v.contains("10.1.3.1")));
}

#[test]
fn a_failed_write_is_retried() {
    let mut h = Harness::new();
    h.ex.apply_node(node());
    let changes = h.sync();
    assert_eq!(changes.len(), 1);
    h.ex.write_failed(changes[0].key());
    assert_eq!(h.ex.take_changes(), changes, "same value, rewritten because the write failed");
    assert_eq!(h.ex.take_changes(), vec![]);
    h.ex.delete_node("east-node-2");
    let del = h.ex.take_changes();
    h.ex.write_failed(del[0].key());
    assert_eq!(h.ex.take_changes(), del);
}

#[test]
fn every_exported_value_passes_the_readers_validation() {
    let mut h = Harness::new();
    h.ex.apply_namespace(ns("shop", &[("team", "payments")]));
    h.ex.apply_pod(pod("shop", "a", "cart", &["10.1.2.33", "fd00::21"], 1));
    h.ex.apply_node(node());
    h.ex.apply_service(global_service());
    h.ex.apply_slice(slice("cart-a", vec![ep("10.1.3.1", Some(true), None)]));
    h.sync();
    let ctx = causeway_store::RemoteContext {
        name: causeway_store::ClusterName::new("east").expect("name"),
        id: causeway_store::ClusterId::new(7, MaxConnectedClusters::C255).expect("id"),
        mode: MaxConnectedClusters::C255,
    };
    assert_eq!(h.ex.entries().len(), 5);
    for (k, v) in h.ex.entries() {
        ctx.decode(&k.to_string(), v.as_bytes()).unwrap_or_else(|e| panic!("{k}: {e}"));
    }
}

#[test]
fn restored_identities_are_exported_until_collected() {
    let mut h = Harness::new();
    let cart = LabelSet::parse(CART_IDENTITY).expect("labels");
    let foreign = LabelSet::parse("k8s:app=x;k8s:io.cilium.k8s.policy.cluster=west;").expect("labels");
    let restored_id = (7 << 16) + 3;
    h.ex.identities_restored([
        (restored_id, cart.clone()),
        ((7 << 16) + 4, LabelSet::parse("k8s:app=idle;k8s:io.cilium.k8s.policy.cluster=east;").expect("labels")),
        // Another cluster's range, or another cluster's labels: never exported from here.
        ((8 << 16) + 1, LabelSet::parse("k8s:app=y;k8s:io.cilium.k8s.policy.cluster=east;").expect("labels")),
        ((7 << 16) + 5, foreign),
    ]);
    let changes = h.sync();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(h.get(&format!("cilium/state/identities/v1/id/{restored_id}")), Some(CART_IDENTITY));
    assert_eq!(h.metrics.error_count("identity_allocation"), 2);

    // A pod with the restored labels gets the same ID back from the allocator: nothing to rewrite but its entry.
    h.ids.insert(cart.clone(), restored_id);
    h.ex.apply_namespace(ns("shop", &[("team", "payments")]));
    h.ex.apply_pod(pod("shop", "cart-1", "cart", &["10.1.2.33"], 1));
    let changes = h.sync();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(h
        .get("cilium/state/ip/v1/default/10.1.2.33")
        .is_some_and(|v| v.contains(&format!("\"ID\":{restored_id}"))));

    // A collection report for an ID in use is not acted on; the unused restored one goes.
    h.ex.identities_collected([restored_id, (7 << 16) + 4]);
    let changes = h.sync();
    assert_eq!(changes, vec![Change::Delete { key: StoreKey::Identity { id: (7 << 16) + 4 } }]);
    assert_eq!(h.keys("cilium/state/identities/"), vec![format!("cilium/state/identities/v1/id/{restored_id}")]);
}

#[test]
fn a_service_export_exports_a_plain_service_until_it_is_deleted() {
    let mut h = Harness::new();
    let mut plain = global_service();
    plain.annotations.clear();
    h.ex.apply_service(plain.clone());
    h.ex.apply_slice(slice("cart-abc", vec![ep("10.1.3.17", Some(true), None)]));
    assert_eq!(h.sync(), vec![], "a plain service stays local");

    h.ex.apply_service_export(export("shop", "cart"));
    let changes = h.sync();
    assert_eq!(changes.len(), 2, "the service and its MCS spec: {changes:?}");
    // The same value an annotated global service gets: frontends, ready backends, shared.
    assert_eq!(
        h.get(CART_KEY),
        Some(
            r#"{"cluster":"east","namespace":"shop","name":"cart","frontends":{"10.96.12.4":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.1.3.17":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{"app":"cart"},"selector":{"app":"cart"},"includeExternal":false,"shared":true,"clusterID":7}"#
        )
    );
    assert!(h.get(CART_EXPORT_KEY).is_some());
    // Re-applying it changes nothing; backends still follow the slices (the MCS spec has none, so it stays).
    h.ex.apply_service_export(export("shop", "cart"));
    assert_eq!(h.sync(), vec![]);
    h.ex.apply_slice(slice("cart-abc", vec![ep("10.1.3.17", Some(true), None), ep("10.1.3.18", None, None)]));
    let changes = h.sync();
    assert!(changes.len() == 1 && h.get(CART_KEY).is_some_and(|v| v.contains("10.1.3.18")), "{changes:?}");

    // An export of a service in another namespace, or of a service that does not exist, exports nothing.
    h.ex.apply_service_export(export("other", "cart"));
    h.ex.apply_service_export(export("shop", "missing"));
    assert_eq!(h.sync(), vec![]);

    // A ServiceExport also exports a global service whose annotations say it is not shared: it is the explicit ask.
    let mut not_shared = global_service();
    not_shared.annotations.insert("service.cilium.io/shared".into(), "false".into());
    h.ex.apply_service(not_shared);
    assert_eq!(h.sync(), vec![]);

    // Deleting the ServiceExport withdraws the plain service and its spec; deleting the Service withdraws both too.
    h.ex.apply_service(plain);
    h.ex.delete_service_export("shop", "cart");
    let withdrawn = vec![
        Change::Delete { key: StoreKey::parse(CART_KEY).expect("key") },
        Change::Delete { key: StoreKey::parse(CART_EXPORT_KEY).expect("key") },
    ];
    assert_eq!(h.sync(), withdrawn);
    h.ex.apply_service_export(export("shop", "cart"));
    assert_eq!(h.sync().len(), 2);
    h.ex.delete_service("shop", "cart");
    assert_eq!(h.sync(), withdrawn);
}

const CART_EXPORT_KEY: &str = "cilium/state/serviceexports/v1/east/shop/cart";

#[test]
fn the_mcs_spec_is_cilium_s_shape_and_follows_the_service() {
    let mut h = Harness::new();
    let mut svc = global_service();
    svc.annotations.clear();
    svc.ports.push(ServicePortInput {
        name: Some("grpc".into()),
        port: 9090,
        protocol: None,
        app_protocol: Some("grpc".into()),
    });
    svc.session_affinity = Some("ClientIP".into());
    svc.session_affinity_timeout = Some(600);
    svc.ip_families = vec!["IPv4".into()];
    svc.internal_traffic_policy = Some("Cluster".into());
    h.ex.apply_service(svc.clone());
    let mut ex = export("shop", "cart");
    ex.exported_labels = labels(&[("tier", "web")]);
    ex.exported_annotations = labels(&[("team", "shop")]);
    h.ex.apply_service_export(ex.clone());
    h.sync();
    // Byte for byte what Cilium's MCSAPIServiceSpec encodes to (field order, omitted empties, metav1.Time).
    assert_eq!(
        h.get(CART_EXPORT_KEY),
        Some(
            r#"{"cluster":"east","name":"cart","namespace":"shop","annotations":{"team":"shop"},"labels":{"tier":"web"},"exportCreationTimestamp":"2026-11-23T10:00:00Z","ports":[{"name":"http","protocol":"TCP","port":80},{"name":"grpc","protocol":"TCP","appProtocol":"grpc","port":9090}],"type":"ClusterSetIP","sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":600}},"ipFamilies":["IPv4"],"internalTrafficPolicy":"Cluster"}"#
        )
    );
    // A reader (peer) accepts it.
    let ctx = causeway_store::RemoteContext {
        name: causeway_store::ClusterName::new("east").expect("name"),
        id: causeway_store::ClusterId::new(7, MaxConnectedClusters::C255).expect("id"),
        mode: MaxConnectedClusters::C255,
    };
    let value = h.get(CART_EXPORT_KEY).unwrap_or_default().to_string();
    assert!(ctx.decode_service_export(CART_EXPORT_KEY, value.as_bytes()).is_ok(), "{value}");

    // The service turns headless: the spec follows.
    svc.cluster_ips = vec!["None".into()];
    h.ex.apply_service(svc.clone());
    h.sync();
    assert!(h.get(CART_EXPORT_KEY).is_some_and(|v| v.contains(r#""type":"Headless""#)));
    // An ExternalName service cannot be MCS-exported; an export without a creation time is not published.
    svc.service_type = Some("ExternalName".into());
    h.ex.apply_service(svc.clone());
    h.sync();
    assert_eq!(h.get(CART_EXPORT_KEY), None);
    svc.service_type = None;
    h.ex.apply_service(svc);
    h.ex.apply_service_export(ServiceExportInput { created: None, ..ex });
    h.sync();
    assert_eq!(h.get(CART_EXPORT_KEY), None);
}
