//! Gratuitous ARP on egress IP takeover.
//!
//! - `the_agent_loop_reports_the_egress_ips_this_node_takes_over`: the agent loop (real gRPC egress stream,
//!   in-memory datapath) tells its hook which egress IPs this node is an active gateway for, and when it stops
//!   being one. No privileges.
//! - `a_neighbour_learns_and_updates_the_egress_ip_after_a_takeover`: the announcer task in a gateway netns with
//!   real netlink reads and an AF_PACKET socket; a neighbour netns on the same veth (arp_accept=1) learns the new
//!   egress IP and corrects stale entries (IPv4 by gratuitous ARP, IPv6 by unsolicited neighbour advertisement)
//!   pointing at a previous gateway's MAC (`ip neigh`).

mod egress_agent_support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_datapath::agent::run::{self, AgentConfig, AgentMetrics, RunHooks};
use causeway_datapath::agent::{GcPolicy, InMemoryDatapath, LocalNode};
use causeway_datapath::egress::garp::{self, GarpConfig, GarpMetrics};
use causeway_datapath::egress::netlink;
use causeway_runtime::Health;
use causeway_testsupport::netns::{self, Netns};
use egress_agent_support::{policy, EgressServer};
use tokio::sync::watch;

fn set(ips: &[&str]) -> BTreeSet<IpAddr> {
    ips.iter().map(|s| s.parse().expect("test IP")).collect()
}

async fn wait_value(rx: &mut watch::Receiver<BTreeSet<IpAddr>>, want: &BTreeSet<IpAddr>) -> Result<()> {
    let r = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v == want)).await.map(|r| r.is_ok());
    if r != Ok(true) {
        bail!("the hook never reported {want:?}; last {:?}", *rx.borrow());
    }
    Ok(())
}

#[tokio::test]
async fn the_agent_loop_reports_the_egress_ips_this_node_takes_over() -> Result<()> {
    let egress = EgressServer::default();
    // Another node is the gateway at first.
    egress.upsert(policy("billing", "203.0.113.0/24", &["10.1.0.5"], "192.0.2.10", &["192.168.0.7"]));
    let addr = egress.serve(std::net::TcpListener::bind("127.0.0.1:0")?)?;
    let cfg = AgentConfig {
        local: LocalNode::new("gw-a", IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)), 51871),
        mesh_endpoint: None,
        egress_endpoint: Some(format!("http://{addr}")),
        gc: GcPolicy::default(),
        gc_interval: Duration::from_secs(60),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    };
    let (tx, mut rx) = watch::channel(set(&["198.51.100.99"]));
    let health = Health::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let dp = InMemoryDatapath::new();
    let task = tokio::spawn(run::run_with(
        cfg,
        dp.clone(),
        health.clone(),
        AgentMetrics::default(),
        RunHooks { local_egress: Some(tx) },
        async {
            let _ = stopped.await;
        },
    ));
    // Synced, not a gateway: the set is empty (and replaces the initial value).
    wait_value(&mut rx, &set(&[])).await?;
    assert_eq!(dp.contents().egress_groups.len(), 1, "programmed before it is reported");

    // The controller fails over to this node (second in the list), then an interface-mode policy adds its own.
    egress.upsert(policy("billing", "203.0.113.0/24", &["10.1.0.5"], "192.0.2.10", &["192.168.0.7", "192.168.0.1"]));
    wait_value(&mut rx, &set(&["192.0.2.10"])).await?;
    let mut own = policy("reports", "198.51.100.0/24", &["10.1.0.6"], "192.0.2.10", &["192.168.0.1"]);
    own.groups[0].egress_ips.clear();
    own.groups[0].gateways[0].egress_ips = vec!["192.0.2.21".into(), "2001:db8::21".into()];
    egress.upsert(own);
    wait_value(&mut rx, &set(&["192.0.2.10", "192.0.2.21", "2001:db8::21"])).await?;

    // The gateway set moves away from this node: nothing left to own.
    egress.upsert(policy("billing", "203.0.113.0/24", &["10.1.0.5"], "192.0.2.10", &["192.168.0.7"]));
    egress.upsert(policy("reports", "198.51.100.0/24", &["10.1.0.6"], "192.0.2.10", &[]));
    wait_value(&mut rx, &set(&[])).await?;

    let _ = stop.send(());
    task.await?;
    Ok(())
}

