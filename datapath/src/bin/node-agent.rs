//! `causeway-node-agent`: the per-node DaemonSet process. It watches identity-sync's MeshView stream and the
//! egress-gw controller's EgressAssignments stream and programs the datapath from them (see
//! `causeway_datapath::agent` and docs/datapath-agent.md).
//!
//! Without `--dry-run` it installs the datapath on this node (loads the eBPF programs with their maps pinned under
//! `--bpffs-root`, attaches them to the pod interfaces, the VXLAN collect-metadata device it creates if missing,
//! the gateway's external interface and the WireGuard interface) and drives it through
//! [`causeway_datapath::kernel::KernelDatapath`]. After a restart it reloads the programs into the same pinned links
//! and re-reads the pinned maps, so only the difference is applied. `--dry-run` uses an in-memory datapath instead.
//!
//! Egress duties besides the maps (`causeway_datapath::egress`): it answers the egress-gw controller's UDP health
//! probes on `--probe-addr`, flagging "gateway ready" while SNAT is attached on `--external-interface`.
//! `--identity-sync-addr` is optional: an egress-only gateway node runs with `--egress-addr` alone. With
//! `--kubeconfig` (or `--publish-interfaces` in a pod) it publishes its interfaces and addresses on its Node. When
//! it becomes an active gateway for an egress IPv4 address configured on one of its interfaces, it sends gratuitous
//! ARP there (the address must already be configured; the agent does not add it).
//!
//! A VM or bare-metal host joining the mesh (`causeway_datapath::workload`) uses two subcommands before it runs the
//! agent, and then runs it in host mode:
//!
//! - `register`: registers the host with its cluster's clustermesh-apiserver over mTLS (causeway.v1.Workloads),
//!   sending the public half of `<state dir>/wireguard.key`, and writes the answer as an EnvironmentFile;
//! - `check-dns`: resolves a name with a resolv.conf's nameservers and search list (hickory-resolver);
//! - host mode: only `--wireguard-interface` (no pod or external interface), `--mesh-ipv4` on that interface, and
//!   `--service-cidrs` routed to one node of `--home-cluster`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_datapath::agent::desired::ServiceRoutes;
use causeway_datapath::agent::run::{self, AgentConfig, AgentMetrics, RunHooks};
use causeway_datapath::agent::{GcPolicy, InMemoryDatapath, LocalNode};
use causeway_datapath::egress::garp::{self, GarpConfig, GarpMetrics};
use causeway_datapath::egress::interfaces::PublishFilter;
use causeway_datapath::egress::netlink;
use causeway_datapath::egress::probe::{self, GatewayReady, ProbeMetrics};
use causeway_datapath::egress::publish::{self, PublishConfig, PublishMetrics};
use causeway_datapath::kernel::install::{self, InstallOptions};
use causeway_datapath::kernel::{KernelConfig, KernelDatapath};
use causeway_datapath::wireguard::{keyfile, Tunnel, TunnelConfig};
use causeway_datapath::workload::{dns, envfile, register};
use causeway_runtime::{Health, LogFormat};
use clap::Parser;
use ipnet::IpNet;
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "causeway-node-agent",
    about = "Causeway node agent: programs the node's datapath (eBPF maps, WireGuard peers, routes) from \
             identity-sync's mesh view and the egress gateway assignments.",
    after_help = "With --dry-run the agent runs the full pipeline (streams, desired state, planner) against an \
                  in-memory datapath and does NOT program the kernel.\n\n\
                  Subcommands for a host joining the mesh (see their --help):\n  \
                  causeway-node-agent register   register with the clustermesh-apiserver, write an EnvironmentFile\n  \
                  causeway-node-agent check-dns  check that a name resolves with a resolv.conf's nameservers"
)]
struct Args {
    /// This node's name (as in the Node object); sent to the stream servers.
    #[arg(long, env = "CAUSEWAY_NODE_NAME")]
    node_name: String,
    /// This node's IP; a remote node record carrying it is skipped, and WireGuard endpoints prefer its family.
    #[arg(long, env = "CAUSEWAY_NODE_IP")]
    node_ip: IpAddr,
    /// identity-sync's MeshView gRPC address (host:port or http://host:port). Absent on egress-only nodes: no
    /// mesh stream is started and readiness does not wait for one (then --egress-addr is required).
    #[arg(long, env = "CAUSEWAY_IDENTITY_SYNC_ADDR")]
    identity_sync_addr: Option<String>,
    /// The egress-gw controller's EgressAssignments gRPC address. Without it no egress policy is programmed.
    #[arg(long, env = "CAUSEWAY_EGRESS_ADDR")]
    egress_addr: Option<String>,
    /// UDP address the egress-gw controller's gateway health probes are answered on. The reply carries the
    /// gateway-ready flag when SNAT is attached on --external-interface (never with --dry-run). Nodes whose node IP
    /// is IPv6 use [::]:9966.
    #[arg(long, env = "CAUSEWAY_PROBE_ADDR", default_value = "0.0.0.0:9966")]
    probe_addr: SocketAddr,
    /// Kubeconfig used to publish this node's interfaces and addresses on its Node (annotations
    /// egress.causeway.io/interfaces and egress.causeway.io/default-interface, read by egress-gw) and, with
    /// --wireguard-interface, its WireGuard public key (causeway.io/wireguard-pub-key, exported by
    /// clustermesh-apiserver in its node record). Given: publishing is on. Absent: see --publish-interfaces.
    #[arg(long, env = "CAUSEWAY_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Publish the interfaces with the in-cluster service account (KUBERNETES_SERVICE_HOST must be set) when no
    /// --kubeconfig is given. Off by default: without either, nothing is published (the controller then cannot
    /// check egressIP placement or resolve `interface:` groups on this node).
    #[arg(long, env = "CAUSEWAY_PUBLISH_INTERFACES")]
    publish_interfaces: bool,
    /// Seconds between reads of this node's addresses (a change is published at the next read).
    #[arg(long, env = "CAUSEWAY_PUBLISH_INTERVAL", default_value_t = 5)]
    publish_interval: u64,
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
    /// Run against an in-memory datapath: nothing in the kernel is touched.
    #[arg(long, env = "CAUSEWAY_DRY_RUN")]
    dry_run: bool,
    /// Remove the datapath from this node and exit: detach every program, unpin the maps under --bpffs-root,
    /// delete the VXLAN device, the WireGuard interface (if --wireguard-interface) and the shadow journal. Traffic
    /// is routed by the kernel alone afterwards.
    #[arg(long)]
    uninstall: bool,
    /// Host-side pod interfaces to attach the egress steering program to (comma separated).
    #[arg(long, env = "CAUSEWAY_POD_INTERFACES", value_delimiter = ',')]
    pod_interfaces: Vec<String>,
    /// Also every interface whose name starts with this (rescanned every few seconds, for new pods).
    #[arg(long, env = "CAUSEWAY_POD_INTERFACE_PREFIX")]
    pod_interface_prefix: Option<String>,
    /// The external interface of an egress gateway node: SNAT is attached there. Absent: no SNAT on this node.
    #[arg(long, env = "CAUSEWAY_EXTERNAL_INTERFACE")]
    external_interface: Option<String>,
    /// The VXLAN collect-metadata device steered packets are sent through (created if missing).
    #[arg(long, env = "CAUSEWAY_VXLAN_DEVICE", default_value = "cw_vxlan")]
    vxlan_device: String,
    /// The node's WireGuard interface (created, userspace boringtun); absent: no tunnel, peer and route ops fail.
    /// On a host outside the cluster (a joined VM) it is the only interface the agent needs.
    #[arg(long, env = "CAUSEWAY_WIREGUARD_INTERFACE")]
    wireguard_interface: Option<String>,
    /// A joined host's address inside the mesh (`register` writes it as CAUSEWAY_MESH_IPV4): put on the WireGuard
    /// interface as a /32, so the host's mesh traffic leaves from it. Other IPv4 addresses on that interface are
    /// removed. Started without it, the agent removes the mesh address an earlier run put there.
    #[arg(long, env = "CAUSEWAY_MESH_IPV4")]
    mesh_ipv4: Option<Ipv4Addr>,
    /// A joined host's home cluster's Service CIDRs (comma separated; CAUSEWAY_SERVICE_CIDRS): routed through the
    /// tunnel to one node of --home-cluster (the first by name with a WireGuard key; the next one if it goes).
    #[arg(long, env = "CAUSEWAY_SERVICE_CIDRS", value_delimiter = ',')]
    service_cidrs: Vec<String>,
    /// The cluster a joined host registered with (CAUSEWAY_HOME_CLUSTER): whose nodes carry --service-cidrs.
    #[arg(long, env = "CAUSEWAY_HOME_CLUSTER")]
    home_cluster: Option<String>,
    /// This node's underlay IPv4, if --node-ip is IPv6 (VXLAN to gateways runs over IPv4).
    #[arg(long, env = "CAUSEWAY_NODE_IPV4")]
    node_ipv4: Option<std::net::Ipv4Addr>,
    /// Drop traffic from remote clusters that the identity policy does not allow.
    #[arg(long, env = "CAUSEWAY_ENFORCE_IDENTITY_POLICY")]
    enforce_identity_policy: bool,
    /// Where state that must survive restarts but is not a BPF object lives (the map shadow journal, the WireGuard
    /// private key).
    #[arg(long, env = "CAUSEWAY_STATE_DIR", default_value = "/var/lib/causeway")]
    state_dir: PathBuf,
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

#[derive(Debug, Parser)]
#[command(
    name = "causeway-node-agent register",
    about = "Register this host (a VM or bare-metal machine) with its cluster's clustermesh-apiserver over mTLS \
             (causeway.v1.Workloads/Register) and write the answer as an EnvironmentFile.",
    after_help = "The WireGuard key is <state dir>/wireguard.key, created if missing: the one the agent uses. \
                  Connection failures and UNAVAILABLE are retried with backoff until --timeout; any other refusal \
                  (NOT_FOUND: no ExternalWorkload of that name, PERMISSION_DENIED, ...) exits non-zero at once \
                  with the server's message."
)]
struct RegisterArgs {
    /// This host's name: the name of its ExternalWorkload object.
    #[arg(long, env = "CAUSEWAY_WORKLOAD_NAME")]
    name: String,
    /// The clustermesh-apiserver's workloads service, https://HOST:PORT (any address that reaches it: Service,
    /// NodePort on any node, load balancer).
    #[arg(long, env = "CAUSEWAY_APISERVER")]
    apiserver: String,
    /// The DNS name the server certificate is verified against, whatever address is dialed.
    #[arg(long, env = "CAUSEWAY_APISERVER_SERVER_NAME", default_value = register::DEFAULT_SERVER_NAME)]
    server_name: String,
    /// The mesh CA (ca.crt of the externalworkload bundle).
    #[arg(long)]
    ca: PathBuf,
    /// The externalworkload client certificate.
    #[arg(long)]
    cert: PathBuf,
    /// Its private key.
    #[arg(long)]
    key: PathBuf,
    /// This host's underlay IPv4 (where cluster nodes reach its WireGuard port).
    #[arg(long, env = "CAUSEWAY_NODE_IP")]
    node_ip: Ipv4Addr,
    /// This host's IPv6, if it has one.
    #[arg(long, env = "CAUSEWAY_NODE_IPV6")]
    node_ipv6: Option<Ipv6Addr>,
    /// The agent's state directory (holds wireguard.key).
    #[arg(long, env = "CAUSEWAY_STATE_DIR", default_value = "/var/lib/causeway")]
    state_dir: PathBuf,
    /// The EnvironmentFile to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// Give up after this long (e.g. 2m, 30s).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long, env = "CAUSEWAY_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[derive(Debug, Parser)]
#[command(
    name = "causeway-node-agent check-dns",
    about = "Resolve a name with the nameservers, search list and options of a resolv.conf (hickory-resolver, not \
             libc or /etc/hosts), retrying until --timeout. Prints the answers; exits non-zero if the name does not \
             resolve or --expect is not among the answers."
)]
struct CheckDnsArgs {
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// The name to resolve (relative names use the search list).
    #[arg(long)]
    name: String,
    /// An address that must be among the answers.
    #[arg(long)]
    expect: Option<IpAddr>,
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Pause between attempts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    #[arg(long, env = "CAUSEWAY_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    // Subcommands are dispatched by hand: the agent's own flags (required --node-name...) stay as they were.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("register") => {
            let args = RegisterArgs::parse_from(subcommand_argv("register", &argv));
            causeway_runtime::init_logging(args.log_format.parse()?);
            return register_host(&args).await;
        }
        Some("check-dns") => {
            let args = CheckDnsArgs::parse_from(subcommand_argv("check-dns", &argv));
            causeway_runtime::init_logging(args.log_format.parse()?);
            return check_dns(&args).await;
        }
        _ => {}
    }
    let args = Args::parse();
    let format: LogFormat = args.log_format.parse()?;
    causeway_runtime::init_logging(format);
    if args.uninstall {
        return uninstall(&args);
    }
    if args.identity_sync_addr.is_none() && args.egress_addr.is_none() {
        // With no input at all the desired state is empty, and programming it would wipe the pinned maps.
        bail!("no input stream: give --identity-sync-addr (mesh) and/or --egress-addr (egress gateway assignments)");
    }
    if args.dry_run {
        warn!("--dry-run: using an in-memory datapath; nothing in the kernel is programmed");
    } else if args.pod_interfaces.is_empty()
        && args.pod_interface_prefix.is_none()
        && args.external_interface.is_none()
        && args.wireguard_interface.is_none()
    {
        // Installing needs to know where: refuse rather than guess interfaces on a real node.
        bail!(
            "no interface to program: give --pod-interfaces / --pod-interface-prefix (steering), \
             --external-interface (gateway SNAT) and/or --wireguard-interface (the only one a joined host needs), \
             or run with --dry-run against an in-memory datapath"
        );
    }
    let service_routes = service_routes(&args)?;
    if args.mesh_ipv4.is_some() && args.wireguard_interface.is_none() && !args.dry_run {
        bail!("--mesh-ipv4 is an address on the WireGuard interface: give --wireguard-interface too");
    }
    let health = Health::new();
    let metrics = AgentMetrics::default();
    metrics.register(&health);
    let addr = causeway_runtime::serve(args.metrics_addr, health.router())
        .await
        .with_context(|| format!("serving metrics on {}", args.metrics_addr))?;
    info!(%addr, node = %args.node_name, "serving /metrics, /healthz, /readyz");
    if args.identity_sync_addr.is_none() {
        info!("no --identity-sync-addr: egress-only node, no mesh stream");
    }

    // The probe responder answers from the start: "alive but not a ready gateway" is what the controller must see
    // while the datapath is being installed.
    let gateway_ready = GatewayReady::new();
    let probe_metrics = ProbeMetrics::default();
    probe_metrics.register(&health);
    let probe_socket = probe::bind(args.probe_addr)
        .await
        .with_context(|| format!("binding the probe responder to {}", args.probe_addr))?;
    tokio::spawn(probe::serve(
        probe_socket,
        args.node_name.clone(),
        gateway_ready.clone(),
        probe_metrics,
        std::future::pending(),
    ));

    if let Some(client) = kube_client(&args).await? {
        let publish_metrics = PublishMetrics::default();
        publish_metrics.register(&health);
        let cfg = PublishConfig {
            node: args.node_name.clone(),
            filter: publish_filter(&args),
            interval: Duration::from_secs(args.publish_interval.max(1)),
            refresh: Duration::from_secs(600),
            // The key the tunnel will use (created now if this is the first run, as the tunnel would).
            wireguard_pub_key: match &args.wireguard_interface {
                Some(_) => {
                    std::fs::create_dir_all(&args.state_dir)
                        .with_context(|| format!("creating {}", args.state_dir.display()))?;
                    Some(keyfile::load_or_create(&args.state_dir.join(keyfile::KEY_FILE))?.public_key())
                }
                None => None,
            },
        };
        tokio::spawn(publish::run(client, cfg, netlink::read, publish_metrics, std::future::pending()));
    }

    let cfg = AgentConfig {
        local: LocalNode {
            mesh_ipv4: args.mesh_ipv4,
            service_routes,
            ..LocalNode::new(args.node_name.clone(), args.node_ip, args.wireguard_port)
        },
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
    // Gratuitous ARP when this node takes over an egress IP (decided and logged only with --dry-run).
    let (local_egress, active_egress) = tokio::sync::watch::channel(std::collections::BTreeSet::new());
    let garp_metrics = GarpMetrics::default();
    garp_metrics.register(&health);
    let garp_cfg = GarpConfig { send: !args.dry_run, ..GarpConfig::default() };
    tokio::spawn(garp::run(active_egress, garp_cfg, netlink::read, garp_metrics, std::future::pending()));
    let hooks = RunHooks { local_egress: Some(local_egress) };

    if args.dry_run {
        // Nothing is attached: the gateway-ready flag stays off.
        run::run_with(cfg, InMemoryDatapath::new(), health, metrics, hooks, shutdown).await;
        return Ok(());
    }
    let dp = kernel_datapath(&args)?;
    if let Some(ext) = args.external_interface.clone() {
        watch_gateway_ready(args.bpffs_root.clone(), ext, gateway_ready.clone());
    }
    // Maps and programs stay pinned and attached after the loop ends. The WireGuard interface is a persistent TUN:
    // boringtun stops with the process, the device and its routes stay (dropping packets), and the next agent
    // re-attaches to it with the same key and re-applies the peers.
    run::run_with(cfg, dp, health, metrics, hooks, shutdown).await;
    Ok(())
}

