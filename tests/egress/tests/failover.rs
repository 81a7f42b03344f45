//! Gateway failure and gateway addition, end to end: the active gateway's agent is SIGKILLed or its underlay cable
//! cut while a pod streams UDP to the legacy server, and the stream must come back through the other gateway's
//! egress IP with no packet leaking with the pod's address; a live TCP flow must survive a third gateway joining.
//! The time to fail over is printed (the benchmark `egress-failover` measures it properly); the assertion is only a
//! generous bound. Needs root; skipped with a message otherwise, unless CAUSEWAY_PRIVILEGED_TESTS=1.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use causeway_egress_e2e::topology::LEGACY_SERVER;
use causeway_egress_e2e::traffic::tcp_source_seen;
use causeway_egress_e2e::{
    billing_policy, EgressCluster, Options, TcpEcho, TcpFlow, BILLING, GW_A, GW_B, TCP_PORT, WORKER,
};
use common::*;
use serde_json::json;

enum Failure {
    KillAgent,
    CutUnderlay,
}

fn fail_over(test: &str, how: Failure) -> Result<()> {
    let Some((_serial, mut c)) = start(test, Options::default())? else {
        return Ok(());
    };
    // Both gateways are active; the stream is pinned to one of them. That one fails.
    let BillingFlow { sink, pod, gateway: victim, stream: _stream, .. } = billing_flow(&mut c)?;
    let survivor = if victim == GW_A { GW_B } else { GW_A };
    let survivor_ip = IpAddr::V4(c.topo.nodes[survivor].egress_ip);
    let name = c.pod(pod).name.clone();
    std::thread::sleep(Duration::from_millis(500));

    let failed_at = Instant::now();
    match how {
        Failure::KillAgent => c.kill_agent(victim),
        Failure::CutUnderlay => c.topo.set_underlay(victim, false)?,
    }
    let resumed = sink.wait_from(&name, survivor_ip, failed_at, GENEROUS);
    let Some(resumed) = resumed else {
        anyhow::bail!(
            "traffic did not resume through {} within {GENEROUS:?}; sources since the failure: {:?}\negress-gw:\n{}",
            c.topo.nodes[survivor].name,
            sink.sources(&name, failed_at),
            c.egress_gw_log(30)
        );
    };
    let took = resumed.duration_since(failed_at);
    println!(
        "{test}: traffic resumed through {} {} ms after {} failed",
        c.topo.nodes[survivor].name,
        took.as_millis(),
        c.topo.nodes[victim].name
    );
    // It stays on the survivor; the status says the victim is out; nothing leaked with the pod IP meanwhile.
    std::thread::sleep(Duration::from_millis(200));
    let seen = sources_during(&c, &sink, pod, Duration::from_secs(1));
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![survivor_ip], "sources after failover");
    let status = c.wait_active("billing", &[survivor])?;
    let victim_ip = c.topo.nodes[victim].ip.to_string();
    ensure!(
        !status.group_statuses[0].healthy_gateway_ips.contains(&victim_ip),
        "the failed gateway is still reported healthy: {:?}",
        status.group_statuses[0]
    );
    assert_no_pod_ip_reached_the_firewall(&c)?;
    Ok(())
}

#[test]
fn killing_the_active_gateways_agent_moves_traffic_to_the_other_gateway() -> Result<()> {
    fail_over("killing_the_active_gateways_agent_moves_traffic_to_the_other_gateway", Failure::KillAgent)
}

#[test]
fn cutting_the_active_gateways_underlay_link_moves_traffic_to_the_other_gateway() -> Result<()> {
    fail_over("cutting_the_active_gateways_underlay_link_moves_traffic_to_the_other_gateway", Failure::CutUnderlay)
}

/// Opens connections from pod `h` until one is seen from `node`'s egress IP (a new flow is hashed over the
/// gateways); the number of connections it took.
fn new_flow_through(c: &EgressCluster, h: usize, echo: SocketAddr, node: usize) -> Result<usize> {
    let want = IpAddr::V4(c.topo.nodes[node].egress_ip);
    let mut seen = Vec::new();
    for tries in 1..=64 {
        let src = tcp_source_seen(c.pod(h), echo)?;
        if src == want {
            return Ok(tries);
        }
        seen.push(src);
    }
    anyhow::bail!("64 new connections, none through {}: {seen:?}", c.topo.nodes[node].name)
}

#[test]
fn a_live_flow_keeps_its_gateway_when_a_gateway_is_added() -> Result<()> {
    let Some((_serial, mut c)) = start("a_live_flow_keeps_its_gateway_when_a_gateway_is_added", Options::default())?
    else {
        return Ok(());
    };
    let echo = TcpEcho::start(&c.topo.server, SocketAddr::from((LEGACY_SERVER, TCP_PORT)))?;
    let pod = c.add_pod(WORKER, "billing-1", BILLING)?;
    c.create_policy("billing", billing_policy(json!({}), None))?;
    c.wait_active("billing", &[GW_A, GW_B])?;
    c.wait_pod_programmed(pod)?;
    // Wait for the datapath: a connection gets through a gateway.
    ensure!(
        causeway_testsupport::netns::wait_for(causeway_egress_e2e::SOON, || tcp_source_seen(c.pod(pod), echo.addr)
            .is_ok_and(|ip| c.topo.node_with_egress_ip(ip).is_some())),
        "no TCP connection got through a gateway"
    );
    let mut flow = TcpFlow::start(c.pod(pod), echo.addr)?;
    let pinned = c.topo.node_with_egress_ip(flow.seen_as).context("the flow left through no gateway")?;
    ensure!(pinned == GW_A || pinned == GW_B, "flow left through {}", c.topo.nodes[pinned].name);
    flow.progresses(64 * 1024, Duration::from_secs(10))?;

    // The worker becomes a third gateway.
    c.label_node(WORKER, "egress-gw", Some("true"))?;
    let status = c.wait_active("billing", &[GW_A, GW_B, WORKER])?;
    println!("active gateways after adding the worker: {:?}", status.group_statuses[0].active_gateway_ips);
    // New flows do use it (so it really is in every node's group now)...
    let tries = new_flow_through(&c, pod, echo.addr, WORKER)?;
    println!("a new connection went through the added gateway after {tries} tries");
    // ...while the live flow keeps its gateway: had it moved, the server would see another source address and the
    // connection would break.
    let before = flow.echoed();
    flow.progresses(200 * 1024, Duration::from_secs(15)).context("the live flow after the gateway was added")?;
    println!(
        "the live flow through {} echoed {} KiB more after the gateway was added",
        c.topo.nodes[pinned].name,
        (flow.echoed() - before) / 1024
    );
    assert_no_pod_ip_reached_the_firewall(&c)?;
    Ok(())
}
