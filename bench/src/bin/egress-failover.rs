//! egress-failover: a gateway's underlay cable is cut while a pod streams UDP through it to the legacy server; how
//! long until the server sees the pod's packets again, through the other gateway's egress IP.
//!
//! Set-up (the `causeway-egress-e2e` harness, the same one the e2e tests use): 3 node namespaces on an underlay
//! switch, gw-a and gw-b gateways in two zones, the real `egress-gw` and one real `causeway-node-agent` per node, a
//! legacy server behind an nftables firewall that lets only the egress IPs through. One policy selects a pod on the
//! worker, both gateways active; the pod sends a datagram every `--interval-ms` (10 ms) to the server. The stream is
//! pinned to one gateway; each trial cuts that gateway's switch port and restores it once traffic is back, then
//! waits until the controller has re-admitted it (after `--hold-down`) and the worker's datapath lists it again.
//!
//! - Measured: cut the cable; the controller's probes (100 ms) notice, it streams the new assignment, the worker's
//!   agent rewrites its group map.
//! - Baseline, the datapath floor, interleaved with the measured trials: cut the cable and at once remove the gateway
//!   from the worker's pinned group map by hand (what the agent writes once the assignment arrives), measured the
//!   same way. What is left is the packet path itself plus the stream's interval.
//!
//! The clock starts just before the cable is cut and stops at the first datagram the server receives from the
//! surviving gateway's egress IP. Target: p99 ≤ 1 s. Build the binaries in the same profile first:
//! `cargo build --release -p causeway-egress-gw -p causeway-datapath --bins`; run as root.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use causeway_bench::report::{percentile, Common, Report};
use causeway_datapath::bpf::maps::EgressGroupsMap;
use causeway_egress_e2e::topology::LEGACY_SERVER;
use causeway_egress_e2e::{
    billing_policy, EgressCluster, Options, UdpSink, UdpStream, BILLING, GW_A, GW_B, UDP_PORT, WORKER,
};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Egress gateway failover: cable cut -> traffic through the other gateway, vs the datapath floor")]
struct Args {
    /// Trials of each kind (measured and baseline, interleaved).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// The pod's UDP stream: one datagram every this many milliseconds.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// egress-gw --hold-down (only delays re-admission between trials, not failover).
    #[arg(long, default_value_t = 1000)]
    hold_down_ms: u64,
    /// A trial that has not recovered after this many seconds counts as infinite.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Exit non-zero when the target is missed.
    #[arg(long)]
    enforce: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egress-failover failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Controller,
    ByHand,
}

fn run(args: Args) -> Result<ExitCode> {
    ensure!(causeway_testsupport::netns::privileged("egress-failover"), "needs root and network namespaces");
    let mut report = Report::start(
        "egress-failover",
        "cable cut of the active gateway -> pod's UDP stream seen from the other gateway's egress IP",
        &Common { enforce: args.enforce, runs: args.trials },
    );
    let mut c =
        EgressCluster::start(Options { hold_down: Duration::from_millis(args.hold_down_ms), ..Options::default() })?;
    let sink = UdpSink::start(&c.topo.server, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    let pod = c.add_pod(WORKER, "billing-1", BILLING)?;
    c.create_policy("billing", billing_policy(json!({}), None))?;
    c.wait_active("billing", &[GW_A, GW_B])?;
    let _stream = UdpStream::start(
        c.pod(pod),
        SocketAddr::from((LEGACY_SERVER, UDP_PORT)),
        Duration::from_millis(args.interval_ms),
    )?;
    let name = c.pod(pod).name.clone();

    let timeout = Duration::from_secs(args.timeout);
    let (mut measured, mut baseline) = (Vec::new(), Vec::new());
    for trial in 0..args.trials * 2 {
        let kind = if trial % 2 == 0 { Kind::Controller } else { Kind::ByHand };
        let victim = steady(&c, &sink, &name)?;
        let survivor = if victim == GW_A { GW_B } else { GW_A };
        let survivor_ip = IpAddr::V4(c.topo.nodes[survivor].egress_ip);
        let t0 = Instant::now();
        c.topo.set_underlay(victim, false)?;
        let saved = match kind {
            Kind::ByHand => Some(c.remove_gateway_by_hand(WORKER, c.topo.nodes[victim].ip)?),
            Kind::Controller => None,
        };
        let ms = match sink.wait_from(&name, survivor_ip, t0, timeout) {
            Some(at) => at.duration_since(t0).as_secs_f64() * 1e3,
            None => f64::INFINITY,
        };
        if let Some(saved) = saved {
            // The controller may not even have noticed so short a cut: put back what the agent believes it wrote.
            c.restore_groups_by_hand(WORKER, &saved)?;
        }
        c.topo.set_underlay(victim, true)?;
        let label = match kind {
            Kind::Controller => "controller",
            Kind::ByHand => "by hand",
        };
        println!(
            "   trial {:>2} {label:<10} {} -> {}: {ms:.1} ms",
            trial / 2 + 1,
            c.topo.nodes[victim].name,
            c.topo.nodes[survivor].name
        );
        match kind {
            Kind::Controller => measured.push(ms),
            Kind::ByHand => baseline.push(ms),
        }
        sink.clear();
    }
    measured.sort_by(f64::total_cmp);
    baseline.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&measured, 50.0), percentile(&measured, 99.0));
    let (b50, b99) = (percentile(&baseline, 50.0), percentile(&baseline, 99.0));
    report.row("failover, controller (probes -> assignment -> map)", format!("p50 {p50:.1} ms, p99 {p99:.1} ms"));
    report.row("baseline: same cut, map rewritten by hand", format!("p50 {b50:.1} ms, p99 {b99:.1} ms"));
    report.row("min / max, controller", format!("{:.1} / {:.1} ms", measured[0], measured[measured.len() - 1]));
    report.row("min / max, baseline", format!("{:.1} / {:.1} ms", baseline[0], baseline[baseline.len() - 1]));
    report.row("controller - baseline (p50)", format!("{:.1} ms", p50 - b50));
    report.target("failover p99 <= 1 s", p99 <= 1000.0);
    Ok(report.finish())
}

/// Waits until both gateways are active again, in the controller's status and in the worker's pinned group map, and
/// the pod's stream flows through one of them; returns that one (the next victim).
fn steady(c: &EgressCluster, sink: &UdpSink, name: &str) -> Result<usize> {
    c.wait_active("billing", &[GW_A, GW_B])?;
    let want = [c.topo.nodes[GW_A].ip, c.topo.nodes[GW_B].ip];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = EgressGroupsMap::open(&c.topo.nodes[WORKER].pin_dir)?.entries()?;
        let both = !groups.is_empty() && groups.iter().all(|(_, g)| want.iter().all(|ip| g.gateways.contains(ip)));
        let flowing = sink.last_from(name).filter(|(at, _)| at.elapsed() < Duration::from_millis(100));
        if let (true, Some((_, src))) = (both, flowing) {
            // Let the stream settle on its gateway for a few datagrams.
            std::thread::sleep(Duration::from_millis(200));
            let (_, now) = sink.last_from(name).context("stream stopped")?;
            if now == src {
                return c.topo.node_with_egress_ip(src).context("traffic through a non-gateway");
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the gateways never both came back: worker groups {groups:?}, last arrival {:?}",
                sink.last_from(name)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
