//! wg-restart: how long a TCP stream through the WireGuard tunnel stalls when one node's agent is SIGKILLed and
//! restarted, for the stream's receiving side (measured) and its sending side (the in-run baseline).
//!
//! Set-up (the shape of datapath/tests/wireguard_restart.rs): two node namespaces joined by a veth, a pod behind
//! each (`causeway_testsupport::netns::TwoNodes`), the real `causeway-node-agent` on both nodes (userspace
//! WireGuard on its persistent TUN, peers and routes from identity-sync's real MeshView hub served in this process).
//! Pod A sends pod B a paced TCP stream (`--chunk-kib` every `--interval-ms`); pod B's reader notes the time of
//! every read.
//!
//! One trial = SIGKILL one node's agent, start it again at once (after `--down-ms`), wait for its `/readyz` and for
//! the stream to move another MiB. The figure is the stream's stall: the largest gap between two reads at pod B
//! during the trial (it includes the agent's own downtime, the same for both sides). Trials alternate: node A's agent
//! (the sending side: its pod's own retransmissions make the restarted device start the handshake, the baseline),
//! then node B's (the receiving side: it only receives, so it is up to the agent to start the handshake; before it
//! did, the stream waited for node A's 15 s rekey timeout and then TCP's backoff).
//!
//! `--without-handshake-start` drops that handshake-starting packet with an nftables rule on both nodes: the control
//! run, as the agent behaved before.
//!
//! Build the binaries in the same profile first: `cargo build --release -p causeway-bench -p causeway-datapath
//! --bins`; run as root: `./target/release/wg-restart --trials 5`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use causeway_bench::report::{percentile, Common, Report};
use causeway_datapath::bpf::loader;
use causeway_datapath::wireguard::{uapi_socket, PrivateKey};
use causeway_store::validate::RemoteEntry;
use causeway_store::{ClusterId, ClusterName, MaxConnectedClusters, Node, NodeAddress, RemoteContext};
use causeway_testsupport::netns::{self, unique_ifname, Netns, TwoNodes};
use clap::Parser;
use identity_sync::core::{CoreConfig, MergedView};
use identity_sync::stream::{MeshViewHub, StreamConfig, StreamMetrics};

#[derive(Parser, Debug)]
#[command(about = "TCP stall when a node agent is SIGKILLed and restarted: receiving side vs sending side")]
struct Args {
    /// Restarts of each side (alternating: sending side, then receiving side).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// The stream writes this many KiB...
    #[arg(long, default_value_t = 16)]
    chunk_kib: usize,
    /// ...every this many milliseconds.
    #[arg(long, default_value_t = 2)]
    interval_ms: u64,
    /// Time between the SIGKILL and starting the agent again.
    #[arg(long, default_value_t = 0)]
    down_ms: u64,
    /// Steady streaming before each trial, so TCP's retransmission timer is back to normal.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// Control run: drop the packet the agent sends into the tunnel to start a handshake with a peer it adds (an
    /// ICMP echo reply; nftables, output hook, both nodes), which reproduces the behaviour before it did so.
    #[arg(long)]
    without_handshake_start: bool,
    /// Exit non-zero when the target is missed.
    #[arg(long)]
    enforce: bool,
}

const WG_PORT: u16 = 51871;
const METRICS_PORT: u16 = 9964;
const CLUSTER: &str = "west";

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wg-restart failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A node's pin directory and state directory (with its WireGuard key), removed on drop.
struct NodeState {
    pin_dir: PathBuf,
    state_dir: PathBuf,
    key: PrivateKey,
}

impl NodeState {
    fn new(tag: &str) -> Result<NodeState> {
        let name = netns::unique_name(&format!("cw-wgrb-{tag}"));
        let st = NodeState {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            state_dir: std::env::temp_dir().join(format!("{name}.state")),
            key: PrivateKey::generate(),
        };
        std::fs::create_dir_all(&st.state_dir)?;
        // Written where the agent reads it, so the node record can carry the public key from the start.
        std::fs::write(st.state_dir.join("wireguard.key"), st.key.to_base64())?;
        Ok(st)
    }
}

