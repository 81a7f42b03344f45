//! The binary against real etcd and the fake kube API (the one test stand-in): objects in kube become the exact
//! store entries, canaries appear, /readyz flips, and deleting a pod withdraws its ipcache entry.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use causeway_crds::{CausewayIdentity, CausewayIdentitySpec};
use causeway_testsupport::{wait_until, Etcd};
use clustermesh_apiserver::kube::service_export_resource;
use fake_kube_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::CustomResourceExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);
const WG_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Kills the exporter when the test ends, however it ends.
struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Status code of `GET path` on the exporter's health server, or None if it does not answer yet.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

async fn get(etcd: &mut etcd_client::Client, key: &str) -> Option<String> {
    let resp = etcd.get(key, None).await.ok()?;
    resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

async fn keys(etcd: &mut etcd_client::Client, prefix: &str) -> Vec<(String, String)> {
    let Ok(resp) = etcd.get(prefix, Some(etcd_client::GetOptions::new().with_prefix())).await else { return vec![] };
    resp.kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), String::from_utf8_lossy(kv.value()).into_owned()))
        .collect()
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(v).context("test object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_cluster_state_into_etcd() -> anyhow::Result<()> {
    let etcd = Etcd::start().await;
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml())?;
    let client =
        kube::Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)?;
    let dir = tempfile::tempdir()?;
    let kubeconfig_path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig_path)?;

    let pp = PostParams::default();
    Api::<CustomResourceDefinition>::all(client.clone()).create(&pp, &CausewayIdentity::crd()).await?;
    Api::<Namespace>::all(client.clone())
        .create(&pp, &from_json(json!({"metadata": {"name": "shop", "labels": {"team": "payments"}}}))?)
        .await?;
    Api::<Node>::all(client.clone())
        .create(
            &pp,
            &from_json(json!({
                "metadata": {"name": "east-node-2", "labels": {"topology.kubernetes.io/zone": "eu-1a"},
                             "annotations": {"causeway.io/wireguard-pub-key": WG_KEY}},
                "spec": {"podCIDRs": ["10.1.2.0/24"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.10.12"},
                                         {"type": "Hostname", "address": "east-node-2"}]}
            }))?,
        )
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), "shop");
    for (name, ip) in [("cart-7f9c-x2", "10.1.2.33"), ("cart-7f9c-y3", "10.1.2.34")] {
        pods.create(
            &pp,
            &from_json(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": {"app": "cart"}},
                "spec": {"nodeName": "east-node-2", "containers": [{"name": "cart", "image": "cart",
                         "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "hostIP": "192.168.10.12", "podIP": ip, "podIPs": [{"ip": ip}]}
            }))?,
        )
        .await?;
    }
    Api::<Service>::namespaced(client.clone(), "shop")
        .create(
            &pp,
            &from_json(json!({
                "metadata": {"name": "cart", "namespace": "shop", "labels": {"app": "cart"},
                             "annotations": {"service.cilium.io/global": "true"}},
                "spec": {"clusterIP": "10.96.12.4", "clusterIPs": ["10.96.12.4"], "selector": {"app": "cart"},
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
            }))?,
        )
        .await?;
    Api::<EndpointSlice>::namespaced(client.clone(), "shop")
        .create(
            &pp,
            &from_json(json!({
                "metadata": {"name": "cart-abc", "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": "cart"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.1.2.33"], "conditions": {"ready": true}},
                              {"addresses": ["10.1.2.99"], "conditions": {"ready": false, "serving": false}}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
            }))?,
        )
        .await?;

    let metrics_port = free_port()?;
    let mut exporter = Exporter(
        Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
            .env("CAUSEWAY_CLUSTER_NAME", "east")
            .env("CAUSEWAY_CLUSTER_ID", "7")
            .arg("--etcd-endpoints")
            .arg(etcd.endpoint())
            .arg("--kubeconfig")
            .arg(&kubeconfig_path)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting clustermesh-apiserver")?,
    );

    let ready = wait_until(WAIT, || async { http_status(metrics_port, "/readyz").await == Some(200) }).await;
    if let Ok(Some(status)) = exporter.0.try_wait() {
        bail!("exporter exited early: {status}");
    }
    assert!(ready, "/readyz never turned 200");
    let mut c = etcd.client().await;

    // Canaries and cluster config.
    for kind in ["nodes", "services", "ip", "identities", "serviceexports"] {
        assert!(get(&mut c, &format!("cilium/synced/east/cilium/state/{kind}/v1")).await.is_some(), "canary {kind}");
    }
    assert_eq!(
        get(&mut c, "cilium/cluster-config/east").await.as_deref(),
        Some(
            r#"{"id":7,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#
        )
    );
    assert!(get(&mut c, "cilium/.has-cluster-config").await.is_some());
    assert!(get(&mut c, "cilium/.heartbeat").await.is_some());

    // One identity for both cart pods, in cluster 7's range.
    let ids = keys(&mut c, "cilium/state/identities/v1/id/").await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    let (id_key, labels) = &ids[0];
    assert_eq!(
        labels,
        "k8s:app=cart;k8s:io.cilium.k8s.namespace.labels.team=payments;k8s:io.cilium.k8s.policy.cluster=east;\
         k8s:io.kubernetes.pod.namespace=shop;"
    );
    let id: u32 = id_key.rsplit('/').next().context("id key")?.parse()?;
    assert!(id > 7 << 16 && id < 8 << 16, "identity {id} outside cluster 7's range");

    assert_eq!(
        get(&mut c, "cilium/state/ip/v1/default/10.1.2.33").await,
        Some(format!(
            r#"{{"IP":"10.1.2.33","HostIP":"192.168.10.12","ID":{id},"Key":0,"Metadata":"","K8sNamespace":"shop","K8sPodName":"cart-7f9c-x2","NamedPorts":[{{"Name":"http","Port":8080,"Protocol":"TCP"}}]}}"#
        ))
    );
    assert!(get(&mut c, "cilium/state/ip/v1/default/10.1.2.34").await.is_some());
    assert_eq!(
        get(&mut c, "cilium/state/nodes/v1/east/east-node-2").await.as_deref(),
        Some(format!(
            r#"{{"Name":"east-node-2","Cluster":"east","IPAddresses":[{{"Type":"InternalIP","IP":"192.168.10.12"}}],"IPv4AllocCIDR":{{"IP":"10.1.2.0","Mask":"////AA=="}},"IPv6AllocCIDR":null,"IPv4HealthIP":"","IPv4IngressIP":"","ClusterID":7,"Source":"kubernetes","EncryptionKey":0,"Labels":{{"topology.kubernetes.io/zone":"eu-1a"}},"Annotations":{{}},"WireguardPubKey":"{WG_KEY}","BootID":""}}"#
        ).as_str())
    );
    assert_eq!(
        get(&mut c, "cilium/state/services/v1/east/shop/cart").await.as_deref(),
        Some(
            r#"{"cluster":"east","namespace":"shop","name":"cart","frontends":{"10.96.12.4":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.1.2.33":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{"app":"cart"},"selector":{"app":"cart"},"includeExternal":false,"shared":true,"clusterID":7}"#
        )
    );

    // Metrics are served with the causeway_ prefix.
    assert_eq!(http_status(metrics_port, "/metrics").await, Some(200));

    // Deleting a pod withdraws its ipcache entry; the identity stays while the other pod uses it.
    pods.delete("cart-7f9c-y3", &DeleteParams::default()).await?;
    let withdrawn = wait_until(WAIT, || async {
        get(&mut etcd.client().await, "cilium/state/ip/v1/default/10.1.2.34").await.is_none()
    })
    .await;
    assert!(withdrawn, "ipcache entry of the deleted pod is still there");
    assert_eq!(keys(&mut c, "cilium/state/identities/v1/id/").await.len(), 1);
    assert!(get(&mut c, "cilium/state/ip/v1/default/10.1.2.33").await.is_some());

    // Deleting the last pod withdraws its entry; the identity is idle but live within its GC grace period (15
    // minutes here), so it stays exported.
    pods.delete("cart-7f9c-x2", &DeleteParams::default()).await?;
    let withdrawn = wait_until(WAIT, || async {
        get(&mut etcd.client().await, "cilium/state/ip/v1/default/10.1.2.33").await.is_none()
    })
    .await;
    assert!(withdrawn, "ipcache entry of the last pod is still there");
    assert_eq!(keys(&mut c, "cilium/state/identities/v1/id/").await, ids, "the idle identity stays exported");
    drop(exporter);
    Ok(())
}

fn start_exporter(
    etcd: &Etcd,
    kubeconfig: &std::path::Path,
    metrics_port: u16,
    gc_grace: &str,
) -> anyhow::Result<Exporter> {
    start_exporter_with(etcd, kubeconfig, metrics_port, &[&format!("--identity-gc-grace={gc_grace}")])
}

fn start_exporter_with(
    etcd: &Etcd,
    kubeconfig: &std::path::Path,
    metrics_port: u16,
    extra: &[&str],
) -> anyhow::Result<Exporter> {
    Ok(Exporter(
        Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
            .env("CAUSEWAY_CLUSTER_NAME", "east")
            .env("CAUSEWAY_CLUSTER_ID", "7")
            .arg("--etcd-endpoints")
            .arg(etcd.endpoint())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting clustermesh-apiserver")?,
    ))
}

/// Identities persisted as CausewayIdentity objects but used by no pod are live until the GC collects them: the
/// apiserver exports them from its first export on (they are there when it reports ready), and withdraws them
/// once they are collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_identities_are_exported_until_collected() -> anyhow::Result<()> {
    let etcd = Etcd::start().await;
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml())?;
    let client =
        kube::Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)?;
    let dir = tempfile::tempdir()?;
    let kubeconfig_path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig_path)?;
    let pp = PostParams::default();
    Api::<CustomResourceDefinition>::all(client.clone()).create(&pp, &CausewayIdentity::crd()).await?;
    let identities = Api::<CausewayIdentity>::all(client.clone());
    let restored = (7 << 16) + 42;
    let labels = "k8s:app=batch;k8s:io.cilium.k8s.policy.cluster=east;k8s:io.kubernetes.pod.namespace=jobs;";
    identities
        .create(
            &pp,
            &CausewayIdentity::new(
                &restored.to_string(),
                CausewayIdentitySpec { labels: labels.into(), cluster: "east".into() },
            ),
        )
        .await?;
    // Another cluster's identity in the same kube API is not ours to export.
    identities
        .create(
            &pp,
            &CausewayIdentity::new(
                &((8 << 16) + 1).to_string(),
                CausewayIdentitySpec {
                    labels: "k8s:app=x;k8s:io.cilium.k8s.policy.cluster=west;".into(),
                    cluster: "west".into(),
                },
            ),
        )
        .await?;
    let key = format!("cilium/state/identities/v1/id/{restored}");

    // A long grace period: the identity is live, so it is in the initial export, before the canary and /readyz.
    let port = free_port()?;
    let exporter = start_exporter(&etcd, &kubeconfig_path, port, "15m")?;
    assert!(wait_until(WAIT, || async { http_status(port, "/readyz").await == Some(200) }).await, "never ready");
    let mut c = etcd.client().await;
    assert_eq!(keys(&mut c, "cilium/state/identities/v1/id/").await, vec![(key.clone(), labels.to_string())]);
    drop(exporter);

    // Restarted with a short grace period: the unused identity is collected (object deleted) and withdrawn.
    let port = free_port()?;
    let _exporter = start_exporter(&etcd, &kubeconfig_path, port, "1s")?;
    let collected = wait_until(WAIT, || async {
        let object_gone = matches!(identities.get_opt(&restored.to_string()).await, Ok(None));
        object_gone && get(&mut etcd.client().await, &key).await.is_none()
    })
    .await;
    assert!(
        collected,
        "the unused identity was not collected and withdrawn: {:?}",
        keys(&mut c, "cilium/state/identities/").await
    );
    assert!(
        identities.get_opt(&((8 << 16) + 1).to_string()).await?.is_some(),
        "another cluster's identity is left alone"
    );
    Ok(())
}

