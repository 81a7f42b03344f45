//! Egress policies end to end: the source IP the legacy server sees, excluded CIDRs, new pods, invalid policies.
//! Real egress-gw and node agents in network namespaces, real traffic, an nftables firewall that only lets the egress
//! IPs through (see `causeway_egress_e2e::topology`). Needs root; skipped with a message otherwise, unless
//! CAUSEWAY_PRIVILEGED_TESTS=1. Build the binaries first: `cargo build -p causeway-egress-gw -p causeway-datapath
//! --bins`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use causeway_egress_e2e::topology::{EXCLUDED_SERVER, LEGACY_SERVER};
use causeway_egress_e2e::traffic::tcp_source_seen;
use causeway_egress_e2e::{
    billing_policy, Options, TcpEcho, UdpSink, BILLING, GW_A, GW_B, SOON, TCP_PORT, UDP_PORT, WORKER,
};
use common::*;
use serde_json::json;

fn condition<'a>(
    s: &'a causeway_crds::EgressGatewayPolicyStatus,
    type_: &str,
) -> Option<&'a causeway_crds::egress::PolicyCondition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

#[test]
fn traffic_reaches_the_legacy_server_with_the_active_gateways_egress_ip() -> Result<()> {
    let Some((_serial, mut c)) =
        start("traffic_reaches_the_legacy_server_with_the_active_gateways_egress_ip", Options::default())?
    else {
        return Ok(());
    };
    let sink = legacy_sink(&c)?;
    let echo = TcpEcho::start(&c.topo.server, SocketAddr::from((LEGACY_SERVER, TCP_PORT)))?;
    let pod = c.add_pod(WORKER, "billing-1", BILLING)?;
    // One active gateway: the status names it, and its egress IP is what the server must see.
    c.create_policy("billing", billing_policy(json!({"maxGatewayNodes": 1}), None))?;
    let status = c.wait_status("billing", SOON, |s| {
        let ready = condition(s, "Ready").is_some_and(|r| r.status == "True");
        let one = s.group_statuses.first().is_some_and(|g| g.active_gateway_ips.len() == 1);
        // matchedPods: the one billing pod.
        if ready && one && s.matched_pods == Some(1) {
            Ok(())
        } else {
            Err("Ready=True with one active gateway and matchedPods 1".into())
        }
    })?;
    let active_ip = &status.group_statuses[0].active_gateway_ips[0];
    let active = c.topo.nodes.iter().position(|n| n.ip.to_string() == *active_ip).context("active IP is a node")?;
    ensure!(c.topo.nodes[active].initially_gateway, "{active_ip} is not a node labelled as gateway");
    let want = IpAddr::V4(c.topo.nodes[active].egress_ip);
    c.wait_pod_programmed(pod)?;
    let t0 = Instant::now();
    let _stream = stream(&c, pod, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;

    let through = wait_through_gateway(&c, &sink, pod, t0)?;
    assert_eq!(through, active, "the traffic left through another gateway than the status says");
    let seen = sources_during(&c, &sink, pod, Duration::from_secs(1));
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![want], "sources the server saw from the pod");
    // TCP too, and the server never saw anything but that egress IP.
    assert_eq!(tcp_source_seen(c.pod(pod), echo.addr)?, want);
    let all: std::collections::BTreeSet<IpAddr> = sink.arrivals().iter().map(|a| a.src).collect();
    assert_eq!(all.into_iter().collect::<Vec<_>>(), vec![want], "every source the server ever saw");
    // The firewall agrees: packets came from the active gateway's egress IP, none from a pod address.
    ensure!(c.topo.fw_counter(&c.topo.nodes[active].egress_counter())? > 0, "no packet counted from {want}");
    assert_no_pod_ip_reached_the_firewall(&c)?;
    Ok(())
}

