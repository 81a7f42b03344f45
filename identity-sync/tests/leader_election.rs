//! Two identity-sync replicas with leader election on one (fake) kube API, in-process, each in its own tokio runtime
//! so that one can be killed outright (runtime shut down: every task gone, the Lease not released), as a crashed
//! pod would be.
//!
//! Remote "east" (ID 1) and "north" (ID 3) share a real etcd; the local cluster "west" (ID 2) has the global
//! Service shop/cart. Checks: both replicas import the remotes and serve the MeshView stream; only the leader writes
//! EndpointSlices (the standby's write counter stays at 0 through a change the leader writes); /status names each
//! replica's role and the holder. Then the leader dies without releasing the Lease: the standby takes over, and the
//! changes made after that (a new backend in east, north removed) are written by it, including the delete of
//! north's slice, which the dead leader had written.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use causeway_api::v1::mesh_view_client::MeshViewClient;
use causeway_api::v1::watch_event::{Kind as EvKind, Object};
use causeway_api::v1::{WatchEvent, WatchRequest};
use causeway_leader::{LeaderMetrics, Leadership, LeaseConfig, Timing as LeaseTiming};
use causeway_store::values::Capabilities;
use causeway_store::{ClusterConfig, ClusterService, Kind, MaxConnectedClusters, PortConfig};
use causeway_testsupport::Etcd;
use fake_kube_apiserver::FakeApiServer;
use identity_sync::app::{self, AppConfig, Running};
use identity_sync::election::Election;
use identity_sync::remotes::task::Timing;
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Streaming;

/// Guards against hangs only; nothing asserts on timing.
const PATIENCE: Duration = Duration::from_secs(60);

const LEASE_TIMING: LeaseTiming = LeaseTiming {
    lease_duration: Duration::from_secs(2),
    renew_deadline: Duration::from_millis(1500),
    retry_period: Duration::from_millis(200),
};

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

fn service(cluster: &str, id: u32, backends: &[&str]) -> ClusterService {
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

async fn put_service(etcd: &mut etcd_client::Client, s: &ClusterService) -> anyhow::Result<()> {
    let key = format!("cilium/state/services/v1/{}/shop/cart", s.cluster);
    etcd.put(key, serde_json::to_vec(s)?, None).await?;
    Ok(())
}

async fn put_remote(etcd: &mut etcd_client::Client, cluster: &str, id: u32, backend: &str) -> anyhow::Result<()> {
    etcd.put("cilium/.has-cluster-config", "true", None).await?;
    let cfg = ClusterConfig {
        id,
        capabilities: Capabilities {
            synced_canaries: true,
            max_connected_clusters: 255,
            service_exports_enabled: None,
        },
    };
    etcd.put(format!("cilium/cluster-config/{cluster}"), serde_json::to_vec(&cfg)?, None).await?;
    put_service(etcd, &service(cluster, id, &[backend])).await?;
    for kind in [Kind::Nodes, Kind::Services, Kind::Ip, Kind::Identities] {
        etcd.put(kind.canary_key(cluster), "2026-01-01T00:00:00Z", None).await?;
    }
    Ok(())
}

fn remote_file(dir: &Path, name: &str, endpoint: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("endpoints:\n- {endpoint}\n"))?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

async fn status(addr: SocketAddr) -> Value {
    match http_get(addr, "/status").await {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// EndpointSlice writes this replica made (every op and result), from its /metrics.
async fn slice_writes(addr: SocketAddr) -> anyhow::Result<u64> {
    let (code, text) = http_get(addr, "/metrics").await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    let mut sum = 0;
    for line in text.lines().filter(|l| l.starts_with("causeway_identity_sync_endpointslice_writes_total{")) {
        let v = line.rsplit(' ').next().unwrap_or_default();
        sum += v.parse::<u64>().with_context(|| format!("metric line {line:?}"))?;
    }
    Ok(sum)
}

/// Remote backend addresses in the managed slices of shop/cart, by source cluster.
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
        entry.sort();
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
        watch_external_workloads: false,
    })
}

async fn kube_client(kubeconfig: &str) -> anyhow::Result<kube::Client> {
    let kc = Kubeconfig::from_yaml(kubeconfig)?;
    Ok(kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)?)
}

/// One identity-sync replica as `main.rs` wires it with `--leader-elect`, on a runtime of its own.
struct Replica {
    identity: String,
    running: Running,
    metrics: LeaderMetrics,
    runtime: Option<tokio::runtime::Runtime>,
    // Dropped with the replica: its election task is aborted, the Lease is not given up.
    _leadership: Leadership,
}

