//! `egress-gw`: the egress gateway controller. Watches EgressGatewayPolicies, Pods, Namespaces and Nodes, probes
//! candidate gateways over UDP, selects gateways, serves the assignments to node agents over gRPC
//! (`causeway.v1.EgressAssignments`), and writes each policy's status and Events.
//!
//! With `--leader-elect` several replicas run: the one holding the `causeway-egress-gw` Lease does all of the above;
//! the others only serve /metrics and /healthz, answer /readyz with "standby" (so the Service sends agents to the
//! leader), and start the controller when they win the Lease. A leader that loses the Lease exits to be restarted
//! as a standby: two replicas must never both probe, select and stream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use causeway_egress_gw::core::{ClusterNetworks, HealthConfig};
use causeway_egress_gw::kube::{spawn_watchers, Controller, Input};
use causeway_egress_gw::mesh::{self, MeshFollowConfig};
use causeway_egress_gw::metrics::Metrics;
use causeway_egress_gw::probe::{self, ProbeConfig, ProbeMetrics};
use causeway_egress_gw::server::{self, AssignmentHub, StreamConfig, StreamMetrics};
use causeway_leader::{LeaderArgs, LeaderMetrics, Leadership, Role};
use causeway_runtime::{Health, LogFormat};
use clap::Parser;
use ipnet::IpNet;
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(name = "egress-gw", version, about)]
struct Args {
    /// Kubeconfig to use; without it, the default kubeconfig or the in-cluster config.
    #[arg(long, env = "CAUSEWAY_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "CAUSEWAY_METRICS_ADDR", default_value = "0.0.0.0:9963")]
    metrics_addr: SocketAddr,
    /// Address of the EgressAssignments gRPC server node agents watch.
    #[arg(long, env = "CAUSEWAY_EGRESS_GRPC_ADDR", default_value = "0.0.0.0:9967")]
    grpc_addr: SocketAddr,
    /// UDP port node agents answer gateway probes on.
    #[arg(long, env = "CAUSEWAY_EGRESS_PROBE_PORT", default_value_t = causeway_api::probe::DEFAULT_PORT)]
    probe_port: u16,
    /// Time between gateway probe rounds (also how long a probe may take to be answered).
    #[arg(long, env = "CAUSEWAY_EGRESS_PROBE_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    probe_interval: Duration,
    /// `text` or `json`.
    #[arg(long, env = "CAUSEWAY_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// This cluster's pod CIDRs, comma-separated; traffic to them never goes to a gateway.
    #[arg(long, env = "CAUSEWAY_POD_CIDRS", value_delimiter = ',')]
    pod_cidrs: Vec<IpNet>,
    /// This cluster's service CIDRs, comma-separated.
    #[arg(long, env = "CAUSEWAY_SERVICE_CIDRS", value_delimiter = ',')]
    service_cidrs: Vec<IpNet>,
    /// identity-sync's MeshView gRPC address (`host:port`): the meshed clusters' pod CIDRs are learned from its node
    /// records, so traffic to another cluster's pods never goes to a gateway. Unset: only --mesh-pod-cidrs.
    #[arg(long, env = "CAUSEWAY_IDENTITY_SYNC_ADDR")]
    identity_sync_addr: Option<String>,
    /// With --identity-sync-addr: how long the assignment stream waits for the first MeshView before serving with
    /// the configured meshed CIDRs only.
    #[arg(long, env = "CAUSEWAY_MESH_SYNC_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    mesh_sync_timeout: Duration,
    /// Meshed clusters' pod CIDRs as `cluster=cidr`, comma-separated (added to those learned with
    /// --identity-sync-addr).
    #[arg(long, env = "CAUSEWAY_MESH_POD_CIDRS", value_delimiter = ',', value_parser = parse_mesh_cidr)]
    mesh_pod_cidrs: Vec<(String, IpNet)>,
    /// Consecutive good probe rounds before a gateway is used.
    #[arg(long, env = "CAUSEWAY_EGRESS_PROBE_RISE", default_value_t = 3)]
    probe_rise: u32,
    /// Consecutive failed probe rounds before a gateway is dropped.
    #[arg(long, env = "CAUSEWAY_EGRESS_PROBE_FALL", default_value_t = 3)]
    probe_fall: u32,
    /// How long a gateway that failed must pass probes before it is used again.
    #[arg(long, env = "CAUSEWAY_EGRESS_HOLD_DOWN", default_value = "5s", value_parser = humantime::parse_duration)]
    hold_down: Duration,
    /// A gateway without probe reports for this long is dropped.
    #[arg(long, env = "CAUSEWAY_EGRESS_STALE_AFTER", default_value = "600ms", value_parser = humantime::parse_duration)]
    stale_after: Duration,
    #[command(flatten)]
    leader: LeaderArgs,
}

/// The Lease egress-gw replicas elect their leader with, unless --leader-elect-lease-name says otherwise.
const LEASE_NAME: &str = "causeway-egress-gw";

