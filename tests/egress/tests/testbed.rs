//! The test bed itself, without Causeway: the firewall in front of the legacy server really refuses pod addresses
//! and accepts the egress IPs, so that the other tests' "the server saw only egress IPs" can fail. Needs root;
//! skipped with a message otherwise, unless CAUSEWAY_PRIVILEGED_TESTS=1.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use causeway_egress_e2e::topology::{EXCLUDED_SERVER, LEGACY_SERVER};
use causeway_egress_e2e::{Topology, UdpSink, UdpStream, GW_A, UDP_PORT, WORKER};
use causeway_testsupport::netns;

#[test]
fn the_firewall_admits_only_egress_ips_to_the_legacy_range() -> Result<()> {
    if !netns::privileged("the_firewall_admits_only_egress_ips_to_the_legacy_range") {
        return Ok(());
    }
    let _serial = causeway_egress_e2e::serial();
    let topo = Topology::build()?;
    let legacy = UdpSink::start(&topo.server, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
    let open = UdpSink::start(&topo.server, SocketAddr::from((EXCLUDED_SERVER, UDP_PORT)))?;
    // No agent runs: the pod's packets leave its node unsteered, with the pod address.
    let pod = topo.add_pod(WORKER, "plain")?;
    let t0 = Instant::now();
    let _to_legacy = UdpStream::start(&pod, SocketAddr::from((LEGACY_SERVER, UDP_PORT)), Duration::from_millis(10))?;
    let _to_open = UdpStream::start(&pod, SocketAddr::from((EXCLUDED_SERVER, UDP_PORT)), Duration::from_millis(10))?;
    ensure!(
        open.wait_from("plain", IpAddr::V4(pod.ip), t0, Duration::from_secs(10)).is_some(),
        "the pod never reached the open (excluded) range: the test bed's routing is broken"
    );
    std::thread::sleep(Duration::from_millis(500));
    ensure!(legacy.arrivals().is_empty(), "a pod address got into the legacy range: {:?}", legacy.arrivals());
    ensure!(topo.fw_counter("pod_ip")? > 0, "the firewall did not count the refused pod packets");
    ensure!(topo.fw_counter("excluded_pod")? > 0);

    // A gateway node's own egress IP is let in.
    let gw = &topo.nodes[GW_A];
    let from = SocketAddr::from((gw.egress_ip, 0));
    let sock = gw.ns.run_in(move || UdpSocket::bind(from))??;
    let t1 = Instant::now();
    for _ in 0..20 {
        sock.send_to(b"gateway 1", SocketAddr::from((LEGACY_SERVER, UDP_PORT)))?;
        std::thread::sleep(Duration::from_millis(10));
    }
    ensure!(
        legacy.wait_from("gateway", IpAddr::V4(gw.egress_ip), t1, Duration::from_secs(5)).is_some(),
        "the egress IP {} was not let into the legacy range",
        gw.egress_ip
    );
    ensure!(topo.fw_counter(&gw.egress_counter())? > 0);
    // And a cut underlay cable really cuts: the switch no longer reaches the node.
    topo.set_underlay(GW_A, false)?;
    let ping = topo.ctl.exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", &gw.ip.to_string()])?;
    ensure!(!ping.status.success(), "the node still answers with its cable cut");
    topo.set_underlay(GW_A, true)?;
    netns::ping(&topo.ctl, &gw.ip.to_string())?;
    Ok(())
}
