//! Every way a remote's value can be refused, each produced by a realistic hostile or broken input.
//!
//! The remote is `east`, cluster ID 7 in 255 mode: identities 458753..=524287 (458752, the range base, is never
//! an identity). The inputs start from the golden fixtures and break one thing each.

use std::collections::BTreeSet;

use causeway_store::validate::{validate_cluster_config, RemoteEntry};
use causeway_store::{ClusterId, ClusterName, MaxConnectedClusters, Rejected, RemoteContext, MAX_VALUE_BYTES};
use serde_json::{json, Value};

const M255: MaxConnectedClusters = MaxConnectedClusters::C255;

fn east7() -> RemoteContext {
    RemoteContext { name: ClusterName::new("east").unwrap(), id: ClusterId::new(7, M255).unwrap(), mode: M255 }
}

fn golden(name: &str) -> Value {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))).expect("fixture JSON")
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("encode")
}

const SVC_KEY: &str = "cilium/state/services/v1/east/shop/cart";
const NODE_KEY: &str = "cilium/state/nodes/v1/east/east-node-2";
const IP_KEY: &str = "cilium/state/ip/v1/default/10.1.2.33";
const GOOD_LABELS: &str = "k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=shop;";

/// The fixture with the field at `path` (object keys, or array indices as numbers) replaced by `new`. An empty
/// path leaves the fixture unchanged, for cases where only the key is broken.
fn with(mut v: Value, path: &[&str], new: Value) -> Value {
    let Some((last, parents)) = path.split_last() else { return v };
    let mut cur = &mut v;
    for p in parents {
        cur = step(cur, p);
    }
    *step(cur, last) = new;
    v
}

fn step<'a>(v: &'a mut Value, seg: &str) -> &'a mut Value {
    match v {
        Value::Array(a) => {
            let i: usize = seg.parse().expect("array index");
            &mut a[i]
        }
        Value::Object(o) => o.get_mut(seg).unwrap_or_else(|| panic!("no field {seg}")),
        other => panic!("cannot step into {other} with {seg}"),
    }
}

fn svc(path: &[&str], new: Value) -> Vec<u8> {
    bytes(&with(golden("service.json"), path, new))
}
fn node(path: &[&str], new: Value) -> Vec<u8> {
    bytes(&with(golden("node.json"), path, new))
}
fn ipc(path: &[&str], new: Value) -> Vec<u8> {
    bytes(&with(golden("ipcache.json"), path, new))
}

/// One name per variant. The match is exhaustive, so a new variant fails to compile here until it gets a case.
fn variant(r: &Rejected) -> &'static str {
    match r {
        Rejected::Key(_) => "Key",
        Rejected::TooLarge { .. } => "TooLarge",
        Rejected::Json { .. } => "Json",
        Rejected::NotUtf8 => "NotUtf8",
        Rejected::WrongCluster { .. } => "WrongCluster",
        Rejected::WrongClusterId { .. } => "WrongClusterId",
        Rejected::KeyMismatch(_) => "KeyMismatch",
        Rejected::IdentityOutOfRange { .. } => "IdentityOutOfRange",
        Rejected::Empty { .. } => "Empty",
        Rejected::Limit { .. } => "Limit",
        Rejected::Labels(_) => "Labels",
        Rejected::LabelCluster { .. } => "LabelCluster",
        Rejected::AddressFamily { .. } => "AddressFamily",
        Rejected::Protocol(_) => "Protocol",
        Rejected::Enum { .. } => "Enum",
        Rejected::ClusterConfig(_) => "ClusterConfig",
        Rejected::Cluster(_) => "Cluster",
    }
}

const ALL_VARIANTS: [&str; 17] = [
    "Key",
    "TooLarge",
    "Json",
    "NotUtf8",
    "WrongCluster",
    "WrongClusterId",
    "KeyMismatch",
    "IdentityOutOfRange",
    "Empty",
    "Limit",
    "Labels",
    "LabelCluster",
    "AddressFamily",
    "Protocol",
    "Enum",
    "ClusterConfig",
    "Cluster",
];

