//! The node agent's stream clients against identity-sync's real MeshView server (its tonic service and hub,
//! in-process) and a test EgressAssignments server, through a TCP proxy the test can cut. The agent drives the
//! in-memory datapath; the tests check what that datapath converges to and how much work each step took.
//!
//! No privileges needed: nothing here touches the kernel.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_api::v1 as pb;
use causeway_api::v1::egress_assignments_server::{EgressAssignments, EgressAssignmentsServer};
use causeway_api::v1::egress_watch_event::Kind as EKind;
use causeway_datapath::agent::model::{EgressVerdict, WgKey};
use causeway_datapath::agent::run::{self, AgentConfig, AgentMetrics};
use causeway_datapath::agent::{AgentCore, GcPolicy, InMemoryDatapath, LocalNode, MapContents};
use causeway_runtime::Health;
use causeway_store::validate::RemoteEntry;
use causeway_store::{ClusterId, ClusterName, IpCacheEntry, MaxConnectedClusters, Node, NodeAddress, RemoteContext};
use futures::Stream;
use identity_sync::core::{CoreConfig, MergedView};
use identity_sync::stream::{MeshViewHub, StreamConfig, StreamMetrics};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

const WEST: &str = "west";

// ------------------------------------------------------------------ identity-sync side (the real hub)

fn mesh_hub() -> Result<MeshViewHub> {
    let mut v = MergedView::new(CoreConfig::default());
    let mode = MaxConnectedClusters::C255;
    v.remote_added(WEST)?;
    v.remote_validated(RemoteContext {
        name: ClusterName::new(WEST).context("cluster name")?,
        id: ClusterId::new(2, mode).context("cluster id")?,
        mode,
    })?;
    Ok(MeshViewHub::new(v, StreamConfig::default(), StreamMetrics::default()))
}

fn pod_ip(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 2, 1, i))
}

fn put_pod(hub: &MeshViewHub, i: u8, identity: u32) -> Result<()> {
    let e = IpCacheEntry {
        ip: pod_ip(i),
        host_ip: Some("192.168.1.1".parse()?),
        id: (2 << 16) + identity,
        key: 0,
        metadata: String::new(),
        k8s_namespace: "shop".into(),
        k8s_pod_name: format!("pod-{i}"),
        k8s_pod_uid: None,
        k8s_service_account: None,
        named_ports: vec![],
    };
    hub.update(|v| v.entry_upsert(WEST, RemoteEntry::Ip(e)))?;
    Ok(())
}

fn delete_pod(hub: &MeshViewHub, i: u8) -> Result<()> {
    hub.update(|v| v.entry_delete(WEST, &format!("cilium/state/ip/v1/default/{}", pod_ip(i))))?;
    Ok(())
}

fn put_node(hub: &MeshViewHub, name: &str, ip: &str, cidr: &str, key: u8) -> Result<()> {
    let n = Node {
        name: name.into(),
        cluster: WEST.into(),
        addresses: vec![NodeAddress { kind: "InternalIP".into(), ip: ip.parse()? }],
        ipv4_alloc_cidr: Some(cidr.parse()?),
        ipv6_alloc_cidr: None,
        ipv4_health_ip: None,
        ipv4_ingress_ip: None,
        cluster_id: 2,
        source: "custom-resource".into(),
        encryption_key: 0,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        wireguard_pub_key: WgKey([key; 32]).to_base64(),
        boot_id: String::new(),
    };
    hub.update(|v| v.entry_upsert(WEST, RemoteEntry::Node(n)))?;
    Ok(())
}

// ------------------------------------------------------------------ test EgressAssignments server

/// A test stand-in for the egress-gw controller's EgressAssignments service: the same resumable protocol as
/// MeshView (snapshot, deltas, resume within an epoch from a delta log), over an in-memory policy set.
#[derive(Clone)]
struct TestEgressServer {
    state: Arc<Mutex<EgressState>>,
    epoch: u64,
}

