//! egress-gw as two replicas with leader election: one leads (ready, serving the agents, probing, writing status),
//! the other stands by (not ready, says who leads). When the leader is SIGKILLed, egress goes on through the same
//! gateway meanwhile (the agents keep their last assignments), the standby takes the Lease and then does the
//! leader's job: a gateway that fails afterwards is failed over and the status says so. A leader stopped with
//! SIGTERM gives the Lease up and exits 0, and a restarted replica takes over. Needs root; skipped with a message
//! otherwise, unless CAUSEWAY_PRIVILEGED_TESTS=1.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};
use causeway_egress_e2e::topology::LEGACY_SERVER;
use causeway_egress_e2e::{EgressCluster, Options, BILLING, GW_A, GW_B, SOON, UDP_PORT, WORKER};
use common::*;

/// Waits until exactly one replica is ready, the Lease names it, and the other says it stands by; returns the
/// leader's index.
fn wait_one_leader(c: &EgressCluster, replicas: &[usize]) -> Result<usize> {
    let deadline = Instant::now() + SOON;
    loop {
        let ready: Vec<usize> = replicas.iter().copied().filter(|&i| c.egress_gw_readyz(i).0).collect();
        let holder = c.egress_gw_lease_holder()?;
        if let [leader] = ready[..] {
            if holder.as_deref() == Some(format!("egress-gw-{leader}").as_str()) {
                return Ok(leader);
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> =
                replicas.iter().map(|&i| format!("-- replica {i}:\n{}", c.egress_gw_replica_log(i, 30))).collect();
            bail!("never exactly one leader: ready {ready:?}, Lease holder {holder:?}\n{}", logs.join("\n"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The worker agent's counter of packets dropped because their group had no healthy gateway.
const NO_GATEWAY_DROPS: &str = "causeway_node_agent_drops_total{reason=\"no_gateway\"}";

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_standby_egress_gw_takes_over_when_the_leader_dies_and_then_fails_gateways_over() -> Result<()> {
    let test = "a_standby_egress_gw_takes_over_when_the_leader_dies_and_then_fails_gateways_over";
    let Some((_serial, mut c)) = start(test, Options { egress_gw_replicas: 2, ..Options::default() })? else {
        return Ok(());
    };
    let leader = wait_one_leader(&c, &[0, 1])?;
    let standby = 1 - leader;
    let (ready, body) = c.egress_gw_readyz(standby);
    ensure!(
        !ready && body.contains("standby") && body.contains(&format!("egress-gw-{leader}")),
        "the standby's /readyz should say it stands by for egress-gw-{leader}: {body}"
    );
    ensure!(metric(&c.egress_gw_metrics_text(leader), "causeway_leader_is_leader") == Some(1.0), "leader metric");
    ensure!(metric(&c.egress_gw_metrics_text(standby), "causeway_leader_is_leader") == Some(0.0), "standby metric");

    let BillingFlow { sink, name, gateway: gw, stream: _stream, .. } = billing_flow(&mut c)?;
    let gw_ip = IpAddr::V4(c.topo.nodes[gw].egress_ip);

    // The leader dies without giving the Lease up.
    let no_gateway = |c: &EgressCluster| c.agent_metric(WORKER, NO_GATEWAY_DROPS).unwrap_or(0.0);
    let dropped_before = no_gateway(&c);
    let killed_at = Instant::now();
    c.kill_egress_gw(leader);
    let new_leader = wait_one_leader(&c, &[standby])?;
    println!("{test}: egress-gw-{new_leader} leads {} ms after the leader was killed", killed_at.elapsed().as_millis());
    // Meanwhile egress went on through the same gateway, never with the pod's address, and the worker dropped
    // nothing for want of a gateway (observed for a while: the agent reads its drop counters every second). That the
    // new leader's first assignments already carry the healthy gateways is checked in egress-gw's controller tests:
    // here the agents' reconnect backoff usually outlasts the new leader's first probe rounds.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let seen: BTreeSet<IpAddr> = sink.sources(&name, killed_at);
    ensure!(seen == BTreeSet::from([gw_ip]), "sources while the controller changed hands: {seen:?} (want {gw_ip})");
    assert_no_pod_ip_reached_the_firewall(&c)?;
    let dropped = no_gateway(&c) - dropped_before;
    ensure!(
        dropped == 0.0,
        "the worker dropped {dropped} packets for want of a gateway while the controller changed hands"
    );

    // The new leader does the job: the active gateway fails, traffic moves to the other one, the status says so.
    let survivor = if gw == GW_A { GW_B } else { GW_A };
    let survivor_ip = IpAddr::V4(c.topo.nodes[survivor].egress_ip);
    let failed_at = Instant::now();
    c.topo.set_underlay(gw, false)?;
    if sink.wait_from(&name, survivor_ip, failed_at, GENEROUS).is_none() {
        bail!(
            "after the takeover, traffic did not fail over to {} within {GENEROUS:?}; sources: {:?}\nnew leader:\n{}",
            c.topo.nodes[survivor].name,
            sink.sources(&name, failed_at),
            c.egress_gw_replica_log(new_leader, 40)
        );
    }
    c.wait_active("billing", &[survivor])?;
    assert_no_pod_ip_reached_the_firewall(&c)?;

    // A clean handover: the killed replica comes back as a standby; the leader gets SIGTERM, gives the Lease up
    // and exits 0; the restarted replica leads.
    c.start_egress_gw(leader)?;
    let deadline = Instant::now() + SOON;
    while !c.egress_gw_readyz(leader).1.contains("standby") {
        ensure!(
            Instant::now() < deadline,
            "the restarted replica never stood by:\n{}",
            c.egress_gw_replica_log(leader, 30)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = c.terminate_egress_gw(new_leader).context("the leader did not exit within 10 s of SIGTERM")?;
    ensure!(
        status.success(),
        "the leader exited with {status} on SIGTERM:\n{}",
        c.egress_gw_replica_log(new_leader, 30)
    );
    ensure!(c.egress_gw_replica_log(new_leader, 20).contains("gave the Lease up"), "no release in the leader's log");
    let last = wait_one_leader(&c, &[leader])?;
    ensure!(last == leader);
    // It serves the agents: a pod created now is programmed and its traffic leaves through the survivor.
    let pod2 = c.add_pod(WORKER, "billing-2", BILLING)?;
    c.wait_pod_programmed(pod2)?;
    let t2 = Instant::now();
    let _stream2 = stream(&c, pod2, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    let via = wait_through_gateway(&c, &sink, pod2, t2)?;
    ensure!(via == survivor, "a pod created after the handover left through {}", c.topo.nodes[via].name);
    assert_no_pod_ip_reached_the_firewall(&c)?;
    Ok(())
}