/// The MCS-API ServiceExport CRD as the Kubernetes multicluster SIG ships it (namespaced, v1alpha1); its schema is
/// not what this test is about.
fn service_export_crd() -> anyhow::Result<CustomResourceDefinition> {
    from_json(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "serviceexports.multicluster.x-k8s.io"},
        "spec": {
            "group": "multicluster.x-k8s.io",
            "scope": "Namespaced",
            "names": {"plural": "serviceexports", "singular": "serviceexport", "kind": "ServiceExport",
                      "shortNames": ["svcex"]},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                          "subresources": {"status": {}}}]
        }
    }))
}

/// With `--enable-mcs-api`, a Service without any Cilium annotation is exported once a ServiceExport of the same
/// namespace and name exists (and withdrawn when it goes); a Service without one stays local; annotated global
/// services are exported as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_exports_export_plain_services() -> anyhow::Result<()> {
    let etcd = Etcd::start().await;
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml())?;
    let client =
        kube::Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)?;
    let dir = tempfile::tempdir()?;
    let kubeconfig_path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig_path)?;
    let pp = PostParams::default();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.create(&pp, &CausewayIdentity::crd()).await?;
    crds.create(&pp, &service_export_crd()?).await?;
    Api::<Namespace>::all(client.clone()).create(&pp, &from_json(json!({"metadata": {"name": "shop"}}))?).await?;
    let services = Api::<Service>::namespaced(client.clone(), "shop");
    for (name, ip, annotations) in [
        ("cart", "10.96.12.4", json!({})),
        ("local", "10.96.12.5", json!({})),
        ("web", "10.96.12.6", json!({"service.cilium.io/global": "true"})),
    ] {
        services
            .create(
                &pp,
                &from_json(json!({
                    "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
                    "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
                             "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
                }))?,
            )
            .await?;
    }
    Api::<EndpointSlice>::namespaced(client.clone(), "shop")
        .create(
            &pp,
            &from_json(json!({
                "metadata": {"name": "cart-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "cart"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.1.2.33"], "conditions": {"ready": true}}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
            }))?,
        )
        .await?;
    let exports = Api::<DynamicObject>::namespaced_with(client.clone(), "shop", &service_export_resource());
    let export = |name: &str| -> anyhow::Result<DynamicObject> {
        from_json(json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"exportedLabels": {"tier": "web"}}
        }))
    };
    exports.create(&pp, &export("cart")?).await?;

    let port = free_port()?;
    let _exporter = start_exporter_with(&etcd, &kubeconfig_path, port, &["--enable-mcs-api"])?;
    assert!(wait_until(WAIT, || async { http_status(port, "/readyz").await == Some(200) }).await, "never ready");
    let mut c = etcd.client().await;
    let names = |keys: Vec<(String, String)>| keys.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    // At ready, the initial export holds the ServiceExport'ed service and the annotated one, not the local one.
    assert_eq!(
        names(keys(&mut c, "cilium/state/services/v1/").await),
        ["cilium/state/services/v1/east/shop/cart", "cilium/state/services/v1/east/shop/web"]
    );
    let cart = get(&mut c, "cilium/state/services/v1/east/shop/cart").await.unwrap_or_default();
    assert!(cart.contains(r#""backends":{"10.1.2.33":"#) && cart.contains(r#""shared":true"#), "{cart}");

    // The MCS spec of each exported service sits under serviceexports/v1, in the shape a peer (Cilium's reader
    // rules, our RemoteContext) accepts; the annotated global service has no ServiceExport, so no spec.
    assert_eq!(
        names(keys(&mut c, "cilium/state/serviceexports/v1/").await),
        ["cilium/state/serviceexports/v1/east/shop/cart"]
    );
    let remote = east7_context()?;
    let spec_key = "cilium/state/serviceexports/v1/east/shop/cart";
    let spec = remote
        .decode_service_export(spec_key, get(&mut c, spec_key).await.unwrap_or_default().as_bytes())
        .context("the exported MCS spec is refused by a reader")?;
    assert_eq!((spec.kind.as_str(), spec.session_affinity.as_str()), ("ClusterSetIP", "None"));
    assert_eq!(spec.labels.get("tier").map(String::as_str), Some("web"), "exportedLabels carried");
    assert_eq!(
        spec.ports.iter().map(|p| (p.name.as_str(), p.protocol.as_str(), p.port)).collect::<Vec<_>>(),
        [("http", "TCP", 80)]
    );
    assert!(spec.export_creation_timestamp.is_some());
    assert!(get(&mut c, "cilium/synced/east/cilium/state/serviceexports/v1").await.is_some(), "canary");
    let config = get(&mut c, "cilium/cluster-config/east").await.unwrap_or_default();
    assert!(config.contains(r#""serviceExportsEnabled":true"#), "{config}");

    // Exporting the local service later, and un-exporting cart.
    exports.create(&pp, &export("local")?).await?;
    exports.delete("cart", &DeleteParams::default()).await?;
    let followed = wait_until(WAIT, || async {
        names(keys(&mut etcd.client().await, "cilium/state/services/v1/").await)
            == ["cilium/state/services/v1/east/shop/local", "cilium/state/services/v1/east/shop/web"]
    })
    .await;
    assert!(
        followed,
        "exports did not follow the ServiceExports: {:?}",
        keys(&mut c, "cilium/state/services/v1/").await
    );
    let specs = wait_until(WAIT, || async {
        names(keys(&mut etcd.client().await, "cilium/state/serviceexports/v1/").await)
            == ["cilium/state/serviceexports/v1/east/shop/local"]
    })
    .await;
    assert!(specs, "MCS specs did not follow: {:?}", keys(&mut c, "cilium/state/serviceexports/v1/").await);
    Ok(())
}

fn east7_context() -> anyhow::Result<causeway_store::RemoteContext> {
    let mode = causeway_store::MaxConnectedClusters::C255;
    Ok(causeway_store::RemoteContext {
        name: causeway_store::ClusterName::new("east")?,
        id: causeway_store::ClusterId::new(7, mode)?,
        mode,
    })
}
