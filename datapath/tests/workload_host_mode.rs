//! Host mode: the real `causeway-node-agent` on a joined VM ("host" netns) with only `--wireguard-interface`,
//! `--mesh-ipv4` (and at the end without it: the old address goes), `--service-cidrs` and `--home-cluster`, fed
//! node records by identity-sync's real MeshView hub in this process. The home cluster's node is wireguard-go in
//! another netns ("node"), configured the way the cluster's agents configure a joined host (its alloc CIDR and
//! underlay IP as allowed IPs), with a pod behind it and a Service address on it:
//!
//! ```text
//! pod 10.244.1.2 ─ pod0 [node] eth0 192.168.60.1 ══ 192.168.60.10 eth0 [host] wg: 10.192.0.1/32 (mesh address)
//!                  lo 10.96.0.10 (a "ClusterIP")
//! ```
//!
//! Checked as a user would: the mesh address is on the interface; the Service CIDR is in the node's peer allowed
//! IPs (`wg show`) and routed into the tunnel with the mesh address as source (`ip route get`); TCP from the host
//! to the pod and to the Service address arrives with the mesh address as source; the address survives a SIGKILL
//! and restart of the agent (once, not duplicated); when the node's record goes, the Service CIDR moves to the next
//! home node by name.
//!
//! Root/netns required: skipped with a message unless CAUSEWAY_PRIVILEGED_TESTS=1, which makes it fail instead.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use causeway_datapath::wireguard::{keyfile, uapi_socket, PrivateKey};
use causeway_store::validate::RemoteEntry;
use causeway_store::{ClusterId, ClusterName, MaxConnectedClusters, RemoteContext};
use causeway_testsupport::netns::{self, unique_ifname, Netns, WireguardGo};
use identity_sync::core::{CoreConfig, MergedView};
use identity_sync::stream::{MeshViewHub, StreamConfig, StreamMetrics};
use mesh_agent_support::{wait_ready, AgentDirs, AgentProcess, SocketFile};

mod mesh_agent_support;

const HOME: &str = "east";
const WG_PORT: u16 = 51871;
const HOST_IP: &str = "192.168.60.10";
const NODE_A_IP: &str = "192.168.60.1";
const NODE_B_IP: &str = "192.168.60.2";
const MESH_IP: &str = "10.192.0.1";
const HOST_CIDR: &str = "10.192.0.0/30";
const POD_CIDR: &str = "10.244.1.0/24";
const POD_IP: &str = "10.244.1.2";
const SERVICE_CIDR: &str = "10.96.0.0/16";
const SERVICE_IP: &str = "10.96.0.10";

struct Host<'a> {
    ns: &'a Netns,
    st: AgentDirs,
    wg: String,
    hub_addr: String,
    metrics: SocketAddr,
}

impl Host<'_> {
    /// The host-mode command line: no pod or external interface.
    fn start(&self) -> Result<AgentProcess> {
        self.start_with(Some(MESH_IP))
    }

    /// The same, with `mesh` as `--mesh-ipv4` (None: without it, as after the host left the mesh datapath).
    fn start_with(&self, mesh: Option<&str>) -> Result<AgentProcess> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.path().display()))
            .arg(env!("CARGO_BIN_EXE_causeway-node-agent"))
            .args(["--node-name", "vm-1", "--node-ip", HOST_IP, "--identity-sync-addr", &self.hub_addr])
            .args(["--metrics-addr", &self.metrics.to_string()])
            .args(["--bpffs-root", &self.st.pin_dir.to_string_lossy()])
            .args(["--state-dir", &self.st.state_dir.to_string_lossy()])
            .args(["--wireguard-interface", &self.wg, "--wireguard-port", &WG_PORT.to_string()])
            .args(mesh.map(|m| ["--mesh-ipv4", m]).into_iter().flatten())
            .args(["--service-cidrs", SERVICE_CIDR, "--home-cluster", HOME])
            .env_remove("CAUSEWAY_DRY_RUN")
            .env_remove("CAUSEWAY_POD_INTERFACES")
            .env_remove("CAUSEWAY_EXTERNAL_INTERFACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(AgentProcess::new(child))
    }

    fn wait_ready(&self) -> Result<()> {
        wait_ready(self.ns, self.metrics)
    }

    fn sh(&self, cmd: &str) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.ns.sh(cmd)?.stdout).into_owned())
    }

    /// IPv4 addresses on the WireGuard interface.
    fn wg_addresses(&self) -> Result<Vec<String>> {
        let out = self.sh(&format!("ip -4 -o addr show dev {}", self.wg))?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(str::to_owned))
            .collect())
    }

    /// `wg show <if> allowed-ips`: peer key → its allowed IPs.
    fn allowed_ips(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let out = self.sh(&format!("wg show {} allowed-ips", self.wg))?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_owned(), it.map(str::to_owned).collect()))
            })
            .collect())
    }
}

