//! Egress group ids agree across nodes whatever their history. The steering node puts its group id in the VXLAN
//! VNI and the gateway reads it as its own, so a node that joins (or comes back with nothing pinned) after a policy
//! was deleted must number the remaining policies as the gateways do. Before group ids followed from policy names,
//! the fresh worker numbered "billing" 1 while the gateways kept 2: its traffic reached the gateway with an unknown
//! VNI and left without SNAT (the firewall counted the pod IPs). Needs root; skipped with a message otherwise, unless
//! CAUSEWAY_PRIVILEGED_TESTS=1.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use causeway_crds::EgressGatewayPolicy;
use causeway_egress_e2e::{billing_policy, Options, WORKER};
use common::*;
use kube::api::{Api, DeleteParams};
use serde_json::json;

#[test]
fn a_node_that_joins_after_a_policy_was_deleted_agrees_with_the_gateways() -> Result<()> {
    let test = "a_node_that_joins_after_a_policy_was_deleted_agrees_with_the_gateways";
    let Some((_serial, mut c)) = start(test, Options::default())? else {
        return Ok(());
    };
    // A policy named to sort before "billing", with a pod of its own, so that both have groups on every node.
    let mut first = billing_policy(json!({}), None);
    first["selectors"][0]["podSelector"] = json!({"matchLabels": {"app": "aaa"}});
    first["excludedCIDRs"] = json!([]);
    let aaa = c.add_pod(WORKER, "aaa-1", &[("app", "aaa")])?;
    c.create_policy("aaa", first)?;
    c.wait_pod_programmed(aaa)?;
    let BillingFlow { sink, name, stream: _stream, .. } = billing_flow(&mut c)?;

    // "aaa" goes; then the worker comes back with nothing pinned (rebooted, or a new node).
    let api: Api<EgressGatewayPolicy> = Api::all(c.kube.clone());
    c.rt.block_on(api.delete("aaa", &DeleteParams::default()))?;
    let aaa_ip = c.pod(aaa).ip.to_string();
    let gone = causeway_testsupport::netns::wait_for(SOON_ENOUGH, || {
        c.egress_maps(WORKER).is_ok_and(|m| !m.contains(&format!("{aaa_ip},")))
    });
    ensure!(gone, "aaa's pod never left the worker's maps:\n{}", c.egress_maps(WORKER)?);
    c.kill_agent(WORKER);
    let pins = c.topo.nodes[WORKER].pin_dir.clone();
    std::fs::remove_dir_all(&pins)?;
    std::fs::create_dir_all(&pins)?;
    c.start_agent(WORKER)?;
    c.wait_agent_ready(WORKER)?;

    // billing's traffic leaves through a gateway's egress IP again...
    let since = Instant::now();
    let egress = egress_ips(&c);
    let through = causeway_testsupport::netns::wait_for(GENEROUS, || {
        sink.sources(&name, since).iter().any(|ip| egress.contains(ip))
    });
    ensure!(
        through,
        "after the fresh worker, billing's traffic never left through a gateway: sources {:?}\n{}",
        sink.sources(&name, since),
        c.datapath_report()
    );
    // ...and from then on only so: nothing reaches the firewall with the pod's address. (While the fresh agent
    // starts, before its maps are filled, some packets do; see docs/datapath.md.)
    let fw_before = c.topo.fw_counter("pod_ip")?;
    let steady = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let seen: BTreeSet<_> = sink.sources(&name, steady);
    ensure!(!seen.is_empty() && seen.is_subset(&egress), "sources after the fresh worker: {seen:?}");
    let leaked = c.topo.fw_counter("pod_ip")? - fw_before;
    ensure!(leaked == 0, "{leaked} packets reached the firewall with a pod address after the fresh worker");
    Ok(())
}

const SOON_ENOUGH: Duration = Duration::from_secs(30);