/// The kube client for publishing interfaces: from --kubeconfig, else in-cluster with --publish-interfaces, else
/// none.
async fn kube_client(args: &Args) -> Result<Option<kube::Client>> {
    let config = match (&args.kubeconfig, args.publish_interfaces) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        (None, true) => {
            if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
                bail!(
                    "--publish-interfaces without --kubeconfig needs the in-cluster config (KUBERNETES_SERVICE_HOST)"
                );
            }
            kube::Config::incluster().context("in-cluster kube config")?
        }
        (None, false) => {
            info!("no --kubeconfig and no --publish-interfaces: this node's interfaces are not published");
            return Ok(None);
        }
    };
    Ok(Some(kube::Client::try_from(config).context("creating the kube client")?))
}

/// The agent's own devices and the pods' interfaces are never egress interfaces.
fn publish_filter(args: &Args) -> PublishFilter {
    let mut skip_names: std::collections::BTreeSet<String> = args.pod_interfaces.iter().cloned().collect();
    skip_names.insert(args.vxlan_device.clone());
    skip_names.extend(args.wireguard_interface.clone());
    PublishFilter { skip_names, skip_prefixes: args.pod_interface_prefix.clone().into_iter().collect() }
}

/// Keeps the probe's gateway-ready flag in line with the SNAT attachment: set once install attached it, cleared if
/// the pinned links or the interface disappear (an operator's --uninstall, the interface deleted).
fn watch_gateway_ready(pin_dir: PathBuf, ifname: String, ready: GatewayReady) {
    ready.set(install::snat_attached(&pin_dir, &ifname));
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        ready.set(install::snat_attached(&pin_dir, &ifname));
    });
}

