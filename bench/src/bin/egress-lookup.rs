//! Per-packet cost of the egress steering lookup, measured in the kernel with BPF_PROG_TEST_RUN (`repeat`, the
//! kernel's own per-run average), at 1, 1k and 100k policy entries — beside a Cilium-style baseline in the same
//! run.
//!
//! - Causeway (`cw_from_pod`, the production program, full path: parse, ipcache check, pod → class hash,
//!   (class, CIDR) LPM, group, per-flow gateway pin, mark, tunnel key, redirect). At size N: N pods in
//!   `cw_egress_src` spread over 16 source classes, and N destination CIDRs in `cw_egress_policy`, spread over
//!   the same classes.
//! - Baseline (`bench_baseline.bpf.c`): one LPM keyed {saddr, daddr} queried with prefix 64, one entry per
//!   (pod, CIDR) as in cilium#22805, N entries (√N pods × √N CIDRs). It does strictly less work per packet
//!   (no ipcache check, no per-flow pin).
//!
//! Memory is entries × (key + value) bytes, kernel overhead excluded; "baseline for the same policy" is what the
//! {saddr, daddr} design needs for Causeway's workload at that size (every pod × every CIDR of its class).
//!
//! Needs root (BPF). `cargo run --release -p causeway-bench --bin egress-lookup [-- --runs 5]`

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::EbpfLoader;
use causeway_bench::report::{median, spread, Common, Report};
use causeway_datapath::bpf::loader::{self, Hook};
use causeway_datapath::bpf::maps::{names, ClassId, EgressAction, EgressGroup, GroupId, NodeConfig};
use causeway_datapath::bpf::types::{EgressPolicyKey, EgressPolicyValue, EgressSrcKey};
use causeway_datapath::bpf::{objects, BpfLoader, BpfMaps};
use clap::Parser;
use ipnet::{IpNet, Ipv4Net};

const SIZES: [u32; 3] = [1, 1_000, 100_000];
const CLASSES: u32 = 16;
/// Distinct (pod, destination) packets measured per size; each runs `REPEAT` times in the kernel.
const SAMPLES: u32 = 16;
const REPEAT: u32 = 50_000;
const TC_ACT_REDIRECT: u32 = 7;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
}

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i)
}

/// The j-th destination CIDR: distinct /24s from 20.0.0.0.
fn cidr(j: u32) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(u32::from(Ipv4Addr::new(20, 0, 0, 0)) + (j << 8)), 24).expect("/24")
}

fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr) -> Result<Vec<u8>> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 5], [2, 0, 0, 0, 0, 1])
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(40000, 53);
    let mut v = Vec::with_capacity(b.size(8));
    b.write(&mut v, b"causeway")?;
    Ok(v)
}

/// Mean ns per run of `prog` over `frames`, from the kernel's duration (already divided by `repeat`).
fn ns_per_packet(prog: &SchedClassifier, frames: &[Vec<u8>]) -> Result<f64> {
    let mut total = 0.0;
    for f in frames {
        let mut out = vec![0u8; f.len() + 64];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(f),
            data_out: Some(&mut out),
            repeat: REPEAT,
            ..TestRunOptions::default()
        })?;
        if r.return_value != TC_ACT_REDIRECT {
            bail!("expected a policy hit (TC_ACT_REDIRECT), got {}", r.return_value);
        }
        total += r.duration.as_nanos() as f64;
    }
    Ok(total / frames.len() as f64)
}

struct Causeway {
    pin_dir: PathBuf,
    progs: causeway_datapath::bpf::BpfPrograms,
    frames: Vec<Vec<u8>>,
    entries: u64,
    bytes: u64,
}

impl Drop for Causeway {
    fn drop(&mut self) {
        let _ = loader::uninstall(&self.pin_dir);
    }
}

