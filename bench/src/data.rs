//! A synthetic cluster, encoded with the real `causeway-store` value types, so that what the benches write and read
//! is byte for byte what clustermesh-apiserver writes.
//!
//! Cluster `east`, ID 7, maxConnectedClusters 255. Pod `i` belongs to app `i % apps`; each app is one identity and
//! lives in namespace `ns-<app % namespaces>`; pod `i` runs on node `i % nodes`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use base64::Engine;
use causeway_store::values::{Capabilities, ClusterConfig};
use causeway_store::{
    ClusterId, ClusterName, ClusterService, IpCacheEntry, Kind, LabelSet, MaxConnectedClusters, NamedPort, Node,
    NodeAddress, PortConfig, RemoteContext, StoreKey,
};

/// The remote cluster every bench reads.
pub const CLUSTER: &str = "east";
/// Its cluster ID.
pub const CLUSTER_ID: u32 = 7;
/// The reading (local) cluster's ID; must differ from the remote's.
pub const LOCAL_ID: u32 = 1;

/// How big the synthetic cluster is.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub pods: u32,
    pub services: u32,
    pub backends_per_service: u32,
    pub nodes: u32,
    /// Distinct identities (apps).
    pub apps: u32,
    pub namespaces: u32,
}

impl Scale {
    /// The brief's cluster: 100k pods, 10k services with 3 backends, 1k nodes, 10k identities in 100 namespaces.
    pub const FULL: Scale =
        Scale { pods: 100_000, services: 10_000, backends_per_service: 3, nodes: 1_000, apps: 10_000, namespaces: 100 };

    /// Scales pods, services, nodes and apps by `f` (for quick runs); at least one of each.
    pub fn scaled(f: f64) -> Scale {
        let s = |n: u32| ((f64::from(n) * f).round() as u32).max(1);
        let full = Self::FULL;
        Scale {
            pods: s(full.pods),
            services: s(full.services),
            backends_per_service: full.backends_per_service,
            nodes: s(full.nodes),
            apps: s(full.apps),
            namespaces: s(full.namespaces),
        }
    }
}

pub fn mode() -> MaxConnectedClusters {
    MaxConnectedClusters::C255
}

/// What a reader holds after validating `east`'s cluster config.
pub fn remote_context(cluster: &str, id: u32) -> RemoteContext {
    RemoteContext {
        name: ClusterName::new(cluster).expect("valid bench cluster name"),
        id: ClusterId::new(id, mode()).expect("valid bench cluster id"),
        mode: mode(),
    }
}

/// `cilium/cluster-config/<cluster>` value.
pub fn cluster_config_json(id: u32) -> Vec<u8> {
    let cfg = ClusterConfig {
        id,
        capabilities: Capabilities {
            synced_canaries: true,
            max_connected_clusters: mode().get(),
            service_exports_enabled: None,
        },
    };
    serde_json::to_vec(&cfg).expect("cluster config encodes")
}

/// Pod IP `i`: 10.64.0.1 upwards.
pub fn pod_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0A40_0000u32 + i + 1))
}

fn node_ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xC0A8_0000u32 + n + 1))
}

fn cluster_ip(s: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0A60_0000u32 + s + 1))
}

/// Numeric identity of app `app` in cluster `id`.
pub fn identity_id(id: u32, app: u32) -> u32 {
    (id << mode().shift()) + 1 + app
}

pub fn namespace(scale: &Scale, app: u32) -> String {
    format!("ns-{}", app % scale.namespaces)
}

/// The pod labels of app `app`.
pub fn app_labels(app: u32) -> BTreeMap<String, String> {
    [("app".to_string(), format!("app-{app}")), ("tier".to_string(), "backend".to_string())].into()
}

/// Identity label string of app `app`, as the store holds it.
pub fn identity_labels(cluster: &str, scale: &Scale, app: u32) -> String {
    LabelSet::for_pod(cluster, &namespace(scale, app), &app_labels(app), &BTreeMap::new()).to_string()
}

pub fn pod_name(app: u32, i: u32) -> String {
    format!("app-{app}-7f9c5d-{i:06}")
}

/// Ipcache entry of pod `i` (with an explicit pod name, which the propagation bench uses as a timestamp carrier).
pub fn ipcache_entry(cluster_id: u32, scale: &Scale, i: u32, name: Option<String>) -> IpCacheEntry {
    let app = i % scale.apps;
    IpCacheEntry {
        ip: pod_ip(i),
        host_ip: Some(node_ip(i % scale.nodes)),
        id: identity_id(cluster_id, app),
        key: 0,
        metadata: String::new(),
        k8s_namespace: namespace(scale, app),
        k8s_pod_name: name.unwrap_or_else(|| pod_name(app, i)),
        k8s_pod_uid: None,
        k8s_service_account: None,
        named_ports: vec![NamedPort { name: "http".into(), port: 8080, protocol: "TCP".into() }],
    }
}

