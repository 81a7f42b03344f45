//! BPF_PROG_TEST_RUN tests of the SNAT programs (`bpf/snat.bpf.c`): real packets built with etherparse run
//! through the real kernel programs, and each output is parsed back and checked the way a receiver would
//! (addresses, ports, checksums recomputed by etherparse). Needs root (BPF); skipped with a message
//! otherwise, unless CAUSEWAY_PRIVILEGED_TESTS=1.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use causeway_datapath::agent::GcPolicy;
use causeway_datapath::bpf::maps::{EgressGroup, EgressGroupsMap, GroupId};
use causeway_datapath::bpf::snat::{self, LoadOptions, PortUseKey, Snat, SnatConfig, SnatStat, PROG_IN, PROG_OUT};
use causeway_testsupport::netns;
use etherparse::{
    icmpv4::DestUnreachableHeader, IcmpEchoHeader, Icmpv4Type, Icmpv6Type, NetHeaders, PacketBuilder, PacketHeaders,
    TransportHeader,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const MARK_EGRESS: u32 = 0xce00_0000;
const GROUP: u32 = 7;
const GROUP6: u32 = 8;
const MARK: u32 = MARK_EGRESS | GROUP;
const MARK6: u32 = MARK_EGRESS | GROUP6;

const POD: [u8; 4] = [10, 244, 1, 5];
const POD2: [u8; 4] = [10, 244, 2, 9];
const REMOTE: [u8; 4] = [203, 0, 113, 7];
const REMOTE2: [u8; 4] = [198, 51, 100, 20];
const EGRESS: [u8; 4] = [192, 0, 2, 10];
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 7);
const EGRESS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 10);
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
const PORT_MIN: u16 = 40000;
const PORT_MAX: u16 = 40999;

/// Loaded programs with their maps pinned in a private bpffs directory, removed on drop.
struct Fixture {
    snat: Snat,
    pin_dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if !mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        let st = std::process::Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?;
        if !st.success() {
            bail!("mount -t bpf bpf /sys/fs/bpf failed");
        }
    }
    Ok(())
}

impl Fixture {
    /// None when the test is skipped (not privileged).
    fn new(test: &str) -> Option<Fixture> {
        if !netns::privileged(test) {
            return None;
        }
        ensure_bpffs().expect("bpffs");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(netns::unique_name("cw-snat-test"));
        let mut snat = Snat::load(&LoadOptions::new(&pin_dir)).expect("load snat.bpf.o");
        snat.set_config(&SnatConfig { port_min: PORT_MIN, port_max: PORT_MAX, ..Default::default() }).expect("config");
        let mut fx = Fixture { snat, pin_dir };
        fx.set_group(GROUP, IpAddr::V4(Ipv4Addr::from(EGRESS)));
        fx.set_group(GROUP6, IpAddr::V6(EGRESS6));
        Some(fx)
    }

    fn set_group(&mut self, id: u32, egress: IpAddr) {
        let mut groups = EgressGroupsMap::open(&self.pin_dir).expect("pinned cw_egress_groups");
        groups.upsert(GroupId(id), &EgressGroup { egress_ip: egress, gateways: vec![] }).expect("upsert group");
    }

    fn config(&mut self, port_min: u16, port_max: u16) {
        self.snat.set_config(&SnatConfig { port_min, port_max, ..Default::default() }).expect("config");
    }

    /// Runs `prog` on `pkt` with skb->mark = `mark`; returns the verdict and the packet as it left.
    fn run(&self, prog: &'static str, pkt: &[u8], mark: u32) -> (u32, Vec<u8>) {
        self.try_run(prog, pkt, mark).expect("BPF_PROG_TEST_RUN")
    }