#[derive(Default)]
struct EgressState {
    policies: BTreeMap<String, pb::EgressPolicyAssignment>,
    revision: u64,
    log: Vec<pb::EgressWatchEvent>,
    subs: Vec<mpsc::Sender<pb::EgressWatchEvent>>,
    snapshots: u64,
    resumes: u64,
}

type EgressStream = Pin<Box<dyn Stream<Item = Result<pb::EgressWatchEvent, Status>> + Send>>;

impl TestEgressServer {
    fn new(epoch: u64) -> Self {
        TestEgressServer { state: Arc::default(), epoch }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EgressState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, kind: EKind, policy: pb::EgressPolicyAssignment) {
        let mut st = self.lock();
        st.revision += 1;
        match kind {
            EKind::Delete => {
                st.policies.remove(&policy.name);
            }
            _ => {
                st.policies.insert(policy.name.clone(), policy.clone());
            }
        }
        let ev =
            pb::EgressWatchEvent { kind: kind as i32, revision: st.revision, epoch: self.epoch, policy: Some(policy) };
        st.log.push(ev.clone());
        st.subs.retain(|s| s.try_send(ev.clone()).is_ok());
    }

    /// Logs an upsert without sending it to the connected clients: a delta lost in transit. The next delta then
    /// arrives with a revision gap.
    fn upsert_lost_in_transit(&self, policy: pb::EgressPolicyAssignment) {
        let mut st = self.lock();
        st.revision += 1;
        st.policies.insert(policy.name.clone(), policy.clone());
        let ev = pb::EgressWatchEvent {
            kind: EKind::Upsert as i32,
            revision: st.revision,
            epoch: self.epoch,
            policy: Some(policy),
        };
        st.log.push(ev);
    }

    fn upsert(&self, p: pb::EgressPolicyAssignment) {
        self.publish(EKind::Upsert, p);
    }

    fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.snapshots, st.resumes)
    }
}

#[tonic::async_trait]
impl EgressAssignments for TestEgressServer {
    type WatchStream = EgressStream;

    async fn watch(&self, req: Request<pb::EgressWatchRequest>) -> Result<Response<EgressStream>, Status> {
        let req = req.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let mut st = self.lock();
        let ev = |kind: EKind, revision: u64, policy| pb::EgressWatchEvent {
            kind: kind as i32,
            revision,
            epoch: self.epoch,
            policy,
        };
        let first: Vec<pb::EgressWatchEvent> =
            if req.resume_revision != 0 && req.resume_epoch == self.epoch && req.resume_revision <= st.revision {
                st.resumes += 1;
                st.log.iter().filter(|e| e.revision > req.resume_revision).cloned().collect()
            } else {
                st.snapshots += 1;
                let rev = st.revision;
                std::iter::once(ev(EKind::SnapshotBegin, rev, None))
                    .chain(st.policies.values().map(|p| ev(EKind::Upsert, rev, Some(p.clone()))))
                    .chain(std::iter::once(ev(EKind::SnapshotEnd, rev, None)))
                    .collect()
            };
        st.subs.push(tx);
        let live = tokio_stream::wrappers::ReceiverStream::new(rx);
        let all = futures::StreamExt::chain(futures::stream::iter(first), live);
        Ok(Response::new(Box::pin(futures::StreamExt::map(all, Ok))))
    }
}

fn policy(name: &str, dst: &[&str], excl: &[&str], sources: &[&str], gw: &str) -> pb::EgressPolicyAssignment {
    pb::EgressPolicyAssignment {
        name: name.into(),
        generation: 1,
        destination_cidrs: dst.iter().map(|s| s.to_string()).collect(),
        excluded_cidrs: excl.iter().map(|s| s.to_string()).collect(),
        source_ips: sources.iter().map(|s| s.to_string()).collect(),
        groups: vec![pb::EgressGroupAssignment {
            egress_ips: vec!["192.0.2.10".into()],
            gateways: vec![pb::GatewayAssignment { node_ip: gw.into(), egress_ips: vec![] }],
        }],
    }
}

