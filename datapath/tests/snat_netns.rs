//! Real traffic through the SNAT programs: pod netns -> gateway netns (cw_snat_out/cw_snat_in attached to its
//! external veth) -> external netns running servers. The servers report the peer address they saw, and an
//! nftables counter in the external netns proves that no packet carrying the pod address arrives there.
//! Needs root; skipped with a message otherwise, unless CAUSEWAY_PRIVILEGED_TESTS=1.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use causeway_datapath::bpf::maps::{EgressGroup, EgressGroupsMap, GroupId};
use causeway_datapath::bpf::snat::{LoadOptions, Snat, SnatConfig, SnatStat};
use causeway_testsupport::netns::{self, Netns};

const POD_IP: &str = "10.244.1.5";
const EGRESS_IP: &str = "192.0.2.10";
const SERVER_IP: &str = "192.0.2.1";
const GROUP: u32 = 7;
const MARK: u32 = 0xce00_0000 | GROUP;

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Packets counted by the named nftables counter `name` of table `inet cwtest` in `ns`.
fn counter(ns: &Netns, name: &str) -> Result<u64> {
    let out = ns.exec(&["nft", "list", "counter", "inet", "cwtest", name])?;
    let text = stdout(&out);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next().context("packets value")?.parse().context("packets number");
        }
    }
    bail!("no packet count in {text}")
}

/// pod (10.244.1.5) -> gateway (pod0 | ext0 with the egress IP) -> external host (192.0.2.1, no route to pods), with
/// the test's stand-in egress mark in the gateway and the leak counters in the external host.
fn topology() -> Result<(Netns, Netns, Netns)> {
    let pod = Netns::new("snpod")?;
    let gw = Netns::new("sngw")?;
    let ext = Netns::new("snext")?;
    netns::veth(&pod, "eth0", &format!("{POD_IP}/24"), &gw, "pod0", "10.244.1.1/24")?;
    netns::veth(&gw, "ext0", "192.0.2.2/24", &ext, "eth0", &format!("{SERVER_IP}/24"))?;
    pod.ip("route add default via 10.244.1.1")?;
    gw.router()?;
    // The egress IP is a dedicated address on the external interface (so the gateway answers ARP for it).
    gw.ip(&format!("addr add {EGRESS_IP}/32 dev ext0"))?;
    // The external host knows nothing of pod addresses: a leaked pod IP could not even be answered.

    // Stand-in for the source-side classifier (steering program): mark the pod's forwarded traffic for egress
    // group 7, as cw_egress steering would before sending it to this gateway.
    gw.exec(&[
        "nft",
        &format!(
            "add table inet cwtest; add chain inet cwtest markfwd {{ type filter hook forward priority 0; }}; \
             add rule inet cwtest markfwd iifname pod0 oifname ext0 meta mark set {MARK:#x}"
        ),
    ])?;
    // Counters in the external netns: packets arriving from the pod address (must stay 0) and from the egress IP.
    ext.exec(&[
        "nft",
        &format!(
            "add table inet cwtest; add counter inet cwtest from_pod; add counter inet cwtest from_egress; \
             add chain inet cwtest countpre {{ type filter hook prerouting priority -300; }}; \
             add rule inet cwtest countpre ip saddr 10.244.0.0/16 counter name from_pod; \
             add rule inet cwtest countpre ip saddr {EGRESS_IP} counter name from_egress"
        ),
    ])?;

    netns::ping(&gw, SERVER_IP)?;
    Ok((pod, gw, ext))
}

#[test]
fn pod_traffic_leaves_with_the_egress_ip_and_replies_return() -> Result<()> {
    if !netns::privileged("pod_traffic_leaves_with_the_egress_ip_and_replies_return") {
        return Ok(());
    }
    let (pod, gw, ext) = topology()?;

    // Load and attach SNAT in the gateway.
    let pin = PinDir(PathBuf::from("/sys/fs/bpf").join(netns::unique_name("cw-snat-netns")));
    let mut snat = Snat::load(&LoadOptions::new(&pin.0))?;
    snat.set_config(&SnatConfig { port_min: 20000, port_max: 29999, ..Default::default() })?;
    EgressGroupsMap::open(&pin.0)?
        .upsert(GroupId(GROUP), &EgressGroup { egress_ip: EGRESS_IP.parse()?, gateways: vec![] })?;
    gw.run_in(|| snat.attach("ext0"))??;

    // Servers in the external netns that answer with, and record, the peer address they saw.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<IpAddr>>> = Arc::default();
    let tcp = ext.run_in(|| TcpListener::bind((SERVER_IP, 8080)))??;
    let udp = ext.run_in(|| UdpSocket::bind((SERVER_IP, 9000)))??;
    let servers = spawn_servers(tcp, udp, stop.clone(), seen.clone())?;
    let _stop = StopOnDrop(stop, Some(servers));

    // TCP (curl): the server saw the egress IP.
    let out = pod.exec(&["curl", "-sS", "--max-time", "5", &format!("http://{SERVER_IP}:8080/")])?;
    let body = stdout(&out);
    assert_eq!(body, format!("peer={EGRESS_IP}"), "HTTP server saw the egress IP");

    // UDP (socat): the reply came back, and the server saw the egress IP.
    let out = pod.exec(&["sh", "-c", &format!("echo hello | socat -t 3 - UDP:{SERVER_IP}:9000")])?;
    assert_eq!(stdout(&out), format!("peer={EGRESS_IP}"), "UDP server saw the egress IP");

    // ICMP echo: replies come back.
    let out = pod.exec(&["ping", "-n", "-c", "3", "-W", "2", SERVER_IP])?;
    assert!(stdout(&out).contains("3 received"), "ping: {}", stdout(&out));

    // The flows are in the conntrack table with the egress IP.
    let flows = snat.table().flows()?;
    assert!(flows.len() >= 3, "tcp, udp and icmp flows tracked: {flows:?}");
    for f in &flows {
        assert_eq!(f.pod().0.to_string(), POD_IP);
        assert_eq!(f.translated().0.to_string(), EGRESS_IP);
        assert!((20000..=29999).contains(&f.translated().1));
    }
    let stats = snat.stats()?;
    assert!(stats[&SnatStat::InTranslated] > 0);

    let peers = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    assert!(peers.len() >= 2, "both servers recorded their peers: {peers:?}");
    assert!(peers.iter().all(|p| p.to_string() == EGRESS_IP), "servers only ever saw the egress IP: {peers:?}");

    // Nothing with the pod address reached the external host; the egress counter shows the rule works.
    assert!(counter(&ext, "from_egress")? > 0, "egress-IP traffic counted");
    assert_eq!(counter(&ext, "from_pod")?, 0, "no packet with the pod IP arrived at the external host");

    // Detach: without SNAT the pod's traffic is no longer translated (the counter sees the pod IP).
    snat.detach()?;
    let _ = pod.exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", SERVER_IP]);
    assert!(counter(&ext, "from_pod")? > 0, "after detach the pod IP leaks: the test can see a leak");
    Ok(())
}