impl Replica {
    async fn start(identity: &str, kubeconfig: String, dir: &Path) -> anyhow::Result<Replica> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let cfg = test_config(dir)?;
        let lease = LeaseConfig {
            namespace: "causeway".into(),
            name: "causeway-identity-sync".into(),
            identity: identity.into(),
            timing: LEASE_TIMING,
        };
        let metrics = LeaderMetrics::default();
        let (m, id) = (metrics.clone(), identity.to_string());
        // The kube client is built on the replica's runtime: its connection tasks must die with it.
        let (running, leadership) = runtime
            .spawn(async move {
                let client = kube_client(&kubeconfig).await?;
                let leadership = Leadership::spawn(client.clone(), lease, m.clone())?;
                let election = Election::of(&leadership, &id);
                let running = app::start_elected(cfg, client, election).await?;
                running.health.with_registry(|r| m.register(r));
                anyhow::Ok((running, leadership))
            })
            .await??;
        Ok(Replica { identity: identity.into(), running, metrics, runtime: Some(runtime), _leadership: leadership })
    }

    fn addr(&self) -> SocketAddr {
        self.running.metrics_addr
    }

    async fn role(&self) -> (String, String) {
        let s = status(self.addr()).await;
        let l = &s["leader"];
        (l["role"].as_str().unwrap_or_default().to_string(), l["holder"].as_str().unwrap_or_default().to_string())
    }

    /// Kills the replica as a crash would: every task stops where it is.
    fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn watch(addr: SocketAddr) -> anyhow::Result<Streaming<WatchEvent>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let req = WatchRequest { resume_revision: 0, node_name: "test-agent".into(), resume_epoch: 0 };
    Ok(MeshViewClient::new(ch).watch(req).await?.into_inner())
}