fn node_record(name: &str, ip: &str, cidr: &str, key: &str) -> Result<RemoteEntry> {
    mesh_agent_support::node_record(HOME, name, ip, cidr, key)
}

/// A TCP listener at `ip:0` inside `ns`; returns its address and a thread answering with the peer address it saw.
fn peer_reporter(ns: &Netns, ip: &str) -> Result<(SocketAddr, std::thread::JoinHandle<Result<SocketAddr>>)> {
    let bind: SocketAddr = format!("{ip}:0").parse()?;
    let listener = ns.run_in(move || TcpListener::bind(bind))??;
    let addr = listener.local_addr()?;
    let handle = std::thread::spawn(move || -> Result<SocketAddr> {
        let (mut s, peer) = listener.accept()?;
        s.write_all(peer.ip().to_string().as_bytes())?;
        Ok(peer)
    });
    Ok((addr, handle))
}

/// Connects from the host (no explicit source address: the kernel picks it) and returns what the far end saw.
fn source_seen_by(host: &Netns, far: &Netns, ip: &str) -> Result<String> {
    let (addr, seen) = peer_reporter(far, ip)?;
    let said = host.run_in(move || -> Result<String> {
        // The first SYNs may wait for the WireGuard handshake.
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let peer = seen.join().map_err(|_| anyhow::anyhow!("listener panicked"))??;
    ensure!(peer.ip().to_string() == said, "the listener's view and its answer agree");
    Ok(said)
}

#[test]
fn host_mode_puts_the_mesh_address_on_the_tunnel_and_routes_service_cidrs_to_one_home_node() -> Result<()> {
    if !netns::privileged("host_mode_puts_the_mesh_address_on_the_tunnel_and_routes_service_cidrs_to_one_home_node") {
        return Ok(());
    }
    let host_ns = Netns::new("hmhost")?;
    let node = Netns::new("hmnode")?;
    let pod = Netns::new("hmpod")?;
    netns::veth(&host_ns, "eth0", &format!("{HOST_IP}/24"), &node, "eth0", &format!("{NODE_A_IP}/24"))?;
    node.router()?;
    netns::veth(&node, "pod0", "10.244.1.1/24", &pod, "eth0", &format!("{POD_IP}/24"))?;
    pod.exec(&["ip", "route", "add", "default", "via", "10.244.1.1"])?;
    node.exec(&["ip", "addr", "add", &format!("{SERVICE_IP}/32"), "dev", "lo"])?;

    // The host's key exists before the agent runs (`register` created it); the node configures it as a peer the
    // way a cluster agent does from the host's exported node record.
    let st = AgentDirs::new("cw-hostmode")?;
    let host_key = keyfile::load_or_create(&st.state_dir.join(keyfile::KEY_FILE))?.public_key().to_base64();
    let node_wg = WireguardGo::start(&node, &unique_ifname("hmwg"), WG_PORT)?;
    node_wg.set_peer(&host_key, &format!("{HOST_IP}:{WG_PORT}"), &[HOST_CIDR, &format!("{HOST_IP}/32")])?;
    node.exec(&["ip", "route", "add", HOST_CIDR, "dev", node_wg.ifname()])?;
    let node_b_key = PrivateKey::generate().public_key().to_base64();

    // identity-sync's hub, as the host's identity-sync (--external-workload) would serve it: the home cluster's
    // node records, the host's own among them (skipped by the agent: it carries --node-ip).
    let rt = tokio::runtime::Runtime::new()?;
    let _guard = rt.enter();
    let std_listener = host_ns.run_in(|| TcpListener::bind("127.0.0.1:0"))??;
    std_listener.set_nonblocking(true)?;
    let hub_addr = std_listener.local_addr()?.to_string();
    let mut view = MergedView::new(CoreConfig::default());
    let mode = MaxConnectedClusters::C255;
    view.remote_added(HOME)?;
    view.remote_validated(RemoteContext {
        name: ClusterName::new(HOME).context("cluster name")?,
        id: ClusterId::new(2, mode).context("cluster id")?,
        mode,
    })?;
    let hub = MeshViewHub::new(view, StreamConfig::default(), StreamMetrics::default());
    for rec in [
        node_record("node-b", NODE_B_IP, "10.244.2.0/24", &node_b_key)?,
        node_record("node-a", NODE_A_IP, POD_CIDR, node_wg.public_key())?,
        node_record("vm-1", HOST_IP, HOST_CIDR, &host_key)?,
    ] {
        hub.update(|v| v.entry_upsert(HOME, rec))?;
    }
    let server = hub.server();
    rt.spawn(async move {
        let Ok(l) = tokio::net::TcpListener::from_std(std_listener) else { return };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        let _ = tonic::transport::Server::builder().add_service(server).serve_with_incoming(incoming).await;
    });

    let metrics: SocketAddr = host_ns.run_in(|| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))??;
    let host = Host { ns: &host_ns, st, wg: unique_ifname("hmvm"), hub_addr, metrics };
    let _socket = SocketFile(uapi_socket(&host.wg));
    let mut agent = host.start()?;
    host.wait_ready()?;

    // The mesh address, alone, on the interface; the home node's peer carries the Service CIDR; node-b does not.
    assert_eq!(host.wg_addresses()?, vec![format!("{MESH_IP}/32")]);
    let allowed = host.allowed_ips()?;
    let a = allowed.get(node_wg.public_key()).context("node-a is a peer")?;
    for want in [SERVICE_CIDR, POD_CIDR] {
        ensure!(a.iter().any(|x| x == want), "node-a's allowed IPs lack {want}: {a:?}");
    }
    let b = allowed.get(&node_b_key).context("node-b is a peer")?;
    ensure!(!b.iter().any(|x| x == SERVICE_CIDR), "only one node carries the Service CIDR: {b:?}");
    ensure!(!allowed.contains_key(&host_key), "the host's own record is skipped: {allowed:?}");
    let route = host.sh(&format!("ip -o route get {SERVICE_IP}"))?;
    ensure!(route.contains(&format!("dev {}", host.wg)) && route.contains(&format!("src {MESH_IP}")), "{route}");

    // Real traffic, source chosen by the kernel: the node and the pod see the mesh address.
    assert_eq!(source_seen_by(&host_ns, &pod, POD_IP)?, MESH_IP, "the pod sees the host's mesh address");
    assert_eq!(source_seen_by(&host_ns, &node, SERVICE_IP)?, MESH_IP, "the Service address is reached through node-a");

    // SIGKILL and restart: the address stays during the gap (the TUN persists) and is not added twice after.
    agent.sigkill()?;
    assert_eq!(host.wg_addresses()?, vec![format!("{MESH_IP}/32")], "kept while the agent is down");
    std::thread::sleep(Duration::from_millis(500));
    agent = host.start()?;
    host.wait_ready()?;
    assert_eq!(host.wg_addresses()?, vec![format!("{MESH_IP}/32")], "once after the restart");
    assert_eq!(source_seen_by(&host_ns, &pod, POD_IP)?, MESH_IP, "traffic flows again after the restart");

    // node-a's record goes: the Service CIDR moves to node-b, the next home node by name.
    hub.update(|v| v.entry_delete(HOME, &format!("cilium/state/nodes/v1/{HOME}/node-a")))?;
    let moved = netns::wait_for(Duration::from_secs(30), || {
        host.allowed_ips().is_ok_and(|m| {
            !m.contains_key(node_wg.public_key())
                && m.get(&node_b_key).is_some_and(|b| b.iter().any(|x| x == SERVICE_CIDR))
        })
    });
    ensure!(moved, "the Service CIDR never moved to node-b: {:?}", host.allowed_ips()?);
    let route = host.sh(&format!("ip -o route get {SERVICE_IP}"))?;
    ensure!(route.contains(&format!("dev {}", host.wg)), "still routed into the tunnel: {route}");
    // No route to node-a's pods any more ("Network is unreachable" on this host, which has no default route).
    let pod_route = host_ns.exec_unchecked(&["ip", "-o", "route", "get", POD_IP])?;
    let shown = String::from_utf8_lossy(&pod_route.stdout);
    ensure!(!shown.contains(&host.wg), "node-a's pod CIDR left with its node: {shown}");

    // The host left the mesh datapath (registered again without a key): started without --mesh-ipv4, the agent
    // takes the old mesh address off the interface instead of keeping it.
    drop(agent);
    let agent = host.start_with(None)?;
    host.wait_ready()?;
    assert_eq!(host.wg_addresses()?, Vec::<String>::new(), "the old mesh address stayed on the interface");
    drop(agent);
    Ok(())
}
