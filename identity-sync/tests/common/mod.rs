//! Setup shared by identity-sync's integration tests: the local cluster's `AppConfig` ("west", ID 2), the fake kube
//! API with a client and the global Service shop/cart, remote stores in real etcd written as a remote's
//! clustermesh-apiserver would (cluster config, shop/cart, nodes, ipcache entries, canaries), remote files, and
//! reading back what identity-sync made of them (/status, /metrics, EndpointSlices, the MeshView stream).

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use causeway_api::v1::mesh_view_client::MeshViewClient;
use causeway_api::v1::{WatchEvent, WatchRequest};
use causeway_store::values::Capabilities;
use causeway_store::{
    ClusterConfig, ClusterService, IpCacheEntry, Kind, MaxConnectedClusters, Node, NodeAddress, PortConfig,
};
use fake_kube_apiserver::{FakeApiServer, FakeApiServerHandle};
use identity_sync::app::AppConfig;
use identity_sync::remotes::task::Timing;
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Streaming;

/// Guards against hangs only; nothing asserts on timing.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub async fn wait_for<F, Fut>(what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if causeway_testsupport::wait_until(PATIENCE, &mut cond).await {
        Ok(())
    } else {
        bail!("timed out waiting for {what}")
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The local cluster "west" (ID 2), with short retry timings; watches ExternalWorkloads.
pub fn test_config(dir: &Path) -> anyhow::Result<AppConfig> {
    Ok(AppConfig {
        cluster_name: "west".into(),
        cluster_id: 2,
        mode: MaxConnectedClusters::C255,
        remotes_dir: dir.to_path_buf(),
        rescan: Duration::from_millis(500),
        cache_ttl: None,
        remote_ready_timeout: Duration::from_secs(600),
        metrics_addr: "127.0.0.1:0".parse()?,
        grpc_addr: "127.0.0.1:0".parse()?,
        timing: Timing {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            invalid_retry: Duration::from_secs(1),
            probe_interval: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(2),
        },
        slice_debounce: Duration::ZERO,
        slice_concurrency: 8,
        watch_external_workloads: true,
    })
}

// ---- Remote stores (etcd), as a remote's clustermesh-apiserver writes them.

/// A remote's shop/cart: frontend 10.96.12.4, the backends on port http 8080/TCP.
pub fn service(cluster: &str, id: u32, backends: &[&str]) -> ClusterService {
    let ports = BTreeMap::from([("http".to_string(), PortConfig { protocol: "TCP".into(), port: 8080 })]);
    ClusterService {
        cluster: cluster.into(),
        namespace: "shop".into(),
        name: "cart".into(),
        frontends: BTreeMap::from([(ip("10.96.12.4"), BTreeMap::new())]),
        backends: backends.iter().map(|b| (ip(b), ports.clone())).collect(),
        hostnames: BTreeMap::new(),
        zones: BTreeMap::new(),
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
        include_external: false,
        shared: true,
        cluster_id: id,
    }
}

/// A node with one InternalIP, no pod CIDR and no WireGuard key.
pub fn node(cluster: &str, cluster_id: u32, name: &str, internal_ip: &str) -> Node {
    Node {
        name: name.into(),
        cluster: cluster.into(),
        addresses: vec![NodeAddress { kind: "InternalIP".into(), ip: ip(internal_ip) }],
        ipv4_alloc_cidr: None,
        ipv6_alloc_cidr: None,
        ipv4_health_ip: None,
        ipv4_ingress_ip: None,
        cluster_id,
        source: "custom-resource".into(),
        encryption_key: 0,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        wireguard_pub_key: String::new(),
        boot_id: String::new(),
    }
}

/// The ipcache entry of pod `shop/{pod}`.
pub fn ipcache_entry(pod_ip: &str, host_ip: &str, identity: u32, pod: &str) -> IpCacheEntry {
    IpCacheEntry {
        ip: ip(pod_ip),
        host_ip: Some(ip(host_ip)),
        id: identity,
        key: 0,
        metadata: String::new(),
        k8s_namespace: "shop".into(),
        k8s_pod_name: pod.into(),
        k8s_pod_uid: None,
        k8s_service_account: None,
        named_ports: vec![],
    }
}

pub async fn put_json(etcd: &mut etcd_client::Client, key: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
    etcd.put(key, serde_json::to_vec(value)?, None).await.with_context(|| format!("putting {key}"))?;
    Ok(())
}

/// Puts a service under its own key.
pub async fn put_service(etcd: &mut etcd_client::Client, s: &ClusterService) -> anyhow::Result<()> {
    put_json(etcd, &format!("cilium/state/services/v1/{}/{}/{}", s.cluster, s.namespace, s.name), s).await
}

pub async fn put_cluster_config(etcd: &mut etcd_client::Client, cluster: &str, id: u32) -> anyhow::Result<()> {
    etcd.put("cilium/.has-cluster-config", "true", None).await?;
    let cfg = ClusterConfig {
        id,
        capabilities: Capabilities {
            synced_canaries: true,
            max_connected_clusters: 255,
            service_exports_enabled: None,
        },
    };
    put_json(etcd, &format!("cilium/cluster-config/{cluster}"), &cfg).await
}

/// The synced canaries: every kind's initial export is complete.
pub async fn put_canaries(etcd: &mut etcd_client::Client, cluster: &str) -> anyhow::Result<()> {
    for kind in [Kind::Nodes, Kind::Services, Kind::Ip, Kind::Identities] {
        etcd.put(kind.canary_key(cluster), "2026-01-01T00:00:00Z", None).await?;
    }
    Ok(())
}

/// A complete remote with nothing but shop/cart with one backend: cluster config, the service, the canaries.
pub async fn put_remote(etcd: &mut etcd_client::Client, cluster: &str, id: u32, backend: &str) -> anyhow::Result<()> {
    put_cluster_config(etcd, cluster, id).await?;
    put_service(etcd, &service(cluster, id, &[backend])).await?;
    put_canaries(etcd, cluster).await
}

/// The remote file `dir/name` (an etcd endpoint, no TLS).
pub fn remote_file(dir: &Path, name: &str, endpoint: &str) -> anyhow::Result<()> {
    // Written beside and renamed, as a Secret volume update is atomic.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("endpoints:\n- {endpoint}\n"))?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

// ---- The local cluster: the fake kube API.

pub async fn kube_client(kubeconfig: &str) -> anyhow::Result<kube::Client> {
    let kc = Kubeconfig::from_yaml(kubeconfig)?;
    Ok(kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)?)
}

/// A fake kube API and a client of it.
pub async fn fake_kube() -> anyhow::Result<(FakeApiServerHandle, kube::Client)> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let client = kube_client(&server.kubeconfig_yaml()).await?;
    Ok((server, client))
}

