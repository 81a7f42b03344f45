//! identity-sync end to end, in-process: real etcd processes as the remote clusters' stores (written with
//! causeway-store types, as their clustermesh-apiservers would), the fake kube API as the local cluster.
//!
//! Local cluster "west" (ID 2) with a global Service shop/cart. Remotes:
//! - "east" (ID 1): a backend for cart, a node, an ipcache entry, an identity, and one malformed service value;
//! - "north" (ID 3): a backend for cart;
//! - "bad": its cluster config claims ID 2, the local cluster's own ID, so it must be refused.
//!
//! Checks: EndpointSlices for east and north appear with their backends and MCS labels; /status shows east and
//! north synced (east with the malformed value counted), bad refused with a reason; /readyz is ready; removing
//! north's file deletes north's slice and its status entry while east's slice stays.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use causeway_store::values::Capabilities;
use causeway_store::{
    ClusterConfig, ClusterService, IpCacheEntry, Kind, MaxConnectedClusters, Node, NodeAddress, PortConfig,
};
use causeway_testsupport::Etcd;
use fake_kube_apiserver::FakeApiServer;
use identity_sync::app::{self, AppConfig};
use identity_sync::remotes::task::Timing;
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Guards against hangs only; nothing asserts on timing.
const PATIENCE: Duration = Duration::from_secs(60);

async fn wait_for<F, Fut>(what: &str, mut cond: F) -> anyhow::Result<()>
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

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn service(cluster: &str, id: u32, backend: &str) -> ClusterService {
    let ports = BTreeMap::from([("http".to_string(), PortConfig { protocol: "TCP".into(), port: 8080 })]);
    ClusterService {
        cluster: cluster.into(),
        namespace: "shop".into(),
        name: "cart".into(),
        frontends: BTreeMap::from([(ip("10.96.12.4"), BTreeMap::new())]),
        backends: BTreeMap::from([(ip(backend), ports)]),
        hostnames: BTreeMap::new(),
        zones: BTreeMap::new(),
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
        include_external: false,
        shared: true,
        cluster_id: id,
    }
}

async fn put_json(etcd: &mut etcd_client::Client, key: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
    etcd.put(key, serde_json::to_vec(value)?, None).await.with_context(|| format!("putting {key}"))?;
    Ok(())
}

async fn put_cluster_config(etcd: &mut etcd_client::Client, cluster: &str, id: u32) -> anyhow::Result<()> {
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

async fn put_canaries(etcd: &mut etcd_client::Client, cluster: &str) -> anyhow::Result<()> {
    for kind in [Kind::Nodes, Kind::Services, Kind::Ip, Kind::Identities] {
        etcd.put(kind.canary_key(cluster), "2026-01-01T00:00:00Z", None).await?;
    }
    Ok(())
}

fn remote_file(dir: &Path, name: &str, endpoint: &str) -> anyhow::Result<()> {
    // Written beside and renamed, as a Secret volume update is atomic.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("endpoints:\n- {endpoint}\n"))?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

async fn status(addr: std::net::SocketAddr) -> Value {
    match http_get(addr, "/status").await {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn remote<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["remotes"].as_array()?.iter().find(|r| r["name"] == name)
}

/// Remote backend addresses in the slices of shop/cart, by source cluster.
async fn slice_backends(api: &Api<EndpointSlice>) -> BTreeMap<String, Vec<String>> {
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
    }
    out
}

fn test_config(dir: &Path) -> anyhow::Result<AppConfig> {
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

async fn fake_kube() -> anyhow::Result<(fake_kube_apiserver::FakeApiServerHandle, kube::Client)> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml())?;
    let client =
        kube::Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)?;
    Ok((server, client))
}