// ------------------------------------------------------------------ plumbing

/// Serves a tonic service on 127.0.0.1:0; the task runs until the test ends. (A macro: tonic's bounds on a
/// generic service are long, and there are only two services.)
macro_rules! serve {
    ($svc:expr) => {{
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let svc = $svc;
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await {
                eprintln!("test gRPC server stopped: {e}");
            }
        });
        addr
    }};
}

/// A TCP proxy between the agent and a server: `cut` kills every connection and refuses new ones until `resume`,
/// which is what the agent sees when the server's pod or the network goes away. `retarget` points it at another
/// server (a restarted identity-sync with a new epoch).
struct Proxy {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = Arc::new(Mutex::new(target));
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (t, o, c) = (target.clone(), open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let to = *t.lock().unwrap_or_else(|e| e.into_inner());
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap_or_else(|e| e.into_inner()).push(h);
            }
        });
        Ok(Proxy { addr, target, open, conns, accept })
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for h in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            h.abort();
        }
    }

    fn resume(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    fn retarget(&self, to: SocketAddr) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

struct RunningAgent {
    dp: InMemoryDatapath,
    health: Health,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<AgentCore>,
}

impl RunningAgent {
    fn start(mesh: SocketAddr, egress: SocketAddr, dp: InMemoryDatapath) -> RunningAgent {
        let cfg = AgentConfig {
            local: LocalNode::new("node-a", "192.168.0.1".parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)), 51871),
            mesh_endpoint: Some(mesh.to_string()),
            egress_endpoint: Some(format!("http://{egress}")),
            gc: GcPolicy::default(),
            gc_interval: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(300),
        };
        let health = Health::new();
        let metrics = AgentMetrics::default();
        metrics.register(&health);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run::run(cfg, dp.clone(), health.clone(), metrics, async {
            let _ = stopped.await;
        }));
        RunningAgent { dp, health, stop: Some(stop), task }
    }

    async fn stop(mut self) -> Result<AgentCore> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        Ok((&mut self.task).await?)
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `pred` holds for the datapath's contents (a hang guard, not a timing assertion).
async fn converge(dp: &InMemoryDatapath, what: &str, pred: impl Fn(&MapContents) -> bool) -> Result<MapContents> {
    for _ in 0..2000 {
        let c = dp.contents();
        if pred(&c) {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("datapath never reached: {what}; it holds {:#?}", dp.contents())
}

async fn until(what: &str, pred: impl Fn() -> bool) -> Result<()> {
    for _ in 0..2000 {
        if pred() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("never happened: {what}")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

fn has_pod(c: &MapContents, i: u8) -> bool {
    c.ipcache.contains_key(&ipnet::IpNet::from(pod_ip(i)))
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn snapshot_deltas_resume_and_restart_converge_the_datapath() -> Result<()> {
    let hub = mesh_hub()?;
    put_pod(&hub, 5, 100)?;
    put_pod(&hub, 6, 101)?;
    put_node(&hub, "w1", "192.168.1.1", "10.2.1.0/24", 1)?;
    let egress = TestEgressServer::new(7);
    egress.upsert(policy(
        "billing",
        &["203.0.113.0/24"],
        &["203.0.113.128/25"],
        &["10.1.0.5", "10.1.0.6"],
        "192.168.0.7",
    ));
    // Garbage from the controller is left out, not fatal.
    egress.upsert(policy(
        "reports",
        &["198.51.100.0/24", "not-a-cidr"],
        &[],
        &["10.1.0.6", "10.1.0.999"],
        "192.168.0.8",
    ));

    let mesh_proxy = Proxy::start(serve!(hub.server())).await?;
    let egress_proxy = Proxy::start(serve!(EgressAssignmentsServer::new(egress.clone()))).await?;
    let agent = RunningAgent::start(mesh_proxy.addr, egress_proxy.addr, InMemoryDatapath::new());

    // 1. Snapshots: everything from both streams is programmed.
    let c = converge(&agent.dp, "both snapshots", |c| {
        has_pod(c, 5) && has_pod(c, 6) && c.wg_peers.len() == 1 && c.egress_src.len() == 2
    })
    .await?;
    assert_eq!(c.ipcache.len(), 4, "2 pods, the node's pod CIDR, the node IP: {:?}", c.ipcache.keys());
    assert_eq!(c.routes.len(), 1);
    assert_eq!(c.wg_peers[&WgKey([1; 32])].endpoint, (ip("192.168.1.1"), 51871));
    assert!(matches!(c.egress_lookup(ip("10.1.0.5"), ip("203.0.113.9")), Some(EgressVerdict::Steer(_))));
    assert_eq!(c.egress_lookup(ip("10.1.0.5"), ip("203.0.113.200")), Some(EgressVerdict::Excluded));
    assert!(matches!(c.egress_lookup(ip("10.1.0.6"), ip("198.51.100.1")), Some(EgressVerdict::Steer(_))));
    assert_eq!(c.egress_lookup(ip("10.1.0.5"), ip("198.51.100.1")), None);
    until("ready", || agent.health.is_ready()).await?;
    let metrics = agent.health.render_metrics();
    assert!(metrics.contains(r#"causeway_node_agent_map_entries{map="ipcache"} 4"#), "{metrics}");
    assert!(
        metrics
            .contains(r#"causeway_node_agent_stream_rejected_total{stream="egress",reason="bad_destination_cidr"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"causeway_node_agent_stream_rejected_total{stream="egress",reason="bad_source_ip"} 1"#),
        "{metrics}"
    );

    // 2. Deltas: one pod added, one removed, one pod joins a policy.
    put_pod(&hub, 7, 102)?;
    delete_pod(&hub, 6)?;
    egress.upsert(policy(
        "billing",
        &["203.0.113.0/24"],
        &["203.0.113.128/25"],
        &["10.1.0.5", "10.1.0.6", "10.1.0.7"],
        "192.168.0.7",
    ));
    let c = converge(&agent.dp, "deltas", |c| has_pod(c, 7) && !has_pod(c, 6) && c.egress_src.len() == 3).await?;
    assert_eq!(c.egress_src[&ip("10.1.0.7")], c.egress_src[&ip("10.1.0.5")], "the new pod joins the existing class");

    // 3. The connections drop while both servers keep running and change; the agent resumes from its revision and
    //    gets only the missed deltas (no second snapshot), and applies exactly those changes.
    let before_ops = agent.dp.ops_applied();
    mesh_proxy.cut();
    egress_proxy.cut();
    put_pod(&hub, 8, 103)?;
    delete_pod(&hub, 5)?;
    egress.publish(EKind::Delete, pb::EgressPolicyAssignment { name: "reports".into(), ..Default::default() });
    tokio::time::sleep(Duration::from_millis(200)).await; // let the agent notice and retry against the closed proxy
    mesh_proxy.resume();
    egress_proxy.resume();
    let c = converge(&agent.dp, "resumed deltas", |c| {
        has_pod(c, 8) && !has_pod(c, 5) && c.egress_lookup(ip("10.1.0.6"), ip("198.51.100.1")).is_none()
    })
    .await?;
    assert_eq!(c.egress_src[&ip("10.1.0.6")], c.egress_src[&ip("10.1.0.5")], "10.1.0.6 is now only in billing");
    assert_eq!(hub.metrics().snapshots_sent.get(), 1, "the mesh stream resumed without a snapshot");
    assert!(hub.metrics().resumes.get() >= 1);
    let (snaps, resumes) = egress.counts();
    assert_eq!(snaps, 1, "the egress stream resumed without a snapshot");
    assert!(resumes >= 1);
    // Exactly the missed changes: ipcache +pod 8, -pod 5; egress: 10.1.0.6 moves to billing's existing class (one
    // SRC upsert), the {billing, reports} class's 3 LPM entries and reports' group go.
    assert_eq!(agent.dp.ops_applied() - before_ops, 2 + 1 + 3 + 1);
    assert!(agent
        .health
        .render_metrics()
        .contains(r#"causeway_node_agent_stream_reconnects_total{stream="meshview"}"#));

    // 4. identity-sync restarts: a new process (new epoch) with a view that lost pod 7 and node w1 but has pod 9.
    //    The agent's resume point is unknown there, so it gets a snapshot; the stale entries go, the rest stays.
    let hub2 = mesh_hub()?;
    put_pod(&hub2, 8, 103)?;
    put_pod(&hub2, 9, 104)?;
    let addr2 = serve!(hub2.server());
    mesh_proxy.retarget(addr2);
    mesh_proxy.cut();
    let before_ops = agent.dp.ops_applied();
    mesh_proxy.resume();
    let c = converge(&agent.dp, "snapshot from the restarted server", |c| {
        has_pod(c, 9) && !has_pod(c, 7) && c.wg_peers.is_empty()
    })
    .await?;
    assert_eq!(hub2.metrics().snapshots_sent.get(), 1);
    assert!(has_pod(&c, 8));
    assert_eq!(c.ipcache.len(), 2);
    assert!(c.routes.is_empty());
    // +pod 9, -pod 7, -node CIDR, -node IP, -route, -peer: a snapshot is diffed, not re-programmed.
    assert_eq!(agent.dp.ops_applied() - before_ops, 6);
    // Egress was not disturbed.
    assert!(matches!(c.egress_lookup(ip("10.1.0.7"), ip("203.0.113.9")), Some(EgressVerdict::Steer(_))));

    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_restarted_agent_reads_back_the_maps_and_applies_nothing() -> Result<()> {
    let hub = mesh_hub()?;
    for i in 1..=20 {
        put_pod(&hub, i, 100 + u32::from(i))?;
    }
    put_node(&hub, "w1", "192.168.1.1", "10.2.1.0/24", 1)?;
    let egress = TestEgressServer::new(3);
    egress.upsert(policy("a", &["203.0.113.0/24"], &[], &["10.1.0.1", "10.1.0.2"], "192.168.0.7"));
    egress.upsert(policy("b", &["198.51.100.0/24"], &[], &["10.1.0.2", "10.1.0.3"], "192.168.0.8"));
    let mesh_addr = serve!(hub.server());
    let egress_addr = serve!(EgressAssignmentsServer::new(egress.clone()));

    let first = RunningAgent::start(mesh_addr, egress_addr, InMemoryDatapath::new());
    until("first agent ready", || first.health.is_ready()).await?;
    let pinned = first.dp.contents();
    assert_eq!(pinned.egress_src.len(), 3);
    assert_eq!(pinned.ipcache.len(), 22);
    first.stop().await?;

    // The "pinned maps" survive the process; a new agent adopts their ids and finds nothing to do.
    let second = RunningAgent::start(mesh_addr, egress_addr, InMemoryDatapath::with_contents(pinned.clone()));
    until("second agent ready", || second.health.is_ready()).await?;
    assert_eq!(second.dp.ops_applied(), 0, "a restart re-programs nothing that is already right");
    assert_eq!(second.dp.contents(), pinned);

    // And it keeps working from there.
    put_pod(&hub, 30, 130)?;
    converge(&second.dp, "pod 30", |c| has_pod(c, 30)).await?;
    assert_eq!(second.dp.ops_applied(), 1);
    second.stop().await?;
    Ok(())
}

/// Kills the child process on drop, even when the test panics.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::test]
async fn the_binary_runs_the_pipeline_in_dry_run_and_refuses_without_it() -> Result<()> {
    let bin = env!("CARGO_BIN_EXE_causeway-node-agent");
    // Without --dry-run and without interfaces to program it refuses rather than guess, and points at --dry-run.
    let out = std::process::Command::new(bin)
        .args(["--node-name", "node-a", "--node-ip", "192.168.0.1", "--identity-sync-addr", "127.0.0.1:1"])
        .env_remove("CAUSEWAY_DRY_RUN")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dry-run"), "{err}");

    let hub = mesh_hub()?;
    put_pod(&hub, 5, 100)?;
    put_node(&hub, "w1", "192.168.1.1", "10.2.1.0/24", 1)?;
    let egress = TestEgressServer::new(5);
    egress.upsert(policy("billing", &["203.0.113.0/24"], &[], &["10.1.0.5", "10.1.0.6"], "192.168.0.7"));
    let mesh_addr = serve!(hub.server());
    let egress_addr = serve!(EgressAssignmentsServer::new(egress.clone()));
    let port = free_port()?;
    let _child = Child(
        std::process::Command::new(bin)
            .args(["--dry-run", "--node-name", "node-a", "--node-ip", "192.168.0.1"])
            .args(["--identity-sync-addr", &mesh_addr.to_string(), "--egress-addr", &egress_addr.to_string()])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}"), "--log-format", "json"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut metrics = String::new();
    for _ in 0..2000 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                metrics = http.get(format!("{base}/metrics")).send().await?.text().await?;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!metrics.is_empty(), "the agent never became ready");
    assert!(metrics.contains(r#"causeway_node_agent_map_entries{map="ipcache"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"causeway_node_agent_map_entries{map="egress_src"} 2"#), "{metrics}");
    assert!(metrics.contains(r#"causeway_node_agent_map_entries{map="wireguard_peers"} 1"#), "{metrics}");
    assert!(metrics.contains("causeway_node_agent_egress_classes 1"), "{metrics}");
    assert!(metrics.contains(r#"causeway_node_agent_ops_applied_total{map="egress_lpm",op="upsert"} 1"#), "{metrics}");
    let health = http.get(format!("{base}/healthz")).send().await?;
    assert!(health.status().is_success());
    Ok(())
}

#[tokio::test]
async fn a_revision_gap_makes_the_agent_reconnect_and_replay_what_it_missed() -> Result<()> {
    let hub = mesh_hub()?;
    put_pod(&hub, 5, 100)?;
    let egress = TestEgressServer::new(9);
    egress.upsert(policy("a", &["203.0.113.0/24"], &[], &["10.1.0.1"], "192.168.0.7"));
    let mesh_addr = serve!(hub.server());
    let egress_addr = serve!(EgressAssignmentsServer::new(egress.clone()));
    let agent = RunningAgent::start(mesh_addr, egress_addr, InMemoryDatapath::new());
    until("ready", || agent.health.is_ready()).await?;

    // Policy b's delta never reaches the agent; policy c's arrives with a gap in revisions.
    egress.upsert_lost_in_transit(policy("b", &["198.51.100.0/24"], &[], &["10.1.0.2"], "192.168.0.7"));
    egress.upsert(policy("c", &["192.0.2.0/24"], &[], &["10.1.0.3"], "192.168.0.7"));
    let c = converge(&agent.dp, "b and c after the replay", |c| c.egress_src.len() == 3).await?;
    assert!(matches!(c.egress_lookup(ip("10.1.0.2"), ip("198.51.100.1")), Some(EgressVerdict::Steer(_))));
    assert!(matches!(c.egress_lookup(ip("10.1.0.3"), ip("192.0.2.1")), Some(EgressVerdict::Steer(_))));
    let (snapshots, resumes) = egress.counts();
    assert_eq!((snapshots, resumes), (1, 1), "the agent resumed from the revision before the gap");
    let metrics = agent.health.render_metrics();
    assert!(metrics.contains(r#"causeway_node_agent_stream_reconnects_total{stream="egress"} 1"#), "{metrics}");
    agent.stop().await?;
    Ok(())
}
