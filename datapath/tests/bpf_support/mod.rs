//! Shared fixture of the BPF_PROG_TEST_RUN tests: the real programs loaded into the kernel with their maps pinned
//! in a private directory under the bpffs (removed on drop, panics included), and helpers to run a packet
//! through a program and read back the verdict, the mark and the output packet.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use aya::maps::ProgramArray;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use causeway_datapath::bpf::loader::{self, Hook};
use causeway_datapath::bpf::maps::DropReason;
use causeway_datapath::bpf::{objects, BpfLoader, BpfMaps, BpfPrograms};
use etherparse::PacketBuilder;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// `sizeof(struct __sk_buff)` on this kernel's UAPI; `mark` is at offset 8, `cb[0..5]` at 48.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK_OFF: usize = 8;
const SKB_CB_OFF: usize = 48;

pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Fixture {
    pub progs: BpfPrograms,
    pub maps: BpfMaps,
    pin_dir: PathBuf,
    probe: Option<Ebpf>,
}

/// What a program did with one packet.
#[derive(Debug)]
pub struct Outcome {
    pub ret: u32,
    pub mark: u32,
    pub data: Vec<u8>,
}

impl Fixture {
    /// `None` (after printing SKIP) when the test cannot use BPF and is allowed to skip.
    pub fn new(test: &str) -> Option<Fixture> {
        if !causeway_testsupport::netns::privileged(test) {
            return None;
        }
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/cw-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        // Maps are pinned before the programs load: clean up before reporting a load failure.
        let loaded = BpfLoader::new(&pin_dir).load().and_then(|p| Ok((p, BpfMaps::open(&pin_dir)?)));
        let (progs, maps) = match loaded {
            Ok(pm) => pm,
            Err(e) => {
                let _ = loader::uninstall(&pin_dir);
                panic!("loading the BPF programs: {e:?}");
            }
        };
        Some(Fixture { progs, maps, pin_dir, probe: None })
    }

    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    pub fn run(&self, hook: Hook, packet: &[u8]) -> Result<Outcome> {
        self.run_ctx(self.progs.classifier(hook)?, packet, 0, [0; 5])
    }

    fn run_ctx(&self, prog: &SchedClassifier, packet: &[u8], mark: u32, cb: [u32; 5]) -> Result<Outcome> {
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
        for (i, w) in cb.iter().enumerate() {
            ctx_in[SKB_CB_OFF + 4 * i..SKB_CB_OFF + 4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut data_out = vec![0u8; packet.len() + 512];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut data_out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        data_out.truncate(res.data_size_out as usize);
        let mut m = [0u8; 4];
        m.copy_from_slice(&ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4]);
        Ok(Outcome { ret: res.return_value, mark: u32::from_ne_bytes(m), data: data_out })
    }

    /// Run `cw_from_overlay` on a packet that "arrived" through VXLAN with this VNI and remote, by way of the
    /// test probe program (sets the tunnel key, tail-calls the real program).
    pub fn run_from_vxlan(&mut self, vni: u32, remote: Ipv4Addr, packet: &[u8]) -> Result<Outcome> {
        if self.probe.is_none() {
            // The probe includes causeway.h, whose shared maps pin by name: keep them in this test's pin dir (shared
            // with the programs under test, removed with it) rather than at the bpffs root.
            let mut probe = EbpfLoader::new()
                .default_map_pin_directory(&self.pin_dir)
                .load(objects::TEST_PROBE)
                .context("load test probe")?;
            {
                let p: &mut SchedClassifier =
                    probe.program_mut("cw_test_tunnel_probe").context("probe program")?.try_into()?;
                p.load()?;
            }
            let target = self.progs.classifier(Hook::FromOverlay)?.fd()?.try_clone()?;
            let mut slots = ProgramArray::try_from(probe.map_mut("cw_test_progs").context("prog array")?)?;
            slots.set(0, &target, 0)?;
            self.probe = Some(probe);
        }
        let probe = self.probe.as_ref().context("probe loaded")?;
        let p: &SchedClassifier = probe.program("cw_test_tunnel_probe").context("probe program")?.try_into()?;
        self.run_ctx(p, packet, 0, [vni, u32::from(remote), 0, 0, 0])
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.maps.drops.count(reason).expect("read cw_drops")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Err(e) = loader::uninstall(&self.pin_dir) {
            eprintln!("cleanup of {}: {e}", self.pin_dir.display());
        }
    }
}

fn eth_ip(src: IpAddr, dst: IpAddr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(POD_MAC, HOST_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    }
}

pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    let payload = b"causeway";
    let b = eth_ip(src, dst).udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).expect("build UDP packet");
    v
}

pub fn tcp_syn(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    let b = eth_ip(src, dst).tcp(sport, dport, 1000, 64240).syn();
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &[]).expect("build TCP packet");
    v
}

pub fn icmp_echo(src: IpAddr, dst: IpAddr, id: u16) -> Vec<u8> {
    let payload = [0xabu8; 16];
    let mut v = Vec::new();
    match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            eth_ip(src, dst).icmpv4_echo_request(id, 1).write(&mut v, &payload).expect("build ICMP")
        }
        _ => eth_ip(src, dst).icmpv6_echo_request(id, 1).write(&mut v, &payload).expect("build ICMPv6"),
    }
    v
}

pub fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().expect("test IPv4 literal"))
}

pub fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().expect("test IPv6 literal"))
}

/// The output packet's IP source and destination, parsed with etherparse.
pub fn addrs_of(frame: &[u8]) -> (IpAddr, IpAddr) {
    let p = etherparse::SlicedPacket::from_ethernet(frame).expect("output is a valid Ethernet frame");
    match p.net.expect("output has an IP header") {
        etherparse::NetSlice::Ipv4(ip) => {
            (IpAddr::V4(ip.header().source_addr()), IpAddr::V4(ip.header().destination_addr()))
        }
        etherparse::NetSlice::Ipv6(ip) => {
            (IpAddr::V6(ip.header().source_addr()), IpAddr::V6(ip.header().destination_addr()))
        }
        other => panic!("unexpected net layer {other:?}"),
    }
}
