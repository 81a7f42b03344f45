//! WireGuard tunnels with real traffic between two "node" netns, each with a "pod" netns behind it
//! (`causeway_testsupport::netns::TwoNodes`):
//!
//! - Causeway (boringtun, in this process, on a thread inside node A's netns) ↔ Debian `wireguard-go` configured
//!   with `wg`: the interop test. nftables counters on both underlay ingresses prove that what crossed the wire
//!   was UDP to the WireGuard ports and never a packet with a pod address.
//! - Causeway ↔ Causeway, with reconciliation (idempotent re-apply, a bad node record, peer removal) and shutdown.
//! - Key rotation on both sides while a TCP transfer runs: it completes with every byte intact.
//!
//! Root/netns required: skipped with a message unless CAUSEWAY_PRIVILEGED_TESTS=1, which makes them fail instead.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use causeway_datapath::wireguard::{
    probe_kernel_wireguard, uapi_socket, BackendKind, BackendPreference, Error, KernelSupport, NodeRecord, PrivateKey,
    Tunnel, TunnelConfig,
};
use causeway_testsupport::netns::{self, unique_ifname, Netns, NftCounters, TwoNodes, WireguardGo};

const PORT_A: u16 = 51820;
const PORT_B: u16 = 51821;

/// Creates a Causeway tunnel inside `ns` (on a thread that joined it, so the TUN and sockets live there).
fn causeway_tunnel(ns: &Netns, backend: BackendPreference, port: u16) -> Result<Tunnel> {
    let mut cfg = TunnelConfig::new(unique_ifname("cwg"), PrivateKey::generate(), port);
    cfg.backend = backend;
    Ok(ns.run_in(move || Tunnel::create(cfg))??)
}

fn record(name: &str, public_key: &str, endpoint: &str, pod_cidr: &str, node_ips: &[&str]) -> Result<NodeRecord> {
    Ok(NodeRecord {
        name: name.to_owned(),
        public_key: public_key.to_owned(),
        endpoint: endpoint.parse()?,
        pod_cidrs: vec![pod_cidr.parse()?],
        node_ips: node_ips.iter().map(|ip| ip.parse()).collect::<Result<_, _>>()?,
    })
}

fn record_a(tunnel: &Tunnel) -> Result<NodeRecord> {
    record(
        "node-a",
        &tunnel.public_key().to_string(),
        &format!("{}:{}", TwoNodes::NODE_A_IP, tunnel.listen_port()),
        TwoNodes::POD_A_CIDR,
        &[TwoNodes::NODE_A_IP, TwoNodes::ROUTER_A_IP],
    )
}

fn record_b(public_key: &str, port: u16) -> Result<NodeRecord> {
    record(
        "node-b",
        public_key,
        &format!("{}:{port}", TwoNodes::NODE_B_IP),
        TwoNodes::POD_B_CIDR,
        &[TwoNodes::NODE_B_IP, TwoNodes::ROUTER_B_IP],
    )
}

/// Counters on a node's underlay ingress: WireGuard UDP to `port`, and anything carrying a pod address.
fn wire_counters(node: &Netns, port: u16) -> Result<NftCounters<'_>> {
    Ok(NftCounters::ingress(
        node,
        TwoNodes::UNDERLAY_IF,
        &[
            ("wg_udp", &format!("udp dport {port}")),
            ("pod_src", "ip saddr 10.244.0.0/16"),
            ("pod_dst", "ip daddr 10.244.0.0/16"),
        ],
    )?)
}

/// The byte at position `i` of a transfer: position-dependent, so reordering or loss changes the digest.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

fn digest(acc: u64, i: u64, byte: u8) -> u64 {
    (acc ^ (u64::from(byte) << (i % 56))).rotate_left(5).wrapping_add(i)
}