fn uninstall(args: &Args) -> Result<()> {
    causeway_datapath::bpf::loader::uninstall(&args.bpffs_root)
        .with_context(|| format!("removing the datapath pinned under {}", args.bpffs_root.display()))?;
    if install::ifindex(&args.vxlan_device).is_ok() {
        causeway_datapath::kernel::install::delete_link(&args.vxlan_device)
            .with_context(|| format!("deleting {}", args.vxlan_device))?;
    }
    if let Some(ifname) = &args.wireguard_interface {
        causeway_datapath::wireguard::delete_interface(ifname)
            .with_context(|| format!("deleting the WireGuard interface {ifname}"))?;
    }
    match std::fs::remove_file(args.state_dir.join("datapath.shadow")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("removing the shadow journal"),
    }
    info!(pin_dir = %args.bpffs_root.display(), "datapath uninstalled");
    Ok(())
}

/// `["causeway-node-agent <sub>", rest...]`: the subcommand's own argv for clap (usage lines name it).
fn subcommand_argv(sub: &str, argv: &[std::ffi::OsString]) -> Vec<std::ffi::OsString> {
    std::iter::once(format!("causeway-node-agent {sub}").into()).chain(argv.iter().skip(2).cloned()).collect()
}

/// --service-cidrs (empty items ignored: an EnvironmentFile may hold an empty list) with --home-cluster.
fn service_routes(args: &Args) -> Result<Option<ServiceRoutes>> {
    let mut cidrs = Vec::new();
    for s in args.service_cidrs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let net: IpNet = s.parse().with_context(|| format!("--service-cidrs: {s:?} is not a CIDR"))?;
        cidrs.push(net.trunc());
    }
    match (cidrs.is_empty(), args.home_cluster.as_deref().map(str::trim).filter(|h| !h.is_empty())) {
        (true, _) => Ok(None),
        (false, None) => bail!("--service-cidrs are routed to a node of --home-cluster: give --home-cluster too"),
        (false, Some(_)) if args.wireguard_interface.is_none() && !args.dry_run => {
            bail!("--service-cidrs are routed through the tunnel: give --wireguard-interface too")
        }
        (false, Some(home)) => {
            info!(home_cluster = home, ?cidrs, "routing the home cluster's Service CIDRs through one of its nodes");
            Ok(Some(ServiceRoutes { home_cluster: home.to_owned(), cidrs }))
        }
    }
}