struct StopOnDrop(Arc<AtomicBool>, Option<JoinHandle<()>>);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
        if let Some(h) = self.1.take() {
            let _ = h.join();
        }
    }
}

/// A minimal HTTP responder and a UDP echo of the peer address, polling until `stop`. The sockets were bound
/// inside the external netns and keep belonging to it whatever thread serves them.
fn spawn_servers(
    tcp: TcpListener,
    udp: UdpSocket,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<IpAddr>>>,
) -> Result<JoinHandle<()>> {
    tcp.set_nonblocking(true)?;
    udp.set_read_timeout(Some(Duration::from_millis(10)))?;
    let record = move |ip: IpAddr| {
        if let Ok(mut v) = seen.lock() {
            v.push(ip);
        }
    };
    Ok(std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((mut conn, peer)) = tcp.accept() {
                record(peer.ip());
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                // Read the request head, then answer and close.
                let mut req = Vec::new();
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("peer={}\n", peer.ip());
                let _ = write!(conn, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            }
            if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                record(peer.ip());
                let _ = udp.send_to(format!("peer={}\n", peer.ip()).as_bytes(), peer);
            }
        }
    }))
}

#[test]
fn snat_survives_an_agent_restart() -> Result<()> {
    if !netns::privileged("snat_survives_an_agent_restart") {
        return Ok(());
    }
    let (pod, gw, ext) = topology()?;
    let pin = PinDir(PathBuf::from("/sys/fs/bpf").join(netns::unique_name("cw-snat-restart")));
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<IpAddr>>> = Arc::default();
    let tcp = ext.run_in(|| TcpListener::bind((SERVER_IP, 8080)))??;
    let udp = ext.run_in(|| UdpSocket::bind((SERVER_IP, 9000)))??;
    let _stop = StopOnDrop(stop.clone(), Some(spawn_servers(tcp, udp, stop, seen.clone())?));
    let curl = || -> Result<String> {
        Ok(stdout(&pod.exec(&["curl", "-sS", "--max-time", "5", &format!("http://{SERVER_IP}:8080/")])?))
    };

    // First agent: load, configure, attach through pinned links.
    {
        let mut snat = Snat::load(&LoadOptions::new(&pin.0))?;
        snat.set_config(&SnatConfig { port_min: 20000, port_max: 29999, ..Default::default() })?;
        EgressGroupsMap::open(&pin.0)?
            .upsert(GroupId(GROUP), &EgressGroup { egress_ip: EGRESS_IP.parse()?, gateways: vec![] })?;
        gw.run_in(|| snat.attach_pinned("ext0"))??;
        assert_eq!(curl()?, format!("peer={EGRESS_IP}"));
        assert!(!snat.table().flows()?.is_empty());
        // The agent exits: its Ebpf object and file descriptors go away.
    }
    // Nothing of ours runs, yet the pinned links keep translating.
    assert_eq!(curl()?, format!("peer={EGRESS_IP}"), "translated while no agent runs");

    // Second agent: same pin directory, the flows are still there, the programs are replaced in place.
    let mut snat = Snat::load(&LoadOptions::new(&pin.0))?;
    let before = snat.table().flows()?.len();
    assert!(before >= 2, "flows of the first agent survived in the pinned maps: {before}");
    gw.run_in(|| snat.attach_pinned("ext0"))??;
    assert_eq!(curl()?, format!("peer={EGRESS_IP}"));
    assert_eq!(counter(&ext, "from_pod")?, 0, "no pod IP leaked across the restart");

    // Uninstall: unpinning the links detaches; the pod IP then leaks, which shows the check above could fail.
    assert!(gw.run_in(|| Snat::detach_pinned(&pin.0, "ext0"))??);
    let _ = pod.exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", SERVER_IP]);
    assert!(counter(&ext, "from_pod")? > 0, "after detach the pod IP leaks");
    assert!(!gw.run_in(|| Snat::detach_pinned(&pin.0, "ext0"))??, "second detach finds nothing");
    Ok(())
}