#[test]
fn an_excluded_cidr_bypasses_the_gateway() -> Result<()> {
    let Some((_serial, mut c)) = start("an_excluded_cidr_bypasses_the_gateway", Options::default())? else {
        return Ok(());
    };
    let legacy = legacy_sink(&c)?;
    let open = UdpSink::start(&c.topo.server, SocketAddr::from((EXCLUDED_SERVER, UDP_PORT)))?;
    let pod = c.add_pod(WORKER, "billing-1", BILLING)?;
    c.create_policy("billing", billing_policy(json!({}), None))?;
    c.wait_active("billing", &[GW_A, GW_B])?;
    c.wait_pod_programmed(pod)?;
    let t0 = Instant::now();
    let _to_legacy = stream(&c, pod, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    let _to_excluded = stream(&c, pod, SocketAddr::from((EXCLUDED_SERVER, UDP_PORT)))?;
    wait_through_gateway(&c, &legacy, pod, t0)?;

    let pod_ip = IpAddr::V4(c.pod(pod).ip);
    let name = c.pod(pod).name.clone();
    let seen_excluded = sources_during(&c, &open, pod, Duration::from_secs(1));
    // To the excluded range the pod's own address arrives: it went straight out of its node, not via a gateway.
    assert_eq!(seen_excluded.into_iter().collect::<Vec<_>>(), vec![pod_ip], "sources at the excluded address");
    let since = Instant::now() - Duration::from_secs(1);
    let seen_legacy = legacy.sources(&name, since);
    ensure!(
        !seen_legacy.is_empty() && seen_legacy.is_subset(&egress_ips(&c)),
        "the legacy address must see only egress IPs, saw {seen_legacy:?}"
    );
    ensure!(c.topo.fw_counter("excluded_pod")? > 0, "the firewall counted no pod-IP packet to the excluded range");
    assert_no_pod_ip_reached_the_firewall(&c)?;
    // It left from the pod's own node: its egress counter would show it had it been SNATed there; the worker is no
    // gateway and its egress IP never reached the legacy range.
    assert_eq!(c.topo.fw_counter(&c.topo.nodes[WORKER].egress_counter())?, 0);
    Ok(())
}

#[test]
fn a_pod_created_after_the_policy_is_covered() -> Result<()> {
    let Some((_serial, c)) = start("a_pod_created_after_the_policy_is_covered", Options::default())? else {
        return Ok(());
    };
    let sink = legacy_sink(&c)?;
    c.create_policy("billing", billing_policy(json!({}), None))?;
    c.wait_active("billing", &[GW_A, GW_B])?;
    let mut c = c;
    // The pod's network exists and it already sends; not in the kube API yet, so nothing selects it and the
    // firewall drops its packets (they leave with the pod IP).
    let pod = c.pod_netns(WORKER, "billing-late")?;
    let _stream = stream(&c, pod, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    ensure!(
        causeway_testsupport::netns::wait_for(SOON, || c.topo.fw_counter("pod_ip").unwrap_or(0) > 0),
        "the unselected pod's packets never reached the firewall"
    );
    ensure!(sink.sources(&c.pod(pod).name, Instant::now() - SOON).is_empty(), "an unselected pod got through");

    let t0 = Instant::now();
    c.create_pod_object(pod, BILLING)?;
    let gw = wait_through_gateway(&c, &sink, pod, t0)?;
    let first = sink.first_from(&c.pod(pod).name, IpAddr::V4(c.topo.nodes[gw].egress_ip), t0).unwrap_or(t0);
    let took = first.duration_since(t0);
    println!(
        "new pod covered {} ms after its Pod object was created (through {})",
        took.as_millis(),
        c.topo.nodes[gw].name
    );
    ensure!(took <= GENEROUS, "the new pod took {took:?} to be covered (bound {GENEROUS:?})");
    // From then on nothing of it reaches the firewall with its pod IP.
    std::thread::sleep(Duration::from_millis(300));
    let before = c.topo.fw_counter("pod_ip")?;
    let seen = sources_during(&c, &sink, pod, Duration::from_secs(1));
    assert_eq!(c.topo.fw_counter("pod_ip")?, before, "pod-IP packets kept reaching the firewall once covered");
    ensure!(!seen.is_empty() && seen.is_subset(&egress_ips(&c)), "sources after coverage: {seen:?}");
    Ok(())
}

#[test]
fn invalid_policies_report_invalid_spec_and_leave_the_datapath_alone() -> Result<()> {
    let Some((_serial, mut c)) =
        start("invalid_policies_report_invalid_spec_and_leave_the_datapath_alone", Options::default())?
    else {
        return Ok(());
    };
    let sink = legacy_sink(&c)?;
    let pod = c.add_pod(WORKER, "billing-1", BILLING)?;
    c.create_policy("billing", billing_policy(json!({"maxGatewayNodes": 1}), None))?;
    c.wait_pod_programmed(pod)?;
    let t0 = Instant::now();
    let _stream = stream(&c, pod, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    let gw = wait_through_gateway(&c, &sink, pod, t0)?;
    let want = IpAddr::V4(c.topo.nodes[gw].egress_ip);
    // Let the agents settle, then take the datapath as bpftool would show it on every node.
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<String> = (0..c.topo.nodes.len()).map(|i| c.egress_maps(i)).collect::<Result<_>>()?;

    // 1. A new policy naming both egressIP and interface (a real apiserver's CEL rule rejects it; one that slipped
    //    through, e.g. before the CRD was upgraded, must still be refused by the controller).
    let mut both = billing_policy(json!({"egressIP": c.topo.nodes[0].egress_ip.to_string()}), None);
    both["destinationCIDRs"] = json!(["192.0.2.0/24"]);
    both["excludedCIDRs"] = json!([]);
    c.create_policy("bad-both", both)?;
    let s = c.wait_status("bad-both", SOON, |s| match condition(s, "InvalidSpec") {
        Some(cond) if cond.status == "True" && cond.reason == "BothEgressIPAndInterface" => Ok(()),
        other => Err(format!("InvalidSpec=True/BothEgressIPAndInterface, have {other:?}")),
    })?;
    ensure!(s.observed_generation == Some(1), "observedGeneration {:?}", s.observed_generation);

    // 2. The working policy gains an excluded CIDR outside its destinations.
    c.patch_policy("billing", json!({"excludedCIDRs": ["203.0.113.128/25", "198.51.100.0/24"]}))?;
    let s = c.wait_status("billing", SOON, |s| match condition(s, "InvalidSpec") {
        Some(cond)
            if cond.status == "True"
                && cond.reason == "ExcludedCIDROutsideDestinations"
                && s.observed_generation == Some(2) =>
        {
            Ok(())
        }
        other => Err(format!("generation 2 with InvalidSpec=True/ExcludedCIDROutsideDestinations, have {other:?}")),
    })?;
    let msg = condition(&s, "InvalidSpec").map(|c| c.message.clone()).unwrap_or_default();
    ensure!(msg.contains("198.51.100.0/24"), "the message names the offending CIDR: {msg:?}");

    // The datapath did not move, and the traffic still leaves the same way.
    std::thread::sleep(Duration::from_secs(1));
    for (i, was) in before.iter().enumerate() {
        let now = c.egress_maps(i)?;
        assert_eq!(&now, was, "egress maps on {} changed after the invalid policies", c.topo.nodes[i].name);
    }
    let seen = sources_during(&c, &sink, pod, Duration::from_secs(1));
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![want], "sources after the invalid policies");
    assert_no_pod_ip_reached_the_firewall(&c)?;
    Ok(())
}
