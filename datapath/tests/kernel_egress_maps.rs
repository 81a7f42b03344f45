//! The kernel adapter (`KernelDatapath`) over the real, pinned egress maps, driven through the agent's `Datapath`
//! trait and checked in the maps the programs read, with packets run through the real `cw_from_pod` (TestRun):
//!
//! - deleting the last policy entry of a prefix length removes that length from `cw_egress_plens`, so the program
//!   stops probing it — also after the adapter is reopened over the pinned maps (an agent restart);
//! - conntrack GC (`AgentCore::gc` with a `GcPolicy`) expires idle `cw_egress_ct` pins by their last-seen stamp,
//!   with the same timeouts table as SNAT (an idle UDP pin goes, a TCP pin — reported established — stays).
//!
//! Root/BPF required: skipped with a message unless CAUSEWAY_PRIVILEGED_TESTS=1, which makes them fail instead.

mod bpf_support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use bpf_support::*;
use causeway_datapath::agent::gc::Proto;
use causeway_datapath::agent::model::{ClassId, EgressGroup, EgressVerdict, Gateway, GroupId};
use causeway_datapath::agent::{AgentCore, Datapath, GcPolicy, LocalNode, Op};
use causeway_datapath::bpf::loader::Hook;
use causeway_datapath::bpf::maps::{FlowTuple, NodeConfig};
use causeway_datapath::kernel::{KernelConfig, KernelDatapath};
use ipnet::IpNet;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);
const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 2);
const CLASS: ClassId = ClassId(1);
const OTHER_CLASS: ClassId = ClassId(2);
const GROUP: GroupId = GroupId(7);

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix literal")
}

/// A shadow journal path, removed on drop.
struct Shadow(PathBuf);