async fn register_host(args: &RegisterArgs) -> Result<()> {
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let key = keyfile::load_or_create(&args.state_dir.join(keyfile::KEY_FILE))?;
    let cfg = register::RegisterConfig {
        name: args.name.clone(),
        apiserver: args.apiserver.clone(),
        server_name: args.server_name.clone(),
        ca_pem: read(&args.ca)?,
        cert_pem: read(&args.cert)?,
        key_pem: read(&args.key)?,
        ipv4: args.node_ip,
        ipv6: args.node_ipv6,
        wireguard_pub_key: key.public_key(),
        timeout: args.timeout,
        backoff_initial: Duration::from_millis(250),
        backoff_max: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(10).min(args.timeout.max(Duration::from_secs(1))),
    };
    let (_, reg) = register::register(&cfg).await?;
    envfile::write_atomic(&args.out, &reg.env_file()).with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "registered {} with cluster {} (id {}): identity {}, mesh address {}, WireGuard key {}; wrote {}",
        args.name,
        reg.cluster_name,
        reg.cluster_id,
        reg.identity,
        reg.mesh_ipv4,
        key.public_key(),
        args.out.display()
    );
    Ok(())
}

async fn check_dns(args: &CheckDnsArgs) -> Result<()> {
    let resolv_conf = std::fs::read_to_string(&args.resolv_conf)
        .with_context(|| format!("reading {}", args.resolv_conf.display()))?;
    let check = dns::DnsCheck {
        resolv_conf,
        name: args.name.clone(),
        expect: args.expect,
        timeout: args.timeout,
        interval: args.interval,
    };
    let answers = dns::check(&check).await?;
    for ip in answers {
        println!("{} {ip}", args.name);
    }
    Ok(())
}

