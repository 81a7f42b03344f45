//! `azAffinity` end to end. The worker is in zone-a with gw-a; gw-b is in zone-b and also hosts a pod. With
//! `localOnly` each pod uses its zone's gateway, and when gw-a's agent dies the zone-a pod's traffic is dropped (on
//! its node, counted as `no_gateway`, never leaked with the pod IP); with `localOnlyFirst` it fails over to gw-b.
//! Needs root; skipped with a message otherwise, unless CAUSEWAY_PRIVILEGED_TESTS=1.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use causeway_datapath::bpf::maps::DropReason;
use causeway_datapath::bpf::BpfMaps;
use causeway_egress_e2e::topology::LEGACY_SERVER;
use causeway_egress_e2e::{billing_policy, EgressCluster, Options, BILLING, GW_A, GW_B, SOON, UDP_PORT, WORKER};
use common::*;
use serde_json::json;

/// Waits until the status shows zone-a → [gw-a's IP] and zone-b → [gw-b's IP].
fn wait_zonal(c: &EgressCluster, a: &[usize], b: &[usize]) -> Result<()> {
    let ips = |v: &[usize]| -> Vec<String> { v.iter().map(|&i| c.topo.nodes[i].ip.to_string()).collect() };
    let (want_a, want_b) = (ips(a), ips(b));
    c.wait_status("billing", SOON, |s| {
        let by_az = s.group_statuses.first().map(|g| g.active_gateway_ips_by_az.clone()).unwrap_or_default();
        // A zone without an active gateway may be listed empty or left out.
        let zone = |z: &str| by_az.get(z).cloned().unwrap_or_default();
        if zone("zone-a") == want_a && zone("zone-b") == want_b {
            Ok(())
        } else {
            Err(format!("activeGatewayIPsByAZ zone-a {want_a:?}, zone-b {want_b:?}"))
        }
    })?;
    Ok(())
}

fn no_gateway_drops(c: &EgressCluster, node: usize) -> Result<u64> {
    Ok(BpfMaps::open(&c.topo.nodes[node].pin_dir)?.drops.count(DropReason::NoGateway)?)
}

#[test]
fn local_only_keeps_pods_on_their_zones_gateway_and_drops_when_it_fails() -> Result<()> {
    let test = "local_only_keeps_pods_on_their_zones_gateway_and_drops_when_it_fails";
    let Some((_serial, mut c)) = start(test, Options::default())? else {
        return Ok(());
    };
    let sink = legacy_sink(&c)?;
    let pod_a = c.add_pod(WORKER, "billing-a", BILLING)?;
    let pod_b = c.add_pod(GW_B, "billing-b", BILLING)?;
    c.create_policy("billing", billing_policy(json!({}), Some("localOnly")))?;
    wait_zonal(&c, &[GW_A], &[GW_B])?;
    c.wait_pod_programmed(pod_a)?;
    c.wait_pod_programmed(pod_b)?;
    let t0 = Instant::now();
    let _sa = stream(&c, pod_a, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    let _sb = stream(&c, pod_b, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    wait_through_gateway(&c, &sink, pod_a, t0)?;
    wait_through_gateway(&c, &sink, pod_b, t0)?;
    // Several flows per pod, so that a hash over both gateways would show: still only the local one.
    let a_ip = IpAddr::V4(c.topo.nodes[GW_A].egress_ip);
    let b_ip = IpAddr::V4(c.topo.nodes[GW_B].egress_ip);
    let _more: Vec<_> =
        (0..8).map(|_| stream(&c, pod_a, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))).collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_millis(300));
    let seen_a = sources_during(&c, &sink, pod_a, Duration::from_secs(1));
    let seen_b = sources_during(&c, &sink, pod_b, Duration::from_secs(1));
    assert_eq!(seen_a.into_iter().collect::<Vec<_>>(), vec![a_ip], "zone-a pod's sources");
    assert_eq!(seen_b.into_iter().collect::<Vec<_>>(), vec![b_ip], "zone-b pod's sources");

    // gw-a's agent dies: zone-a has no gateway left. The zone-a pod's traffic is dropped on its node.
    let drops_before = no_gateway_drops(&c, WORKER)?;
    c.kill_agent(GW_A);
    wait_zonal(&c, &[], &[GW_B])?;
    std::thread::sleep(Duration::from_millis(500));
    let since = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let name_a = c.pod(pod_a).name.clone();
    let got = sink.sources(&name_a, since);
    ensure!(got.is_empty(), "with localOnly and no zone-a gateway the zone-a pod still reached the server via {got:?}");
    let drops = no_gateway_drops(&c, WORKER)?;
    ensure!(drops > drops_before + 50, "no_gateway drops on the worker: {drops_before} -> {drops}");
    let seen_b = sources_during(&c, &sink, pod_b, Duration::from_secs(1));
    assert_eq!(seen_b.into_iter().collect::<Vec<_>>(), vec![b_ip], "zone-b pod keeps its gateway");
    assert_no_pod_ip_reached_the_firewall(&c)?;
    Ok(())
}

#[test]
fn local_only_first_fails_over_to_the_other_zone() -> Result<()> {
    let test = "local_only_first_fails_over_to_the_other_zone";
    let Some((_serial, mut c)) = start(test, Options::default())? else {
        return Ok(());
    };
    let sink = legacy_sink(&c)?;
    let pod_a = c.add_pod(WORKER, "billing-a", BILLING)?;
    let pod_b = c.add_pod(GW_B, "billing-b", BILLING)?;
    c.create_policy("billing", billing_policy(json!({}), Some("localOnlyFirst")))?;
    wait_zonal(&c, &[GW_A], &[GW_B])?;
    c.wait_pod_programmed(pod_a)?;
    c.wait_pod_programmed(pod_b)?;
    let t0 = Instant::now();
    let _sa = stream(&c, pod_a, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    let _sb = stream(&c, pod_b, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    wait_through_gateway(&c, &sink, pod_a, t0)?;
    wait_through_gateway(&c, &sink, pod_b, t0)?;
    let a_ip = IpAddr::V4(c.topo.nodes[GW_A].egress_ip);
    let b_ip = IpAddr::V4(c.topo.nodes[GW_B].egress_ip);
    let seen_a = sources_during(&c, &sink, pod_a, Duration::from_secs(1));
    assert_eq!(seen_a.into_iter().collect::<Vec<_>>(), vec![a_ip], "zone-a pod uses its local gateway first");

    let failed_at = Instant::now();
    c.kill_agent(GW_A);
    let name_a = c.pod(pod_a).name.clone();
    let resumed = sink.wait_from(&name_a, b_ip, failed_at, GENEROUS);
    ensure!(resumed.is_some(), "the zone-a pod never failed over to gw-b: {:?}", sink.sources(&name_a, failed_at));
    if let Some(at) = resumed {
        println!("{test}: zone-a pod resumed through gw-b {} ms after gw-a's agent died", (at - failed_at).as_millis());
    }
    wait_zonal(&c, &[GW_B], &[GW_B])?;
    std::thread::sleep(Duration::from_millis(200));
    let seen_a = sources_during(&c, &sink, pod_a, Duration::from_secs(1));
    assert_eq!(seen_a.into_iter().collect::<Vec<_>>(), vec![b_ip], "zone-a pod after gw-a failed");
    assert_no_pod_ip_reached_the_firewall(&c)?;
    Ok(())
}