impl Shadow {
    fn new(tag: &str) -> Shadow {
        Shadow(std::env::temp_dir().join(causeway_testsupport::netns::unique_name(&format!("cw-kadapter-{tag}"))))
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open(fx: &Fixture, shadow: &Shadow) -> Result<KernelDatapath> {
    Ok(KernelDatapath::open(KernelConfig {
        pin_dir: fx.pin_dir().to_owned(),
        shadow_path: shadow.0.clone(),
        local_ip: IpAddr::V4(NODE),
        tunnel: None,
    })?)
}

fn steer(class: ClassId, cidr: &str) -> Op {
    Op::UpsertEgressLpm(class, net(cidr), EgressVerdict::Steer(GROUP))
}

/// The node, one egress-selected pod and a group with one remote gateway, programmed through the adapter.
fn program_node(fx: &mut Fixture, dp: &mut KernelDatapath) -> Result<()> {
    fx.maps.config.set(NodeConfig { node_ipv4: NODE, vxlan_ifindex: 42, enforce_policy: false })?;
    let group = EgressGroup { gateways: vec![Gateway { node_ip: IpAddr::V4(GW), egress_v4: None, egress_v6: None }] };
    dp.apply(&Op::UpsertEgressGroup(GROUP, group))?;
    dp.apply(&Op::UpsertEgressSrc(v4("10.244.1.5"), CLASS))?;
    Ok(())
}

#[test]
fn deleting_the_last_entry_of_a_prefix_length_stops_the_program_probing_it() -> Result<()> {
    let Some(mut fx) = Fixture::new("deleting_the_last_entry_of_a_prefix_length_stops_the_program_probing_it") else {
        return Ok(());
    };
    let shadow = Shadow::new("plens");
    let mut dp = open(&fx, &shadow)?;
    program_node(&mut fx, &mut dp)?;
    for op in [
        steer(CLASS, "203.0.113.0/24"),
        steer(OTHER_CLASS, "198.51.100.0/24"),
        steer(CLASS, "10.0.0.0/8"),
        steer(CLASS, "2001:db8:100::/48"),
    ] {
        dp.apply(&op)?;
    }
    let plens = |fx: &Fixture| fx.maps.egress_policy.prefix_lengths(false);
    assert_eq!(plens(&fx)?, vec![24, 8]);
    assert_eq!(fx.maps.egress_policy.prefix_lengths(true)?, vec![48]);
    let out = fx.run(Hook::FromPod, &udp(v4("10.244.1.5"), 40000, v4("203.0.113.7"), 53))?;
    assert_eq!(out.ret, TC_ACT_REDIRECT, "steered by the /24");

    // One /24 of two goes: 24 is still in use.
    dp.apply(&Op::DeleteEgressLpm(CLASS, net("203.0.113.0/24")))?;
    assert_eq!(plens(&fx)?, vec![24, 8], "198.51.100.0/24 still needs 24");
    let out = fx.run(Hook::FromPod, &udp(v4("10.244.1.5"), 40001, v4("203.0.113.7"), 53))?;
    assert_eq!(out.ret, TC_ACT_OK, "the deleted /24 no longer steers");
    // Deleting an absent entry (idempotent op) prunes nothing and fails nothing.
    dp.apply(&Op::DeleteEgressLpm(CLASS, net("203.0.113.0/24")))?;
    assert_eq!(plens(&fx)?, vec![24, 8]);

    // The last /24 goes: the program stops probing 24, the /8 still steers.
    dp.apply(&Op::DeleteEgressLpm(OTHER_CLASS, net("198.51.100.0/24")))?;
    assert_eq!(plens(&fx)?, vec![8], "24 pruned");
    assert_eq!(fx.maps.egress_policy.prefix_lengths(true)?, vec![48], "the other family untouched");
    let out = fx.run(Hook::FromPod, &udp(v4("10.244.1.5"), 40002, v4("10.1.2.3"), 53))?;
    assert_eq!(out.ret, TC_ACT_REDIRECT, "the /8 still steers");

    // An agent restart: a new adapter over the same pins learns the entries from the map and keeps pruning.
    drop(dp);
    let mut dp = open(&fx, &shadow)?;
    dp.apply(&Op::DeleteEgressLpm(CLASS, net("10.0.0.0/8")))?;
    assert_eq!(plens(&fx)?, Vec::<u8>::new(), "8 pruned after the reopen");
    dp.apply(&Op::DeleteEgressLpm(CLASS, net("2001:db8:100::/48")))?;
    assert_eq!(fx.maps.egress_policy.prefix_lengths(true)?, Vec::<u8>::new());
    Ok(())
}

#[test]
fn conntrack_gc_expires_idle_egress_pins_with_the_shared_timeouts() -> Result<()> {
    let Some(mut fx) = Fixture::new("conntrack_gc_expires_idle_egress_pins_with_the_shared_timeouts") else {
        return Ok(());
    };
    let shadow = Shadow::new("pins");
    let mut dp = open(&fx, &shadow)?;
    program_node(&mut fx, &mut dp)?;
    dp.apply(&steer(CLASS, "203.0.113.0/24"))?;
    let (pod, dst) = (v4("10.244.1.5"), v4("203.0.113.7"));
    for pkt in [udp(pod, 40000, dst, 53), tcp_syn(pod, 33000, dst, 443)] {
        assert_eq!(fx.run(Hook::FromPod, &pkt)?.ret, TC_ACT_REDIRECT);
    }
    let udp_pin = FlowTuple { proto: 17, src: pod, dst, sport: 40000, dport: 53 };
    let tcp_pin = FlowTuple { proto: 6, src: pod, dst, sport: 33000, dport: 443 };
    assert!(fx.maps.egress_ct.get(&udp_pin)?.is_some() && fx.maps.egress_ct.get(&tcp_pin)?.is_some());
    let seen = dp.conntrack()?;
    assert_eq!(seen.len(), 2, "both pins reported to GC: {seen:?}");
    assert!(seen.iter().all(|e| e.last_seen_ns > 0 && e.last_seen_ns <= dp.now_ns()), "stamped: {seen:?}");

    let local = LocalNode::new("me", IpAddr::V4(NODE), 0);
    let mut core = AgentCore::new(local, true);
    // Default timeouts: nothing is idle long enough yet.
    let report = core.gc(&mut dp, &GcPolicy::default())?;
    assert_eq!((report.scanned, report.deleted), (2, 0));
    // UDP may idle for no time at all: its pin has been idle longer than that; TCP keeps the established timeout.
    let strict = GcPolicy { udp: Duration::ZERO, ..GcPolicy::default() };
    let report = core.gc(&mut dp, &strict)?;
    assert_eq!((report.scanned, report.deleted), (2, 1));
    assert!(fx.maps.egress_ct.get(&udp_pin)?.is_none(), "idle UDP pin expired");
    assert!(fx.maps.egress_ct.get(&tcp_pin)?.is_some(), "TCP pin kept");
    assert_eq!(dp.conntrack()?.iter().map(|e| e.proto).collect::<Vec<_>>(), vec![Proto::Tcp]);
    // The expired flow's next packet is pinned afresh (to the group's gateway), so traffic is never stranded.
    assert_eq!(fx.run(Hook::FromPod, &udp(pod, 40000, dst, 53))?.ret, TC_ACT_REDIRECT);
    assert_eq!(fx.maps.egress_ct.get(&udp_pin)?.map(|p| p.gateway), Some(GW));
    Ok(())
}