/// `ip -j neigh show <ip> dev eth0` in `ns`: the lladdr, if there is an entry with one.
fn neigh(ns: &Netns, ip: &str) -> Result<Option<String>> {
    let out = ns.exec(&["ip", "-j", "neigh", "show", ip, "dev", "eth0"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j neigh")?;
    Ok(v.as_array().and_then(|a| a.first()).and_then(|e| e.get("lladdr")).and_then(|m| m.as_str()).map(str::to_owned))
}

fn mac_of(ns: &Netns, ifname: &str) -> Result<String> {
    let out = ns.exec(&["ip", "-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j link")?;
    v.get(0).and_then(|l| l.get("address")).and_then(|m| m.as_str()).map(str::to_owned).context("no MAC in ip -j link")
}

#[test]
fn a_neighbour_learns_and_updates_the_egress_ip_after_a_takeover() -> Result<()> {
    if !netns::privileged("a_neighbour_learns_and_updates_the_egress_ip_after_a_takeover") {
        return Ok(());
    }
    let gw = Netns::new("garpgw")?;
    let nb = Netns::new("garpnb")?;
    netns::veth(&gw, "eth0", "192.168.80.1/24", &nb, "eth0", "192.168.80.2/24")?;
    // The egress IPs are configured on the gateway's interface beforehand (the agent never adds them).
    gw.ip("addr add 192.168.80.10/32 dev eth0")?;
    gw.ip("addr add 192.168.80.11/32 dev eth0")?;
    gw.ip("-6 addr add 2001:db8:80::1/64 dev eth0 nodad")?;
    gw.ip("-6 addr add 2001:db8:80::10/128 dev eth0 nodad")?;
    nb.ip("-6 addr add 2001:db8:80::2/64 dev eth0 nodad")?;
    // The neighbour (a router or firewall on the segment) accepts gratuitous ARP for addresses it has no entry for.
    nb.sysctl("net.ipv4.conf.all.arp_accept", "1")?;
    nb.sysctl("net.ipv4.conf.eth0.arp_accept", "1")?;
    // .11 was served by a previous gateway: the neighbour still points it at that gateway's MAC.
    let old_mac = "02:00:00:00:00:99";
    nb.ip(&format!("neigh replace 192.168.80.11 lladdr {old_mac} dev eth0 nud stale"))?;
    // So was the IPv6 egress address: an unsolicited neighbour advertisement (override) corrects it.
    nb.ip(&format!("-6 neigh replace 2001:db8:80::10 lladdr {old_mac} dev eth0 nud stale"))?;
    let gw_mac = mac_of(&gw, "eth0")?;

    // Before the takeover the neighbour knows nothing of .10 and the old MAC for .11.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(neigh(&nb, "192.168.80.10")?, None);
    assert_eq!(neigh(&nb, "192.168.80.11")?.as_deref(), Some(old_mac));
    assert_eq!(neigh(&nb, "2001:db8:80::10")?.as_deref(), Some(old_mac));

    let (tx, rx) = watch::channel(BTreeSet::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = GarpMetrics::default();
    let m = metrics.clone();
    let announcer = gw.enter(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let cfg = GarpConfig { recheck: Duration::from_millis(100), ..GarpConfig::default() };
        rt.block_on(garp::run(rx, cfg, netlink::read, m, async {
            let _ = stopped.await;
        }));
        Ok(())
    })?;
    struct Stop(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(s) = self.0.take() {
                let _ = s.send(());
            }
        }
    }
    let mut stop = Stop(Some(stop));

    // This node becomes the active gateway for both (what the agent loop's hook reports).
    let egress = ["192.168.80.10", "192.168.80.11", "2001:db8:80::10"];
    tx.send(set(&egress))?;
    let learned = netns::wait_for(Duration::from_secs(10), || {
        egress.iter().all(|ip| neigh(&nb, ip).ok().flatten().as_deref() == Some(gw_mac.as_str()))
    });
    if !learned {
        let seen: Vec<_> = egress.iter().map(|ip| (ip, neigh(&nb, ip).ok().flatten())).collect();
        bail!("neighbour entries after the takeover: {seen:?} (gateway MAC {gw_mac}); sent {}", metrics.sent.get());
    }
    // The counter moves once a whole burst (3 frames, 100 ms apart) is out; the neighbour learned from its first.
    assert!(netns::wait_for(Duration::from_secs(5), || metrics.sent.get() == 3), "one burst per egress IP");
    assert_eq!(metrics.errors.get(), 0);
    if let Some(s) = stop.0.take() {
        let _ = s.send(());
    }
    announcer.join().map_err(|_| anyhow::anyhow!("announcer thread panicked"))??;
    Ok(())
}
