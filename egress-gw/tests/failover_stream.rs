//! The controller end to end, minus the datapath: the fake kube API server (the only stand-in) holds nodes, a pod
//! and a policy; the real controller, prober, assignment hub and gRPC server run as in the binary; UDP responders
//! on loopback addresses play the gateway nodes' agents; a tonic client watches as a worker node. A gateway that
//! stops answering probes must disappear from that node's stream, replaced by the other gateway.
//!
//! The time from silencing the gateway to the stream update is printed (a figure, not an assertion).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use causeway_api::probe::{Probe, FLAG_GATEWAY_READY};
use causeway_api::v1::egress_assignments_client::EgressAssignmentsClient;
use causeway_api::v1::egress_watch_event::Kind;
use causeway_api::v1::{EgressPolicyAssignment, EgressWatchEvent, EgressWatchRequest};
use causeway_crds::EgressGatewayPolicy;
use causeway_egress_gw::core::HealthConfig;
use causeway_egress_gw::kube::{spawn_watchers, Controller};
use causeway_egress_gw::probe::{self, ProbeConfig, ProbeMetrics};
use causeway_egress_gw::server::{serve, AssignmentHub, StreamConfig, StreamMetrics};
use fake_kube_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{Namespace as KNamespace, Node as KNode, Pod as KPod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt};
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(30);

/// A node agent's probe responder that can be silenced.
struct Agent {
    answering: Arc<AtomicBool>,
    last_answer: Arc<std::sync::Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn agent(sock: UdpSocket, name: &str) -> Agent {
    let answering = Arc::new(AtomicBool::new(true));
    let last_answer = Arc::new(std::sync::Mutex::new(None));
    let name = name.to_string();
    let task = tokio::spawn({
        let answering = answering.clone();
        let last_answer = last_answer.clone();
        async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let Ok(p) = Probe::decode(&buf[..n]) else { continue };
                if answering.load(Ordering::Acquire) {
                    let _ = sock.send_to(&p.reply(&name, FLAG_GATEWAY_READY), from).await;
                    if let Ok(mut t) = last_answer.lock() {
                        *t = Some(Instant::now());
                    }
                }
            }
        }
    });
    Agent { answering, last_answer, task }
}

/// Sockets on 127.0.0.2 and 127.0.0.3 sharing one port: two "nodes", one probe port.
async fn gateway_sockets() -> Result<(UdpSocket, UdpSocket, u16)> {
    for _ in 0..50 {
        let a = UdpSocket::bind("127.0.0.2:0").await?;
        let port = a.local_addr()?.port();
        if let Ok(b) = UdpSocket::bind(("127.0.0.3", port)).await {
            return Ok((a, b, port));
        }
    }
    bail!("no port free on both 127.0.0.2 and 127.0.0.3")
}

async fn create<K>(api: &Api<K>, value: serde_json::Value) -> Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    api.create(&PostParams::default(), &serde_json::from_value::<K>(value)?).await?;
    Ok(())
}

fn node(name: &str, zone: &str, ip: &str, gateway: bool) -> serde_json::Value {
    let mut labels = json!({"topology.kubernetes.io/zone": zone});
    if gateway {
        labels["egress-gw"] = json!("true");
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {
            "egress.causeway.io/interfaces": format!("{{\"eth0\": [\"{ip}\"], \"eth1\": [\"192.0.2.20\"]}}"),
            "egress.causeway.io/default-interface": "eth0"
        }},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    })
}

async fn cluster(client: &Client) -> Result<()> {
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &EgressGatewayPolicy::crd())
        .await?;
    create(
        &Api::<KNamespace>::all(client.clone()),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    )
    .await?;
    let nodes = Api::<KNode>::all(client.clone());
    for (name, zone, ip, gw) in [
        ("gw-a", "eu-1a", "127.0.0.2", true),
        ("gw-b", "eu-1b", "127.0.0.3", true),
        ("w1", "eu-1a", "127.0.0.4", false),
    ] {
        create(&nodes, node(name, zone, ip, gw)).await?;
        let patch = json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
        nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    let pods = Api::<KPod>::namespaced(client.clone(), "shop");
    create(
        &pods,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "billing-1", "namespace": "shop", "labels": {"app": "billing"}},
               "spec": {"nodeName": "w1", "containers": [{"name": "c", "image": "i"}]}}),
    )
    .await?;
    let patch = json!({"status": {"phase": "Running", "podIP": "10.0.1.5", "podIPs": [{"ip": "10.0.1.5"}]}});
    pods.patch_status("billing-1", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    create(
        &Api::<EgressGatewayPolicy>::all(client.clone()),
        json!({"apiVersion": "causeway.io/v1alpha1", "kind": "EgressGatewayPolicy",
               "metadata": {"name": "partner-api"},
               "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "billing"}}}],
                        "destinationCIDRs": ["198.51.100.0/24"],
                        "azAffinity": "localOnlyFirst",
                        "egressGroups": [{"nodeSelector": {"matchLabels": {"egress-gw": "true"}},
                                          "egressIP": "192.0.2.20"}]}}),
    )
    .await?;
    Ok(())
}

/// A node agent's view of the stream: applies events, replacing everything at each SNAPSHOT_END.
#[derive(Default)]
struct View {
    policies: BTreeMap<String, EgressPolicyAssignment>,
    staging: Option<BTreeMap<String, EgressPolicyAssignment>>,
}

