//! External workloads (VMs joined to a cluster), both sides, over a real MeshView gRPC stream:
//!
//! - in a cluster: a Ready `ExternalWorkload` (fake kube API) becomes a Node and the ipcache entry of its mesh address
//!   on the stream; a refused re-registration (Ready=False, still exported) keeps them; a keyless re-registration or
//!   deleting the object withdraws both (DELETE events);
//! - on the VM (`--external-workload`, the real binary, no kube API at all): the home cluster's store in a real etcd
//!   (mTLS, auth on, read as the `externalworkload` user) named like the local cluster is imported, and its node
//!   (with its WireGuard key), ipcache entry and global service reach the stream.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _};
use causeway_api::v1::watch_event::{Kind as EvKind, Object};
use causeway_api::v1::WatchEvent;
use causeway_crds::ExternalWorkload;
use causeway_store::{ClusterService, Node, PortConfig};
use causeway_testsupport::Etcd;
use common::{
    fake_kube, http_get, ip, ipcache_entry, node, put_canaries, put_cluster_config, put_json, put_service, remote,
    service, test_config, watch, PATIENCE,
};
use identity_sync::app;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::CustomResourceExt;
use serde_json::json;
use tonic::Streaming;

const VM_KEY: &str = "hIc2Bzv5nFyTmnTVcMrh0/qvNTsWqQ/xN7h0DjwAlnU=";
const HOME_NODE_KEY: &str = "wAd0mrIMmyBaaYTB6o1O7ZHKWy2iK1mf4gfD/5jqTDM=";

/// What a watching agent holds: the view as applied from the stream, by object key.
#[derive(Default)]
struct AgentView {
    nodes: BTreeMap<(String, String), causeway_api::v1::Node>,
    ips: BTreeMap<String, causeway_api::v1::IpCacheEntry>,
    services: BTreeMap<(String, String), causeway_api::v1::GlobalService>,
    deleted_nodes: Vec<(String, String)>,
    deleted_ips: Vec<String>,
}

impl AgentView {
    fn apply(&mut self, e: WatchEvent) {
        let kind = EvKind::try_from(e.kind).unwrap_or(EvKind::Unspecified);
        match (kind, e.object) {
            (EvKind::Upsert, Some(Object::Node(n))) => {
                self.nodes.insert((n.cluster.clone(), n.name.clone()), n);
            }
            (EvKind::Upsert, Some(Object::Ipcache(i))) => {
                self.ips.insert(i.ip.clone(), i);
            }
            (EvKind::Upsert, Some(Object::Service(s))) => {
                self.services.insert((s.namespace.clone(), s.name.clone()), s);
            }
            (EvKind::Delete, Some(Object::Node(n))) => {
                let k = (n.cluster, n.name);
                self.nodes.remove(&k);
                self.deleted_nodes.push(k);
            }
            (EvKind::Delete, Some(Object::Ipcache(i))) => {
                self.ips.remove(&i.ip);
                self.deleted_ips.push(i.ip);
            }
            _ => {}
        }
    }
}

/// Applies stream events to `view` until `cond` holds.
async fn until(
    s: &mut Streaming<WatchEvent>,
    view: &mut AgentView,
    what: &str,
    cond: impl Fn(&AgentView) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond(view) {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Err(_) => bail!("timed out waiting for {what}"),
            Ok(Err(e)) => bail!("stream failed while waiting for {what}: {e}"),
            Ok(Ok(None)) => bail!("stream ended while waiting for {what}"),
            Ok(Ok(Some(e))) => view.apply(e),
        }
    }
    Ok(())
}