/// Sends `total` bytes from `client` (pod) to `server_ip:port` in `server` (pod) over TCP, optionally paced, and
/// checks that the receiver got exactly the bytes sent. `during` runs once a quarter of the data has arrived.
fn tcp_transfer(
    server: &Netns,
    server_ip: &str,
    client: &Netns,
    total: u64,
    pace: Option<Duration>,
    during: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let bind: SocketAddr = format!("{server_ip}:0").parse()?;
    let listener = server.run_in(move || TcpListener::bind(bind))??;
    let addr = listener.local_addr()?;
    let received = Arc::new(AtomicU64::new(0));
    let rx_count = received.clone();
    let receiver = server.enter(move || -> Result<(u64, u64)> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = vec![0u8; 64 * 1024];
        let (mut n, mut acc) = (0u64, 0u64);
        loop {
            let got = conn.read(&mut buf).context("receiver read")?;
            if got == 0 {
                break;
            }
            for b in &buf[..got] {
                acc = digest(acc, n, *b);
                n += 1;
            }
            rx_count.store(n, Ordering::Relaxed);
        }
        Ok((n, acc))
    })?;
    let sender = client.enter(move || -> Result<u64> {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(20)).context("connect")?;
        conn.set_write_timeout(Some(Duration::from_secs(60)))?;
        let mut chunk = vec![0u8; 64 * 1024];
        let (mut sent, mut acc) = (0u64, 0u64);
        while sent < total {
            let len = (total - sent).min(chunk.len() as u64) as usize;
            for (j, b) in chunk[..len].iter_mut().enumerate() {
                *b = pattern(sent + j as u64);
                acc = digest(acc, sent + j as u64, *b);
            }
            conn.write_all(&chunk[..len]).context("sender write")?;
            sent += len as u64;
            if let Some(p) = pace {
                std::thread::sleep(p);
            }
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        Ok(acc)
    })?;
    let quarter = netns::wait_for(Duration::from_secs(60), || received.load(Ordering::Relaxed) >= total / 4);
    ensure!(quarter, "transfer stalled before a quarter: {} of {total} bytes", received.load(Ordering::Relaxed));
    during()?;
    let sent_digest = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let (n, got_digest) = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    ensure!(n == total, "received {n} of {total} bytes");
    ensure!(got_digest == sent_digest, "received bytes differ from those sent");
    Ok(())
}

