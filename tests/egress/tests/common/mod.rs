//! Shared by the egress e2e test files: start the cluster, start traffic, find the gateway a flow uses.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use causeway_egress_e2e::topology::{LEGACY_SERVER, POD_SUPERNET};
use causeway_egress_e2e::{EgressCluster, Options, UdpSink, UdpStream, SOON, UDP_PORT};
use causeway_testsupport::netns;

/// A bound on "soon" for what the tests measure and print (new pod covered, failover). The figures themselves are
/// the benchmarks' business; this only catches "never" or "way off".
pub const GENEROUS: Duration = Duration::from_secs(10);

/// Skips (or fails under CAUSEWAY_PRIVILEGED_TESTS=1) without root, then starts the cluster.
pub fn start(test: &str, options: Options) -> Result<Option<(std::sync::MutexGuard<'static, ()>, EgressCluster)>> {
    if !netns::privileged(test) {
        return Ok(None);
    }
    let guard = causeway_egress_e2e::serial();
    let cluster = EgressCluster::start(options).with_context(|| format!("{test}: starting the cluster"))?;
    Ok(Some((guard, cluster)))
}

/// The legacy server's UDP sink.
pub fn legacy_sink(c: &EgressCluster) -> Result<UdpSink> {
    UdpSink::start(&c.topo.server, SocketAddr::from((LEGACY_SERVER, UDP_PORT)))
}

/// A 10 ms UDP stream from pod `h` to `dst`.
pub fn stream(c: &EgressCluster, h: usize, dst: SocketAddr) -> Result<UdpStream> {
    UdpStream::start(c.pod(h), dst, Duration::from_millis(10))
}

/// The billing setup both gateway-failure tests start from: the legacy server's sink, pod billing-1 on the worker
/// under the billing policy with both gateways active, and its UDP stream flowing through one of them.
pub struct BillingFlow {
    pub sink: UdpSink,
    pub pod: usize,
    /// The pod's name (the sink's key for its datagrams).
    pub name: String,
    /// The gateway node the stream is pinned to.
    pub gateway: usize,
    pub stream: UdpStream,
}

pub fn billing_flow(c: &mut EgressCluster) -> Result<BillingFlow> {
    use causeway_egress_e2e::{billing_policy, BILLING, GW_A, GW_B, WORKER};
    let sink = legacy_sink(c)?;
    let pod = c.add_pod(WORKER, "billing-1", BILLING)?;
    c.create_policy("billing", billing_policy(serde_json::json!({}), None))?;
    c.wait_active("billing", &[GW_A, GW_B])?;
    c.wait_pod_programmed(pod)?;
    let t0 = Instant::now();
    let stream = stream(c, pod, SocketAddr::from((causeway_egress_e2e::topology::LEGACY_SERVER, UDP_PORT)))?;
    let gateway = wait_through_gateway(c, &sink, pod, t0)?;
    let name = c.pod(pod).name.clone();
    Ok(BillingFlow { sink, pod, name, gateway, stream })
}

/// Every node's egress IP.
pub fn egress_ips(c: &EgressCluster) -> BTreeSet<IpAddr> {
    c.topo.nodes.iter().map(|n| IpAddr::V4(n.egress_ip)).collect()
}

/// Waits until pod `h`'s datagrams reach the sink from one of the egress IPs; returns the node that sent it.
pub fn wait_through_gateway(c: &EgressCluster, sink: &UdpSink, h: usize, since: Instant) -> Result<usize> {
    let name = c.pod(h).name.clone();
    let deadline = Instant::now() + SOON;
    loop {
        if let Some((_, src)) = sink.last_from(&name).filter(|(at, _)| *at >= since) {
            if let Some(node) = c.topo.node_with_egress_ip(src) {
                return Ok(node);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "{name}'s traffic never reached the server through a gateway; it saw {:?}; firewall dropped {} pod-IP \
             packets\n{}",
            sink.sources(&name, since),
            c.topo.fw_counter("pod_ip").unwrap_or(0),
            c.datapath_report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sources the server saw from pod `h` during the next `period`.
pub fn sources_during(c: &EgressCluster, sink: &UdpSink, h: usize, period: Duration) -> BTreeSet<IpAddr> {
    let since = Instant::now();
    std::thread::sleep(period);
    sink.sources(&c.pod(h).name, since)
}

/// No packet with a pod address ever got to the legacy side of the firewall.
pub fn assert_no_pod_ip_reached_the_firewall(c: &EgressCluster) -> Result<()> {
    let dropped = c.topo.fw_counter("pod_ip")?;
    ensure!(dropped == 0, "the firewall saw {dropped} packets with a pod source address ({POD_SUPERNET})");
    Ok(())
}
