//! BPF_PROG_TEST_RUN tests of egress steering: the real `cw_from_pod` / `cw_from_overlay` in the kernel, fed
//! packets built with etherparse; each result is checked through the verdict, the packet mark (the contract
//! with SNAT), the output packet and the pinned maps.

mod bpf_support;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use anyhow::Result;
use bpf_support::*;
use causeway_datapath::bpf::loader::Hook;
use causeway_datapath::bpf::maps::{
    ClassId, DropReason, EgressAction, EgressGroup, FlowTuple, GroupId, IpcacheEntry, NodeConfig,
};
use etherparse::{IpNumber, Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader};
use ipnet::IpNet;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const GW_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const GW_B: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
const GW_C: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 4);
const GW_D: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 5);
const VXLAN_IFINDEX: u32 = 42;
const CLASS: ClassId = ClassId(1);
const GROUP: GroupId = GroupId(7);
const GROUP_V6: GroupId = GroupId(9);
const GROUP_LOCAL: GroupId = GroupId(11);
const GROUP_EMPTY: GroupId = GroupId(12);

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix literal")
}

/// A node with one egress-selected pod (v4 and v6), one unselected pod, the cluster's pod CIDR in the ipcache,
/// and a policy: 203.0.113.0/24 minus 203.0.113.128/25 and 10.0.0.0/8 via GROUP; 2001:db8:100::/48 minus
/// 2001:db8:100:ff::/64 via GROUP_V6; 198.18.0.0/24 via a group whose only gateway is this node;
/// 198.18.1.0/24 via a group with no healthy gateway.
fn setup(fx: &mut Fixture) -> Result<()> {
    let m = &mut fx.maps;
    m.config.set(NodeConfig { node_ipv4: NODE, vxlan_ifindex: VXLAN_IFINDEX, enforce_policy: false })?;
    let pods =
        IpcacheEntry { identity: 1000, cluster_id: 1, is_node: false, remote_cluster: false, tunnel_endpoint: None };
    m.ipcache.upsert(net("10.244.0.0/16"), pods)?;
    m.ipcache.upsert(net("fd00:10:244::/48"), pods)?;
    m.egress_src.upsert(v4("10.244.1.5"), CLASS)?;
    m.egress_src.upsert(v6("fd00:10:244::5"), CLASS)?;
    m.egress_groups.upsert(GROUP, &EgressGroup { egress_ip: v4("192.0.2.10"), gateways: vec![GW_A, GW_B] })?;
    m.egress_groups.upsert(GROUP_V6, &EgressGroup { egress_ip: v6("2001:db8:e::10"), gateways: vec![GW_A, GW_B] })?;
    m.egress_groups.upsert(GROUP_LOCAL, &EgressGroup { egress_ip: v4("192.0.2.11"), gateways: vec![NODE] })?;
    m.egress_groups.upsert(GROUP_EMPTY, &EgressGroup { egress_ip: v4("192.0.2.12"), gateways: vec![] })?;
    m.egress_policy.upsert(CLASS, net("203.0.113.0/24"), EgressAction::Steer(GROUP))?;
    m.egress_policy.upsert(CLASS, net("203.0.113.128/25"), EgressAction::Excluded)?;
    m.egress_policy.upsert(CLASS, net("10.0.0.0/8"), EgressAction::Steer(GROUP))?;
    m.egress_policy.upsert(CLASS, net("2001:db8:100::/48"), EgressAction::Steer(GROUP_V6))?;
    m.egress_policy.upsert(CLASS, net("2001:db8:100:ff::/64"), EgressAction::Excluded)?;
    m.egress_policy.upsert(CLASS, net("198.18.0.0/24"), EgressAction::Steer(GROUP_LOCAL))?;
    m.egress_policy.upsert(CLASS, net("198.18.1.0/24"), EgressAction::Steer(GROUP_EMPTY))?;
    Ok(())
}

fn fixture(test: &str) -> Option<Fixture> {
    let mut fx = Fixture::new(test)?;
    setup(&mut fx).expect("program the maps");
    Some(fx)
}