/// mTLS with a Cilium-format file (relative TLS paths), and an ID clash: a second remote claiming east's ID is
/// refused while east keeps it, and is accepted once east is removed (refused configs are retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_remote_and_duplicate_id_refused_until_the_clash_is_gone() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);
    let pki = causeway_pki::Pki::loopback()?;
    let etcd = Etcd::start_tls(&pki).await;
    let mut c = etcd.client().await;
    put_cluster_config(&mut c, "east", 1).await?;
    put_json(&mut c, "cilium/state/services/v1/east/shop/cart", &service("east", 1, "10.1.3.17")).await?;
    put_canaries(&mut c, "east").await?;
    put_cluster_config(&mut c, "twin", 1).await?;
    put_json(&mut c, "cilium/state/services/v1/twin/shop/cart", &service("twin", 1, "10.1.9.9")).await?;
    put_canaries(&mut c, "twin").await?;

    let dir = tempfile::tempdir()?;
    let cert = etcd.client_tls_for("root");
    std::fs::write(dir.path().join("ca.crt"), etcd.ca_pem().context("TLS etcd has a CA")?)?;
    std::fs::write(dir.path().join("west.crt"), &cert.cert_pem)?;
    std::fs::write(dir.path().join("west.key"), &cert.key_pem)?;
    let file = |_: &str| {
        format!(
            "endpoints:\n- {}\ntrusted-ca-file: ca.crt\ncert-file: west.crt\nkey-file: {}\n",
            etcd.endpoint(),
            dir.path().join("west.key").display()
        )
    };
    std::fs::write(dir.path().join("east"), file("east"))?;

    let (_kube_server, client) = fake_kube().await?;
    let running = app::start(test_config(dir.path())?, client).await?;
    let addr = running.metrics_addr;
    wait_for("east synced over mTLS", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "synced" && r["entries"]["services"] == 1)
    })
    .await?;

    std::fs::write(dir.path().join("twin"), file("twin"))?;
    wait_for("twin refused", || async {
        remote(&status(addr).await, "twin").is_some_and(|r| r["state"] == "validation_failed")
    })
    .await?;
    let s = status(addr).await;
    let reason = remote(&s, "twin").and_then(|r| r["last_error"].as_str()).unwrap_or_default().to_string();
    assert!(reason.contains("already used by remote \"east\""), "twin's reason: {reason:?}");
    assert!(remote(&s, "east").is_some_and(|r| r["state"] == "synced"), "east must be unaffected: {s:#}");

    std::fs::remove_file(dir.path().join("east"))?;
    wait_for("twin accepted once east is gone", || async {
        let s = status(addr).await;
        remote(&s, "east").is_none() && remote(&s, "twin").is_some_and(|r| r["state"] == "synced")
    })
    .await?;
    Ok(())
}

/// A remote whose etcd dies keeps its entries and slices (a remote's failure stays remote); when it comes back the
/// remote is synced again and follows later deletes. (The sweep of keys deleted while away is the core's rule, unit
/// tested there; etcd cannot be written while it is down, so this test cannot create that case.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_keeps_entries_and_the_remote_resyncs_when_back() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);
    let mut east = Etcd::start().await;
    let mut c = east.client().await;
    put_cluster_config(&mut c, "east", 1).await?;
    put_json(&mut c, "cilium/state/services/v1/east/shop/cart", &service("east", 1, "10.1.3.17")).await?;
    put_canaries(&mut c, "east").await?;
    let node_key = "cilium/state/nodes/v1/east/gone";
    let mut node_value: Value = serde_json::json!({"Name": "gone", "Cluster": "east", "ClusterID": 1});
    node_value["IPAddresses"] = serde_json::json!([{"Type": "InternalIP", "IP": "192.168.10.99"}]);
    put_json(&mut c, node_key, &node_value).await?;

    let (_kube_server, client) = fake_kube().await?;
    let ns =
        Namespace { metadata: ObjectMeta { name: Some("shop".into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Api::<Service>::namespaced(client.clone(), "shop").create(&PostParams::default(), &global_service()).await?;
    let dir = tempfile::tempdir()?;
    remote_file(dir.path(), "east", &east.endpoint())?;
    let running = app::start(test_config(dir.path())?, client.clone()).await?;
    let addr = running.metrics_addr;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    wait_for("east synced with its node", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "synced" && r["entries"]["nodes"] == 1)
    })
    .await?;
    wait_for("east's slice", || async { slice_backends(&slices).await.contains_key("east") }).await?;

    // While etcd is down: entries and slices stay.
    east.kill();
    wait_for("east disconnected", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "disconnected" && r["connected"] == false)
    })
    .await?;
    assert!(running.hub.read(|v| v.node("east", "gone").is_some()), "node dropped on disconnect");
    assert!(slice_backends(&slices).await.contains_key("east"), "slice dropped on disconnect");

    // Back: synced again, and a delete reaches the view.
    east.restart().await;
    let mut c = east.client().await;
    c.delete(node_key, None).await?;
    wait_for("east synced again without the deleted node", || async {
        let synced = remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "synced");
        synced && running.hub.read(|v| v.node("east", "gone").is_none())
    })
    .await?;
    assert!(slice_backends(&slices).await.contains_key("east"));
    Ok(())
}