fn parse_mesh_cidr(s: &str) -> Result<(String, IpNet), String> {
    let (cluster, cidr) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected cluster=cidr"))?;
    let cidr = cidr.parse::<IpNet>().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((cluster.to_string(), cidr))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    causeway_runtime::init_logging(args.log_format.parse::<LogFormat>()?);

    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).with_context(|| format!("read {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no kubeconfig and not running in a cluster")?,
    };
    let client = kube::Client::try_from(config)?;
    let lease = args.leader.config(LEASE_NAME)?;

    let health = Health::new();
    let metrics = Metrics::default();
    let stream_metrics = StreamMetrics::default();
    let probe_metrics = ProbeMetrics::default();
    let leader_metrics = LeaderMetrics::default();
    health.with_registry(|r| {
        metrics.register(r);
        stream_metrics.register(r);
        probe_metrics.register(r);
        if lease.is_some() {
            leader_metrics.register(r);
        }
    });
    let bound = causeway_runtime::serve(args.metrics_addr, health.router()).await?;
    info!(%bound, "serving /metrics, /healthz, /readyz");

    let leadership = match lease {
        Some(cfg) => {
            health.set_not_ready(format!("standby: waiting for the leader Lease {}/{}", cfg.namespace, cfg.name));
            info!(lease = %format!("{}/{}", cfg.namespace, cfg.name), identity = %cfg.identity, "leader election on");
            let leadership = Leadership::spawn(client.clone(), cfg, leader_metrics)?;
            let mut roles = leadership.subscribe();
            let standby = async {
                loop {
                    if let Role::Follower { holder: Some(holder) } = &*roles.borrow_and_update() {
                        health.set_not_ready(format!("standby: {holder} leads"));
                    }
                    if roles.changed().await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! {
                () = leadership.leading() => {}
                () = standby => anyhow::bail!("leader election ended"),
                () = shutdown_signal() => {
                    info!("shutting down as a standby");
                    return Ok(());
                }
            }
            info!("leading: starting the controller");
            Some(leadership)
        }
        None => None,
    };
    let result = run(args, client, health, metrics, stream_metrics, probe_metrics, leadership.as_ref()).await;
    // Give the Lease up on the way out (clean shutdown or failure) so that a standby takes over at once.
    if let Some(l) = leadership {
        l.release().await;
    }
    result
}

/// The controller proper: watchers, prober, gRPC server. Returns on SIGTERM (Ok), or with an error when a part
/// ended or the leader Lease was lost.
async fn run(
    args: Args,
    client: kube::Client,
    health: Health,
    metrics: Metrics,
    stream_metrics: StreamMetrics,
    probe_metrics: ProbeMetrics,
    leadership: Option<&Leadership>,
) -> Result<()> {
    let mut mesh: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
    for (cluster, cidr) in &args.mesh_pod_cidrs {
        mesh.entry(cluster.clone()).or_default().push(*cidr);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let networks = ClusterNetworks {
        pod_cidrs: args.pod_cidrs.clone(),
        service_cidrs: args.service_cidrs.clone(),
        remote_pod_cidrs: mesh,
    };
    tx.send(Input::Networks(networks.clone())).await?;
    let (mesh_ready_tx, mesh_ready) = tokio::sync::watch::channel(args.identity_sync_addr.is_none());
    if let Some(endpoint) = args.identity_sync_addr.clone() {
        let cfg = MeshFollowConfig {
            endpoint,
            configured: networks,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        };
        tokio::spawn(mesh::follow(cfg, tx.clone(), metrics.clone(), mesh_ready_tx));
    }
    // The prober reports every node every round; a staleness limit under a few rounds would take healthy
    // gateways down between two reports.
    let min_stale = args.probe_interval * 3;
    let stale_after = if args.stale_after < min_stale {
        warn!(stale_after = ?args.stale_after, probe_interval = ?args.probe_interval, raised_to = ?min_stale,
              "--stale-after is under three probe intervals; raising it");
        min_stale
    } else {
        args.stale_after
    };
    let probe = HealthConfig { rise: args.probe_rise, fall: args.probe_fall, hold_down: args.hold_down, stale_after };
    // Readiness comes from the controller after its first full list; bind the gRPC listener before that, so that
    // ready also means agents can connect.
    let listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("bind the gRPC address {}", args.grpc_addr))?;
    info!(addr = %listener.local_addr()?, "serving causeway.v1.EgressAssignments");
    // The first publish waits until every gateway rose or failed (rise/fall rounds), at most a few rounds more.
    let warmup = (args.probe_interval * (args.probe_rise + args.probe_fall + 2)).max(Duration::from_secs(1));
    let controller =
        Controller::new(client.clone(), probe).with_metrics(metrics).with_health(health).with_warmup(warmup);
    let hub = AssignmentHub::new(StreamConfig::default(), stream_metrics, controller.node_zones());
    // Served once the controller synced and (with --identity-sync-addr) the meshed clusters' CIDRs are in.
    let (serve_gate, _gate) = mesh::gate(controller.synced(), mesh_ready, args.mesh_sync_timeout);
    let _feeder = hub.follow(controller.assignments(), serve_gate);
    let mut grpc = tokio::spawn(server::serve(listener, hub));
    let probe_cfg = ProbeConfig { port: args.probe_port, interval: args.probe_interval };
    let mut prober = tokio::spawn(probe::run(probe_cfg, controller.probe_targets(), tx.clone(), probe_metrics));
    let _watchers = spawn_watchers(client, tx);
    let lost = async {
        match leadership {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    // Any part ending means the process can no longer do its job; exit so that it gets restarted.
    tokio::select! {
        () = controller.run(rx) => anyhow::bail!("controller input closed"),
        r = &mut grpc => anyhow::bail!("gRPC server ended: {:?}", r.map(|r| r.map_err(|e| e.to_string()))),
        r = &mut prober => anyhow::bail!("prober ended: {:?}", r.map(|r| r.map_err(|e| e.to_string()))),
        () = lost => anyhow::bail!("lost the leader Lease (could not renew it in time, or another replica took it); \
                                    exiting to restart as a standby"),
        () = shutdown_signal() => {
            info!("shutting down");
            Ok(())
        }
    }
}

/// SIGTERM (how Kubernetes stops a pod) or ctrl-c.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