fn flow(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowTuple {
    FlowTuple { proto, src, dst, sport, dport }
}

const UDP: u8 = 17;
const TCP: u8 = 6;

fn assert_untouched(out: &Outcome, input: &[u8]) {
    assert_eq!(out.ret, TC_ACT_OK, "passed to the stack");
    assert_eq!(out.mark, 0, "no egress mark");
    assert_eq!(out.data, input, "packet unchanged");
}

#[test]
fn policy_hit_is_marked_pinned_and_redirected_to_the_tunnel() -> Result<()> {
    let Some(fx) = fixture("policy_hit_is_marked_pinned_and_redirected_to_the_tunnel") else { return Ok(()) };
    let (pod, dst) = (v4("10.244.1.5"), v4("203.0.113.7"));
    let pkt = udp(pod, 40000, dst, 53);
    let out = fx.run(Hook::FromPod, &pkt)?;
    assert_eq!(out.ret, TC_ACT_REDIRECT, "sent to the VXLAN device");
    assert_eq!(out.mark, GROUP.mark(), "marked CW_MARK_EGRESS | group");
    // Steering does not rewrite: the gateway's SNAT does. The inner packet still carries the pod's address.
    assert_eq!(addrs_of(&out.data), (pod, dst));
    assert_eq!(out.data, pkt);
    let pin = fx.maps.egress_ct.get(&flow(UDP, pod, 40000, dst, 53))?.expect("flow pinned in cw_egress_ct");
    assert_eq!(pin.group, GROUP);
    assert!([GW_A, GW_B].contains(&pin.gateway), "pinned to a gateway of the group: {}", pin.gateway);
    assert!(pin.last_seen_ns > 0);

    // TCP takes the same path.
    let out = fx.run(Hook::FromPod, &tcp_syn(pod, 33000, dst, 443))?;
    assert_eq!((out.ret, out.mark), (TC_ACT_REDIRECT, GROUP.mark()));
    assert!(fx.maps.egress_ct.get(&flow(TCP, pod, 33000, dst, 443))?.is_some());
    Ok(())
}

#[test]
fn miss_unselected_pod_excluded_cidr_and_in_cluster_destination_pass_untouched() -> Result<()> {
    let Some(fx) = fixture("miss_unselected_pod_excluded_cidr_and_in_cluster_destination_pass_untouched") else {
        return Ok(());
    };
    let pod = v4("10.244.1.5");
    let cases = [
        ("destination matches no policy", udp(pod, 40000, v4("198.51.100.1"), 53), pod, v4("198.51.100.1")),
        ("pod not selected", udp(v4("10.244.1.6"), 40000, v4("203.0.113.7"), 53), v4("10.244.1.6"), v4("203.0.113.7")),
        ("excluded CIDR", udp(pod, 40000, v4("203.0.113.200"), 53), pod, v4("203.0.113.200")),
        // 10.0.0.0/8 is in the policy, but 10.244.2.9 is a pod of the mesh (ipcache): never to a gateway.
        ("in-cluster destination", udp(pod, 40000, v4("10.244.2.9"), 53), pod, v4("10.244.2.9")),
    ];
    for (what, pkt, src, dst) in &cases {
        let out = fx.run(Hook::FromPod, pkt)?;
        assert_eq!(out.ret, TC_ACT_OK, "{what}");
        assert_eq!(out.mark, 0, "{what}");
        assert_eq!(&out.data, pkt, "{what}");
        assert!(fx.maps.egress_ct.get(&flow(UDP, *src, 40000, *dst, 53))?.is_none(), "{what}: no pin");
    }
    // Just outside the excluded half, the policy applies again (longest prefix wins both ways).
    let out = fx.run(Hook::FromPod, &udp(pod, 40000, v4("203.0.113.127"), 53))?;
    assert_eq!((out.ret, out.mark), (TC_ACT_REDIRECT, GROUP.mark()));
    Ok(())
}

#[test]
fn a_flow_keeps_its_gateway_when_a_gateway_is_added() -> Result<()> {
    let Some(fx) = fixture("a_flow_keeps_its_gateway_when_a_gateway_is_added") else { return Ok(()) };
    let (pod, dst) = (v4("10.244.1.5"), v4("203.0.113.7"));
    let mut pinned = HashMap::new();
    for sport in 20000..20064u16 {
        fx.run(Hook::FromPod, &udp(pod, sport, dst, 53))?;
        let pin = fx.maps.egress_ct.get(&flow(UDP, pod, sport, dst, 53))?.expect("pinned");
        pinned.insert(sport, pin.gateway);
    }
    let used: BTreeSet<_> = pinned.values().copied().collect();
    assert_eq!(used, BTreeSet::from([GW_A, GW_B]), "64 flows spread over both gateways");

    // Same flow again: same gateway.
    for (&sport, &gw) in &pinned {
        assert_eq!(fx.run(Hook::FromPod, &udp(pod, sport, dst, 53))?.ret, TC_ACT_REDIRECT);
        assert_eq!(fx.maps.egress_ct.get(&flow(UDP, pod, sport, dst, 53))?.expect("pinned").gateway, gw);
    }

    // Two gateways join the group: live flows stay where they are, new flows may use the new ones.
    fx.maps_mut_groups(GROUP, vec![GW_A, GW_B, GW_C, GW_D])?;
    for (&sport, &gw) in &pinned {
        fx.run(Hook::FromPod, &udp(pod, sport, dst, 53))?;
        assert_eq!(fx.maps.egress_ct.get(&flow(UDP, pod, sport, dst, 53))?.expect("pinned").gateway, gw, "{sport}");
    }
    let mut fresh = BTreeSet::new();
    for sport in 30000..30064u16 {
        fx.run(Hook::FromPod, &udp(pod, sport, dst, 53))?;
        fresh.insert(fx.maps.egress_ct.get(&flow(UDP, pod, sport, dst, 53))?.expect("pinned").gateway);
    }
    assert!(fresh.contains(&GW_C) || fresh.contains(&GW_D), "new flows use the added gateways: {fresh:?}");
    Ok(())
}

trait GroupsExt {
    fn maps_mut_groups(&self, id: GroupId, gateways: Vec<Ipv4Addr>) -> Result<()>;
}

impl GroupsExt for Fixture {
    /// Re-open the groups map (a second handle on the same pinned map) to change a group in place, as the agent
    /// would while the datapath runs.
    fn maps_mut_groups(&self, id: GroupId, gateways: Vec<Ipv4Addr>) -> Result<()> {
        let mut groups = causeway_datapath::bpf::maps::EgressGroupsMap::open(self.pin_dir())?;
        let mut g = groups.get(id)?.expect("group exists");
        g.gateways = gateways;
        groups.upsert(id, &g)?;
        Ok(())
    }
}

#[test]
fn flows_of_a_removed_gateway_are_re_picked() -> Result<()> {
    let Some(fx) = fixture("flows_of_a_removed_gateway_are_re_picked") else { return Ok(()) };
    let (pod, dst) = (v4("10.244.1.5"), v4("203.0.113.7"));
    let mut pinned = HashMap::new();
    for sport in 20000..20032u16 {
        fx.run(Hook::FromPod, &udp(pod, sport, dst, 53))?;
        pinned.insert(sport, fx.maps.egress_ct.get(&flow(UDP, pod, sport, dst, 53))?.expect("pinned").gateway);
    }
    assert!(pinned.values().any(|g| *g == GW_A) && pinned.values().any(|g| *g == GW_B));
    // GW_A fails over: the controller leaves only GW_B in the group.
    fx.maps_mut_groups(GROUP, vec![GW_B])?;
    for &sport in pinned.keys() {
        let out = fx.run(Hook::FromPod, &udp(pod, sport, dst, 53))?;
        assert_eq!(out.ret, TC_ACT_REDIRECT);
        let pin = fx.maps.egress_ct.get(&flow(UDP, pod, sport, dst, 53))?.expect("pinned");
        assert_eq!(pin.gateway, GW_B, "flow {sport} moved off the failed gateway");
    }
    Ok(())
}

#[test]
fn local_gateway_passes_marked_and_empty_group_drops() -> Result<()> {
    let Some(fx) = fixture("local_gateway_passes_marked_and_empty_group_drops") else { return Ok(()) };
    let pod = v4("10.244.1.5");
    let pkt = udp(pod, 40000, v4("198.18.0.9"), 53);
    let out = fx.run(Hook::FromPod, &pkt)?;
    assert_eq!(out.ret, TC_ACT_OK, "this node is the gateway: on to the local SNAT");
    assert_eq!(out.mark, GROUP_LOCAL.mark());
    assert_eq!(out.data, pkt);

    let before = fx.drops(DropReason::NoGateway);
    let out = fx.run(Hook::FromPod, &udp(pod, 40000, v4("198.18.1.9"), 53))?;
    assert_eq!(out.ret, TC_ACT_SHOT, "no healthy gateway: dropped rather than leaving with the pod's IP");
    assert_eq!(fx.drops(DropReason::NoGateway), before + 1);
    Ok(())
}

#[test]
fn ipv6_hit_excluded_and_icmp_echo() -> Result<()> {
    let Some(fx) = fixture("ipv6_hit_excluded_and_icmp_echo") else { return Ok(()) };
    let pod = v6("fd00:10:244::5");
    let dst = v6("2001:db8:100:1::53");
    let pkt = udp(pod, 40000, dst, 53);
    let out = fx.run(Hook::FromPod, &pkt)?;
    assert_eq!((out.ret, out.mark), (TC_ACT_REDIRECT, GROUP_V6.mark()));
    assert_eq!(addrs_of(&out.data), (pod, dst));
    assert_eq!(fx.maps.egress_ct.get(&flow(UDP, pod, 40000, dst, 53))?.expect("pinned").group, GROUP_V6);

    assert_untouched(
        &fx.run(Hook::FromPod, &udp(pod, 40000, v6("2001:db8:100:ff::1"), 53))?,
        &udp(pod, 40000, v6("2001:db8:100:ff::1"), 53),
    );
    let in_mesh = udp(pod, 40000, v6("fd00:10:244::9"), 53);
    assert_untouched(&fx.run(Hook::FromPod, &in_mesh)?, &in_mesh);

    // ICMP echo: the identifier is the flow's "port".
    let out = fx.run(Hook::FromPod, &icmp_echo(pod, dst, 0x4242))?;
    assert_eq!((out.ret, out.mark), (TC_ACT_REDIRECT, GROUP_V6.mark()));
    assert!(fx.maps.egress_ct.get(&flow(58, pod, 0x4242, dst, 0))?.is_some(), "ICMPv6 echo pinned by id");
    let (pod4, dst4) = (v4("10.244.1.5"), v4("203.0.113.7"));
    let out = fx.run(Hook::FromPod, &icmp_echo(pod4, dst4, 77))?;
    assert_eq!((out.ret, out.mark), (TC_ACT_REDIRECT, GROUP.mark()));
    assert!(fx.maps.egress_ct.get(&flow(1, pod4, 77, dst4, 0))?.is_some(), "ICMP echo pinned by id");
    Ok(())
}

/// An IPv4 fragment of a UDP datagram: offset in 8-byte units, built with etherparse's headers.
fn ipv4_fragment(src: Ipv4Addr, dst: Ipv4Addr, offset_units: u16, more: bool, payload: &[u8]) -> Vec<u8> {
    let eth =
        etherparse::Ethernet2Header { source: POD_MAC, destination: HOST_MAC, ether_type: etherparse::EtherType::IPV4 };
    let mut ip = etherparse::Ipv4Header::new(payload.len() as u16, 64, IpNumber::UDP, src.octets(), dst.octets())
        .expect("IPv4 header");
    ip.identification = 0x1234;
    ip.more_fragments = more;
    ip.fragment_offset = etherparse::IpFragOffset::try_new(offset_units).expect("fragment offset");
    ip.header_checksum = ip.calc_header_checksum();
    let mut v = Vec::new();
    eth.write(&mut v).expect("write eth");
    ip.write(&mut v).expect("write ipv4");
    v.extend_from_slice(payload);
    v
}

#[test]
fn fragments_of_a_datagram_follow_one_gateway() -> Result<()> {
    let Some(fx) = fixture("fragments_of_a_datagram_follow_one_gateway") else { return Ok(()) };
    let (src, dst) = (Ipv4Addr::new(10, 244, 1, 5), Ipv4Addr::new(203, 0, 113, 7));
    // First fragment: a UDP header and the start of the payload.
    let udp_hdr = etherparse::UdpHeader { source_port: 5000, destination_port: 6000, length: 1208, checksum: 0 };
    let mut first_payload = udp_hdr.to_bytes().to_vec();
    first_payload.extend_from_slice(&[7u8; 1192]);
    let first = ipv4_fragment(src, dst, 0, true, &first_payload);
    let later = ipv4_fragment(src, dst, 150, false, &[8u8; 8]);
    let out_first = fx.run(Hook::FromPod, &first)?;
    let out_later = fx.run(Hook::FromPod, &later)?;
    assert_eq!((out_first.ret, out_first.mark), (TC_ACT_REDIRECT, GROUP.mark()));
    assert_eq!((out_later.ret, out_later.mark), (TC_ACT_REDIRECT, GROUP.mark()), "later fragment steered too");
    // Both are pinned under the 3-tuple (ports 0), so they share one gateway; no 5-tuple pin was made.
    let pin = fx.maps.egress_ct.get(&flow(UDP, src.into(), 0, dst.into(), 0))?.expect("3-tuple pin");
    assert!(fx.maps.egress_ct.get(&flow(UDP, src.into(), 5000, dst.into(), 6000))?.is_none());
    assert_eq!(fx.maps.egress_ct.entries()?.len(), 1, "one pin for the whole datagram: {pin:?}");
    Ok(())
}

#[test]
fn malformed_and_non_ip_input_is_handled() -> Result<()> {
    let Some(fx) = fixture("malformed_and_non_ip_input_is_handled") else { return Ok(()) };
    let good = udp(v4("10.244.1.5"), 40000, v4("203.0.113.7"), 53);

    // (BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than Ethernet + 20 bytes, so a cut IP header is
    // exercised through IHL and total length instead; the parser's bounds checks are the same code.)
    let before = fx.drops(DropReason::Malformed);
    // Total length smaller than the header.
    let mut short_total = good.clone();
    short_total[16..18].copy_from_slice(&10u16.to_be_bytes());
    assert_eq!(fx.run(Hook::FromPod, &short_total)?.ret, TC_ACT_SHOT, "tot_len < IHL");
    // IHL 4 (< 5 words) and IHL 15 (past the packet's end).
    for ihl in [0x44u8, 0x4f] {
        let mut bad = good.clone();
        bad[14] = ihl;
        assert_eq!(fx.run(Hook::FromPod, &bad)?.ret, TC_ACT_SHOT, "IHL byte {ihl:#x}");
    }
    // UDP header cut short.
    assert_eq!(fx.run(Hook::FromPod, &good[..14 + 20 + 4])?.ret, TC_ACT_SHOT);
    assert_eq!(fx.drops(DropReason::Malformed), before + 4, "each counted as malformed");
    assert!(fx.maps.egress_ct.entries()?.is_empty(), "nothing pinned from malformed packets");

    // Not IP (ARP): not ours, passed as is.
    let mut arp = Vec::new();
    etherparse::Ethernet2Header { source: POD_MAC, destination: [0xff; 6], ether_type: etherparse::EtherType::ARP }
        .write(&mut arp)?;
    arp.extend_from_slice(&[0u8; 28]);
    assert_untouched(&fx.run(Hook::FromPod, &arp)?, &arp);
    Ok(())
}

#[test]
fn ipv6_extension_headers_and_fragments_are_walked() -> Result<()> {
    let Some(fx) = fixture("ipv6_extension_headers_and_fragments_are_walked") else { return Ok(()) };
    let (src, dst) = (v6("fd00:10:244::5"), v6("2001:db8:100:1::53"));
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else { unreachable!() };
    let hdr = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: 0,
        next_header: IpNumber::UDP,
        hop_limit: 64,
        source: s.octets(),
        destination: d.octets(),
    };
    // Hop-by-hop + destination options before UDP: the ports are still found.
    let exts = Ipv6Extensions {
        hop_by_hop_options: Some(Ipv6RawExtHeader::new_raw(IpNumber::UDP, &[1, 4, 0, 0, 0, 0])?),
        destination_options: Some(Ipv6RawExtHeader::new_raw(IpNumber::UDP, &[1, 4, 0, 0, 0, 0])?),
        ..Default::default()
    };
    let b = etherparse::PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ip(etherparse::IpHeaders::Ipv6(hdr.clone(), exts))
        .udp(41000, 53);
    let mut pkt = Vec::new();
    b.write(&mut pkt, b"hello")?;
    let out = fx.run(Hook::FromPod, &pkt)?;
    assert_eq!((out.ret, out.mark), (TC_ACT_REDIRECT, GROUP_V6.mark()));
    assert_eq!(out.data, pkt);
    assert!(fx.maps.egress_ct.get(&flow(UDP, src, 41000, dst, 53))?.is_some(), "5-tuple through ext headers");

    // A later IPv6 fragment: no ports, pinned by the 3-tuple.
    let frag = Ipv6Extensions {
        fragment: Some(Ipv6FragmentHeader::new(IpNumber::UDP, etherparse::IpFragOffset::try_new(100)?, false, 9)),
        ..Default::default()
    };
    let mut ip6 = hdr;
    ip6.next_header = IpNumber::IPV6_FRAGMENTATION_HEADER;
    let mut later = Vec::new();
    etherparse::Ethernet2Header { source: POD_MAC, destination: HOST_MAC, ether_type: etherparse::EtherType::IPV6 }
        .write(&mut later)?;
    ip6.payload_length = 8 + 16;
    ip6.write(&mut later)?;
    frag.fragment.expect("fragment header").write(&mut later)?;
    later.extend_from_slice(&[5u8; 16]);
    let out = fx.run(Hook::FromPod, &later)?;
    assert_eq!((out.ret, out.mark), (TC_ACT_REDIRECT, GROUP_V6.mark()));
    assert!(fx.maps.egress_ct.get(&flow(UDP, src, 0, dst, 0))?.is_some());
    Ok(())
}

#[test]
fn overlay_restores_the_mark_from_a_known_vni_only() -> Result<()> {
    let Some(mut fx) = fixture("overlay_restores_the_mark_from_a_known_vni_only") else { return Ok(()) };
    let pkt = udp(v4("10.244.1.5"), 40000, v4("203.0.113.7"), 53);
    // No tunnel metadata at all (not from the VXLAN decap): untouched.
    assert_untouched(&fx.run(Hook::FromOverlay, &pkt)?, &pkt);

    let out = fx.run_from_vxlan(GROUP.0, NODE, &pkt)?;
    assert_eq!(out.ret, TC_ACT_OK, "continues to the stack, to be routed out and SNATed");
    assert_eq!(out.mark, GROUP.mark(), "mark restored from the VNI");
    assert_eq!(out.data, pkt);

    // A VNI that is no egress group (e.g. plain overlay traffic) is left alone.
    let out = fx.run_from_vxlan(4242, NODE, &pkt)?;
    assert_eq!((out.ret, out.mark), (TC_ACT_OK, 0));
    Ok(())
}
