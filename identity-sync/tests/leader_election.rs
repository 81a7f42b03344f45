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

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use causeway_api::v1::watch_event::{Kind as EvKind, Object};
use causeway_api::v1::WatchEvent;
use causeway_leader::{LeaderMetrics, Leadership, LeaseConfig, Timing as LeaseTiming};
use causeway_testsupport::Etcd;
use common::{
    create_global_cart, create_namespace, fake_kube, http_get, kube_client, put_remote, put_service, remote_file,
    service, slice_backends, status, test_config, wait_for, watch, PATIENCE,
};
use identity_sync::app::{self, AppConfig, Running};
use identity_sync::election::Election;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use tonic::Streaming;

const LEASE_TIMING: LeaseTiming = LeaseTiming {
    lease_duration: Duration::from_secs(2),
    renew_deadline: Duration::from_millis(1500),
    retry_period: Duration::from_millis(200),
};

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
        let cfg = AppConfig { watch_external_workloads: false, ..test_config(dir)? };
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

    let (server, client) = fake_kube().await?;
    create_global_cart(&client).await?;
    create_namespace(&client, "causeway").await?;
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

/// The real binary with `--leader-elect` against the fake kube API: it takes the Lease (named by POD_NAME), and on
/// SIGTERM gives it up (no holder left) and exits 0, so a standby takes over at once rather than after the lease
/// duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_holds_the_lease_and_gives_it_up_on_sigterm() -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    let (server, client) = fake_kube().await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let remotes = dir.path().join("remotes");
    std::fs::create_dir_all(&remotes)?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_identity-sync"))
        .args(["--cluster-name", "west", "--cluster-id", "2", "--metrics-addr", "127.0.0.1:0"])
        .args(["--grpc-addr", "127.0.0.1:0", "--remotes-dir"])
        .arg(&remotes)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--leader-elect", "--leader-elect-namespace", "default", "--leader-elect-retry-period", "200ms"])
        .args(["--watch-external-workloads", "false"])
        .env("POD_NAME", "identity-sync-0")
        .env_remove("CAUSEWAY_LEADER_ELECT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let holder = || async {
        let lease = leases.get_opt("causeway-identity-sync").await.ok().flatten();
        lease.and_then(|l| l.spec).and_then(|s| s.holder_identity).filter(|h| !h.is_empty())
    };
    let took = tokio::time::timeout(PATIENCE, async {
        loop {
            if holder().await.is_some_and(|h| h.starts_with("identity-sync-0_")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if took.is_err() {
        let _ = child.kill();
        let out = child.wait_with_output()?;
        bail!("the binary never took the Lease:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = tokio::time::timeout(PATIENCE, waited).await.context("no exit after SIGTERM")???;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit on SIGTERM: {}\n{stderr}", out.status);
    assert_eq!(holder().await, None, "the Lease still names a holder after a clean shutdown\n{stderr}");
    Ok(())
}