impl Drop for NodeState {
    fn drop(&mut self) {
        if let Err(e) = loader::uninstall(&self.pin_dir) {
            eprintln!("cleanup of {}: {e}", self.pin_dir.display());
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// One node: its namespace, underlay IP, state and WireGuard interface name (the interface goes with the netns;
/// the UAPI socket file a killed agent leaves is removed on drop).
struct BenchNode<'a> {
    ns: &'a Netns,
    ip: &'static str,
    st: NodeState,
    wg: String,
}

impl Drop for BenchNode<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(uapi_socket(&self.wg));
    }
}

/// A running agent (`nsenter --net` execs it: same pid); SIGTERMed and reaped on drop.
struct Agent(Option<Child>);

impl Agent {
    fn sigkill(&mut self) -> Result<()> {
        if let Some(mut child) = self.0.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else { return };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        if !netns::wait_for(Duration::from_secs(5), || matches!(child.try_wait(), Ok(Some(_)))) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl BenchNode<'_> {
    fn start(&self, agent_bin: &PathBuf, hub_addr: &str) -> Result<Agent> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.path().display()))
            .arg(agent_bin)
            .args(["--node-name", self.ns.name(), "--node-ip", self.ip])
            .args(["--metrics-addr", &format!("{}:{METRICS_PORT}", self.ip), "--identity-sync-addr", hub_addr])
            .args(["--bpffs-root", &self.st.pin_dir.to_string_lossy()])
            .args(["--state-dir", &self.st.state_dir.to_string_lossy()])
            .args(["--pod-interfaces", "pod0", "--wireguard-interface", &self.wg])
            .args(["--wireguard-port", &WG_PORT.to_string()])
            .env_remove("CAUSEWAY_DRY_RUN")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Agent(Some(child)))
    }

    /// `/readyz` answers 200 (streams synced, datapath reconciled).
    fn wait_ready(&self) -> Result<()> {
        let addr: SocketAddr = format!("{}:{METRICS_PORT}", self.ip).parse()?;
        let ready = || {
            self.ns
                .run_in(move || -> Option<()> {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: agent\r\n\r\n").ok()?;
                    let mut out = String::new();
                    s.read_to_string(&mut out).ok()?;
                    (out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")).then_some(())
                })
                .ok()
                .flatten()
                .is_some()
        };
        ensure!(netns::wait_for(Duration::from_secs(120), ready), "the agent in {} never became ready", self.ns.name());
        Ok(())
    }
}

fn node_record(name: &str, ip: &str, cidr: &str, key: &PrivateKey) -> Result<RemoteEntry> {
    Ok(RemoteEntry::Node(Node {
        name: name.into(),
        cluster: CLUSTER.into(),
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
        wireguard_pub_key: key.public_key().to_base64(),
        boot_id: String::new(),
    }))
}