    /// Like `run`, but returns the kernel's refusal of an input (BPF_PROG_TEST_RUN rejects some too-short
    /// packets before the program runs) as an error.
    fn try_run(&self, prog: &'static str, pkt: &[u8], mark: u32) -> Result<(u32, Vec<u8>)> {
        // struct __sk_buff: mark is at offset 8; the kernel accepts only a few fields set, the rest zero.
        let mut ctx = [0u8; 192];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut out = vec![0u8; pkt.len() + 256];
        let program = self.snat.classifier(prog).expect("program");
        let res = program.test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    fn out(&self, pkt: &[u8]) -> Vec<u8> {
        let (ret, out) = self.run(PROG_OUT, pkt, MARK);
        assert_eq!(ret, TC_ACT_OK, "cw_snat_out passes the translated packet");
        out
    }

    fn stat(&self, s: SnatStat) -> u64 {
        self.snat.stats().expect("stats")[&s]
    }
}

fn v4_tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64).tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(2000) };
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build tcp");
    v
}

fn v4_udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64).udp(sport, dport).write(&mut v, payload).expect("udp");
    v
}

fn v4_echo(src: [u8; 4], dst: [u8; 4], id: u16, reply: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64);
    let b = if reply { b.icmpv4_echo_reply(id, 3) } else { b.icmpv4_echo_request(id, 3) };
    let mut v = Vec::new();
    b.write(&mut v, b"ping payload").expect("icmp");
    v
}

/// What a receiver sees: addresses, ports (ICMP echo: id), and whether every checksum verifies.
#[derive(Debug)]
struct Seen {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: Vec<u8>,
}

fn parse(pkt: &[u8]) -> Result<Seen> {
    let h = PacketHeaders::from_ethernet_slice(pkt).map_err(|e| anyhow!("parse: {e:?}"))?;
    let payload = h.payload.slice().to_vec();
    let (src, dst, src_raw6, dst_raw6, src4, dst4) = match &h.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            if ip.header_checksum != ip.calc_header_checksum() {
                bail!("bad IPv4 header checksum");
            }
            (
                IpAddr::V4(ip.source.into()),
                IpAddr::V4(ip.destination.into()),
                [0u8; 16],
                [0u8; 16],
                Some(ip.clone()),
                true,
            )
        }
        Some(NetHeaders::Ipv6(ip, _)) => {
            (IpAddr::V6(ip.source.into()), IpAddr::V6(ip.destination.into()), ip.source, ip.destination, None, false)
        }
        other => bail!("not IP: {other:?}"),
    };
    let (sport, dport) = match &h.transport {
        Some(TransportHeader::Tcp(t)) => {
            let want = match &src4 {
                Some(ip) => t.calc_checksum_ipv4(ip, &payload)?,
                None => t.calc_checksum_ipv6_raw(src_raw6, dst_raw6, &payload)?,
            };
            if t.checksum != want {
                bail!("bad TCP checksum {:#06x}, want {want:#06x}", t.checksum);
            }
            (t.source_port, t.destination_port)
        }
        Some(TransportHeader::Udp(u)) => {
            if !(dst4 && u.checksum == 0) {
                let want = match &src4 {
                    Some(ip) => u.calc_checksum_ipv4(ip, &payload)?,
                    None => u.calc_checksum_ipv6_raw(src_raw6, dst_raw6, &payload)?,
                };
                if u.checksum != want {
                    bail!("bad UDP checksum {:#06x}, want {want:#06x}", u.checksum);
                }
            }
            (u.source_port, u.destination_port)
        }
        Some(TransportHeader::Icmpv4(i)) => {
            let want = i.icmp_type.calc_checksum(&payload);
            if i.checksum != want {
                bail!("bad ICMP checksum {:#06x}, want {want:#06x}", i.checksum);
            }
            match i.icmp_type {
                Icmpv4Type::EchoRequest(IcmpEchoHeader { id, .. })
                | Icmpv4Type::EchoReply(IcmpEchoHeader { id, .. }) => (id, 0),
                _ => (0, 0),
            }
        }
        Some(TransportHeader::Icmpv6(i)) => {
            let want = i.icmp_type.calc_checksum(src_raw6, dst_raw6, &payload)?;
            if i.checksum != want {
                bail!("bad ICMPv6 checksum {:#06x}, want {want:#06x}", i.checksum);
            }
            match i.icmp_type {
                Icmpv6Type::EchoRequest(IcmpEchoHeader { id, .. })
                | Icmpv6Type::EchoReply(IcmpEchoHeader { id, .. }) => (id, 0),
                _ => (0, 0),
            }
        }
        other => bail!("unexpected transport {other:?}"),
    };
    Ok(Seen { src, dst, sport, dport, payload })
}

