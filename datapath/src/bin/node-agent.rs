//! `causeway-node-agent`: the per-node DaemonSet process. It watches identity-sync's MeshView stream and the
//! egress-gw controller's EgressAssignments stream and programs the datapath from them (see
//! `causeway_datapath::agent` and docs/datapath-agent.md).
//!
//! Until the BPF-map adapter of the `Datapath` trait lands, the only datapath this binary can drive is the
//! in-memory one, and it says so: without `--dry-run` it refuses to start rather than pretend to program the kernel.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_datapath::agent::run::{self, AgentConfig, AgentMetrics};
use causeway_datapath::agent::{GcPolicy, InMemoryDatapath, LocalNode};
use causeway_runtime::{Health, LogFormat};
use clap::Parser;
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "causeway-node-agent",
    about = "Causeway node agent: programs the node's datapath (eBPF maps, WireGuard peers, routes) from \
             identity-sync's mesh view and the egress gateway assignments.",
    after_help = "STATUS: the BPF-map adapter is not wired in yet. Only --dry-run is supported: the agent then runs \
                  the full pipeline (streams, desired state, planner) against an in-memory datapath, serves metrics \
                  (map sizes and ops as they would be in the kernel), and does NOT program the kernel."
)]
struct Args {
    /// This node's name (as in the Node object); sent to the stream servers.
    #[arg(long, env = "CAUSEWAY_NODE_NAME")]
    node_name: String,
    /// This node's IP; a remote node record carrying it is skipped, and WireGuard endpoints prefer its family.
    #[arg(long, env = "CAUSEWAY_NODE_IP")]
    node_ip: IpAddr,
    /// identity-sync's MeshView gRPC address (host:port or http://host:port).
    #[arg(long, env = "CAUSEWAY_IDENTITY_SYNC_ADDR")]
    identity_sync_addr: String,
    /// The egress-gw controller's EgressAssignments gRPC address. Without it no egress policy is programmed.
    #[arg(long, env = "CAUSEWAY_EGRESS_ADDR")]
    egress_addr: Option<String>,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "CAUSEWAY_METRICS_ADDR", default_value = "0.0.0.0:9964")]
    metrics_addr: SocketAddr,
    /// "text" or "json".
    #[arg(long, env = "CAUSEWAY_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// bpffs directory holding the pinned maps (read back after a restart).
    #[arg(long, env = "CAUSEWAY_BPFFS_ROOT", default_value = "/sys/fs/bpf/causeway")]
    bpffs_root: PathBuf,
    /// UDP port of every mesh node's WireGuard interface.
    #[arg(long, env = "CAUSEWAY_WIREGUARD_PORT", default_value_t = 51871)]
    wireguard_port: u16,
    /// Run against an in-memory datapath: nothing in the kernel is touched. Required until the BPF adapter lands.
    #[arg(long, env = "CAUSEWAY_DRY_RUN")]
    dry_run: bool,
    /// Idle timeout of established TCP flows, seconds.
    #[arg(long, env = "CAUSEWAY_CT_TCP_ESTABLISHED", default_value_t = 21_600)]
    ct_tcp_established: u64,
    /// Idle timeout of TCP flows whose handshake did not complete, seconds.
    #[arg(long, env = "CAUSEWAY_CT_TCP_SYN", default_value_t = 60)]
    ct_tcp_syn: u64,
    /// Idle timeout of TCP flows that saw FIN or RST, seconds.
    #[arg(long, env = "CAUSEWAY_CT_TCP_CLOSING", default_value_t = 10)]
    ct_tcp_closing: u64,
    /// Idle timeout of UDP flows, seconds.
    #[arg(long, env = "CAUSEWAY_CT_UDP", default_value_t = 60)]
    ct_udp: u64,
    /// Idle timeout of ICMP echo flows, seconds.
    #[arg(long, env = "CAUSEWAY_CT_ICMP", default_value_t = 30)]
    ct_icmp: u64,
    /// Idle timeout of other protocols, seconds.
    #[arg(long, env = "CAUSEWAY_CT_OTHER", default_value_t = 60)]
    ct_other: u64,
    /// How often conntrack GC runs and drop counters are read, seconds.
    #[arg(long, env = "CAUSEWAY_GC_INTERVAL", default_value_t = 10)]
    gc_interval: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let format: LogFormat = args.log_format.parse()?;
    causeway_runtime::init_logging(format);
    if !args.dry_run {
        bail!(
            "the BPF-map datapath adapter is not built into this agent yet, so it cannot program {}; \
             run with --dry-run to exercise the streams and planner against an in-memory datapath",
            args.bpffs_root.display()
        );
    }
    warn!("--dry-run: using an in-memory datapath; nothing in the kernel is programmed");

    let health = Health::new();
    let metrics = AgentMetrics::default();
    metrics.register(&health);
    let addr = causeway_runtime::serve(args.metrics_addr, health.router())
        .await
        .with_context(|| format!("serving metrics on {}", args.metrics_addr))?;
    info!(%addr, node = %args.node_name, "serving /metrics, /healthz, /readyz");

    let cfg = AgentConfig {
        local: LocalNode { name: args.node_name.clone(), ip: args.node_ip, wireguard_port: args.wireguard_port },
        mesh_endpoint: args.identity_sync_addr.clone(),
        egress_endpoint: args.egress_addr.clone(),
        gc: GcPolicy {
            tcp_established: Duration::from_secs(args.ct_tcp_established),
            tcp_syn: Duration::from_secs(args.ct_tcp_syn),
            tcp_closing: Duration::from_secs(args.ct_tcp_closing),
            udp: Duration::from_secs(args.ct_udp),
            icmp: Duration::from_secs(args.ct_icmp),
            other: Duration::from_secs(args.ct_other),
        },
        gc_interval: Duration::from_secs(args.gc_interval.max(1)),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(10),
    };
    let shutdown = async {
        // A DaemonSet pod is stopped with SIGTERM; pinned maps outlive the process either way.
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        info!("shutting down; the datapath keeps its entries");
    };
    run::run(cfg, InMemoryDatapath::new(), health, metrics, shutdown).await;
    Ok(())
}
