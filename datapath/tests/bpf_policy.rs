//! BPF_PROG_TEST_RUN tests of the identity policy hook on traffic from remote clusters: `cw_from_remote_eth`
//! (Ethernet devices) and `cw_from_remote` (the L3 WireGuard TUN device), with verdicts checked against the
//! drop counters and the output packet.

mod bpf_support;

use std::net::IpAddr;

use anyhow::Result;
use bpf_support::*;
use causeway_datapath::bpf::loader::Hook;
use causeway_datapath::bpf::maps::{Direction, DropReason, IpcacheEntry, NodeConfig, PolicyRule, Verdict};
use causeway_datapath::bpf::types::IDENTITY_WORLD;
use ipnet::IpNet;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ID_WEB: u32 = 5000; // remote cluster's web pods: TCP 80 allowed, 22 denied, any other TCP port allowed
const ID_DNS: u32 = 6000; // UDP on any port
const ID_ADMIN: u32 = 7000; // everything

fn remote(identity: u32) -> IpcacheEntry {
    IpcacheEntry {
        identity,
        cluster_id: 2,
        is_node: false,
        remote_cluster: true,
        tunnel_endpoint: Some("192.168.60.1".parse().expect("literal")),
    }
}

fn rule(id: u32, dport: Option<u16>, proto: Option<u8>) -> PolicyRule {
    PolicyRule { remote_identity: id, dport, proto, direction: Direction::Ingress }
}

fn fixture(test: &str, enforce: bool) -> Option<Fixture> {
    let mut fx = Fixture::new(test)?;
    let m = &mut fx.maps;
    let mut setup = || -> Result<()> {
        m.config.set(NodeConfig { node_ipv4: "192.168.50.1".parse()?, vxlan_ifindex: 0, enforce_policy: enforce })?;
        m.ipcache.upsert("10.99.1.0/24".parse::<IpNet>()?, remote(ID_WEB))?;
        m.ipcache.upsert("10.99.2.0/24".parse::<IpNet>()?, remote(ID_DNS))?;
        m.ipcache.upsert("10.99.3.0/24".parse::<IpNet>()?, remote(ID_ADMIN))?;
        m.ipcache.upsert("fd00:99:1::/64".parse::<IpNet>()?, remote(ID_WEB))?;
        // The L3 test trick (below) needs sources whose bytes 12-13 of the frame read as an EtherType.
        m.ipcache.upsert("8.0.0.0/16".parse::<IpNet>()?, remote(ID_WEB))?;
        m.ipcache.upsert("fd00:0:86dd::/48".parse::<IpNet>()?, remote(ID_WEB))?;
        m.policy.upsert(rule(ID_WEB, Some(80), Some(TCP)), Verdict::Allow)?;
        m.policy.upsert(rule(ID_WEB, Some(22), Some(TCP)), Verdict::Deny)?;
        m.policy.upsert(rule(ID_WEB, None, Some(TCP)), Verdict::Allow)?;
        m.policy.upsert(rule(ID_DNS, None, Some(UDP)), Verdict::Allow)?;
        m.policy.upsert(rule(ID_ADMIN, None, None), Verdict::Allow)?;
        Ok(())
    };
    setup().expect("program the maps");
    Some(fx)
}

fn verdict(fx: &Fixture, hook: Hook, pkt: &[u8]) -> Result<u32> {
    let out = fx.run(hook, pkt)?;
    if out.ret == TC_ACT_OK {
        assert_eq!(out.data, pkt, "allowed packets pass unchanged");
    }
    Ok(out.ret)
}

#[test]
fn identity_policy_exact_wildcard_and_deny() -> Result<()> {
    let Some(fx) = fixture("identity_policy_exact_wildcard_and_deny", true) else { return Ok(()) };
    let local = v4("10.244.1.5");
    let h = Hook::FromRemoteEth;
    let before = fx.drops(DropReason::PolicyDenied);
    assert_eq!(verdict(&fx, h, &tcp_syn(v4("10.99.1.7"), 50000, local, 80))?, TC_ACT_OK, "exact allow");
    assert_eq!(verdict(&fx, h, &tcp_syn(v4("10.99.1.7"), 50000, local, 22))?, TC_ACT_SHOT, "exact deny wins");
    assert_eq!(verdict(&fx, h, &tcp_syn(v4("10.99.1.7"), 50000, local, 8443))?, TC_ACT_OK, "port wildcard");
    assert_eq!(verdict(&fx, h, &udp(v4("10.99.1.7"), 50000, local, 53))?, TC_ACT_SHOT, "no UDP rule for web");
    assert_eq!(verdict(&fx, h, &udp(v4("10.99.2.7"), 50000, local, 5353))?, TC_ACT_OK, "UDP any port");
    assert_eq!(verdict(&fx, h, &tcp_syn(v4("10.99.2.7"), 50000, local, 80))?, TC_ACT_SHOT, "DNS has no TCP");
    assert_eq!(verdict(&fx, h, &icmp_echo(v4("10.99.3.7"), local, 9))?, TC_ACT_OK, "protocol wildcard");
    assert_eq!(verdict(&fx, h, &icmp_echo(v4("10.99.1.7"), local, 9))?, TC_ACT_SHOT, "web has no ICMP");
    assert_eq!(fx.drops(DropReason::PolicyDenied), before + 4, "every deny counted");
    // IPv6 source, same identity.
    assert_eq!(verdict(&fx, h, &tcp_syn(v6("fd00:99:1::7"), 50000, v6("fd00:10:244::5"), 80))?, TC_ACT_OK);
    assert_eq!(verdict(&fx, h, &tcp_syn(v6("fd00:99:1::7"), 50000, v6("fd00:10:244::5"), 22))?, TC_ACT_SHOT);
    Ok(())
}