#[test]
fn causeway_interoperates_with_wireguard_go() -> Result<()> {
    if !netns::privileged("causeway_interoperates_with_wireguard_go") {
        return Ok(());
    }
    let t = TwoNodes::new()?;
    let mut a = causeway_tunnel(&t.node_a, BackendPreference::Auto, PORT_A)?;
    // The selection logic ran for real: on this kernel (no WireGuard module) it must have fallen back.
    if let KernelSupport::Unavailable(_) = t.node_a.run_in(probe_kernel_wireguard)? {
        assert_eq!(a.backend(), BackendKind::Userspace);
    }
    let b = WireguardGo::start(&t.node_b, &unique_ifname("wgo"), PORT_B)?;
    b.set_peer(
        &a.public_key().to_string(),
        &format!("{}:{PORT_A}", TwoNodes::NODE_A_IP),
        &[TwoNodes::POD_A_CIDR, &format!("{}/32", TwoNodes::ROUTER_A_IP)],
    )?;
    t.node_b.exec(&["ip", "route", "add", TwoNodes::POD_A_CIDR, "dev", b.ifname()])?;
    let report = a.apply_nodes(&[record_b(b.public_key(), PORT_B)?])?;
    assert_eq!(report.changes.len(), 1);
    assert!(report.rejected.is_empty());
    // The endpoint's own /32 is an allowed IP but must not be routed into the tunnel.
    let routes: Vec<String> = a.routes().iter().map(ToString::to_string).collect();
    assert_eq!(routes, vec!["10.244.2.0/24", "10.244.2.1/32"]);

    let on_b = wire_counters(&t.node_b, PORT_B)?;
    let on_a = wire_counters(&t.node_a, PORT_A)?;

    netns::ping(&t.pod_a, TwoNodes::POD_B_IP)?;
    netns::ping(&t.pod_b, TwoNodes::POD_A_IP)?;
    // The node's router IP on the far side is reachable through the tunnel too (node IPs are allowed IPs).
    netns::ping(&t.pod_a, TwoNodes::ROUTER_B_IP)?;
    let total = 16 << 20;
    tcp_transfer(&t.pod_b, TwoNodes::POD_B_IP, &t.pod_a, total, None, || Ok(()))?;
    tcp_transfer(&t.pod_a, TwoNodes::POD_A_IP, &t.pod_b, total, None, || Ok(()))?;

    let (_, udp_to_b) = on_b.read("wg_udp")?;
    let (_, udp_to_a) = on_a.read("wg_udp")?;
    assert!(udp_to_b > total && udp_to_a > total, "WireGuard UDP on the wire: {udp_to_b} / {udp_to_a} bytes");
    for (node, counters) in [("a", &on_a), ("b", &on_b)] {
        for name in ["pod_src", "pod_dst"] {
            let (packets, _) = counters.read(name)?;
            assert_eq!(packets, 0, "node {node}: {packets} plaintext packets with a pod address ({name}) on the wire");
        }
    }

    // Both implementations saw the handshake and the traffic.
    let handshakes = b.latest_handshakes()?;
    assert!(
        handshakes.iter().any(|(k, t)| *k == a.public_key().to_string() && *t > 0),
        "wireguard-go has a handshake with Causeway: {handshakes:?}"
    );
    // Causeway's UAPI reader understands wireguard-go's answer too.
    let b_status = causeway_datapath::wireguard::uapi::get(&uapi_socket(b.ifname()))??;
    assert_eq!(b_status.listen_port, Some(PORT_B));
    let b_peer = b_status.peers.iter().find(|p| p.spec.public_key == a.public_key()).context("B lists A")?;
    assert!(b_peer.has_handshake() && b_peer.rx_bytes > total, "{b_peer:?}");
    let status = a.status()?;
    let peer = status.peers.first().context("Causeway's device has its peer")?;
    assert!(peer.has_handshake());
    assert!(peer.rx_bytes > total && peer.tx_bytes > total, "{peer:?}");

    let ifname = a.ifname().to_owned();
    a.shutdown()?;
    assert!(!uapi_socket(&ifname).exists(), "UAPI socket removed");
    assert!(t.node_a.exec(&["ip", "link", "show", "dev", &ifname]).is_err(), "interface removed");
    Ok(())
}

#[test]
fn causeway_to_causeway_reconciles_and_shuts_down() -> Result<()> {
    if !netns::privileged("causeway_to_causeway_reconciles_and_shuts_down") {
        return Ok(());
    }
    let t = TwoNodes::new()?;
    let mut a = causeway_tunnel(&t.node_a, BackendPreference::Userspace, PORT_A)?;
    let mut b = causeway_tunnel(&t.node_b, BackendPreference::Userspace, 0)?;
    assert_ne!(b.listen_port(), 0, "a free port was picked and reported");

    // A second device under a live interface's name is refused instead of stealing its socket.
    let mut dup = TunnelConfig::new(a.ifname(), PrivateKey::generate(), 0);
    dup.backend = BackendPreference::Userspace;
    let refused = t.node_b.run_in(move || Tunnel::create(dup))?;
    assert!(matches!(refused, Err(Error::InterfaceInUse(_))), "{refused:?}");

    let rec_a = record_a(&a)?;
    let rec_b = record_b(&b.public_key().to_string(), b.listen_port())?;
    // A broken record next to the good one: reported, skipped, and the good peer still works.
    let broken = record("node-z", "not a key", "192.168.50.99:1", "10.244.99.0/24", &[])?;
    let report = a.apply_nodes(&[rec_b.clone(), broken])?;
    assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
    b.apply_nodes(std::slice::from_ref(&rec_a))?;

    let on_b = wire_counters(&t.node_b, b.listen_port())?;
    if let Err(e) = netns::ping(&t.pod_a, TwoNodes::POD_B_IP) {
        bail!("{e}\nnode A: {:?}\nnode B: {:?}", a.status()?, b.status()?);
    }
    tcp_transfer(&t.pod_b, TwoNodes::POD_B_IP, &t.pod_a, 8 << 20, None, || Ok(()))?;
    assert!(on_b.read("wg_udp")?.1 > 8 << 20);
    assert_eq!(on_b.read("pod_src")?.0, 0, "no plaintext pod packets on the wire");

    // Re-applying the same records changes nothing (idempotent) and keeps the session.
    let again = a.apply_nodes(std::slice::from_ref(&rec_b))?;
    assert!(again.changes.is_empty() && again.routes_added.is_empty(), "{again:?}");

    // A new pod CIDR on node B: the peer is updated, the route appears, existing traffic still flows.
    let mut rec_b2 = rec_b.clone();
    rec_b2.pod_cidrs.push("10.245.2.0/24".parse()?);
    let grown = a.apply_nodes(&[rec_b2])?;
    assert_eq!(grown.changes.len(), 1);
    assert_eq!(grown.routes_added, vec!["10.245.2.0/24".parse()?]);
    if let Err(e) = netns::ping(&t.pod_a, TwoNodes::POD_B_IP) {
        bail!("{e}\nnode A: {:?}\nnode B: {:?}", a.status()?, b.status()?);
    }

    // Node B leaves: peer and routes go, pod B becomes unreachable from pod A.
    let gone = a.apply_nodes(&[])?;
    assert_eq!(gone.changes.len(), 1);
    assert!(a.routes().is_empty());
    assert!(a.peers()?.is_empty());
    let out = t.pod_a.exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", TwoNodes::POD_B_IP])?;
    assert!(!out.status.success(), "pod B must be unreachable once its node is removed");

    for tunnel in [a, b] {
        let ifname = tunnel.ifname().to_owned();
        tunnel.shutdown()?;
        assert!(!uapi_socket(&ifname).exists());
    }
    Ok(())
}

