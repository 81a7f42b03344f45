//! The network: every box is a network namespace, every wire a veth.
//!
//! ```text
//!                ctl (bridge br0 = the underlay switch, 172.30.0.100: the clustermesh-apiserver's
//!                 │   "load balancer": etcd on :2379 and registrations on :9965, forwarded to the root namespace)
//!        p1 ┌─────┴─────┐ p2
//!   und0 172.30.0.11   und0 172.30.0.50
//!     node1             vm1     (the external workload: runs the join script; no route to pods but its tunnel)
//!     ├ lxc0 ── pod "echo" 10.244.1.10 (TCP echo that reports the peer address)
//!     └ lxc1 ── pod "dns"  10.244.1.11 (dnsmasq, the cluster DNS stand-in)
//! ```
//!
//! Pods are /32 addresses in node1's pod CIDR, routed by node1 through a host-side veth with proxy ARP (the
//! Calico layout). vm1 shares only the underlay with node1: everything between them must go through WireGuard.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use causeway_testsupport::netns::{self, Netns};

/// The switch's own address: where the clustermesh-apiserver's Service "load balancer" listens.
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 100);
pub const NODE1_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 50);
pub const NODE1_POD_CIDR: &str = "10.244.1.0/24";
pub const ECHO_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const DNS_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
/// The echo server's port in its pod.
pub const ECHO_PORT: u16 = 8080;
const POD_GATEWAY: &str = "169.254.1.1";

/// A pod: a namespace behind node1.
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub host_if: String,
}

pub struct Network {
    // Drop order: pods before the node they hang off.
    pub echo: Pod,
    pub dns: Pod,
    pub node1: Netns,
    pub vm1: Netns,
    pub ctl: Netns,
}

impl Network {
    pub fn build() -> Result<Network> {
        let ctl = Netns::new("cwx-ctl")?;
        ctl.ip("link add br0 type bridge")?;
        ctl.ip(&format!("addr add {CONTROL_IP}/24 dev br0"))?;
        ctl.ip("link set br0 up")?;
        let node1 = Netns::new("cwx-node1")?;
        netns::veth(&node1, "und0", &format!("{NODE1_IP}/24"), &ctl, "p1", "")?;
        ctl.ip("link set p1 master br0")?;
        node1.router()?;
        // A default route, as every node has: proxy ARP for the pods' gateway answers only for routable addresses.
        node1.ip(&format!("route add default via {CONTROL_IP} dev und0"))?;
        let vm1 = Netns::new("cwx-vm1")?;
        netns::veth(&vm1, "und0", &format!("{VM_IP}/24"), &ctl, "p2", "")?;
        ctl.ip("link set p2 master br0")?;
        vm1.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        vm1.ip("link set lo up")?;
        // The host's own default route (its internet uplink in real life): cluster addresses must not leak there.
        vm1.ip(&format!("route add default via {CONTROL_IP} dev und0"))?;
        let echo = add_pod(&node1, "echo", ECHO_POD_IP, "lxc0")?;
        let dns = add_pod(&node1, "dns", DNS_POD_IP, "lxc1")?;
        netns::ping(&ctl, &NODE1_IP.to_string()).context("underlay to node1")?;
        netns::ping(&ctl, &VM_IP.to_string()).context("underlay to vm1")?;
        Ok(Network { echo, dns, node1, vm1, ctl })
    }
}

fn add_pod(node: &Netns, name: &str, ip: Ipv4Addr, host_if: &str) -> Result<Pod> {
    let ns = Netns::new(&format!("cwx-{name}"))?;
    netns::veth(&ns, "eth0", "", node, host_if, "")?;
    ns.ip("link set lo up")?;
    ns.ip(&format!("addr add {ip}/32 dev eth0"))?;
    ns.ip(&format!("route add {POD_GATEWAY} dev eth0 scope link"))?;
    ns.ip(&format!("route add default via {POD_GATEWAY} dev eth0"))?;
    node.sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
    node.ip(&format!("route add {ip}/32 dev {host_if}"))?;
    Ok(Pod { name: name.to_string(), ns, ip, host_if: host_if.to_string() })
}