fn ready_status(ready: &str) -> serde_json::Value {
    json!({
        "status": {
            "id": (2 << 16) + 42,
            "ip": "192.168.50.10",
            "meshIPv4": "10.192.1.1",
            "wireguardPublicKey": VM_KEY,
            "conditions": [{
                "type": "Ready", "status": ready, "lastTransitionTime": "2026-11-23T18:00:00Z",
                "reason": "Registered", "message": ""
            }]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_external_workload_is_a_node_and_an_ipcache_entry_on_the_stream_until_it_goes() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);
    let (_server, client) = fake_kube().await?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ExternalWorkload::crd())
        .await?;
    let dir = tempfile::tempdir()?;
    let running = app::start(test_config(dir.path())?, client.clone()).await?;

    let mut stream = watch(running.grpc_addr).await?;
    let mut view = AgentView::default();
    let api = Api::<ExternalWorkload>::all(client.clone());
    let obj: ExternalWorkload = serde_json::from_value(json!({
        "apiVersion": "causeway.io/v1alpha1", "kind": "ExternalWorkload",
        "metadata": {"name": "vm-1", "labels": {"io.kubernetes.pod.namespace": "vms", "app": "db"}},
        "spec": {"ipv4AllocCIDR": "10.192.1.0/30"}
    }))?;
    api.create(&PostParams::default(), &obj).await?;
    // Registered but without status yet: nothing. Then clustermesh-apiserver's status patch makes it Ready.
    let pp = PatchParams::default();
    api.patch_status("vm-1", &pp, &Patch::Merge(ready_status("True"))).await?;

    let node_key = ("west".to_string(), "vm-1".to_string());
    until(&mut stream, &mut view, "the host's node and mesh address", |v| {
        v.nodes.contains_key(&node_key) && v.ips.contains_key("10.192.1.1")
    })
    .await?;
    let node = &view.nodes[&node_key];
    assert_eq!(node.cluster_id, 2);
    assert_eq!(node.internal_ips, vec!["192.168.50.10"]);
    assert_eq!(node.pod_cidrs, vec!["10.192.1.0/30"]);
    assert_eq!(node.wireguard_pub_key, VM_KEY);
    assert_eq!(node.zone, "");
    let ip = &view.ips["10.192.1.1"];
    assert_eq!(
        (ip.identity, ip.host_ip.as_str(), ip.cluster.as_str(), ip.cluster_id),
        ((2 << 16) + 42, "192.168.50.10", "west", 2)
    );
    assert_eq!((ip.namespace.as_str(), ip.pod_name.as_str()), ("vms", "vm-1"));
    // The underlay address is not a mesh address: only the node names it.
    assert!(!view.ips.contains_key("192.168.50.10"));

    // A refused re-registration: Ready=False, the previous registration still exported (status fields kept) — the
    // host stays a peer, as it stays in the exported store for remote clusters. Then a keyless re-registration
    // (the apiserver clears key and mesh address and withdraws its node record): both withdrawn here too.
    // (The same patch relabels the identity, so the stream shows when the patch has been taken.)
    let mut refused = ready_status("False");
    refused["status"]["id"] = json!((2 << 16) + 43);
    api.patch_status("vm-1", &pp, &Patch::Merge(refused)).await?;
    until(&mut stream, &mut view, "the refused re-registration taken", |v| {
        v.ips.get("10.192.1.1").is_some_and(|ip| ip.identity == (2 << 16) + 43)
    })
    .await?;
    assert!(view.deleted_nodes.is_empty() && view.nodes.contains_key(&node_key), "Ready=False withdrew the host");
    api.patch_status(
        "vm-1",
        &pp,
        &Patch::Merge(json!({"status": {"wireguardPublicKey": null, "meshIPv4": null,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-23T18:01:00Z",
                            "reason": "Registered", "message": ""}]}})),
    )
    .await?;
    until(&mut stream, &mut view, "DELETEs after the keyless re-registration", |v| {
        v.deleted_nodes.contains(&node_key) && v.deleted_ips.iter().any(|i| i == "10.192.1.1")
    })
    .await?;
    assert!(view.nodes.is_empty() && view.ips.is_empty());

    // Ready again, then deleted: DELETEs again.
    api.patch_status("vm-1", &pp, &Patch::Merge(ready_status("True"))).await?;
    until(&mut stream, &mut view, "the host back", |v| v.nodes.contains_key(&node_key)).await?;
    view.deleted_nodes.clear();
    view.deleted_ips.clear();
    api.delete("vm-1", &DeleteParams::default()).await?;
    until(&mut stream, &mut view, "DELETEs after the object was deleted", |v| {
        v.deleted_nodes.contains(&node_key) && v.deleted_ips.iter().any(|i| i == "10.192.1.1")
    })
    .await?;
    assert!(view.nodes.is_empty() && view.ips.is_empty());

    // An unusable object (its key is not a WireGuard key) never reaches the stream, and is counted.
    let mut bad = obj.clone();
    bad.metadata.name = Some("vm-bad".into());
    api.create(&PostParams::default(), &bad).await?;
    let mut status = ready_status("True");
    status["status"]["wireguardPublicKey"] = json!("not-a-key");
    api.patch_status("vm-bad", &pp, &Patch::Merge(status)).await?;
    let counted = causeway_testsupport::wait_until(PATIENCE, || async {
        running
            .health
            .render_metrics()
            .contains("causeway_identity_sync_external_workload_skips_total{reason=\"invalid_value\"} 1")
    })
    .await;
    assert!(counted, "{}", running.health.render_metrics());
    // A later ready object still arrives, and vm-bad never did.
    let mut good = obj.clone();
    good.metadata.name = Some("vm-2".into());
    good.spec.ipv4_alloc_cidr = Some("10.192.1.4/30".into());
    api.create(&PostParams::default(), &good).await?;
    let mut status = ready_status("True");
    status["status"]["meshIPv4"] = json!("10.192.1.5");
    api.patch_status("vm-2", &pp, &Patch::Merge(status)).await?;
    until(&mut stream, &mut view, "vm-2", |v| v.nodes.contains_key(&("west".to_string(), "vm-2".to_string()))).await?;
    assert!(!view.nodes.contains_key(&("west".to_string(), "vm-bad".to_string())));
    Ok(())
}

