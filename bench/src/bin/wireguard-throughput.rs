//! wireguard-throughput: iperf3 from pod A to pod B across two node netns joined by a veth
//! (`causeway_testsupport::netns::TwoNodes`), the nodes connected by
//!
//! - (a) Causeway's tunnel (boringtun in this process, one `Tunnel` per node) on both ends,
//! - (b) Debian `wireguard-go` configured with `wg` on both ends: the baseline,
//! - (c) no tunnel, plain routing over the veth: the reference ceiling.
//!
//! Figures per mode: one TCP flow (Mbit/s) and 64-byte UDP datagrams (received packets/s, `iperf3 -u -b 0 -l 64`).
//! Modes run interleaved for `--rounds` rounds, each on a fresh topology, and the median is reported with the
//! ratio of (a) to (b). `--threads 1,2,4` measures boringtun with several worker-thread counts. Needs root,
//! iperf3, wireguard-go and wg.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use causeway_datapath::wireguard::{BackendPreference, NodeRecord, PrivateKey, Tunnel, TunnelConfig};
use causeway_testsupport::netns::{self, unique_ifname, Netns, TwoNodes, WireguardGo};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "WireGuard throughput: Causeway (boringtun) vs wireguard-go vs plain veth")]
struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Interleaved rounds of all modes; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// boringtun worker threads per node, one Causeway mode per value (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2")]
    threads: Vec<usize>,
    /// Skip the UDP 64-byte runs.
    #[arg(long)]
    no_udp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Causeway(usize),
    WireguardGo,
    Plain,
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::Causeway(n) => format!("(a) Causeway boringtun x{n}"),
            Mode::WireguardGo => "(b) wireguard-go".to_owned(),
            Mode::Plain => "(c) plain veth".to_owned(),
        }
    }
}

/// The topology plus whatever carries traffic between the nodes; dropping it tears everything down.
struct Path {
    // Tunnels and processes go before the namespaces (fields drop in order).
    causeway: Option<(Tunnel, Tunnel)>,
    wggo: Option<(WireguardGo, WireguardGo)>,
    nodes: TwoNodes,
}

const PORT_A: u16 = 51820;
const PORT_B: u16 = 51821;

fn node_record(name: &str, key: &str, ip: &str, port: u16, pods: &str, router: &str) -> Result<NodeRecord> {
    Ok(NodeRecord {
        name: name.to_owned(),
        public_key: key.to_owned(),
        endpoint: format!("{ip}:{port}").parse()?,
        pod_cidrs: vec![pods.parse()?],
        node_ips: vec![router.parse()?],
    })
}

fn causeway_tunnel(ns: &Netns, threads: usize, port: u16) -> Result<Tunnel> {
    let mut cfg = TunnelConfig::new(unique_ifname("cwb"), PrivateKey::generate(), port);
    cfg.backend = BackendPreference::Userspace;
    cfg.threads = threads;
    Ok(ns.run_in(move || Tunnel::create(cfg))??)
}

fn build(mode: Mode) -> Result<Path> {
    let nodes = TwoNodes::new()?;
    let mut path = Path { causeway: None, wggo: None, nodes };
    let n = &path.nodes;
    match mode {
        Mode::Plain => {
            n.node_a.exec(&["ip", "route", "add", TwoNodes::POD_B_CIDR, "via", TwoNodes::NODE_B_IP])?;
            n.node_b.exec(&["ip", "route", "add", TwoNodes::POD_A_CIDR, "via", TwoNodes::NODE_A_IP])?;
        }
        Mode::WireguardGo => {
            let a = WireguardGo::start(&n.node_a, &unique_ifname("wga"), PORT_A)?;
            let b = WireguardGo::start(&n.node_b, &unique_ifname("wgb"), PORT_B)?;
            a.set_peer(b.public_key(), &format!("{}:{PORT_B}", TwoNodes::NODE_B_IP), &[TwoNodes::POD_B_CIDR])?;
            b.set_peer(a.public_key(), &format!("{}:{PORT_A}", TwoNodes::NODE_A_IP), &[TwoNodes::POD_A_CIDR])?;
            n.node_a.exec(&["ip", "route", "add", TwoNodes::POD_B_CIDR, "dev", a.ifname()])?;
            n.node_b.exec(&["ip", "route", "add", TwoNodes::POD_A_CIDR, "dev", b.ifname()])?;
            path.wggo = Some((a, b));
        }
        Mode::Causeway(threads) => {
            let mut a = causeway_tunnel(&n.node_a, threads, PORT_A)?;
            let mut b = causeway_tunnel(&n.node_b, threads, PORT_B)?;
            let rec_a = node_record(
                "node-a",
                &a.public_key().to_string(),
                TwoNodes::NODE_A_IP,
                PORT_A,
                TwoNodes::POD_A_CIDR,
                TwoNodes::ROUTER_A_IP,
            )?;
            let rec_b = node_record(
                "node-b",
                &b.public_key().to_string(),
                TwoNodes::NODE_B_IP,
                PORT_B,
                TwoNodes::POD_B_CIDR,
                TwoNodes::ROUTER_B_IP,
            )?;
            a.apply_nodes(&[rec_b])?;
            b.apply_nodes(&[rec_a])?;
            path.causeway = Some((a, b));
        }
    }
    netns::ping(&path.nodes.pod_a, TwoNodes::POD_B_IP).context("pod A reaches pod B")?;
    Ok(path)
}