/// Makes `want` the only IPv4 address on the WireGuard interface (the agent owns that interface). Idempotent: an
/// address already there is left alone, so a restart changes nothing.
/// The mesh address this agent put on the WireGuard interface, in the state directory: an agent started without
/// `--mesh-ipv4` (the host left the mesh datapath) removes that address, and only that one.
const MESH_ADDRESS_FILE: &str = "mesh-ipv4";

/// Puts `want` (a /32) on the WireGuard interface and removes its other IPv4 addresses; without `want`, removes the
/// address a previous run put there (named in `record`), so a host that lost its mesh address does not keep using it.
fn set_mesh_address(ifname: &str, want: Option<Ipv4Addr>, record: &std::path::Path) -> Result<()> {
    let ip = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new("ip").args(args).output().context("running ip")?;
        if !out.status.success() {
            bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let shown = ip(&["-4", "-o", "addr", "show", "dev", ifname])?;
    let have: Vec<String> = shown
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.find(|w| *w == "inet")?;
            it.next().map(str::to_owned)
        })
        .collect();
    let Some(want) = want else {
        let Ok(previous) = std::fs::read_to_string(record) else { return Ok(()) };
        let previous = format!("{}/32", previous.trim());
        if have.contains(&previous) {
            ip(&["addr", "del", &previous, "dev", ifname])?;
            info!(ifname, address = %previous, "no --mesh-ipv4: removed the mesh address an earlier run set");
        }
        std::fs::remove_file(record).with_context(|| format!("removing {}", record.display()))?;
        return Ok(());
    };
    let want_net = format!("{want}/32");
    // Recorded first: a crash between the two leaves a record of an address that may not be there (harmless),
    // never an address without a record.
    std::fs::write(record, want.to_string()).with_context(|| format!("writing {}", record.display()))?;
    for other in have.iter().filter(|a| **a != want_net) {
        info!(ifname, address = %other, "removing a stale address from the WireGuard interface");
        ip(&["addr", "del", other, "dev", ifname])?;
    }
    if !have.contains(&want_net) {
        ip(&["addr", "replace", &want_net, "dev", ifname])?;
        info!(ifname, address = %want_net, "mesh address on the WireGuard interface");
    }
    Ok(())
}