/// Kills the binary however the test ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

fn home_node(name: &str, ip: &str, cidr: &str, key: &str) -> anyhow::Result<Node> {
    Ok(Node { ipv4_alloc_cidr: Some(cidr.parse()?), wireguard_pub_key: key.into(), ..node("home", 5, name, ip) })
}

/// The home cluster "home" (ID 5) as its clustermesh-apiserver exports it: cluster config, one node with a
/// WireGuard key, one pod's ipcache entry, its identity, the global service shop/cart it backs, and the synced
/// canaries.
async fn export_home(c: &mut etcd_client::Client) -> anyhow::Result<()> {
    put_cluster_config(c, "home", 5).await?;
    let node = home_node("home-node-1", "172.18.0.2", "10.5.1.0/24", HOME_NODE_KEY)?;
    put_json(c, "cilium/state/nodes/v1/home/home-node-1", &node).await?;
    let entry = ipcache_entry("10.5.1.17", "172.18.0.2", (5 << 16) + 3, "cart-0");
    put_json(c, "cilium/state/ip/v1/default/10.5.1.17", &entry).await?;
    c.put(
        format!("cilium/state/identities/v1/id/{}", (5 << 16) + 3),
        "k8s:app=cart;k8s:io.cilium.k8s.policy.cluster=home;k8s:io.kubernetes.pod.namespace=shop;",
        None,
    )
    .await?;
    // The ClusterIP's port is exported with it (port http 80), the backend's is 8080.
    let http80 = BTreeMap::from([("http".to_string(), PortConfig { protocol: "TCP".into(), port: 80 })]);
    let cart = ClusterService {
        frontends: BTreeMap::from([(ip("10.96.12.4"), http80)]),
        ..service("home", 5, &["10.5.1.17"])
    };
    put_service(c, &cart).await?;
    put_canaries(c, "home").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_workload_mode_serves_the_home_clusters_store_without_any_kube_api() -> anyhow::Result<()> {
    let pki = causeway_pki::Pki::loopback()?;
    let etcd = Etcd::start_tls(&pki).await;
    let mut root = etcd.client().await;
    export_home(&mut root).await?;
    // The home etcd as the chart runs it: auth on, the VM connects as `externalworkload` (read-only on the state).
    causeway_kvstore::ensure_auth(&mut root, "home", &["west"]).await?;

    let dir = tempfile::tempdir()?;
    let remotes = dir.path().join("remotes");
    std::fs::create_dir(&remotes)?;
    let cert = etcd.client_tls_for(causeway_pki::users::EXTERNAL_WORKLOAD);
    std::fs::write(remotes.join("ca.crt"), etcd.ca_pem().context("TLS etcd has a CA")?)?;
    std::fs::write(remotes.join("tls.crt"), &cert.cert_pem)?;
    std::fs::write(remotes.join("tls.key"), &cert.key_pem)?;
    // The one remote file, named after the home cluster, as the join script writes it.
    std::fs::write(
        remotes.join("home"),
        format!("endpoints:\n- {}\ntrusted-ca-file: ca.crt\ncert-file: tls.crt\nkey-file: tls.key\n", etcd.endpoint()),
    )?;

    let bin = env!("CARGO_BIN_EXE_identity-sync");
    // --kubeconfig is refused with a clear message.
    let out = Command::new(bin)
        .args(["--external-workload", "--cluster-name", "home", "--cluster-id", "5", "--kubeconfig", "/dev/null"])
        .env_remove("CAUSEWAY_KUBECONFIG")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot be used with --external-workload"), "{stderr}");

    let (grpc, metrics) = (free_addr()?, free_addr()?);
    let child = Command::new(bin)
        .args(["--external-workload", "--cluster-name", "home", "--cluster-id", "5"])
        .arg("--remotes-dir")
        .arg(&remotes)
        .args(["--grpc-addr", &grpc.to_string(), "--metrics-addr", &metrics.to_string()])
        // No kube API anywhere: a kube client would fail on this path (and there is no in-cluster config).
        .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
        .env_remove("CAUSEWAY_KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut child = Proc(child);

    let connected =
        causeway_testsupport::wait_until(PATIENCE, || async { tokio::net::TcpStream::connect(grpc).await.is_ok() })
            .await;
    if let Ok(Some(status)) = child.0.try_wait() {
        bail!("identity-sync exited early: {status}");
    }
    assert!(connected, "the MeshView port never opened");
    let mut stream = watch(grpc).await?;
    let mut view = AgentView::default();
    let node_key = ("home".to_string(), "home-node-1".to_string());
    let cart = ("shop".to_string(), "cart".to_string());
    until(&mut stream, &mut view, "the home cluster's node, ipcache entry and service", |v| {
        v.nodes.contains_key(&node_key) && v.ips.contains_key("10.5.1.17") && v.services.contains_key(&cart)
    })
    .await?;
    // The home's service, with its ClusterIP as the frontend and its backend.
    let svc = &view.services[&cart];
    let fe: Vec<(&str, Vec<u32>)> =
        svc.frontends.iter().map(|f| (f.ip.as_str(), f.ports.iter().map(|p| p.port).collect())).collect();
    assert_eq!(fe, vec![("10.96.12.4", vec![80])]);
    let be: Vec<(&str, &str, Vec<u32>)> = svc
        .backends
        .iter()
        .map(|b| (b.ip.as_str(), b.cluster.as_str(), b.ports.iter().map(|p| p.port).collect()))
        .collect();
    assert_eq!(be, vec![("10.5.1.17", "home", vec![8080])]);
    let node = &view.nodes[&node_key];
    assert_eq!((node.cluster_id, node.wireguard_pub_key.as_str()), (5, HOME_NODE_KEY));
    assert_eq!(node.internal_ips, vec!["172.18.0.2"]);
    assert_eq!(node.pod_cidrs, vec!["10.5.1.0/24"]);
    let ip = &view.ips["10.5.1.17"];
    assert_eq!((ip.identity, ip.host_ip.as_str(), ip.cluster.as_str()), ((5 << 16) + 3, "172.18.0.2", "home"));

    // Readiness waits for no kube thing: it turns on once the home cluster synced, and /status shows it synced.
    let ready = causeway_testsupport::wait_until(PATIENCE, || async {
        matches!(http_get(metrics, "/readyz").await, Ok((200, _)))
    })
    .await;
    assert!(ready, "/readyz never turned ready");
    let (_, body) = http_get(metrics, "/status").await?;
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let home = remote(&status, "home").cloned();
    let home = home.context("home on /status")?;
    assert_eq!((home["state"].as_str(), home["cluster_id"].as_u64()), (Some("synced"), Some(5)), "{home}");

    // A node the home cluster adds later arrives as a delta.
    let later = home_node("home-node-2", "172.18.0.3", "10.5.2.0/24", VM_KEY)?;
    put_json(&mut root, "cilium/state/nodes/v1/home/home-node-2", &later).await?;
    until(&mut stream, &mut view, "the second home node", |v| {
        v.nodes.get(&("home".to_string(), "home-node-2".to_string())).is_some_and(|n| n.wireguard_pub_key == VM_KEY)
    })
    .await?;
    Ok(())
}