fn ip4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn in_range(port: u16) -> bool {
    (PORT_MIN..=PORT_MAX).contains(&port)
}

#[test]
fn tcp_source_rewritten_to_egress_ip_and_reply_reverse_translated() {
    let Some(fx) = Fixture::new("tcp_source_rewritten_to_egress_ip_and_reply_reverse_translated") else { return };
    let out = fx.out(&v4_tcp(POD, 51000, REMOTE, 443, true, b""));
    let seen = parse(&out).expect("valid translated SYN");
    assert_eq!(seen.src, ip4(EGRESS));
    assert_eq!(seen.dst, ip4(REMOTE));
    assert_eq!(seen.dport, 443);
    assert!(in_range(seen.sport), "translated port {} in {PORT_MIN}-{PORT_MAX}", seen.sport);

    // The table lists the flow with its translation.
    let flows = fx.snat.table().flows().expect("flows");
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].pod(), (ip4(POD), 51000));
    assert_eq!(flows[0].remote(), (ip4(REMOTE), 443));
    assert_eq!(flows[0].translated(), (ip4(EGRESS), seen.sport));
    assert!(flows[0].rev.is_some());
    assert_eq!(flows[0].fwd.tcp_state & snat::TCP_SYN, snat::TCP_SYN);

    // The SYN-ACK from the server comes back to the pod, with payload intact and checksums valid.
    let reply = v4_tcp(REMOTE, 443, EGRESS, seen.sport, false, b"hello from the server");
    let (ret, back) = fx.run(PROG_IN, &reply, 0);
    assert_eq!(ret, TC_ACT_OK);
    let back = parse(&back).expect("valid reverse-translated reply");
    assert_eq!((back.src, back.sport), (ip4(REMOTE), 443));
    assert_eq!((back.dst, back.dport), (ip4(POD), 51000));
    assert_eq!(back.payload, b"hello from the server");
    assert_eq!(fx.stat(SnatStat::OutTranslated), 1);
    assert_eq!(fx.stat(SnatStat::InTranslated), 1);
    let flows = fx.snat.table().flows().expect("flows");
    assert_eq!(flows[0].rev.expect("reverse entry").tcp_state & snat::TCP_EST, snat::TCP_EST);
}