fn json_f64(v: &serde_json::Value, path: &[&str]) -> Result<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).with_context(|| format!("iperf3 JSON has no {}", path.join(".")))?;
    }
    cur.as_f64().with_context(|| format!("{} is not a number", path.join(".")))
}

/// One iperf3 client in pod A against a fresh one-shot server in pod B: Mbit/s for TCP, received packets/s for
/// UDP.
fn iperf(path: &Path, secs: u32, udp: bool) -> Result<f64> {
    let pod_b = &path.nodes.pod_b;
    let _server = pod_b.spawn(&["iperf3", "-s", "-1", "-B", TwoNodes::POD_B_IP])?;
    ensure!(
        netns::wait_for(Duration::from_secs(5), || pod_b.sh("ss -ltn | grep -q ':5201'").is_ok()),
        "iperf3 server did not start"
    );
    let secs_s = secs.to_string();
    let mut argv = vec!["iperf3", "-c", TwoNodes::POD_B_IP, "-t", &secs_s, "-J"];
    if udp {
        argv.extend(["-u", "-b", "0", "-l", "64"]);
    }
    let out = path.nodes.pod_a.exec_unchecked(&argv)?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!("iperf3 output: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    if udp {
        let packets = json_f64(&v, &["end", "sum", "packets"])?;
        let lost = json_f64(&v, &["end", "sum", "lost_packets"])?;
        let seconds = json_f64(&v, &["end", "sum", "seconds"])?;
        Ok((packets - lost) / seconds)
    } else {
        Ok(json_f64(&v, &["end", "sum_received", "bits_per_second"])? / 1e6)
    }
}

/// The benchmark must have measured the tunnel: its peer counters carried the traffic.
fn check_tunnel_carried(path: &Path, min_bytes: u64) -> Result<()> {
    if let Some((a, _)) = &path.causeway {
        let status = a.status()?;
        let peer = status.peers.first().context("Causeway tunnel has its peer")?;
        ensure!(peer.tx_bytes >= min_bytes, "Causeway tunnel carried only {} bytes", peer.tx_bytes);
    }
    if let Some((a, _)) = &path.wggo {
        let out = a.wg(&["show", a.ifname(), "transfer"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let tx: u64 = text.split_whitespace().nth(2).and_then(|t| t.parse().ok()).unwrap_or(0);
        ensure!(tx >= min_bytes, "wireguard-go carried only {tx} bytes: {text}");
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn run(args: &Args) -> Result<()> {
    ensure!(netns::privileged("wireguard-throughput"), "wireguard-throughput needs root (netns, TUN)");
    let mut modes: Vec<Mode> = args.threads.iter().map(|t| Mode::Causeway((*t).max(1))).collect();
    modes.extend([Mode::WireguardGo, Mode::Plain]);
    let mut tcp: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut pps: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..args.rounds {
        for (i, mode) in modes.iter().enumerate() {
            let path = build(*mode)?;
            let t = iperf(&path, args.seconds, false)?;
            check_tunnel_carried(&path, 1 << 20)?;
            let p = if args.no_udp { f64::NAN } else { iperf(&path, args.seconds, true)? };
            eprintln!("round {} {:<30} tcp {:8.0} Mbit/s   udp64 {:8.0} pps", round + 1, mode.label(), t, p);
            tcp[i].push(t);
            pps[i].push(p);
        }
    }
    let tcp: Vec<f64> = tcp.into_iter().map(median).collect();
    let pps: Vec<f64> = pps.into_iter().map(median).collect();
    let base = modes.iter().position(|m| *m == Mode::WireguardGo).context("wireguard-go mode")?;
    println!(
        "wireguard-throughput: pod netns -> node netns =tunnel over veth= node netns -> pod netns, iperf3 {} s, \
         median of {} rounds",
        args.seconds, args.rounds
    );
    println!("{:<30} {:>16} {:>8} {:>14} {:>8}", "mode", "TCP 1 flow", "vs (b)", "UDP 64 B", "vs (b)");
    for (i, mode) in modes.iter().enumerate() {
        println!(
            "{:<30} {:>9.0} Mbit/s {:>7.2}x {:>10.0} pps {:>7.2}x",
            mode.label(),
            tcp[i],
            tcp[i] / tcp[base],
            pps[i],
            pps[i] / pps[base]
        );
    }
    println!("target: (a) >= 1.0x (b) wireguard-go");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wireguard-throughput: {e:#}");
            ExitCode::FAILURE
        }
    }
}