pub async fn create_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// The namespace shop and its global Service cart (ClusterIP 10.96.0.10, port http 80).
pub async fn create_global_cart(client: &kube::Client) -> anyhow::Result<()> {
    create_namespace(client, "shop").await?;
    let svc = Service {
        metadata: ObjectMeta {
            name: Some("cart".into()),
            namespace: Some("shop".into()),
            annotations: Some(BTreeMap::from([("service.cilium.io/global".to_string(), "true".to_string())])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort { name: Some("http".into()), port: 80, ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Service>::namespaced(client.clone(), "shop").create(&PostParams::default(), &svc).await?;
    Ok(())
}

/// Remote backend addresses (sorted) in the slices of shop/cart that identity-sync manages, by source cluster.
pub async fn slice_backends(api: &Api<EndpointSlice>) -> BTreeMap<String, Vec<String>> {
    let lp = ListParams::default().labels("kubernetes.io/service-name=cart");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(list) = api.list(&lp).await else { return out };
    for s in list.items {
        let labels = s.metadata.labels.unwrap_or_default();
        if labels.get("endpointslice.kubernetes.io/managed-by").map(String::as_str) != Some("identity-sync.causeway.io")
        {
            continue;
        }
        let cluster = labels.get("multicluster.kubernetes.io/source-cluster").cloned().unwrap_or_default();
        let entry = out.entry(cluster).or_default();
        for e in s.endpoints {
            entry.extend(e.addresses);
        }
        entry.sort();
    }
    out
}

// ---- identity-sync's own endpoints.

pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// /status, or null while it cannot be read (callers poll).
pub async fn status(addr: SocketAddr) -> Value {
    match http_get(addr, "/status").await {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// One remote's entry in /status.
pub fn remote<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["remotes"].as_array()?.iter().find(|r| r["name"] == name)
}

/// A MeshView stream from the start, as a node agent "test-agent" opens it.
pub async fn watch(addr: SocketAddr) -> anyhow::Result<Streaming<WatchEvent>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let req = WatchRequest { resume_revision: 0, node_name: "test-agent".into(), resume_epoch: 0 };
    Ok(MeshViewClient::new(ch).watch(req).await?.into_inner())
}