/// `(description, key, value, expected variant, text the message must contain)`
type DecodeCase = (&'static str, String, Vec<u8>, &'static str, &'static str);

fn decode_cases() -> Vec<DecodeCase> {
    let k = |s: &str| s.to_string();
    let labels300: serde_json::Map<String, Value> =
        (0..300).map(|i| (format!("label-{i}"), Value::from("x"))).collect();
    let long_name = "a".repeat(254);
    let huge_label = "x".repeat(MAX_VALUE_BYTES);
    let truncated = {
        let full = bytes(&golden("service.json"));
        full[..full.len() / 2].to_vec()
    };
    vec![
        // Keys.
        (
            "ipcache key IP does not parse",
            k("cilium/state/ip/v1/default/10.1.2.999"),
            ipc(&[], json!(null)),
            "Key",
            "not an IP address",
        ),
        ("identity key is negative", k("cilium/state/identities/v1/id/-1"), GOOD_LABELS.into(), "Key", "24-bit"),
        (
            "identity key is beyond 24 bits",
            k("cilium/state/identities/v1/id/16777216"),
            GOOD_LABELS.into(),
            "Key",
            "24-bit",
        ),
        (
            "cluster-config key fed as state",
            k("cilium/cluster-config/east"),
            b"{}".to_vec(),
            "KeyMismatch",
            "not a state entry",
        ),
        // Cluster names and IDs.
        (
            "service key names another cluster",
            k("cilium/state/services/v1/west/shop/cart"),
            svc(&[], json!(null)),
            "WrongCluster",
            "west",
        ),
        ("service value names another cluster", k(SVC_KEY), svc(&["cluster"], json!("west")), "WrongCluster", "west"),
        ("node value names another cluster", k(NODE_KEY), node(&["Cluster"], json!("west")), "WrongCluster", "west"),
        ("service claims cluster ID 8", k(SVC_KEY), svc(&["clusterID"], json!(8)), "WrongClusterId", "ID 8"),
        ("node claims cluster ID 1", k(NODE_KEY), node(&["ClusterID"], json!(1)), "WrongClusterId", "ID 1"),
        // Identity ranges.
        (
            "ipcache claims cluster 2's identity",
            k(IP_KEY),
            ipc(&["ID"], json!((2 << 16) + 5)),
            "IdentityOutOfRange",
            "131077",
        ),
        ("ipcache claims identity 0", k(IP_KEY), ipc(&["ID"], json!(0)), "IdentityOutOfRange", "458753..=524287"),
        ("ipcache claims reserved world (2)", k(IP_KEY), ipc(&["ID"], json!(2)), "IdentityOutOfRange", "east"),
        (
            "identity at the range base",
            k("cilium/state/identities/v1/id/458752"),
            GOOD_LABELS.into(),
            "IdentityOutOfRange",
            "458752",
        ),
        (
            "identity in cluster 8's range",
            k("cilium/state/identities/v1/id/524289"),
            GOOD_LABELS.into(),
            "IdentityOutOfRange",
            "524289",
        ),
        // Key/value disagreement.
        (
            "ipcache key and value IPs differ",
            k("cilium/state/ip/v1/default/10.1.2.34"),
            ipc(&[], json!(null)),
            "KeyMismatch",
            "10.1.2.34",
        ),
        (
            "node key and value names differ",
            k("cilium/state/nodes/v1/east/east-node-9"),
            node(&[], json!(null)),
            "KeyMismatch",
            "east-node-9",
        ),
        (
            "service key and value names differ",
            k("cilium/state/services/v1/east/shop/payments"),
            svc(&[], json!(null)),
            "KeyMismatch",
            "payments",
        ),
        // Addresses and masks that do not parse.
        ("ipcache IP does not parse", k(IP_KEY), ipc(&["IP"], json!("10.1.2.999")), "Json", "invalid IP address"),
        ("ipcache HostIP does not parse", k(IP_KEY), ipc(&["HostIP"], json!("node-2")), "Json", "invalid IP address"),
        (
            "service backend key is a hostname",
            k(SVC_KEY),
            svc(&["backends"], json!({"cart-0": {"http": {"Protocol": "TCP", "Port": 8080}}})),
            "Json",
            "",
        ),
        ("node address does not parse", k(NODE_KEY), node(&["IPAddresses", "0", "IP"], json!("bogus")), "Json", ""),
        (
            "node mask is not contiguous",
            k(NODE_KEY),
            node(&["IPv4AllocCIDR", "Mask"], json!("/wD/AA==")),
            "Json",
            "not a valid prefix mask",
        ),
        ("node mask is not base64", k(NODE_KEY), node(&["IPv4AllocCIDR", "Mask"], json!("/24")), "Json", "not base64"),
        (
            "node mask has 5 bytes",
            k(NODE_KEY),
            node(&["IPv4AllocCIDR", "Mask"], json!("/////wA=")),
            "Json",
            "not a valid prefix mask",
        ),
        (
            "IPv4AllocCIDR holds an IPv6 net",
            k(NODE_KEY),
            node(&["IPv4AllocCIDR"], json!({"IP": "fd00::", "Mask": "//////////8AAAAAAAAAAA=="})),
            "AddressFamily",
            "IPv4AllocCIDR",
        ),
        (
            "IPv6AllocCIDR holds an IPv4 net",
            k(NODE_KEY),
            node(&["IPv6AllocCIDR"], json!({"IP": "10.1.2.0", "Mask": "////AA=="})),
            "AddressFamily",
            "IPv6AllocCIDR",
        ),
        (
            "port is out of u16 range",
            k(SVC_KEY),
            svc(&["backends", "10.1.3.17", "http", "Port"], json!(70000)),
            "Json",
            "",
        ),
        ("identity ID is a string", k(IP_KEY), ipc(&["ID"], json!("458771")), "Json", ""),
        // Broken or oversize values.
        ("truncated JSON", k(SVC_KEY), truncated, "Json", "EOF"),
        ("empty value", k(NODE_KEY), Vec::new(), "Json", ""),
        ("oversize service", k(SVC_KEY), svc(&["labels", "app"], json!(huge_label)), "TooLarge", "over the"),
        (
            "oversize identity",
            k("cilium/state/identities/v1/id/458771"),
            vec![b'a'; MAX_VALUE_BYTES + 1],
            "TooLarge",
            "over the",
        ),
        (
            "identity value is not UTF-8",
            k("cilium/state/identities/v1/id/458771"),
            b"k8s:app=\xff\xfe;k8s:io.cilium.k8s.policy.cluster=east;".to_vec(),
            "NotUtf8",
            "UTF-8",
        ),
        // Names and limits.
        ("service with empty namespace", k(SVC_KEY), svc(&["namespace"], json!("")), "Empty", "service namespace"),
        ("node with empty name", k(NODE_KEY), node(&["Name"], json!("")), "Empty", "node name"),
        ("node with 300 labels", k(NODE_KEY), node(&["Labels"], Value::Object(labels300)), "Limit", "node labels"),
        (
            "service name of 254 characters",
            format!("cilium/state/services/v1/east/shop/{long_name}"),
            svc(&["name"], json!(long_name)),
            "Limit",
            "service name",
        ),
        (
            "ipcache pod name of 300 characters",
            k(IP_KEY),
            ipc(&["K8sPodName"], json!("p".repeat(300))),
            "Limit",
            "pod name",
        ),
        // Identity labels.
        (
            "identity value is not a label string",
            k("cilium/state/identities/v1/id/458771"),
            b"cart".to_vec(),
            "Labels",
            "no source",
        ),
        ("identity value is empty", k("cilium/state/identities/v1/id/458771"), Vec::new(), "Labels", "no labels"),
        (
            "identity labels name cluster west",
            k("cilium/state/identities/v1/id/458771"),
            GOOD_LABELS.replace("=east", "=west").into_bytes(),
            "LabelCluster",
            "west",
        ),
        (
            "identity labels have no cluster",
            k("cilium/state/identities/v1/id/458771"),
            b"k8s:app=cart;".to_vec(),
            "LabelCluster",
            "east",
        ),
        // Protocols.
        (
            "backend protocol HTTP",
            k(SVC_KEY),
            svc(&["backends", "10.1.3.17", "http", "Protocol"], json!("HTTP")),
            "Protocol",
            "HTTP",
        ),
        (
            "frontend protocol lowercase tcp",
            k(SVC_KEY),
            svc(&["frontends", "10.96.12.4", "http", "Protocol"], json!("tcp")),
            "Protocol",
            "tcp",
        ),
        (
            "named port protocol ICMP",
            k(IP_KEY),
            ipc(&["NamedPorts", "0", "Protocol"], json!("ICMP")),
            "Protocol",
            "ICMP",
        ),
    ]
}

#[test]
fn every_decode_rejection_has_a_realistic_cause() {
    let remote = east7();
    for (what, key, value, want, needle) in decode_cases() {
        match remote.decode(&key, &value) {
            Ok(entry) => panic!("{what}: accepted {entry:?}"),
            Err(e) => {
                assert_eq!(variant(&e), want, "{what}: got {e}");
                assert!(e.to_string().contains(needle), "{what}: message {e:?} lacks {needle:?}");
                assert!(!e.reason().is_empty());
            }
        }
    }
}

#[test]
fn the_fixtures_themselves_are_accepted() {
    let remote = east7();
    assert!(matches!(remote.decode(SVC_KEY, &bytes(&golden("service.json"))), Ok(RemoteEntry::Service(_))));
    assert!(matches!(remote.decode(NODE_KEY, &bytes(&golden("node.json"))), Ok(RemoteEntry::Node(_))));
    assert!(matches!(remote.decode(IP_KEY, &bytes(&golden("ipcache.json"))), Ok(RemoteEntry::Ip(_))));
    // The first and last allocatable identities are inside the range.
    for id in [458753, 524287] {
        let key = format!("cilium/state/identities/v1/id/{id}");
        assert!(matches!(remote.decode(&key, GOOD_LABELS.as_bytes()), Ok(RemoteEntry::Identity { .. })));
    }
}

fn cfg(id: u32, mode: u32) -> Vec<u8> {
    bytes(&json!({"id": id, "capabilities": {"syncedCanaries": true, "maxConnectedClusters": mode}}))
}

/// `(description, value, IDs held by other remotes, expected variant, text the message must contain)`
type ConfigCase = (&'static str, Vec<u8>, Vec<(String, ClusterId)>, &'static str, &'static str);

fn config_cases() -> Vec<ConfigCase> {
    let id = |n| ClusterId::new(n, M255).unwrap();
    vec![
        ("remote reuses the local ID", cfg(1, 255), vec![], "ClusterConfig", "local cluster's own ID"),
        (
            "ID held by another remote",
            cfg(7, 255),
            vec![("west".to_string(), id(7))],
            "ClusterConfig",
            "already used by remote \"west\"",
        ),
        ("remote runs 511 mode, local 255", cfg(7, 511), vec![], "ClusterConfig", "maxConnectedClusters 511"),
        ("remote has ID 0", cfg(0, 255), vec![], "Cluster", "out of range"),
        ("remote ID beyond 255", cfg(256, 255), vec![], "Cluster", "out of range"),
        ("unsupported mode 256", cfg(7, 256), vec![], "Cluster", "not supported"),
        ("truncated config", b"{\"id\": 7, \"capab".to_vec(), vec![], "Json", ""),
        ("oversize config", vec![b' '; MAX_VALUE_BYTES + 1], vec![], "TooLarge", ""),
    ]
}

#[test]
fn cluster_config_rejections() {
    let east = ClusterName::new("east").unwrap();
    let local = ClusterId::new(1, M255).unwrap();
    for (what, value, others, want, needle) in config_cases() {
        match validate_cluster_config(&east, &value, local, M255, others) {
            Ok(ctx) => panic!("{what}: accepted {ctx:?}"),
            Err(e) => {
                assert_eq!(variant(&e), want, "{what}: got {e}");
                assert!(e.to_string().contains(needle), "{what}: message {e:?} lacks {needle:?}");
            }
        }
    }
}

#[test]
fn cluster_config_accepts_good_and_legacy_values() {
    let east = ClusterName::new("east").unwrap();
    let local = ClusterId::new(1, M255).unwrap();
    let ctx = validate_cluster_config(&east, &cfg(7, 255), local, M255, []).unwrap();
    assert_eq!((ctx.id.get(), ctx.mode), (7, M255));
    // The same remote reconnecting keeps its own ID.
    validate_cluster_config(&east, &cfg(7, 255), local, M255, [("east".to_string(), ctx.id)]).unwrap();
    // An older writer without capabilities means 255 mode.
    validate_cluster_config(&east, b"{\"id\": 7}", local, M255, []).unwrap();
    let m511 = MaxConnectedClusters::C511;
    let ctx = validate_cluster_config(&east, &cfg(300, 511), ClusterId::new(1, m511).unwrap(), m511, []).unwrap();
    assert_eq!(ctx.range().first, 300 << 15);
}

#[test]
fn every_variant_is_covered() {
    let mut seen: BTreeSet<&str> = decode_cases().iter().map(|c| c.3).collect();
    seen.extend(config_cases().iter().map(|c| c.3));
    seen.extend(export_cases().iter().map(|c| c.3));
    let all: BTreeSet<&str> = ALL_VARIANTS.into_iter().collect();
    assert_eq!(seen, all, "each Rejected variant needs a realistic case above");
}

// ---- MCS service exports (`cilium/state/serviceexports/v1/...`) ----------------------------------------------

const EXPORT_KEY: &str = "cilium/state/serviceexports/v1/east/shop/cart";

fn export(path: &[&str], new: Value) -> Vec<u8> {
    bytes(&with(golden("service-export.json"), path, new))
}

fn export_cases() -> Vec<DecodeCase> {
    let k = EXPORT_KEY.to_string();
    vec![
        ("value names another cluster", k.clone(), export(&["cluster"], json!("west")), "WrongCluster", "west"),
        (
            "key under another cluster's prefix",
            "cilium/state/serviceexports/v1/west/shop/cart".into(),
            export(&[], json!(null)),
            "WrongCluster",
            "west",
        ),
        ("name differs from the key", k.clone(), export(&["name"], json!("payments")), "KeyMismatch", "payments"),
        (
            "a service key is not an export",
            SVC_KEY.into(),
            export(&[], json!(null)),
            "KeyMismatch",
            "not a service export",
        ),
        ("empty namespace", k.clone(), export(&["namespace"], json!("")), "Empty", "namespace"),
        (
            "no export time (Go zero time)",
            k.clone(),
            export(&["exportCreationTimestamp"], json!(null)),
            "Empty",
            "exportCreationTimestamp",
        ),
        (
            "export time not RFC 3339",
            k.clone(),
            export(&["exportCreationTimestamp"], json!("yesterday")),
            "Json",
            "RFC 3339",
        ),
        ("unknown service type", k.clone(), export(&["type"], json!("LoadBalancer")), "Enum", "LoadBalancer"),
        ("unknown session affinity", k.clone(), export(&["sessionAffinity"], json!("Sticky")), "Enum", "Sticky"),
        ("unknown traffic policy", k.clone(), export(&["internalTrafficPolicy"], json!("Node")), "Enum", "Node"),
        (
            "unknown traffic distribution",
            k.clone(),
            export(&["trafficDistribution"], json!("Random")),
            "Enum",
            "Random",
        ),
        ("unknown IP family", k.clone(), export(&["ipFamilies", "1"], json!("IPX")), "Enum", "IPX"),
        ("port 0", k.clone(), export(&["ports", "0", "port"], json!(0)), "Enum", "1..65535"),
        ("port out of range", k.clone(), export(&["ports", "1", "port"], json!(70000)), "Enum", "70000"),
        ("port protocol ICMP", k.clone(), export(&["ports", "0", "protocol"], json!("ICMP")), "Protocol", "ICMP"),
        ("not JSON", k.clone(), b"{\"cluster\":".to_vec(), "Json", "JSON"),
        ("over the size limit", k, vec![b' '; MAX_VALUE_BYTES + 1], "TooLarge", "limit"),
    ]
}

#[test]
fn every_service_export_rejection_has_a_realistic_cause() {
    let remote = east7();
    for (what, key, value, want, needle) in export_cases() {
        match remote.decode_service_export(&key, &value) {
            Ok(spec) => panic!("{what}: accepted {spec:?}"),
            Err(e) => {
                assert_eq!(variant(&e), want, "{what}: got {e}");
                assert!(e.to_string().contains(needle), "{what}: message {e:?} lacks {needle:?}");
                assert!(!e.reason().is_empty());
            }
        }
    }
}

#[test]
fn service_export_fixtures_are_accepted() {
    let remote = east7();
    let spec = remote.decode_service_export(EXPORT_KEY, &bytes(&golden("service-export.json")));
    assert!(spec.is_ok_and(|s| s.name == "cart" && s.ports.len() == 2), "full fixture");
    for name in ["service-export-headless.json", "service-export-go-nils.json"] {
        let key = "cilium/state/serviceexports/v1/east/shop/db";
        let spec = remote.decode_service_export(key, &bytes(&golden(name)));
        assert!(spec.is_ok_and(|s| s.kind == "Headless"), "{name}");
    }
}
