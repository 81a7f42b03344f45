//! Gateway removal end to end through the agent: assignments from the controller go through the agent core
//! (desired state, planner) into the real pinned maps via `KernelDatapath`, and the real `cw_from_pod` (run with
//! BPF_PROG_TEST_RUN) steers packets. Checks that flows pinned to a gateway the controller removed move to a
//! remaining gateway, that an empty gateway set drops instead of leaking pod IPs, and that flows stay put when a
//! gateway comes back.

#[path = "bpf_support/mod.rs"]
mod bpf_support;
mod egress_agent_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use anyhow::Result;
use bpf_support::*;
use causeway_api::v1 as pb;
use causeway_api::v1::egress_watch_event::Kind;
use causeway_datapath::agent::{AgentCore, LocalNode};
use causeway_datapath::bpf::loader::Hook;
use causeway_datapath::bpf::maps::{DropReason, FlowTuple, NodeConfig};
use causeway_datapath::kernel::{KernelConfig, KernelDatapath};
use egress_agent_support::policy;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);
const GW_A: &str = "192.168.60.2";
const GW_B: &str = "192.168.60.3";
const GW_C: &str = "192.168.60.4";
const POD: &str = "10.244.1.5";
const DST: &str = "203.0.113.7";
const FLOWS: std::ops::Range<u16> = 20000..20032;

struct Agent {
    core: AgentCore,
    dp: KernelDatapath,
    revision: u64,
}

impl Agent {
    /// The controller (re)assigns the policy's gateways; the agent reconciles the maps.
    fn assign(&mut self, gateways: &[&str]) -> Result<()> {
        self.revision += 1;
        let p = policy("billing", "203.0.113.0/24", &[POD], "192.0.2.10", gateways);
        let ev =
            |kind: Kind, policy| pb::EgressWatchEvent { kind: kind as i32, revision: self.revision, epoch: 1, policy };
        if self.revision == 1 {
            self.core.on_egress_event(&ev(Kind::SnapshotBegin, None))?;
            self.core.on_egress_event(&ev(Kind::Upsert, Some(p)))?;
            self.core.on_egress_event(&ev(Kind::SnapshotEnd, None))?;
        } else {
            self.core.on_egress_event(&ev(Kind::Upsert, Some(p)))?;
        }
        self.core.reconcile(&mut self.dp)?;
        Ok(())
    }
}

fn flow(sport: u16) -> FlowTuple {
    FlowTuple { proto: 17, src: v4(POD), dst: v4(DST), sport, dport: 53 }
}

/// Sends one packet of every flow; returns the verdicts and the gateway each flow is pinned to afterwards.
fn send_all(fx: &Fixture) -> Result<(BTreeSet<u32>, BTreeMap<u16, Ipv4Addr>)> {
    let mut verdicts = BTreeSet::new();
    let mut pins = BTreeMap::new();
    for sport in FLOWS {
        verdicts.insert(fx.run(Hook::FromPod, &udp(v4(POD), sport, v4(DST), 53))?.ret);
        if let Some(pin) = fx.maps.egress_ct.get(&flow(sport))? {
            pins.insert(sport, pin.gateway);
        }
    }
    Ok((verdicts, pins))
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test IP")
}

#[test]
fn flows_of_a_removed_gateway_move_and_an_empty_group_drops() -> Result<()> {
    let Some(mut fx) = Fixture::new("flows_of_a_removed_gateway_move_and_an_empty_group_drops") else {
        return Ok(());
    };
    fx.maps.config.set(NodeConfig { node_ipv4: NODE, vxlan_ifindex: 42, enforce_policy: false })?;
    let shadow = std::env::temp_dir().join(format!("cw-failover-{}.shadow", std::process::id()));
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(shadow.clone());
    let dp = KernelDatapath::open(KernelConfig {
        pin_dir: fx.pin_dir().to_owned(),
        shadow_path: shadow,
        local_ip: IpAddr::V4(NODE),
        tunnel: None,
    })?;
    let local = LocalNode::new("node-a", IpAddr::V4(NODE), 51871);
    let mut agent = Agent { core: AgentCore::with_streams(local, false, true), dp, revision: 0 };

    // Two gateways: flows spread over both and are pinned.
    agent.assign(&[GW_A, GW_B])?;
    let (verdicts, before) = send_all(&fx)?;
    assert_eq!(verdicts, BTreeSet::from([TC_ACT_REDIRECT]));
    assert_eq!(before.len(), FLOWS.len());
    let used: BTreeSet<Ipv4Addr> = before.values().copied().collect();
    assert_eq!(used, BTreeSet::from([ip(GW_A), ip(GW_B)]), "flows use both gateways");

    // GW_A fails: the controller leaves GW_B only. Every flow pinned to GW_A moves to GW_B at its next packet;
    // flows already on GW_B stay.
    agent.assign(&[GW_B])?;
    let (verdicts, after) = send_all(&fx)?;
    assert_eq!(verdicts, BTreeSet::from([TC_ACT_REDIRECT]));
    assert!(after.values().all(|g| *g == ip(GW_B)), "no flow left on the removed gateway: {after:?}");

    // No healthy gateway at all: dropped (counted), never sent with the pod IP; the group stays programmed empty.
    agent.assign(&[])?;
    let dropped_before = fx.drops(DropReason::NoGateway);
    let (verdicts, _) = send_all(&fx)?;
    assert_eq!(verdicts, BTreeSet::from([TC_ACT_SHOT]));
    assert_eq!(fx.drops(DropReason::NoGateway), dropped_before + FLOWS.len() as u64);
    let groups = fx.maps.egress_groups.entries()?;
    assert_eq!(groups.len(), 1);
    assert!(groups[0].1.gateways.is_empty());

    // A new gateway: every flow (its pin points at GW_B, which is gone) goes there.
    agent.assign(&[GW_C])?;
    let (verdicts, pins) = send_all(&fx)?;
    assert_eq!(verdicts, BTreeSet::from([TC_ACT_REDIRECT]));
    assert!(pins.values().all(|g| *g == ip(GW_C)), "{pins:?}");

    // GW_A comes back after its hold-down: live flows stay on GW_C (no second move), new flows may use GW_A.
    agent.assign(&[GW_C, GW_A])?;
    let (_, pins) = send_all(&fx)?;
    assert!(pins.values().all(|g| *g == ip(GW_C)), "live flows keep their gateway: {pins:?}");
    Ok(())
}
