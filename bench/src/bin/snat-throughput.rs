//! snat-throughput: iperf3 through a gateway netns, pod netns -> gateway netns -> external netns, with the
//! gateway doing (a) plain routing (the external host routes the pod CIDR back), (b) nftables masquerade,
//! (c) Causeway's BPF SNAT (`cw_snat_out`/`cw_snat_in` on the gateway's external veth).
//!
//! Two figures per mode: a single TCP flow (Gbit/s) and 64-byte UDP datagrams (received packets/s, iperf3
//! `-u -b 0 -l 64`). Modes run interleaved for `--rounds` rounds, each on a fresh topology; the median is
//! printed with the ratio of (c) to (b). Needs root, iperf3 and nft.
//!
//! In (c) the egress mark that the source node's steering program sets in production is set by one stateless
//! nftables rule on the gateway's forward hook (this kernel has no tc skbedit action), so (c) pays for a netfilter
//! filter hook it would not have in production; (b) needs conntrack and its NAT hooks by construction.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use causeway_datapath::bpf::maps::{EgressGroup, EgressGroupsMap, GroupId};
use causeway_datapath::bpf::snat::{LoadOptions, Snat, SnatConfig, SnatStat};
use causeway_testsupport::netns::{self, Netns};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "SNAT throughput: plain routing vs nftables masquerade vs Causeway BPF SNAT")]
struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Interleaved rounds of (a, b, c); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const POD_IP: &str = "10.244.1.5";
const SERVER_IP: &str = "192.0.2.1";
const EGRESS_IP: &str = "192.0.2.10";
const GROUP: u32 = 7;
const MARK: u32 = 0xce00_0000 | GROUP;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Nft,
    Bpf,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Plain => "(a) plain routing",
            Mode::Nft => "(b) nftables masquerade",
            Mode::Bpf => "(c) causeway BPF SNAT",
        }
    }
}

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// One topology with its gateway configured for `mode`; everything is removed on drop.
struct Path {
    pod: Netns,
    _gw: Netns,
    ext: Netns,
    snat: Option<(Snat, PinDir)>,
}

fn build(mode: Mode) -> Result<Path> {
    let pod = Netns::new("stpod")?;
    let gw = Netns::new("stgw")?;
    let ext = Netns::new("stext")?;
    netns::veth(&pod, "eth0", &format!("{POD_IP}/24"), &gw, "pod0", "10.244.1.1/24")?;
    netns::veth(&gw, "ext0", "192.0.2.2/24", &ext, "eth0", &format!("{SERVER_IP}/24"))?;
    pod.ip("route add default via 10.244.1.1")?;
    gw.router()?;
    gw.ip(&format!("addr add {EGRESS_IP}/32 dev ext0"))?;
    let mut snat = None;
    match mode {
        Mode::Plain => {
            ext.ip("route add 10.244.0.0/16 via 192.0.2.2")?;
        }
        Mode::Nft => {
            gw.exec(&[
                "nft",
                "add table ip cwnat; add chain ip cwnat natpost { type nat hook postrouting priority 100; }; \
                 add rule ip cwnat natpost oifname ext0 ip saddr 10.244.0.0/16 masquerade",
            ])?;
        }
        Mode::Bpf => {
            // Stand-in for the steering program's mark (this kernel has no tc skbedit action): one stateless
            // nftables filter rule on the forward hook; no conntrack.
            gw.exec(&[
                "nft",
                &format!(
                    "add table inet cwmark; add chain inet cwmark markfwd {{ type filter hook forward priority 0; }}; \
                     add rule inet cwmark markfwd iifname pod0 oifname ext0 meta mark set {MARK:#x}"
                ),
            ])?;
            let pin = PinDir(PathBuf::from("/sys/fs/bpf").join(netns::unique_name("cw-snat-bench")));
            let mut s = Snat::load(&LoadOptions::new(&pin.0))?;
            s.set_config(&SnatConfig { port_min: 20000, port_max: 29999, ..Default::default() })?;
            EgressGroupsMap::open(&pin.0)?
                .upsert(GroupId(GROUP), &EgressGroup { egress_ip: EGRESS_IP.parse()?, gateways: vec![] })?;
            gw.run_in(|| s.attach("ext0"))??;
            snat = Some((s, pin));
        }
    }
    netns::ping(&pod, SERVER_IP).context("pod reaches the server")?;
    Ok(Path { pod, _gw: gw, ext, snat })
}

fn json_f64(v: &serde_json::Value, path: &[&str]) -> Result<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).with_context(|| format!("iperf3 JSON has no {}", path.join(".")))?;
    }
    cur.as_f64().with_context(|| format!("{} is not a number", path.join(".")))
}

/// Runs one iperf3 client in the pod against a fresh server in the external netns.
fn iperf(path: &Path, secs: u32, udp: bool) -> Result<f64> {
    let mut server = path.ext.spawn(&["iperf3", "-s", "-1", "-B", SERVER_IP])?;
    ensure!(
        netns::wait_for(Duration::from_secs(5), || {
            path.ext.exec(&["sh", "-c", "ss -ltn | grep -q ':5201'"]).is_ok()
        }),
        "iperf3 server did not start"
    );
    let secs_s = secs.to_string();
    let mut argv = vec!["iperf3", "-c", SERVER_IP, "-t", &secs_s, "-J"];
    if udp {
        argv.extend(["-u", "-b", "0", "-l", "64"]);
    }
    let out = path.pod.exec_unchecked(&argv)?;
    let _ = server.is_running();
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
        Ok(json_f64(&v, &["end", "sum_received", "bits_per_second"])? / 1e9)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn run(args: &Args) -> Result<()> {
    ensure!(netns::privileged("snat-throughput"), "snat-throughput needs root (netns, BPF)");
    let modes = [Mode::Plain, Mode::Nft, Mode::Bpf];
    let mut tcp: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut pps: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for round in 0..args.rounds {
        for (i, mode) in modes.iter().enumerate() {
            let path = build(*mode)?;
            let t = iperf(&path, args.seconds, false)?;
            let p = iperf(&path, args.seconds, true)?;
            if let Some((s, _)) = &path.snat {
                // The benchmark must measure the translated path: the programs saw the traffic.
                let stats = s.stats()?;
                ensure!(stats[&SnatStat::OutTranslated] > 0 && stats[&SnatStat::InTranslated] > 0, "BPF SNAT idle");
            }
            eprintln!("round {} {:<26} tcp {:6.2} Gbit/s   udp64 {:8.0} pps", round + 1, mode.label(), t, p);
            tcp[i].push(t);
            pps[i].push(p);
        }
    }
    let tcp: Vec<f64> = tcp.into_iter().map(median).collect();
    let pps: Vec<f64> = pps.into_iter().map(median).collect();
    println!("snat-throughput: pod netns -> gateway netns -> external netns, iperf3, median of {} rounds", args.rounds);
    println!("{:<26} {:>14} {:>16}", "mode", "TCP 1 flow", "UDP 64 B");
    for (i, mode) in modes.iter().enumerate() {
        println!("{:<26} {:>9.2} Gbit/s {:>12.0} pps", mode.label(), tcp[i], pps[i]);
    }
    println!(
        "ratio (c)/(b): TCP {:.2}x, UDP 64 B {:.2}x   (target >= 1.0x nftables)",
        tcp[2] / tcp[1],
        pps[2] / pps[1]
    );
    println!("ratio (c)/(a): TCP {:.2}x, UDP 64 B {:.2}x", tcp[2] / tcp[0], pps[2] / pps[0]);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snat-throughput: {e:#}");
            ExitCode::FAILURE
        }
    }
}