pub fn service(cluster: &str, cluster_id: u32, scale: &Scale, s: u32) -> ClusterService {
    let app = s % scale.apps;
    let port = |p: u16| -> BTreeMap<String, PortConfig> {
        [("http".to_string(), PortConfig { protocol: "TCP".into(), port: p })].into()
    };
    let backends =
        (0..scale.backends_per_service).map(|k| (pod_ip((s + k * scale.services) % scale.pods), port(8080))).collect();
    ClusterService {
        cluster: cluster.to_string(),
        namespace: namespace(scale, app),
        name: format!("svc-{s}"),
        frontends: [(cluster_ip(s), port(80))].into(),
        backends,
        hostnames: BTreeMap::new(),
        zones: BTreeMap::new(),
        labels: app_labels(app),
        selector: app_labels(app),
        include_external: false,
        shared: true,
        cluster_id,
    }
}

pub fn node(cluster: &str, cluster_id: u32, n: u32) -> Node {
    let cidr = ipnet::IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0A40_0000u32 + (n << 8))), 24).expect("valid /24");
    let key = base64::engine::general_purpose::STANDARD.encode([n as u8; 32]);
    Node {
        name: format!("{cluster}-node-{n}"),
        cluster: cluster.to_string(),
        addresses: vec![
            NodeAddress { kind: "InternalIP".into(), ip: node_ip(n) },
            NodeAddress { kind: "CiliumInternalIP".into(), ip: IpAddr::V4(Ipv4Addr::from(0x0A40_0001u32 + (n << 8))) },
        ],
        ipv4_alloc_cidr: Some(cidr),
        ipv6_alloc_cidr: None,
        ipv4_health_ip: None,
        ipv4_ingress_ip: None,
        cluster_id,
        source: "custom-resource".into(),
        encryption_key: 0,
        labels: [("topology.kubernetes.io/zone".to_string(), format!("zone-{}", n % 3))].into(),
        annotations: BTreeMap::new(),
        wireguard_pub_key: key,
        boot_id: format!("00000000-0000-4000-8000-{n:012}"),
    }
}

/// Key/value pairs of one kind of the cluster's export.
pub fn kind_entries(cluster: &str, cluster_id: u32, scale: &Scale, kind: Kind) -> Vec<(String, Vec<u8>)> {
    match kind {
        Kind::Ip => (0..scale.pods)
            .map(|i| {
                let e = ipcache_entry(cluster_id, scale, i, None);
                (StoreKey::Ip { ip: e.ip }.to_string(), json(&e))
            })
            .collect(),
        Kind::Identities => (0..scale.apps)
            .map(|app| {
                let key = StoreKey::Identity { id: identity_id(cluster_id, app) }.to_string();
                (key, identity_labels(cluster, scale, app).into_bytes())
            })
            .collect(),
        Kind::Services => (0..scale.services)
            .map(|s| {
                let v = service(cluster, cluster_id, scale, s);
                let key = StoreKey::Service {
                    cluster: cluster.to_string(),
                    namespace: v.namespace.clone(),
                    name: v.name.clone(),
                };
                (key.to_string(), json(&v))
            })
            .collect(),
        Kind::Nodes => (0..scale.nodes)
            .map(|n| {
                let v = node(cluster, cluster_id, n);
                (StoreKey::Node { cluster: cluster.to_string(), name: v.name.clone() }.to_string(), json(&v))
            })
            .collect(),
        Kind::ServiceExports => Vec::new(),
    }
}

/// The bookkeeping keys a reader needs: cluster config, its marker, the heartbeat and the canaries of `kinds`.
pub fn meta_entries(cluster: &str, cluster_id: u32, kinds: &[Kind]) -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        (StoreKey::ClusterConfig { cluster: cluster.to_string() }.to_string(), cluster_config_json(cluster_id)),
        (StoreKey::HasClusterConfig.to_string(), b"true".to_vec()),
        (StoreKey::Heartbeat.to_string(), b"2025-01-01T00:00:00Z".to_vec()),
    ];
    for k in kinds {
        v.push((k.canary_key(cluster), b"2025-01-01T00:00:00Z".to_vec()));
    }
    v
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store values encode")
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_store::validate::RemoteEntry;

    /// Every generated value passes the reader's validation (a bench that measured rejections would be wrong).
    #[test]
    fn generated_entries_validate() {
        let scale = Scale::scaled(0.01);
        let ctx = remote_context(CLUSTER, CLUSTER_ID);
        for kind in [Kind::Ip, Kind::Identities, Kind::Services, Kind::Nodes] {
            let entries = kind_entries(CLUSTER, CLUSTER_ID, &scale, kind);
            assert!(!entries.is_empty());
            for (k, v) in entries {
                let e = ctx.decode(&k, &v).unwrap_or_else(|e| panic!("{k}: {e}"));
                if let RemoteEntry::Service(s) = e {
                    assert_eq!(s.backends.len() as u32, scale.backends_per_service);
                }
            }
        }
    }
}