/// Creates the tunnel, installs the programs and opens the adapter over the pinned maps.
fn kernel_datapath(args: &Args) -> Result<KernelDatapath> {
    let node_ipv4 = match (args.node_ipv4, args.node_ip) {
        (Some(v4), _) => v4,
        (None, IpAddr::V4(v4)) => v4,
        (None, IpAddr::V6(_)) => bail!("--node-ip is IPv6: give the node's underlay IPv4 with --node-ipv4"),
    };
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let tunnel = match &args.wireguard_interface {
        Some(ifname) => {
            let key = keyfile::load_or_create(&args.state_dir.join(keyfile::KEY_FILE))?;
            let t = Tunnel::create(TunnelConfig::new(ifname.clone(), key, args.wireguard_port))
                .with_context(|| format!("creating WireGuard interface {ifname}"))?;
            info!(ifname, public_key = %t.public_key().to_base64(), "WireGuard interface up");
            set_mesh_address(ifname, args.mesh_ipv4, &args.state_dir.join(MESH_ADDRESS_FILE))?;
            Some(t)
        }
        None => None,
    };
    let opts = InstallOptions {
        pin_dir: args.bpffs_root.clone(),
        node_ipv4,
        pod_interfaces: args.pod_interfaces.clone(),
        pod_prefix: args.pod_interface_prefix.clone(),
        vxlan_device: args.vxlan_device.clone(),
        external_interface: args.external_interface.clone(),
        wireguard_interface: args.wireguard_interface.clone(),
        enforce_policy: args.enforce_identity_policy,
    };
    let installed = install::install(&opts).context("installing the eBPF datapath")?;
    if let Some(prefix) = args.pod_interface_prefix.clone() {
        // New pods get the steering program within a few seconds.
        let mut installed = installed;
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(3));
            match installed.attach_pods_by_prefix(&prefix) {
                Ok(added) if !added.is_empty() => info!(?added, "steering attached to new pod interfaces"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "attaching steering to pod interfaces"),
            }
        });
    }
    let dp = KernelDatapath::open(KernelConfig {
        pin_dir: args.bpffs_root.clone(),
        shadow_path: args.state_dir.join("datapath.shadow"),
        local_ip: args.node_ip,
        tunnel,
    })
    .context("opening the pinned maps")?;
    Ok(dp)
}