fn global_service() -> Service {
    Service {
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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remotes_become_endpointslices_bad_remotes_are_refused_and_removal_drains() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);

    // Remote stores.
    let east = Etcd::start().await;
    let north = Etcd::start().await;
    let mut ec = east.client().await;
    let mut nc = north.client().await;
    put_cluster_config(&mut ec, "east", 1).await?;
    put_json(&mut ec, "cilium/state/services/v1/east/shop/cart", &service("east", 1, "10.1.3.17")).await?;
    ec.put("cilium/state/services/v1/east/shop/broken", "{\"cluster\": \"east\", truncated", None).await?;
    let node = Node {
        name: "east-node-1".into(),
        cluster: "east".into(),
        addresses: vec![NodeAddress { kind: "InternalIP".into(), ip: ip("192.168.10.12") }],
        ipv4_alloc_cidr: None,
        ipv6_alloc_cidr: None,
        ipv4_health_ip: None,
        ipv4_ingress_ip: None,
        cluster_id: 1,
        source: "custom-resource".into(),
        encryption_key: 0,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        wireguard_pub_key: String::new(),
        boot_id: String::new(),
    };
    put_json(&mut ec, "cilium/state/nodes/v1/east/east-node-1", &node).await?;
    let identity = (1 << 16) + 5;
    let entry = IpCacheEntry {
        ip: ip("10.1.3.17"),
        host_ip: Some(ip("192.168.10.12")),
        id: identity,
        key: 0,
        metadata: String::new(),
        k8s_namespace: "shop".into(),
        k8s_pod_name: "cart-1".into(),
        k8s_pod_uid: None,
        k8s_service_account: None,
        named_ports: vec![],
    };
    put_json(&mut ec, "cilium/state/ip/v1/default/10.1.3.17", &entry).await?;
    ec.put(
        format!("cilium/state/identities/v1/id/{identity}"),
        "k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=shop;",
        None,
    )
    .await?;
    put_canaries(&mut ec, "east").await?;

    put_cluster_config(&mut nc, "north", 3).await?;
    put_json(&mut nc, "cilium/state/services/v1/north/shop/cart", &service("north", 3, "10.3.0.5")).await?;
    put_canaries(&mut nc, "north").await?;
    // "bad" shares north's etcd and claims the local cluster's ID.
    put_cluster_config(&mut nc, "bad", 2).await?;
    put_canaries(&mut nc, "bad").await?;

    // Local cluster: the fake kube API with a global Service.
    let (_kube_server, client) = fake_kube().await?;
    let ns =
        Namespace { metadata: ObjectMeta { name: Some("shop".into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
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

    let dir = tempfile::tempdir()?;
    remote_file(dir.path(), "east", &east.endpoint())?;
    remote_file(dir.path(), "north", &north.endpoint())?;
    remote_file(dir.path(), "bad", &north.endpoint())?;
    // Not remotes: TLS material and Secret-volume links are skipped.
    std::fs::write(dir.path().join("ca.crt"), "not a remote")?;

    let running = app::start(test_config(dir.path())?, client.clone()).await?;
    let addr = running.metrics_addr;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");

    wait_for("slices for east and north", || async {
        let b = slice_backends(&slices).await;
        b.get("east") == Some(&vec!["10.1.3.17".to_string()]) && b.get("north") == Some(&vec!["10.3.0.5".to_string()])
    })
    .await?;

    wait_for("east and north synced, bad refused", || async {
        let s = status(addr).await;
        remote(&s, "east").is_some_and(|r| r["state"] == "synced")
            && remote(&s, "north").is_some_and(|r| r["state"] == "synced")
            && remote(&s, "bad").is_some_and(|r| r["state"] == "validation_failed")
    })
    .await?;
    let s = status(addr).await;
    let e = remote(&s, "east").context("east in /status")?;
    assert_eq!(e["cluster_id"], 1, "{s:#}");
    assert_eq!(e["entries"]["services"], 1, "{s:#}");
    assert_eq!(e["entries"]["nodes"], 1, "{s:#}");
    assert_eq!(e["entries"]["ip"], 1, "{s:#}");
    assert_eq!(e["entries"]["identities"], 1, "{s:#}");
    assert!(e["rejected"]["malformed"].as_u64().unwrap_or(0) >= 1, "malformed value not counted: {s:#}");
    let bad = remote(&s, "bad").context("bad in /status")?;
    let reason = bad["last_error"].as_str().unwrap_or_default();
    assert!(reason.contains("local cluster's own ID"), "bad remote's reason: {reason:?}");
    assert!(remote(&s, "ca.crt").is_none(), "TLS files are not remotes: {s:#}");

    // Ready: every remote is synced or refused.
    wait_for("/readyz", || async { matches!(http_get(addr, "/readyz").await, Ok((200, _))) }).await?;
    let (_, metrics) = http_get(addr, "/metrics").await?;
    assert!(
        metrics.contains("causeway_identity_sync_remote_rejected_values_total{remote=\"east\",reason=\"malformed\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("causeway_identity_sync_endpointslice_writes_total"), "{metrics}");

    // The merged view also reaches the gRPC side's view: the remote identity is there.
    assert!(running.hub.read(|v| v.identity(identity).is_some()), "identity {identity} missing from the view");

    // A new backend in east shows up in the slice.
    let mut two = service("east", 1, "10.1.3.17");
    two.backends.insert(ip("10.1.3.18"), two.backends.values().next().cloned().unwrap_or_default());
    put_json(&mut ec, "cilium/state/services/v1/east/shop/cart", &two).await?;
    wait_for("east's second backend", || async {
        slice_backends(&slices).await.get("east").is_some_and(|b| b.len() == 2)
    })
    .await?;

    // Removing north's file drains its slice and status; east keeps working.
    std::fs::remove_file(dir.path().join("north"))?;
    wait_for("north drained", || async {
        let b = slice_backends(&slices).await;
        !b.contains_key("north") && b.contains_key("east") && remote(&status(addr).await, "north").is_none()
    })
    .await?;
    Ok(())
}

/// A remote whose etcd is restarted empty (its clustermesh-apiserver has not exported again yet) keeps every entry
/// and its EndpointSlice while it is rebuilt: no sweep while the cluster config and the canaries are missing, nor
/// while the data is back but the canaries are not. Once the canaries are back, the remote is synced again and what
/// did not come back (a node) is swept. A sampler checks throughout that nothing that stays ever flapped away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_empty_keeps_entries_until_the_canaries_are_back() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);
    let identity = (1 << 16) + 7;
    let entry = IpCacheEntry {
        ip: ip("10.1.3.17"),
        host_ip: Some(ip("192.168.10.12")),
        id: identity,
        key: 0,
        metadata: String::new(),
        k8s_namespace: "shop".into(),
        k8s_pod_name: "cart-1".into(),
        k8s_pod_uid: None,
        k8s_service_account: None,
        named_ports: vec![],
    };
    let node = |name: &str| {
        let mut v: Value = serde_json::json!({"Name": name, "Cluster": "east", "ClusterID": 1});
        v["IPAddresses"] = serde_json::json!([{"Type": "InternalIP", "IP": "192.168.10.12"}]);
        v
    };
    // What east's clustermesh-apiserver exports (again, after the restart).
    async fn export(c: &mut etcd_client::Client, entry: &IpCacheEntry, node: &Value, id: u32) -> anyhow::Result<()> {
        put_json(c, "cilium/state/services/v1/east/shop/cart", &service("east", 1, "10.1.3.17")).await?;
        put_json(c, "cilium/state/nodes/v1/east/kept", node).await?;
        put_json(c, "cilium/state/ip/v1/default/10.1.3.17", entry).await?;
        c.put(
            format!("cilium/state/identities/v1/id/{id}"),
            "k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=east;",
            None,
        )
        .await?;
        Ok(())
    }

    let mut east = Etcd::start().await;
    let mut c = east.client().await;
    put_cluster_config(&mut c, "east", 1).await?;
    export(&mut c, &entry, &node("kept"), identity).await?;
    put_json(&mut c, "cilium/state/nodes/v1/east/dropped", &node("dropped")).await?;
    put_canaries(&mut c, "east").await?;

    let (_kube_server, client) = fake_kube().await?;
    let ns =
        Namespace { metadata: ObjectMeta { name: Some("shop".into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Api::<Service>::namespaced(client.clone(), "shop").create(&PostParams::default(), &global_service()).await?;
    let dir = tempfile::tempdir()?;
    remote_file(dir.path(), "east", &east.endpoint())?;
    let running = app::start(test_config(dir.path())?, client.clone()).await?;
    let addr = running.metrics_addr;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    wait_for("east synced", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "synced" && r["entries"]["nodes"] == 2)
    })
    .await?;
    wait_for("east's slice", || async { slice_backends(&slices).await.contains_key("east") }).await?;

    // From here on, what east keeps exporting must never leave the view or the slices.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (hub, slices, stop) = (running.hub.clone(), slices.clone(), stop.clone());
        tokio::spawn(async move {
            let mut flaps: Vec<String> = Vec::new();
            let mut samples = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let missing = hub.read(|v| {
                    let mut m = Vec::new();
                    if v.node("east", "kept").is_none() {
                        m.push("node kept");
                    }
                    if v.identity(identity).is_none() {
                        m.push("identity");
                    }
                    if v.ip(&ip("10.1.3.17")).is_none() {
                        m.push("ipcache entry");
                    }
                    let key = identity_sync::core::ServiceKey::new("shop", "cart");
                    if v.service(&key).is_none_or(|s| s.clusters.iter().all(|c| &*c.cluster != "east")) {
                        m.push("east's backends of shop/cart");
                    }
                    m
                });
                flaps.extend(missing.into_iter().map(String::from));
                if slice_backends(&slices).await.get("east") != Some(&vec!["10.1.3.17".to_string()]) {
                    flaps.push("east's EndpointSlice".into());
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (flaps, samples)
        })
    };

    east.restart_empty().await;
    let mut c = east.client().await;
    wait_for("a new session waiting for east's cluster config", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "waiting_for_cluster_config")
    })
    .await?;
    // Several probe intervals with an empty etcd.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(running.hub.read(|v| v.node("east", "dropped").is_some()), "swept while east's etcd was empty");

    put_cluster_config(&mut c, "east", 1).await?;
    wait_for("east waiting for its canaries", || async {
        remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "waiting_for_canaries")
    })
    .await?;
    // The data comes back before the canaries (the apiserver writes a canary after its kind's initial export).
    export(&mut c, &entry, &node("kept"), identity).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        running.hub.read(|v| v.node("east", "dropped").is_some()),
        "swept before the canaries said the export was complete"
    );
    assert!(remote(&status(addr).await, "east").is_some_and(|r| r["state"] == "waiting_for_canaries"));

    put_canaries(&mut c, "east").await?;
    wait_for("east synced again, without the node that did not come back", || async {
        let synced = remote(&status(addr).await, "east")
            .is_some_and(|r| r["state"] == "synced" && r["entries"]["nodes"] == 1 && r["entries"]["services"] == 1);
        synced && running.hub.read(|v| v.node("east", "dropped").is_none())
    })
    .await?;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (flaps, samples) = sampler.await?;
    assert!(samples > 10, "sampler ran {samples} times");
    assert!(flaps.is_empty(), "entries flapped while east's etcd was rebuilt: {flaps:?}");

    // The new history is followed live.
    c.delete("cilium/state/nodes/v1/east/kept", None).await?;
    wait_for("a delete in the new history", || async { running.hub.read(|v| v.node("east", "kept").is_none()) })
        .await?;
    Ok(())
}