fn setup_causeway(n: u32) -> Result<Causeway> {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/cw-bench-{}-{n}", std::process::id()));
    let progs = BpfLoader::new(&pin_dir)
        .max_entries(names::EGRESS_SRC, 131_072)
        .max_entries(names::EGRESS_POLICY, 131_072)
        .load()?;
    let mut cw = Causeway { pin_dir, progs, frames: Vec::new(), entries: 0, bytes: 0 };
    let mut maps = BpfMaps::open(&cw.pin_dir)?;
    maps.config.set(NodeConfig {
        node_ipv4: Ipv4Addr::new(192, 168, 50, 1),
        vxlan_ifindex: 1,
        enforce_policy: false,
    })?;
    let group = GroupId(1);
    let gws = vec![Ipv4Addr::new(192, 168, 50, 2), Ipv4Addr::new(192, 168, 50, 3)];
    maps.egress_groups.upsert(group, &EgressGroup { egress_ip: "192.0.2.10".parse()?, gateways: gws })?;
    let classes = CLASSES.min(n);
    for i in 0..n {
        maps.egress_src.upsert(pod_ip(i).into(), ClassId(i % classes + 1))?;
        maps.egress_policy.upsert(ClassId(i % classes + 1), IpNet::V4(cidr(i)), EgressAction::Steer(group))?;
    }
    let src_entry = (size_of::<EgressSrcKey>() + size_of::<u32>()) as u64;
    let policy_entry = (size_of::<EgressPolicyKey>() + size_of::<EgressPolicyValue>()) as u64;
    cw.entries = 2 * u64::from(n);
    cw.bytes = u64::from(n) * (src_entry + policy_entry);
    // Packets from pods spread over the set, to a CIDR of the pod's class.
    for s in 0..SAMPLES.min(n) {
        let pod = s * (n / SAMPLES.min(n));
        let class_base = pod % classes;
        // CIDR index j with j % classes == pod's class, spread over the range.
        let j = ((s * (n / SAMPLES.min(n))) / classes) * classes + class_base;
        let j = if j < n { j } else { class_base };
        let dst = Ipv4Addr::from(u32::from(cidr(j).network()) + 7);
        cw.frames.push(udp_frame(pod_ip(pod), dst)?);
    }
    Ok(cw)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct BaselineKey {
    saddr: [u8; 4],
    daddr: [u8; 4],
}
#[repr(C)]
#[derive(Clone, Copy)]
struct BaselineValue {
    egress_ip: [u8; 4],
    gateway_ip: [u8; 4],
}
// SAFETY: repr(C) byte arrays, no padding; mirrors struct cw_bench_baseline_{key,value} (minus prefixlen).
unsafe impl aya::Pod for BaselineKey {}
unsafe impl aya::Pod for BaselineValue {}

struct Baseline {
    ebpf: aya::Ebpf,
    frames: Vec<Vec<u8>>,
    bytes: u64,
    pin_dir: PathBuf,
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn setup_baseline(n: u32) -> Result<Baseline> {
    // The baseline includes causeway.h, whose shared maps pin by name: give them a directory of their own.
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/cw-bench-baseline-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pin_dir)
        .map_max_entries("cw_bench_baseline", 131_072)
        .load(objects::BENCH_BASELINE)?;
    {
        let p: &mut SchedClassifier =
            ebpf.program_mut("cw_bench_baseline_from_pod").context("baseline program")?.try_into()?;
        p.load()?;
    }
    let pods = (f64::from(n).sqrt().ceil() as u32).max(1);
    let per_pod = n.div_ceil(pods);
    let mut frames = Vec::new();
    {
        let mut lpm: LpmTrie<_, BaselineKey, BaselineValue> =
            LpmTrie::try_from(ebpf.map_mut("cw_bench_baseline").context("baseline map")?)?;
        let value = BaselineValue { egress_ip: [192, 0, 2, 10], gateway_ip: [192, 168, 50, 2] };
        let mut inserted = 0;
        'fill: for p in 0..pods {
            for j in 0..per_pod {
                if inserted == n {
                    break 'fill;
                }
                let key =
                    Key::new(32 + 24, BaselineKey { saddr: pod_ip(p).octets(), daddr: cidr(j).network().octets() });
                lpm.insert(&key, value, 0)?;
                inserted += 1;
            }
        }
        for s in 0..SAMPLES.min(n) {
            let idx = s * (n / SAMPLES.min(n));
            let (p, j) = (idx / per_pod, idx % per_pod);
            frames.push(udp_frame(pod_ip(p), Ipv4Addr::from(u32::from(cidr(j).network()) + 7))?);
        }
    }
    let bytes = u64::from(n) * (size_of::<u32>() + size_of::<BaselineKey>() + size_of::<BaselineValue>()) as u64;
    Ok(Baseline { ebpf, frames, bytes, pin_dir })
}

fn baseline_prog(b: &Baseline) -> Result<&SchedClassifier> {
    Ok(b.ebpf.program("cw_bench_baseline_from_pod").context("baseline program")?.try_into()?)
}

fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egress-lookup: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode> {
    if !nix_is_root() {
        bail!("needs root (loads BPF programs and runs BPF_PROG_TEST_RUN)");
    }
    let mut report = Report::start(
        "egress-lookup",
        "ns/packet of the egress steering program via BPF_PROG_TEST_RUN, flat keys vs a {saddr,daddr} LPM",
        &args.common,
    );
    let mut ours_median = Vec::new();
    for &n in &SIZES {
        let cw = setup_causeway(n)?;
        let base = setup_baseline(n)?;
        let ours_prog = cw.progs.classifier(Hook::FromPod)?;
        let base_prog = baseline_prog(&base)?;
        // Warm up (first packet of each flow creates its pin), then alternate to share the machine's noise.
        ns_per_packet(ours_prog, &cw.frames)?;
        ns_per_packet(base_prog, &base.frames)?;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..args.common.runs.max(1) {
            ours.push(ns_per_packet(ours_prog, &cw.frames)?);
            theirs.push(ns_per_packet(base_prog, &base.frames)?);
        }
        let m = median(&ours);
        ours_median.push(m);
        let same_policy_entries = f64::from(n) * (f64::from(n) / f64::from(CLASSES.min(n))).max(1.0);
        let base_entry = (size_of::<u32>() + size_of::<BaselineKey>() + size_of::<BaselineValue>()) as f64;
        println!("   -- size {n}");
        report.row("causeway cw_from_pod", spread(&ours, "ns/pkt", 1));
        report.row("baseline {saddr,daddr} LPM (same run)", spread(&theirs, "ns/pkt", 1));
        report.row("ratio causeway / baseline", format!("{:.2}x", m / median(&theirs)));
        report.row(
            "causeway memory (pods + classes x CIDRs entries)",
            format!("{} entries, {}", cw.entries, human_bytes(cw.bytes as f64)),
        );
        report.row("baseline memory as measured", format!("{n} entries, {}", human_bytes(base.bytes as f64)));
        report.row(
            "baseline for causeway's policy (pods x CIDRs)",
            format!(
                "{same_policy_entries:.0} entries, {}{}",
                human_bytes(same_policy_entries * base_entry),
                if same_policy_entries > 16_384.0 { " (over Cilium's 16k map limit)" } else { "" }
            ),
        );
    }
    let flat = ours_median.last().copied().unwrap_or(0.0) / ours_median.first().copied().unwrap_or(1.0);
    report.row("causeway 100k / 1 entries", format!("{flat:.2}x"));
    report.target("per-packet cost flat within 25% from 1 to 100k entries", flat <= 1.25);
    Ok(report.finish())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}