/// identity-sync's hub holding both nodes' records (each agent skips the one carrying its own IP).
fn mesh_hub(nodes: &[&BenchNode<'_>]) -> Result<MeshViewHub> {
    let mut v = MergedView::new(CoreConfig::default());
    let mode = MaxConnectedClusters::C255;
    v.remote_added(CLUSTER)?;
    v.remote_validated(RemoteContext {
        name: ClusterName::new(CLUSTER).context("cluster name")?,
        id: ClusterId::new(2, mode).context("cluster id")?,
        mode,
    })?;
    let hub = MeshViewHub::new(v, StreamConfig::default(), StreamMetrics::default());
    for (n, cidr) in nodes.iter().zip([TwoNodes::POD_A_CIDR, TwoNodes::POD_B_CIDR]) {
        let rec = node_record(n.ns.name(), n.ip, cidr, &n.st.key)?;
        hub.update(|v| v.entry_upsert(CLUSTER, rec))?;
    }
    Ok(hub)
}

/// The paced stream from pod A to pod B. The reader keeps the byte count and the largest gap between two reads
/// since the last [`Stream::reset_gap`]; both threads end when `stop` is set (or the connection breaks).
struct Stream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    max_gap_us: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl Stream {
    fn start(from: &Netns, to: &Netns, to_ip: &str, chunk: usize, interval: Duration) -> Result<Stream> {
        let bind: SocketAddr = format!("{to_ip}:0").parse()?;
        let listener = to.run_in(move || TcpListener::bind(bind))??;
        let server = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let max_gap_us = Arc::new(AtomicU64::new(0));
        let reader = {
            let (stop, received, max_gap_us) = (stop.clone(), received.clone(), max_gap_us.clone());
            to.enter(move || -> Result<()> {
                let (mut s, _) = listener.accept()?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                let mut buf = vec![0u8; 256 * 1024];
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let n = match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                            continue
                        }
                        Err(e) => return Err(e).context("receiving (a reset shows here)"),
                    };
                    let now = Instant::now();
                    max_gap_us.fetch_max(now.duration_since(last).as_micros() as u64, Ordering::Relaxed);
                    last = now;
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(())
            })?
        };
        let writer = {
            let stop = stop.clone();
            from.enter(move || -> Result<()> {
                let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
                s.set_write_timeout(Some(Duration::from_millis(200)))?;
                let data = vec![0x5au8; chunk];
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    // A full send buffer (the tunnel is down) blocks here; the timeout lets `stop` be seen.
                    let mut off = 0;
                    while off < data.len() && !stop.load(Ordering::Relaxed) {
                        match s.write(&data[off..]) {
                            Ok(n) => off += n,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(e) => return Err(e).context("sending (a reset shows here)"),
                        }
                    }
                    next += interval;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                Ok(())
            })?
        };
        Ok(Stream { stop, received, max_gap_us, threads: vec![reader, writer] })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn reset_gap(&self) {
        self.max_gap_us.store(0, Ordering::Relaxed);
    }

    fn max_gap(&self) -> Duration {
        Duration::from_micros(self.max_gap_us.load(Ordering::Relaxed))
    }

    /// Waits until at least another `bytes` arrived.
    fn progressed(&self, bytes: u64, within: Duration) -> bool {
        let before = self.received();
        netns::wait_for(within, || self.received() >= before + bytes)
    }

    fn finish(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(args: Args) -> Result<ExitCode> {
    ensure!(netns::privileged("wg-restart"), "needs root and network namespaces");
    ensure!(args.trials > 0 && args.chunk_kib > 0, "--trials and --chunk-kib must be positive");
    let agent_bin = causeway_multicluster_tests::binary("causeway-node-agent")?;
    let mut report = Report::start(
        "wg-restart",
        "TCP stall (largest gap between reads) across a node agent SIGKILL + restart, per side of the stream",
        &Common { enforce: args.enforce, runs: args.trials },
    );
    println!(
        "   stream {} KiB every {} ms, agent restarted {} ms after the SIGKILL, binary {}",
        args.chunk_kib,
        args.interval_ms,
        args.down_ms,
        agent_bin.display()
    );

    let t = TwoNodes::new()?;
    if args.without_handshake_start {
        for ns in [&t.node_a, &t.node_b] {
            // Removed with the netns.
            ns.sh("nft add table inet cw_wgrestart_ctl && nft add chain inet cw_wgrestart_ctl out \
                 '{ type filter hook output priority 0; }' && nft add rule inet cw_wgrestart_ctl out \
                 oifname \"cwwg*\" icmp type echo-reply drop")?;
        }
        println!("   control run: the agents' handshake-starting echo replies are dropped");
    }
    let a = BenchNode { ns: &t.node_a, ip: TwoNodes::NODE_A_IP, st: NodeState::new("a")?, wg: unique_ifname("cwwg") };
    let b = BenchNode { ns: &t.node_b, ip: TwoNodes::NODE_B_IP, st: NodeState::new("b")?, wg: unique_ifname("cwwg") };

    // identity-sync's MeshView server on node A's underlay address (both agents reach it there).
    let rt = tokio::runtime::Runtime::new()?;
    let bind: SocketAddr = format!("{}:0", a.ip).parse()?;
    let std_listener = t.node_a.run_in(move || TcpListener::bind(bind))??;
    std_listener.set_nonblocking(true)?;
    let hub_addr = std_listener.local_addr()?.to_string();
    let hub = mesh_hub(&[&a, &b])?;
    rt.spawn(async move {
        let Ok(l) = tokio::net::TcpListener::from_std(std_listener) else { return };
        let incoming = futures::stream::unfold(l, |l| async move { Some((l.accept().await.map(|(s, _)| s), l)) });
        let _ = tonic::transport::Server::builder().add_service(hub.server()).serve_with_incoming(incoming).await;
    });

    let mut agent_a = a.start(&agent_bin, &hub_addr)?;
    let mut agent_b = b.start(&agent_bin, &hub_addr)?;
    a.wait_ready()?;
    b.wait_ready()?;
    ensure!(
        netns::wait_for(Duration::from_secs(30), || netns::ping(&t.pod_a, TwoNodes::POD_B_IP).is_ok()),
        "pod A never reached pod B through the agents' tunnel"
    );
    let stream = Stream::start(
        &t.pod_a,
        &t.pod_b,
        TwoNodes::POD_B_IP,
        args.chunk_kib * 1024,
        Duration::from_millis(args.interval_ms),
    )?;
    ensure!(stream.progressed(1 << 20, Duration::from_secs(20)), "the stream never got going");

    let (mut sending, mut receiving) = (Vec::new(), Vec::new());
    for trial in 1..=args.trials {
        for (label, node, agent, out) in [
            ("sending side (node A)", &a, &mut agent_a, &mut sending),
            ("receiving side (node B)", &b, &mut agent_b, &mut receiving),
        ] {
            std::thread::sleep(Duration::from_millis(args.settle_ms));
            ensure!(
                stream.progressed(256 * 1024, Duration::from_secs(30)),
                "the stream is not flowing before the trial"
            );
            stream.reset_gap();
            let killed = Instant::now();
            agent.sigkill()?;
            std::thread::sleep(Duration::from_millis(args.down_ms));
            *agent = node.start(&agent_bin, &hub_addr)?;
            node.wait_ready()?;
            let ready = killed.elapsed();
            ensure!(
                stream.progressed(1 << 20, Duration::from_secs(120)),
                "trial {trial}, {label}: the stream never resumed"
            );
            let stall = stream.max_gap();
            println!(
                "   trial {trial:>2} {label:<24} stall {:>8.1} ms   (kill -> agent ready {:>7.1} ms)",
                ms(stall),
                ms(ready)
            );
            out.push(ms(stall));
        }
    }
    stream.finish()?;
    drop((agent_a, agent_b));

    sending.sort_by(f64::total_cmp);
    receiving.sort_by(f64::total_cmp);
    let p50 = |v: &[f64]| percentile(v, 50.0);
    let max = |v: &[f64]| v.last().copied().unwrap_or(0.0);
    report.row(
        "stall, receiving side restarted (measured)",
        format!("p50 {:.1} ms, max {:.1} ms", p50(&receiving), max(&receiving)),
    );
    report.row(
        "stall, sending side restarted (baseline)",
        format!("p50 {:.1} ms, max {:.1} ms", p50(&sending), max(&sending)),
    );
    report.row("receiving - sending (p50)", format!("{:.1} ms", p50(&receiving) - p50(&sending)));
    // The receiving side should cost at most a round trip or two more than the sending side, not a rekey timeout.
    report.target("receiving-side max <= sending-side max + 1 s", max(&receiving) <= max(&sending) + 1000.0);
    Ok(report.finish())
}