/// Reads the stream until shop/cart's backends (sorted `cluster/ip`) are `want`.
async fn stream_until(s: &mut Streaming<WatchEvent>, who: &str, want: &[&str]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut have: Vec<String> = Vec::new();
    while have != want {
        let e = match tokio::time::timeout_at(deadline, s.message()).await {
            Err(_) => bail!("{who}'s stream: timed out waiting for backends {want:?} (last {have:?})"),
            Ok(Err(e)) => bail!("{who}'s stream failed: {e}"),
            Ok(Ok(None)) => bail!("{who}'s stream ended"),
            Ok(Ok(Some(e))) => e,
        };
        if let (Ok(kind), Some(Object::Service(svc))) = (EvKind::try_from(e.kind), e.object) {
            if (svc.namespace.as_str(), svc.name.as_str()) == ("shop", "cart") {
                have = match kind {
                    EvKind::Upsert => svc.backends.iter().map(|b| format!("{}/{}", b.cluster, b.ip)).collect(),
                    _ => Vec::new(),
                };
                have.sort();
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_endpointslices_and_the_standby_takes_over_when_it_dies() -> anyhow::Result<()> {
    causeway_runtime::init_logging(causeway_runtime::LogFormat::Text);
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    put_remote(&mut c, "east", 1, "10.1.0.1").await?;
    put_remote(&mut c, "north", 3, "10.3.0.1").await?;

    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let client = kube_client(&server.kubeconfig_yaml()).await?;
    for ns in ["shop", "causeway"] {
        let ns =
            Namespace { metadata: ObjectMeta { name: Some(ns.into()), ..Default::default() }, ..Default::default() };
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    }
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
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    let dir = tempfile::tempdir()?;
    remote_file(dir.path(), "east", &etcd.endpoint())?;
    remote_file(dir.path(), "north", &etcd.endpoint())?;

    // "a" starts first and takes the Lease; "b" then finds it held.
    let a = Replica::start("a", server.kubeconfig_yaml(), dir.path()).await?;
    wait_for("a leads", || async { a.role().await.0 == "leader" }).await?;
    let b = Replica::start("b", server.kubeconfig_yaml(), dir.path()).await?;
    wait_for("b stands by", || async { b.role().await == ("standby".to_string(), "a".to_string()) }).await?;
    let (ra, rb) = (status(a.addr()).await, status(b.addr()).await);
    assert_eq!(ra["leader"]["identity"], "a", "{ra:#}");
    assert_eq!(ra["leader"]["holder"], "a", "{ra:#}");
    assert_eq!(ra["leader"]["lease"], "causeway/causeway-identity-sync", "{ra:#}");
    assert_eq!(rb["leader"]["enabled"], true, "{rb:#}");

    let both = ["east", "north"].map(String::from);
    wait_for("the leader's slices for east and north", || async {
        let b = slice_backends(&slices).await;
        b.get("east") == Some(&vec!["10.1.0.1".to_string()]) && b.get("north") == Some(&vec!["10.3.0.1".to_string()])
    })
    .await?;
    // Both are ready: the standby does not wait for a writer it does not run.
    for r in [&a, &b] {
        wait_for(&format!("{}'s /readyz", r.identity), || async {
            matches!(http_get(r.addr(), "/readyz").await, Ok((200, _)))
        })
        .await?;
    }
    // Both serve the stream, with both remotes' backends.
    let mut stream_a = watch(a.running.grpc_addr).await?;
    let mut stream_b = watch(b.running.grpc_addr).await?;
    stream_until(&mut stream_a, "a", &["east/10.1.0.1", "north/10.3.0.1"]).await?;
    stream_until(&mut stream_b, "b", &["east/10.1.0.1", "north/10.3.0.1"]).await?;

    // A change while a leads: written once (by a), seen by both.
    put_service(&mut c, &service("east", 1, &["10.1.0.1", "10.1.0.2"])).await?;
    wait_for("east's second backend in the slice", || async {
        slice_backends(&slices).await.get("east").is_some_and(|b| b.len() == 2)
    })
    .await?;
    stream_until(&mut stream_b, "b", &["east/10.1.0.1", "east/10.1.0.2", "north/10.3.0.1"]).await?;
    assert!(slice_writes(a.addr()).await? >= 3, "the leader wrote the slices");
    assert_eq!(slice_writes(b.addr()).await?, 0, "the standby wrote EndpointSlices");
    assert_eq!(b.metrics.acquired.get(), 0, "b led at some point (a failed to renew: a very slow machine?)");
    assert!(b.running.status.report().remotes.iter().all(|r| both.contains(&r.name)));

    // a dies without giving the Lease up. b takes over once the Lease expires, and what changes from then on is
    // written by b: a new backend in east, and north removed (the slice a wrote is deleted).
    a.kill();
    put_service(&mut c, &service("east", 1, &["10.1.0.1", "10.1.0.2", "10.1.0.3"])).await?;
    std::fs::remove_file(dir.path().join("north"))?;
    wait_for("b leads", || async { b.role().await == ("leader".to_string(), "b".to_string()) }).await?;
    wait_for("b's writes: east's third backend, north's slice deleted", || async {
        let s = slice_backends(&slices).await;
        s.get("east").is_some_and(|b| b.len() == 3) && !s.contains_key("north")
    })
    .await?;
    assert!(slice_writes(b.addr()).await? >= 2, "the new leader wrote the apply and the delete");
    assert_eq!(b.metrics.leader.get(), 1);
    stream_until(&mut stream_b, "b", &["east/10.1.0.1", "east/10.1.0.2", "east/10.1.0.3"]).await?;
    drop(b);
    server.shutdown().await?;
    Ok(())
}

/// The binary refuses leader election where there is nothing to elect (a VM, no kube API) and without the Lease's
/// namespace, saying what to change.
#[test]
fn the_binary_refuses_leader_election_without_a_kube_api_or_a_namespace() -> anyhow::Result<()> {
    let bin = env!("CARGO_BIN_EXE_identity-sync");
    let run = |args: &[&str]| -> anyhow::Result<(bool, String)> {
        let out = std::process::Command::new(bin)
            .args(["--cluster-name", "west", "--cluster-id", "2", "--metrics-addr", "127.0.0.1:0"])
            .args(["--grpc-addr", "127.0.0.1:0", "--remotes-dir", "/nonexistent"])
            .args(args)
            .env_remove("POD_NAMESPACE")
            .env_remove("CAUSEWAY_LEADER_ELECT")
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).to_string()))
    };
    let (ok, err) = run(&["--external-workload", "--leader-elect"])?;
    assert!(!ok && err.contains("--leader-elect") && err.contains("--external-workload"), "{err}");
    let (ok, err) = run(&["--leader-elect", "--kubeconfig", "/nonexistent"])?;
    assert!(!ok && err.contains("POD_NAMESPACE"), "{err}");
    Ok(())
}