#[test]
fn unknown_sources_are_world_and_enforcement_is_a_switch() -> Result<()> {
    let Some(mut fx) = fixture("unknown_sources_are_world_and_enforcement_is_a_switch", true) else {
        return Ok(());
    };
    let pkt = tcp_syn(v4("198.51.100.9"), 50000, v4("10.244.1.5"), 80);
    assert_eq!(verdict(&fx, Hook::FromRemoteEth, &pkt)?, TC_ACT_SHOT, "world has no rule: default deny");
    fx.maps.policy.upsert(rule(IDENTITY_WORLD, Some(80), Some(TCP)), Verdict::Allow)?;
    assert_eq!(verdict(&fx, Hook::FromRemoteEth, &pkt)?, TC_ACT_OK, "a rule for the world identity applies");
    assert!(fx.maps.policy.delete(rule(IDENTITY_WORLD, Some(80), Some(TCP)))?);
    assert_eq!(verdict(&fx, Hook::FromRemoteEth, &pkt)?, TC_ACT_SHOT);

    // Enforcement off: the same packet passes, and nothing is counted.
    let mut cfg = fx.maps.config.get()?;
    cfg.enforce_policy = false;
    fx.maps.config.set(cfg)?;
    let before = fx.drops(DropReason::PolicyDenied);
    assert_eq!(verdict(&fx, Hook::FromRemoteEth, &pkt)?, TC_ACT_OK);
    assert_eq!(fx.drops(DropReason::PolicyDenied), before);
    Ok(())
}

/// `cw_from_remote` reads the IP header at offset 0, as on the WireGuard TUN device. BPF_PROG_TEST_RUN always
/// parses the input as Ethernet to set `skb->protocol` from bytes 12-13, so the test feeds a bare IP packet
/// whose bytes 12-13 happen to read as the right EtherType: an IPv4 source 8.0.x.y (bytes 12-13 = 08 00), an
/// IPv6 source fd00:0:86dd::/48 (bytes 12-13 = 86 dd). The program sees exactly what it would on a TUN device.
fn bare_ip(pkt_with_eth: &[u8]) -> Vec<u8> {
    pkt_with_eth[14..].to_vec()
}

#[test]
fn l3_variant_reads_the_ip_header_at_offset_zero() -> Result<()> {
    let Some(fx) = fixture("l3_variant_reads_the_ip_header_at_offset_zero", true) else { return Ok(()) };
    let h = Hook::FromRemote;
    let local4 = v4("10.244.1.5");
    let allowed = bare_ip(&tcp_syn(v4("8.0.1.2"), 50000, local4, 80));
    let denied = bare_ip(&tcp_syn(v4("8.0.1.2"), 50000, local4, 22));
    assert_eq!(&allowed[12..14], &[0x08, 0x00]);
    assert_eq!(verdict(&fx, h, &allowed)?, TC_ACT_OK);
    assert_eq!(verdict(&fx, h, &denied)?, TC_ACT_SHOT);
    let local6 = v6("fd00:10:244::5");
    let allowed6 = bare_ip(&tcp_syn(v6("fd00:0:86dd::7"), 50000, local6, 80));
    assert_eq!(&allowed6[12..14], &[0x86, 0xdd]);
    assert_eq!(verdict(&fx, h, &allowed6)?, TC_ACT_OK);
    assert_eq!(verdict(&fx, h, &bare_ip(&tcp_syn(v6("fd00:0:86dd::7"), 50000, local6, 22)))?, TC_ACT_SHOT);
    // The Ethernet variant on the same bytes would read garbage as IP: the two hooks are not interchangeable.
    let _: IpAddr = local4;
    Ok(())
}

#[test]
fn malformed_remote_traffic_is_dropped_and_counted() -> Result<()> {
    let Some(fx) = fixture("malformed_remote_traffic_is_dropped_and_counted", true) else { return Ok(()) };
    let good = tcp_syn(v4("10.99.1.7"), 50000, v4("10.244.1.5"), 80);
    let before = fx.drops(DropReason::Malformed);
    let mut short_total = good.clone();
    short_total[16..18].copy_from_slice(&12u16.to_be_bytes());
    assert_eq!(fx.run(Hook::FromRemoteEth, &short_total)?.ret, TC_ACT_SHOT, "tot_len < IHL");
    let mut bad = good.clone();
    bad[14] = 0x43;
    assert_eq!(fx.run(Hook::FromRemoteEth, &bad)?.ret, TC_ACT_SHOT, "IHL 3");
    assert_eq!(fx.run(Hook::FromRemoteEth, &good[..14 + 20 + 10])?.ret, TC_ACT_SHOT, "TCP header cut");
    assert_eq!(fx.drops(DropReason::Malformed), before + 3);
    Ok(())
}
