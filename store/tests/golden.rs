//! Golden tests: the exact bytes of every value shape in the shared store (schema v1, `kvstore-schema.md`).
//!
//! Each test decodes a fixture from `tests/golden/`, checks the fields, re-encodes it and compares bytes. Fixtures
//! that carry what a Go writer may produce but we never write (nil maps as `null`, 16-byte IPv4 masks, unknown
//! fields) are compared against a `.normalized.json` twin, which is our writer's canonical form of the same value.

use std::collections::BTreeMap;
use std::net::IpAddr;

use causeway_store::validate::RemoteEntry;
use causeway_store::values::{BackendZone, ForZone};
use causeway_store::{
    format_timestamp, parse_timestamp, ClusterConfig, ClusterId, ClusterName, ClusterService, IpCacheEntry, LabelSet,
    MaxConnectedClusters, McsServicePort, Node, PortConfig, RemoteContext, ServiceExportSpec,
};
use ipnet::IpNet;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    // Tolerate an editor's trailing newline; the writer never emits one.
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    bytes
}

fn text(name: &str) -> String {
    String::from_utf8(fixture(name)).expect("fixture is UTF-8")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn east7() -> RemoteContext {
    let mode = MaxConnectedClusters::C255;
    RemoteContext { name: ClusterName::new("east").unwrap(), id: ClusterId::new(7, mode).unwrap(), mode }
}

/// Decodes `name`, re-encodes it and asserts the bytes equal `expected` (the fixture itself when byte-exact).
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(name: &str, expected: &str) -> T {
    let value: T = serde_json::from_slice(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let encoded = serde_json::to_string(&value).expect("encode");
    assert_eq!(encoded, text(expected), "{name} re-encoded differs from {expected}");
    value
}

fn port(protocol: &str, port: u16) -> PortConfig {
    PortConfig { protocol: protocol.to_string(), port }
}

#[test]
fn cluster_config() {
    let cfg: ClusterConfig = round_trip("cluster-config.json", "cluster-config.json");
    assert_eq!(cfg.id, 7);
    assert!(cfg.capabilities.synced_canaries);
    assert_eq!(cfg.capabilities.max_connected_clusters, 255);
    assert_eq!(cfg.capabilities.service_exports_enabled, Some(false));

    let cfg: ClusterConfig = round_trip("cluster-config-511.json", "cluster-config-511.json");
    assert_eq!((cfg.id, cfg.capabilities.max_connected_clusters), (300, 511));
    assert_eq!(cfg.capabilities.service_exports_enabled, None, "absent stays absent");
}

#[test]
fn cluster_service_minimal() {
    let svc: ClusterService = round_trip("service.json", "service.json");
    assert_eq!((svc.cluster.as_str(), svc.namespace.as_str(), svc.name.as_str()), ("east", "shop", "cart"));
    assert_eq!(svc.frontends[&ip("10.96.12.4")]["http"], port("TCP", 80));
    assert_eq!(svc.backends[&ip("10.1.3.17")]["http"], port("TCP", 8080));
    assert_eq!(svc.labels, BTreeMap::from([("app".to_string(), "cart".to_string())]));
    assert_eq!(svc.selector, svc.labels);
    assert!(!svc.include_external && svc.shared);
    assert_eq!(svc.cluster_id, 7);
    assert!(svc.hostnames.is_empty() && svc.zones.is_empty(), "optional fields absent");
    assert!(matches!(
        east7().decode("cilium/state/services/v1/east/shop/cart", &fixture("service.json")),
        Ok(RemoteEntry::Service(s)) if s == svc
    ));
}

#[test]
fn cluster_service_with_hostnames_zones_and_go_key_order() {
    // Keys are in Go's string order: "10.1.3.17" < "10.1.3.9" < "fd00:...", not numeric order.
    let svc: ClusterService = round_trip("service-hostnames-zones.json", "service-hostnames-zones.json");
    assert_eq!(svc.frontends.len(), 2);
    assert_eq!(svc.frontends[&ip("fd00:96::c")]["http"], port("TCP", 80));
    assert_eq!(svc.backends.len(), 3);
    assert_eq!(svc.backends[&ip("10.1.3.9")]["dns"], port("UDP", 53));
    assert_eq!(svc.backends[&ip("10.1.3.17")]["metrics"], port("TCP", 9090));
    assert_eq!(svc.hostnames[&ip("10.1.3.17")], "cart-0");
    assert_eq!(svc.hostnames[&ip("10.1.3.9")], "cart-1");
    assert_eq!(
        svc.zones[&ip("10.1.3.17")],
        BackendZone {
            zone: "eu-1a".into(),
            for_zones: vec![ForZone { name: "eu-1a".into() }, ForZone { name: "eu-1b".into() }]
        }
    );
    assert_eq!(svc.zones[&ip("10.1.3.9")], BackendZone { zone: "eu-1b".into(), for_zones: vec![] });
    assert!(svc.include_external);
    east7().decode("cilium/state/services/v1/east/shop/cart", &fixture("service-hostnames-zones.json")).unwrap();
}

#[test]
fn cluster_service_headless_and_go_nil_maps() {
    let svc: ClusterService = round_trip("service-headless.json", "service-headless.json");
    assert!(svc.frontends.is_empty(), "headless: no frontends");
    let nils: ClusterService = round_trip("service-go-nils.json", "service-go-nils.normalized.json");
    assert!(nils.backends.is_empty() && nils.labels.is_empty() && nils.hostnames.is_empty());
}

#[test]
fn node() {
    let node: Node = round_trip("node.json", "node.json");
    assert_eq!(node.name, "east-node-2");
    assert_eq!(node.cluster, "east");
    assert_eq!(node.addresses.len(), 2);
    assert_eq!((node.addresses[0].kind.as_str(), node.addresses[0].ip), ("InternalIP", ip("192.168.10.12")));
    assert_eq!((node.addresses[1].kind.as_str(), node.addresses[1].ip), ("CiliumInternalIP", ip("10.1.2.1")));
    assert_eq!(node.internal_ips().collect::<Vec<_>>(), vec![ip("192.168.10.12")]);
    // "////AA==" is the 4-byte mask ff.ff.ff.00: /24.
    assert_eq!(node.ipv4_alloc_cidr, Some("10.1.2.0/24".parse::<IpNet>().unwrap()));
    assert_eq!(node.ipv6_alloc_cidr, None);
    assert_eq!((node.ipv4_health_ip, node.ipv4_ingress_ip), (None, None));
    assert_eq!(node.cluster_id, 7);
    assert_eq!(node.source, "custom-resource");
    assert_eq!(node.encryption_key, 0);
    assert_eq!(node.zone(), Some("eu-1a"));
    assert!(node.annotations.is_empty());
    assert_eq!(node.wireguard_pub_key, "hG6zAOqP2K4MLrvQ2u5tTtgpbmpfUbD9Ue1pMGWbJ3k=");
    assert_eq!(node.boot_id, "3f0a2b8c-1d4e-4f6a-9b7c-2e5d8f1a0c3b");
    east7().decode("cilium/state/nodes/v1/east/east-node-2", &fixture("node.json")).unwrap();
}

#[test]
fn node_dual_stack() {
    let node: Node = round_trip("node-dualstack.json", "node-dualstack.json");
    // 8 bytes of ones then 8 of zeros: /64.
    assert_eq!(node.ipv6_alloc_cidr, Some("fd00:10:1:5::/64".parse::<IpNet>().unwrap()));
    assert_eq!(node.pod_cidrs().count(), 2);
    assert_eq!(node.ipv4_health_ip, Some(ip("10.1.5.7")));
    assert_eq!(node.ipv4_ingress_ip, Some(ip("10.1.5.8")));
    assert_eq!(node.internal_ips().count(), 2);
    assert_eq!(node.encryption_key, 3);
    east7().decode("cilium/state/nodes/v1/east/east-node-5", &fixture("node-dualstack.json")).unwrap();
}

#[test]
fn node_go_nils_16_byte_mask_and_unknown_fields() {
    let node: Node = round_trip("node-go-nils.json", "node-go-nils.normalized.json");
    assert!(node.addresses.is_empty() && node.labels.is_empty() && node.annotations.is_empty());
    // Go's 16-byte form of an IPv4 mask (96 one bits, then ff.ff.ff.00) is still /24.
    assert_eq!(node.ipv4_alloc_cidr, Some("10.1.3.0/24".parse::<IpNet>().unwrap()));
    assert_eq!(node.ipv4_health_ip, None);
}

#[test]
fn ipcache_entry() {
    let e: IpCacheEntry = round_trip("ipcache.json", "ipcache.json");
    assert_eq!(e.ip, ip("10.1.2.33"));
    assert_eq!(e.host_ip, Some(ip("192.168.10.12")));
    assert_eq!(e.id, 458771);
    assert_eq!(e.id >> 16, 7, "identity is in cluster 7's range");
    assert_eq!((e.key, e.metadata.as_str()), (0, ""));
    assert_eq!((e.k8s_namespace.as_str(), e.k8s_pod_name.as_str()), ("shop", "cart-7f9c-x2"));
    assert_eq!((e.k8s_pod_uid.as_deref(), e.k8s_service_account.as_deref()), (None, None));
    assert_eq!(e.named_ports.len(), 1);
    assert_eq!((e.named_ports[0].name.as_str(), e.named_ports[0].port), ("http", 8080));
    assert_eq!(e.named_ports[0].protocol, "TCP");
    east7().decode("cilium/state/ip/v1/default/10.1.2.33", &fixture("ipcache.json")).unwrap();
}

#[test]
fn ipcache_entry_v6_with_optional_fields() {
    let e: IpCacheEntry = round_trip("ipcache-v6-optional.json", "ipcache-v6-optional.json");
    assert_eq!(e.ip, ip("fd00:10:1:2::21"));
    assert_eq!(e.host_ip, None, "empty HostIP");
    assert_eq!(e.key, 2);
    assert_eq!(e.k8s_pod_uid.as_deref(), Some("0b6f7c1e-8a52-4d3e-9f10-6c2a7b9d4e85"));
    assert_eq!(e.k8s_service_account.as_deref(), Some("cart"));
    assert!(e.named_ports.is_empty());
    east7().decode("cilium/state/ip/v1/default/fd00:10:1:2::21", &fixture("ipcache-v6-optional.json")).unwrap();
}

#[test]
fn identity_label_string() {
    let s = text("identity.txt");
    let labels = LabelSet::parse(&s).unwrap();
    assert_eq!(labels.len(), 3);
    assert_eq!(labels.cluster(), Some("east"));
    let app = labels.get("app").unwrap();
    assert_eq!((app.source.as_str(), app.value.as_str()), ("k8s", "cart"));
    assert_eq!(labels.get("io.kubernetes.pod.namespace").unwrap().value, "shop");
    assert_eq!(labels.to_string(), s, "store form is byte-identical");
    let pod = BTreeMap::from([("app".to_string(), "cart".to_string())]);
    assert_eq!(LabelSet::for_pod("east", "shop", &pod, &BTreeMap::new()).to_string(), s);
    match east7().decode("cilium/state/identities/v1/id/458771", s.as_bytes()).unwrap() {
        RemoteEntry::Identity { id, labels: l } => assert_eq!((id, l), (458771, labels)),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn rfc3339_canary() {
    let s = text("canary.txt");
    let t = parse_timestamp(s.as_bytes()).unwrap();
    assert_eq!(t.timestamp(), 1_714_564_807);
    assert_eq!(format_timestamp(t), s);
}

#[test]
fn service_export_full() {
    let spec: ServiceExportSpec = round_trip("service-export.json", "service-export.json");
    assert_eq!((spec.cluster.as_str(), spec.namespace.as_str(), spec.name.as_str()), ("east", "shop", "cart"));
    assert_eq!(spec.annotations, BTreeMap::from([("team".to_string(), "shop".to_string())]));
    assert_eq!(spec.labels, BTreeMap::from([("tier".to_string(), "web".to_string())]));
    assert_eq!(spec.export_creation_timestamp.map(format_timestamp).as_deref(), Some("2026-11-23T10:00:00Z"));
    assert_eq!(
        spec.ports,
        vec![
            McsServicePort { name: "http".into(), protocol: "TCP".into(), app_protocol: Some("http".into()), port: 80 },
            McsServicePort { name: "dns".into(), protocol: "UDP".into(), app_protocol: None, port: 53 },
        ]
    );
    assert_eq!((spec.kind.as_str(), spec.session_affinity.as_str()), ("ClusterSetIP", "ClientIP"));
    assert_eq!(spec.session_affinity_config.and_then(|c| c.client_ip).and_then(|c| c.timeout_seconds), Some(10800));
    assert_eq!(spec.ip_families, vec!["IPv4", "IPv6"]);
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(spec.traffic_distribution.as_deref(), Some("PreferClose"));
}

#[test]
fn service_export_headless_minimal_and_go_nils() {
    // Optional fields absent; `ports` is always written, `[]` when empty.
    let spec: ServiceExportSpec = round_trip("service-export-headless.json", "service-export-headless.json");
    assert_eq!(spec.kind, ServiceExportSpec::HEADLESS);
    assert!(spec.ports.is_empty() && spec.labels.is_empty() && spec.session_affinity_config.is_none());
    // Go's nil maps and slices (`null`), a non-UTC export time, an unknown field: all read, and
    // written back in the canonical form (UTC).
    let nils: ServiceExportSpec = round_trip("service-export-go-nils.json", "service-export-go-nils.normalized.json");
    assert_eq!(nils, spec);
}