/// A TCP server inside a namespace: to every connection it first writes `peer=<ip>:<port>\n` (the source address
/// it sees), then echoes what it reads. Stopped and joined on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<EchoServer> {
        let listener = ns.run_in(move || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        std::thread::spawn(move || serve(stream, peer));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(EchoServer { stop, thread: Some(thread) })
    }
}

fn serve(mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if stream.write_all(format!("peer={peer}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a client in `ns` learns from an [`EchoServer`] at `addr`: the source address the server saw, and whether
/// `payload` came back intact.
pub fn echo_from(ns: &Netns, addr: SocketAddr, payload: &[u8]) -> Result<(String, bool)> {
    let payload = payload.to_vec();
    ns.run_in(move || -> Result<(String, bool)> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line).with_context(|| format!("reading the greeting of {addr}"))?;
        let peer = line.trim().strip_prefix("peer=").unwrap_or_default().to_string();
        (&stream).write_all(&payload)?;
        let mut back = vec![0u8; payload.len()];
        reader.read_exact(&mut back).with_context(|| format!("reading the echo of {addr}"))?;
        Ok((peer, back == payload))
    })?
}

/// The host part of `ip:port`.
pub fn host_of(peer: &str) -> &str {
    peer.rsplit_once(':').map(|(h, _)| h).unwrap_or(peer)
}

/// Counters on `device`'s ingress in `ns` (table `netdev cw_underlay`) for what arrives from `peer`: `wg` counts
/// WireGuard UDP (source port `wg_port`), `wg_icmp` ICMP errors about WireGuard UDP (a peer that handshakes
/// before the other end's agent listens: the host's agent starts after its registration made it a peer), `other`
/// everything else from `peer`, `inner` any packet whose source is in `inner_cidrs` (a pod, Service or mesh
/// address crossing the wire unencrypted).
pub fn install_underlay_counters(
    ns: &Netns,
    device: &str,
    peer: Ipv4Addr,
    wg_port: u16,
    inner_cidrs: &[&str],
) -> Result<()> {
    // `seen` records, for anything that is not WireGuard, the protocol, the first two 16-bit words of the transport
    // header (ports for TCP/UDP; type/code and checksum for ICMP) and the two words at byte 28 (for an ICMP error:
    // the source and destination port of the packet it answers), so a failure says what it was.
    let script = format!(
        "table netdev cw_underlay {{\n  counter wg {{}}\n  counter wg_icmp {{}}\n  counter other {{}}\n  counter inner {{}}\n\
         \x20 set seen {{ type inet_proto . inet_service . inet_service; flags dynamic; size 256; }}\n\
         \x20 chain ingress {{\n    type filter hook ingress device \"{device}\" priority 0; policy accept;\n\
         \x20   ip saddr {{ {} }} counter name \"inner\" add @seen {{ ip protocol . @th,0,16 . @th,16,16 }} accept\n\
         \x20   ip saddr {peer} udp sport {wg_port} counter name \"wg\" accept\n\
         \x20   ip saddr {peer} icmp type destination-unreachable @th,224,16 {wg_port} @th,240,16 {wg_port} \
         counter name \"wg_icmp\" accept\n\
         \x20   ip saddr {peer} counter name \"other\" add @seen {{ ip protocol . @th,0,16 . @th,16,16 }} accept\n\
         \x20 }}\n}}\n",
        inner_cidrs.join(", ")
    );
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), script)?;
    ns.exec(&["nft", "-f", &file.path().to_string_lossy()])?;
    Ok(())
}

/// What [`install_underlay_counters`] saw that was not WireGuard: `protocol . word0 . word1` elements.
pub fn underlay_seen(ns: &Netns) -> String {
    match ns.exec_unchecked(&["nft", "list", "set", "netdev", "cw_underlay", "seen"]) {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => e.to_string(),
    }
}

/// Packets counted by [`install_underlay_counters`]'s counter `name`.
pub fn underlay_counter(ns: &Netns, name: &str) -> Result<u64> {
    let out = ns.exec(&["nft", "list", "counter", "netdev", "cw_underlay", name])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next().and_then(|v| v.parse().ok()).context("packets value");
        }
    }
    anyhow::bail!("no packet count for {name} in: {text}")
}