impl View {
    fn apply(&mut self, e: EgressWatchEvent) {
        match (Kind::try_from(e.kind).unwrap_or(Kind::Unspecified), e.policy) {
            (Kind::SnapshotBegin, _) => self.staging = Some(BTreeMap::new()),
            (Kind::SnapshotEnd, _) => self.policies = self.staging.take().unwrap_or_default(),
            (Kind::Upsert, Some(p)) => {
                let target = self.staging.as_mut().unwrap_or(&mut self.policies);
                target.insert(p.name.clone(), p);
            }
            (Kind::Delete, Some(p)) => {
                self.policies.remove(&p.name);
            }
            _ => {}
        }
    }

    fn gateways(&self, policy: &str) -> Option<Vec<String>> {
        let g = self.policies.get(policy)?.groups.first()?;
        Some(g.gateways.iter().map(|g| g.node_ip.clone()).collect())
    }

    /// Applies events until `want` gateways are active for `policy`.
    async fn until(&mut self, s: &mut Streaming<EgressWatchEvent>, policy: &str, want: &[&str]) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.gateways(policy).as_deref() != Some(&want.iter().map(|s| s.to_string()).collect::<Vec<_>>()[..]) {
            match tokio::time::timeout_at(deadline, s.message()).await {
                Ok(Ok(Some(e))) => self.apply(e),
                Ok(other) => bail!("stream ended: {other:?}"),
                Err(_) => bail!("gateways of {policy} never became {want:?} (last {:?})", self.gateways(policy)),
            }
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_gateway_that_stops_answering_probes_leaves_the_stream() -> Result<()> {
    let server = FakeApiServer::start("127.0.0.1:0".parse()?).await?;
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml())?;
    let client = Client::try_from(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)?;
    cluster(&client).await?;
    let (sock_a, sock_b, port) = gateway_sockets().await?;
    let gw_a = agent(sock_a, "gw-a");
    let _gw_b = agent(sock_b, "gw-b");

    // Wired as in main.rs, with the binary's default health settings and probe interval.
    let health = causeway_runtime::Health::new();
    let probe_metrics = ProbeMetrics::default();
    let metrics = causeway_egress_gw::metrics::Metrics::default();
    health.with_registry(|r| {
        probe_metrics.register(r);
        metrics.register(r);
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let controller = Controller::new(client.clone(), HealthConfig::default())
        .with_health(health.clone())
        .with_metrics(metrics.clone());
    let hub = AssignmentHub::new(StreamConfig::default(), StreamMetrics::default(), controller.node_zones());
    let feeder = hub.follow(controller.assignments(), controller.synced());
    let grpc = tokio::spawn(serve(listener, hub.clone()));
    let (tx, rx) = mpsc::channel(4096);
    let prober = tokio::spawn(probe::run(
        ProbeConfig { port, interval: Duration::from_millis(100) },
        controller.probe_targets(),
        tx.clone(),
        probe_metrics.clone(),
    ));
    let watchers = spawn_watchers(client.clone(), tx);
    let run = tokio::spawn(controller.run(rx));

    let mut grpc_client = EgressAssignmentsClient::connect(format!("http://{addr}")).await?;
    let req = EgressWatchRequest { node_name: "w1".into(), ..Default::default() };
    let mut stream = grpc_client.watch(req).await?.into_inner();
    let mut view = View::default();
    // w1 is in eu-1a: with localOnlyFirst it uses gw-a only, once gw-a's probes pass.
    view.until(&mut stream, "partner-api", &["127.0.0.2"]).await?;
    assert!(health.is_ready());
    let p = view.policies.get("partner-api").context("policy")?;
    assert_eq!(p.source_ips, vec!["10.0.1.5"]);
    assert_eq!(p.groups[0].egress_ips, vec!["192.0.2.20"]);

    // Steady state: probe rounds that change no gateway's health cost no recomputation. (Our own status patch
    // comes back as a policy update and recomputes once, and gw-b may still be rising: wait for a quiet stretch.)
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (reconciles, rounds) = (metrics.reconciles.get(), probe_metrics.rounds.get());
        while probe_metrics.rounds.get() < rounds + 5 {
            if tokio::time::Instant::now() > deadline {
                bail!("the prober stopped");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if metrics.reconciles.get() == reconciles {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("probe rounds keep causing recomputation ({} so far)", metrics.reconciles.get());
        }
    }

    // gw-a's agent dies: after `fall` failed rounds, w1 falls back to gw-b in the other zone.
    gw_a.answering.store(false, Ordering::Release);
    view.until(&mut stream, "partner-api", &["127.0.0.3"]).await?;
    let last = gw_a.last_answer.lock().ok().and_then(|t| *t).context("gw-a answered at least once")?;
    println!(
        "failover on the stream: {} ms from gw-a's last answer to w1's stream naming gw-b (probe interval 100 ms, \
         fall 3: the third failed round closes 300-400 ms after the last answer)",
        last.elapsed().as_millis()
    );
    let text = health.render_metrics();
    assert!(
        text.contains(r#"causeway_egress_probe_failures_total{node="gw-a",reason="no_reply"}"#),
        "no per-node failure counter in\n{text}"
    );

    // The status names the new gateway and counts the matched pod.
    let policies = Api::<EgressGatewayPolicy>::all(client.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = policies.get("partner-api").await?.status.unwrap_or_default();
        let by_az = s.group_statuses.first().and_then(|g| g.active_gateway_ips_by_az.get("eu-1a").cloned());
        if s.matched_pods == Some(1) && by_az == Some(vec!["127.0.0.3".to_string()]) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("status never showed the failover: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for w in watchers {
        w.abort();
    }
    for t in [run, feeder] {
        t.abort();
    }
    prober.abort();
    grpc.abort();
    server.shutdown().await?;
    Ok(())
}