#[test]
fn same_flow_keeps_its_port_and_payload() {
    let Some(fx) = Fixture::new("same_flow_keeps_its_port_and_payload") else { return };
    let a = parse(&fx.out(&v4_tcp(POD, 51000, REMOTE, 443, true, b""))).expect("first");
    let b = parse(&fx.out(&v4_tcp(POD, 51000, REMOTE, 443, false, b"GET / HTTP/1.1\r\n\r\n"))).expect("second");
    assert_eq!(a.sport, b.sport);
    assert_eq!(b.payload, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(fx.snat.table().flows().expect("flows").len(), 1);
    assert_eq!(fx.stat(SnatStat::OutNewFlow), 1);
    assert_eq!(fx.stat(SnatStat::OutTranslated), 2);
}

#[test]
fn two_pods_to_one_destination_get_different_ports() {
    let Some(fx) = Fixture::new("two_pods_to_one_destination_get_different_ports") else { return };
    // Same pod-side port on purpose: only the translated port can tell the replies apart.
    let a = parse(&fx.out(&v4_udp(POD, 5353, REMOTE, 53, b"q1"))).expect("a");
    let b = parse(&fx.out(&v4_udp(POD2, 5353, REMOTE, 53, b"q2"))).expect("b");
    assert_eq!(a.src, ip4(EGRESS));
    assert_eq!(b.src, ip4(EGRESS));
    assert_ne!(a.sport, b.sport);
    for (port, pod) in [(a.sport, POD), (b.sport, POD2)] {
        let (_, back) = fx.run(PROG_IN, &v4_udp(REMOTE, 53, EGRESS, port, b"answer"), 0);
        let back = parse(&back).expect("reply");
        assert_eq!((back.dst, back.dport), (ip4(pod), 5353));
    }
}

#[test]
fn ports_are_allocated_per_destination() {
    let Some(mut fx) = Fixture::new("ports_are_allocated_per_destination") else { return };
    // One single port: two destinations can still both be reached through it, which is what per-destination
    // allocation buys over a per-egress-IP pool.
    fx.config(PORT_MIN, PORT_MIN);
    let a = parse(&fx.out(&v4_tcp(POD, 51000, REMOTE, 443, true, b""))).expect("a");
    let b = parse(&fx.out(&v4_tcp(POD, 51000, REMOTE2, 443, true, b""))).expect("b");
    let c = parse(&fx.out(&v4_tcp(POD2, 51001, REMOTE, 8443, true, b""))).expect("c: other destination port");
    assert_eq!((a.sport, b.sport, c.sport), (PORT_MIN, PORT_MIN, PORT_MIN));
    for (remote, rport, pod, pport) in
        [(REMOTE, 443, POD, 51000), (REMOTE2, 443, POD, 51000), (REMOTE, 8443, POD2, 51001)]
    {
        let (_, back) = fx.run(PROG_IN, &v4_tcp(remote, rport, EGRESS, PORT_MIN, false, b""), 0);
        let back = parse(&back).expect("reply");
        assert_eq!((back.dst, back.dport), (ip4(pod), pport), "reply from {remote:?}:{rport}");
    }
}

#[test]
fn exhaustion_drops_and_counts() {
    let Some(mut fx) = Fixture::new("exhaustion_drops_and_counts") else { return };
    fx.config(PORT_MIN, PORT_MIN + 1);
    let a = parse(&fx.out(&v4_udp(POD, 1000, REMOTE, 53, b""))).expect("a");
    let b = parse(&fx.out(&v4_udp(POD, 1001, REMOTE, 53, b""))).expect("b");
    let mut used = [a.sport, b.sport];
    used.sort();
    assert_eq!(used, [PORT_MIN, PORT_MIN + 1]);
    let (ret, _) = fx.run(PROG_OUT, &v4_udp(POD, 1002, REMOTE, 53, b""), MARK);
    assert_eq!(ret, TC_ACT_SHOT, "no free port toward this destination: dropped, not sent with the pod IP");
    assert_eq!(fx.snat.drops(snat::DROP_SNAT_PORTS_EXHAUSTED).expect("drops"), 1);
    // Another destination still has all its ports.
    parse(&fx.out(&v4_udp(POD, 1002, REMOTE2, 53, b""))).expect("other destination");
    let usage = fx.snat.table().port_use().expect("port use");
    let key = PortUseKey { egress: ip4(EGRESS), destination: ip4(REMOTE), destination_port: 53, proto: 17 };
    assert_eq!(usage.get(&key), Some(&2));
    let key2 = PortUseKey { destination: ip4(REMOTE2), ..key };
    assert_eq!(usage.get(&key2), Some(&1));
}

#[test]
fn udp_checksums_including_zero() {
    let Some(fx) = Fixture::new("udp_checksums_including_zero") else { return };
    let out = fx.out(&v4_udp(POD, 7000, REMOTE, 9000, b"datagram"));
    let seen = parse(&out).expect("valid UDP");
    assert_eq!(seen.src, ip4(EGRESS));
    assert!(in_range(seen.sport));

    // An IPv4 UDP datagram without checksum (0) must leave without one: a computed value would be wrong
    // for a sender that did not checksum, and 0 is legal for IPv4.
    let mut pkt = v4_udp(POD, 7001, REMOTE, 9000, b"no checksum");
    let csum_at = 14 + 20 + 6;
    pkt[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
    let out = fx.out(&pkt);
    assert_eq!(&out[csum_at..csum_at + 2], &[0, 0], "zero UDP checksum stays zero");
    let seen = parse(&out).expect("valid");
    assert_eq!(seen.src, ip4(EGRESS));
    // And its reply (also without checksum) comes back without one.
    let mut reply = v4_udp(REMOTE, 9000, EGRESS, seen.sport, b"r");
    reply[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
    let (_, back) = fx.run(PROG_IN, &reply, 0);
    assert_eq!(&back[csum_at..csum_at + 2], &[0, 0]);
    assert_eq!(parse(&back).expect("reply").dst, ip4(POD));
}

#[test]
fn icmp_echo_identifier_translated() {
    let Some(fx) = Fixture::new("icmp_echo_identifier_translated") else { return };
    let out = fx.out(&v4_echo(POD, REMOTE, 0x1234, false));
    let seen = parse(&out).expect("valid ICMP");
    assert_eq!(seen.src, ip4(EGRESS));
    assert!(in_range(seen.sport), "echo id {} from the port range", seen.sport);
    let (_, back) = fx.run(PROG_IN, &v4_echo(REMOTE, EGRESS, seen.sport, true), 0);
    let back = parse(&back).expect("valid echo reply");
    assert_eq!((back.dst, back.sport), (ip4(POD), 0x1234));
    assert_eq!(back.payload, b"ping payload");
}

#[test]
fn ipv6_tcp_and_icmpv6() {
    let Some(fx) = Fixture::new("ipv6_tcp_and_icmpv6") else { return };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(POD6.octets(), REMOTE6.octets(), 64)
        .tcp(52000, 443, 1, 64000)
        .syn()
        .write(&mut v, b"")
        .expect("v6 tcp");
    let (ret, out) = fx.run(PROG_OUT, &v, MARK6);
    assert_eq!(ret, TC_ACT_OK);
    let seen = parse(&out).expect("valid v6 TCP");
    assert_eq!(seen.src, IpAddr::V6(EGRESS6));
    assert!(in_range(seen.sport));
    let mut r = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv6(REMOTE6.octets(), EGRESS6.octets(), 64)
        .tcp(443, seen.sport, 1, 64000)
        .syn()
        .ack(2)
        .write(&mut r, b"v6 reply")
        .expect("v6 reply");
    let (_, back) = fx.run(PROG_IN, &r, 0);
    let back = parse(&back).expect("valid v6 reply");
    assert_eq!((back.dst, back.dport), (IpAddr::V6(POD6), 52000));

    let mut e = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(POD6.octets(), REMOTE6.octets(), 64)
        .icmpv6_echo_request(0x4242, 1)
        .write(&mut e, b"ping6")
        .expect("echo6");
    let (ret, out) = fx.run(PROG_OUT, &e, MARK6);
    assert_eq!(ret, TC_ACT_OK);
    let seen = parse(&out).expect("valid ICMPv6 (pseudo header)");
    assert_eq!(seen.src, IpAddr::V6(EGRESS6));
    let mut er = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv6(REMOTE6.octets(), EGRESS6.octets(), 64)
        .icmpv6_echo_reply(seen.sport, 1)
        .write(&mut er, b"ping6")
        .expect("echo6 reply");
    let (_, back) = fx.run(PROG_IN, &er, 0);
    let back = parse(&back).expect("valid ICMPv6 reply");
    assert_eq!((back.dst, back.sport), (IpAddr::V6(POD6), 0x4242));

    // A v6 packet marked for a v4 group is not translated: dropped rather than leaking the pod address.
    let (ret, _) = fx.run(PROG_OUT, &v, MARK);
    assert_eq!(ret, TC_ACT_SHOT);
}

#[test]
fn icmp_port_unreachable_for_translated_flow_reaches_the_pod() {
    let Some(fx) = Fixture::new("icmp_port_unreachable_for_translated_flow_reaches_the_pod") else { return };
    let out = fx.out(&v4_udp(POD, 7000, REMOTE, 9999, b"anyone there?"));
    let sent = parse(&out).expect("translated");
    // The remote host answers with a port unreachable quoting the datagram as it saw it.
    let quoted = &out[14..];
    let mut err = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4(REMOTE, EGRESS, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
        .write(&mut err, quoted)
        .expect("icmp error");
    let (ret, back) = fx.run(PROG_IN, &err, 0);
    assert_eq!(ret, TC_ACT_OK);
    let seen = parse(&back).expect("outer IPv4 and ICMP checksums valid");
    assert_eq!(seen.dst, ip4(POD));
    // The quoted packet now shows the pod's own datagram: its address and port, header checksum valid.
    let inner = etherparse::Ipv4HeaderSlice::from_slice(&seen.payload).expect("quoted IPv4 header");
    assert_eq!(inner.source(), POD);
    assert_eq!(inner.destination(), REMOTE);
    assert_eq!(inner.header_checksum(), inner.to_header().calc_header_checksum());
    let ihl = inner.slice().len();
    assert_eq!(u16::from_be_bytes([seen.payload[ihl], seen.payload[ihl + 1]]), 7000);
    assert_eq!(u16::from_be_bytes([seen.payload[ihl + 2], seen.payload[ihl + 3]]), 9999);
    assert_ne!(sent.sport, 7000, "test premise: the port was translated");
    assert_eq!(fx.stat(SnatStat::InIcmpError), 1);
}

#[test]
fn icmpv6_packet_too_big_for_translated_flow_reaches_the_pod() {
    let Some(fx) = Fixture::new("icmpv6_packet_too_big_for_translated_flow_reaches_the_pod") else { return };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(POD6.octets(), REMOTE6.octets(), 64)
        .udp(7000, 9999)
        .write(&mut v, &[0x55; 200])
        .expect("v6 udp");
    let (ret, out) = fx.run(PROG_OUT, &v, MARK6);
    assert_eq!(ret, TC_ACT_OK);
    let sent = parse(&out).expect("translated");
    assert_ne!(sent.sport, 7000);
    // A router on the way reports Packet Too Big, quoting the start of the translated datagram.
    let quoted = &out[14..14 + 40 + 8 + 32];
    let mut err = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv6(REMOTE6.octets(), EGRESS6.octets(), 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut err, quoted)
        .expect("icmpv6 error");
    let (ret, back) = fx.run(PROG_IN, &err, 0);
    assert_eq!(ret, TC_ACT_OK);
    // parse() checks the ICMPv6 checksum over the new pseudo header and the rewritten quote.
    let seen = parse(&back).expect("ICMPv6 checksum valid after the rewrite");
    assert_eq!(seen.dst, IpAddr::V6(POD6));
    let inner = etherparse::Ipv6HeaderSlice::from_slice(&seen.payload).expect("quoted IPv6 header");
    assert_eq!(inner.source_addr(), POD6);
    assert_eq!(inner.destination_addr(), REMOTE6);
    assert_eq!(u16::from_be_bytes([seen.payload[40], seen.payload[41]]), 7000);
    assert_eq!(fx.stat(SnatStat::InIcmpError), 1);
}

#[test]
fn unmarked_and_unknown_traffic() {
    let Some(fx) = Fixture::new("unmarked_and_unknown_traffic") else { return };
    // Not marked: the gateway's own traffic, untouched.
    let pkt = v4_tcp(POD, 51000, REMOTE, 443, true, b"");
    let (ret, out) = fx.run(PROG_OUT, &pkt, 0);
    assert_eq!((ret, out.as_slice()), (TC_ACT_OK, pkt.as_slice()));
    let (ret, out) = fx.run(PROG_OUT, &pkt, 0x1234_0007);
    assert_eq!((ret, out.as_slice()), (TC_ACT_OK, pkt.as_slice()), "another subsystem's mark");
    assert!(fx.snat.table().flows().expect("flows").is_empty());

    // Marked for a group the gateway does not know: dropped (fail closed) and counted.
    let (ret, _) = fx.run(PROG_OUT, &pkt, MARK_EGRESS | 999);
    assert_eq!(ret, TC_ACT_SHOT);
    assert_eq!(fx.snat.drops(snat::DROP_SNAT_NO_STATE).expect("drops"), 1);

    // To the egress IP without state: passed unchanged, counted.
    let stray = v4_tcp(REMOTE, 443, EGRESS, 40123, true, b"");
    let (ret, out) = fx.run(PROG_IN, &stray, 0);
    assert_eq!((ret, out.as_slice()), (TC_ACT_OK, stray.as_slice()));
    assert_eq!(fx.stat(SnatStat::InNoState), 1);

    // Marked but neither TCP, UDP nor ICMP echo (here: GRE): dropped.
    let mut gre = v4_udp(POD, 1, REMOTE, 2, b"xxxxxxxx");
    gre[14 + 9] = 47;
    fix_ipv4_checksum(&mut gre);
    let (ret, _) = fx.run(PROG_OUT, &gre, MARK);
    assert_eq!(ret, TC_ACT_SHOT);
    assert_eq!(fx.snat.drops(snat::DROP_UNSUPPORTED_L4).expect("drops"), 1);
}

fn fix_ipv4_checksum(pkt: &mut [u8]) {
    pkt[24..26].copy_from_slice(&[0, 0]);
    let h = etherparse::Ipv4HeaderSlice::from_slice(&pkt[14..]).expect("ipv4").to_header();
    pkt[24..26].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
}

#[test]
fn malformed_input_is_handled_safely() {
    let Some(fx) = Fixture::new("malformed_input_is_handled_safely") else { return };
    let good = v4_tcp(POD, 51000, REMOTE, 443, true, b"");

    // Truncated in the IP header, and in the TCP header. The kernel's test runner refuses some lengths
    // outright (it wants a full IP header for an IPv4 frame); those that it runs must be handled.
    let mut ran = 0;
    for cut in [14 + 10, 14 + 19, 14 + 20 + 6, 14 + 20 + 19] {
        let short = &good[..cut];
        let Ok((ret, _)) = fx.try_run(PROG_OUT, short, MARK) else {
            println!("kernel refused a {cut}-byte frame for BPF_PROG_TEST_RUN");
            continue;
        };
        ran += 1;
        assert_eq!(ret, TC_ACT_SHOT, "marked and truncated at {cut}: dropped");
        let (ret, out) = fx.run(PROG_IN, short, 0);
        assert_eq!((ret, out.as_slice()), (TC_ACT_OK, short), "ingress leaves what it cannot parse to the kernel");
    }
    assert!(ran >= 2, "at least the truncated-TCP frames ran");
    // IHL below 5.
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    let (ret, _) = fx.run(PROG_OUT, &bad_ihl, MARK);
    assert_eq!(ret, TC_ACT_SHOT);
    // IHL pointing past the end of the packet.
    let mut long_ihl = good.clone();
    long_ihl[14] = 0x4f;
    let (ret, _) = fx.run(PROG_OUT, &long_ihl[..14 + 40], MARK);
    assert_eq!(ret, TC_ACT_SHOT);
    assert!(fx.snat.drops(snat::DROP_MALFORMED).expect("drops") >= 4);

    // A later fragment has no ports: it cannot be translated, so it is dropped rather than leaking the pod IP.
    let mut frag = v4_udp(POD, 7000, REMOTE, 9000, b"0123456789abcdef");
    frag[14 + 6..14 + 8].copy_from_slice(&(185u16).to_be_bytes()); // offset 1480
    fix_ipv4_checksum(&mut frag);
    let (ret, _) = fx.run(PROG_OUT, &frag, MARK);
    assert_eq!(ret, TC_ACT_SHOT);
    let (ret, out) = fx.run(PROG_IN, &frag, 0);
    assert_eq!((ret, out.as_slice()), (TC_ACT_OK, frag.as_slice()));

    // Not IP at all (ARP), even if marked: passed unchanged.
    let mut arp = vec![0u8; 42];
    arp[..6].copy_from_slice(&[0xff; 6]);
    arp[6..12].copy_from_slice(&MAC_A);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let (ret, out) = fx.run(PROG_OUT, &arp, MARK);
    assert_eq!((ret, out.as_slice()), (TC_ACT_OK, arp.as_slice()));

    // Nothing of the above created state.
    assert!(fx.snat.table().flows().expect("flows").is_empty());
}

#[test]
fn gc_removes_expired_flows_and_keeps_live_ones() {
    let Some(mut fx) = Fixture::new("gc_removes_expired_flows_and_keeps_live_ones") else { return };
    // An established TCP flow (SYN out, SYN-ACK in, ACK out), a UDP flow and a ping.
    let syn = parse(&fx.out(&v4_tcp(POD, 51000, REMOTE, 443, true, b""))).expect("syn");
    let mut synack = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4(REMOTE, EGRESS, 64)
        .tcp(443, syn.sport, 5, 64000)
        .syn()
        .ack(1001)
        .write(&mut synack, b"")
        .expect("synack");
    fx.run(PROG_IN, &synack, 0);
    fx.out(&v4_tcp(POD, 51000, REMOTE, 443, false, b""));
    let udp = parse(&fx.out(&v4_udp(POD, 7000, REMOTE, 53, b"q"))).expect("udp");
    fx.out(&v4_echo(POD, REMOTE, 77, false));
    assert_eq!(fx.snat.table().flows().expect("flows").len(), 3);

    let t = GcPolicy::default();
    let now = snat::monotonic_ns();
    let r = fx.snat.table_mut().gc(now, &t).expect("gc now");
    assert_eq!((r.flows_deleted, r.live), (0, 3), "nothing is idle yet");

    // 45 s later: the ping (30 s) is gone, UDP (60 s) and TCP stay.
    let r = fx.snat.table_mut().gc(now + 45_000_000_000, &t).expect("gc +45s");
    assert_eq!((r.flows_deleted, r.live), (1, 2));
    // 2 minutes later: UDP gone too; the established TCP connection stays (6 h).
    let r = fx.snat.table_mut().gc(now + 120_000_000_000, &t).expect("gc +120s");
    assert_eq!((r.flows_deleted, r.live), (1, 1));
    let flows = fx.snat.table().flows().expect("flows");
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].pod(), (ip4(POD), 51000));
    // Both directions of the expired flows were deleted: a late UDP reply is no longer translated.
    assert_eq!(fx.snat.table().reverse_entries().expect("rev").len(), 1);
    let late = v4_udp(REMOTE, 53, EGRESS, udp.sport, b"late");
    let (ret, out) = fx.run(PROG_IN, &late, 0);
    assert_eq!((ret, out.as_slice()), (TC_ACT_OK, late.as_slice()));
    // After 6 hours idle the TCP connection goes as well.
    let r = fx.snat.table_mut().gc(now + 21_601_000_000_000, &t).expect("gc +6h");
    assert_eq!((r.flows_deleted, r.live), (1, 0));
    assert!(fx.snat.table().forward_entries().expect("fwd").is_empty());
}