#[test]
fn key_rotation_keeps_a_running_tcp_transfer_intact() -> Result<()> {
    if !netns::privileged("key_rotation_keeps_a_running_tcp_transfer_intact") {
        return Ok(());
    }
    let t = TwoNodes::new()?;
    let mut a = causeway_tunnel(&t.node_a, BackendPreference::Userspace, PORT_A)?;
    let mut b = causeway_tunnel(&t.node_b, BackendPreference::Userspace, PORT_B)?;
    a.apply_nodes(&[record_b(&b.public_key().to_string(), PORT_B)?])?;
    b.apply_nodes(&[record_a(&a)?])?;
    netns::ping(&t.pod_a, TwoNodes::POD_B_IP)?;

    let (old_a, old_b) = (a.public_key(), b.public_key());
    let (mut new_a, mut new_b) = (old_a, old_b);
    // 48 MiB paced at ~16 MiB/s: the rotations happen while data is in flight.
    tcp_transfer(&t.pod_b, TwoNodes::POD_B_IP, &t.pod_a, 48 << 20, Some(Duration::from_millis(4)), || {
        // Node A rotates and publishes; node B reconciles from the new record. Then the other way round.
        new_a = a.rotate_key()?;
        b.apply_nodes(&[record_a(&a)?])?;
        std::thread::sleep(Duration::from_millis(300));
        new_b = b.rotate_key()?;
        a.apply_nodes(&[record_b(&new_b.to_string(), PORT_B)?])?;
        Ok(())
    })?;
    assert_ne!(new_a, old_a);
    assert_ne!(new_b, old_b);
    // The sessions that carried the end of the transfer use the new keys: each side's only peer is the other's
    // new key, with a handshake.
    let peers_b = b.status()?.peers;
    if peers_b.len() != 1 || peers_b[0].spec.public_key != new_a {
        bail!("node B's peers after rotation: {:?}", peers_b.iter().map(|p| p.spec.public_key).collect::<Vec<_>>());
    }
    assert!(peers_b[0].has_handshake());
    let peers_a = a.status()?.peers;
    assert_eq!(peers_a.len(), 1);
    assert_eq!(peers_a[0].spec.public_key, new_b);
    // And new connections work after the rotation.
    netns::ping(&t.pod_b, TwoNodes::POD_A_IP)?;
    a.shutdown()?;
    b.shutdown()?;
    Ok(())
}
