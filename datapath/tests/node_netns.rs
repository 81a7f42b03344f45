//! The node datapath end to end, with real traffic, through the kernel adapter (`causeway_datapath::kernel`):
//!
//! ```text
//! pod netns ──veth── node A netns ══ VXLAN over the underlay veth ══ gateway netns ──veth── external netns
//! 10.244.1.5        cw_from_pod on lxc0     (VNI = egress group)      cw_from_overlay         192.0.2.1
//!                                                                    cw_snat_out/in on ext0 (egress IP 192.0.2.10)
//! ```
//!
//! Both nodes are programmed the way the agent does it: a desired `MapContents` (what the agent core computes from an
//! EgressAssignments snapshot), diffed by the agent's planner against what `KernelDatapath::read_programmed` reads
//! back from the pinned maps, and applied op by op. Needs root; skipped with a message otherwise, unless
//! CAUSEWAY_PRIVILEGED_TESTS=1.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use causeway_datapath::agent::gc::Proto;
use causeway_datapath::agent::model::{ClassId, EgressGroup, EgressVerdict, Gateway, GroupId, IpcacheValue};
use causeway_datapath::agent::{plan, Datapath, DropReason, MapContents, Op};
use causeway_datapath::bpf::loader;
use causeway_datapath::kernel::install::{self, InstallOptions, Installed};
use causeway_datapath::kernel::{KernelConfig, KernelDatapath};
use causeway_testsupport::netns::{self, Netns, NftCounters};

const POD_IP: &str = "10.244.1.5";
const NODE_A: &str = "172.30.0.1";
const GATEWAY: &str = "172.30.0.2";
const EGRESS_IP: &str = "192.0.2.10";
const SERVER_IP: &str = "192.0.2.1";
const VXLAN: &str = "cw_vxlan";

/// A unique pin directory and shadow journal, removed (programs detached, maps unpinned) on drop, even on panic.
struct NodeState {
    pin_dir: PathBuf,
    shadow: PathBuf,
}

impl NodeState {
    fn new(tag: &str) -> NodeState {
        let name = netns::unique_name(&format!("cw-nodetest-{tag}"));
        NodeState {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            shadow: std::env::temp_dir().join(format!("{name}.shadow")),
        }
    }
}

impl Drop for NodeState {
    fn drop(&mut self) {
        if let Err(e) = loader::uninstall(&self.pin_dir) {
            eprintln!("cleanup of {}: {e}", self.pin_dir.display());
        }
        let _ = std::fs::remove_file(&self.shadow);
        // The agent binary's --state-dir (shadow journal, WireGuard key).
        let _ = std::fs::remove_dir_all(self.shadow.with_extension("state"));
    }
}

struct Topology {
    pod: Netns,
    node_a: Netns,
    gw: Netns,
    ext: Netns,
}

fn topology() -> Result<Topology> {
    let t = Topology {
        pod: Netns::new("cwpod")?,
        node_a: Netns::new("cwna")?,
        gw: Netns::new("cwgw")?,
        ext: Netns::new("cwext")?,
    };
    // The pod's MTU leaves room for the VXLAN header on the 1500-byte underlay.
    netns::veth(&t.pod, "eth0", &format!("{POD_IP}/24"), &t.node_a, "lxc0", "10.244.1.1/24")?;
    t.pod.ip("link set eth0 mtu 1400")?;
    t.node_a.ip("link set lxc0 mtu 1400")?;
    t.pod.ip("route add default via 10.244.1.1")?;
    netns::veth(&t.node_a, "und0", &format!("{NODE_A}/24"), &t.gw, "und0", &format!("{GATEWAY}/24"))?;
    netns::veth(&t.gw, "ext0", "192.0.2.2/24", &t.ext, "eth0", &format!("{SERVER_IP}/24"))?;
    // The egress IP is a dedicated address on the external interface (the gateway answers ARP for it).
    t.gw.ip(&format!("addr add {EGRESS_IP}/32 dev ext0"))?;
    // Replies, once reverse-translated, go back to the pod's node over the underlay.
    t.gw.ip(&format!("route add 10.244.1.0/24 via {NODE_A}"))?;
    t.node_a.router()?;
    t.gw.router()?;
    // The external host has no route to pods: a leaked pod address could not even be answered.
    Ok(t)
}

fn install_node(ns: &Netns, st: &NodeState, node_ip: &str, pods: &[&str], external: Option<&str>) -> Result<Installed> {
    let opts = InstallOptions {
        pin_dir: st.pin_dir.clone(),
        node_ipv4: node_ip.parse()?,
        pod_interfaces: pods.iter().map(|s| s.to_string()).collect(),
        pod_prefix: None,
        vxlan_device: VXLAN.into(),
        external_interface: external.map(str::to_owned),
        wireguard_interface: None,
        enforce_policy: false,
    };
    Ok(ns.run_in(move || install::install(&opts))??)
}

fn open_dp(st: &NodeState, node_ip: &str) -> Result<KernelDatapath> {
    Ok(KernelDatapath::open(KernelConfig {
        pin_dir: st.pin_dir.clone(),
        shadow_path: st.shadow.clone(),
        local_ip: node_ip.parse()?,
        tunnel: None,
    })?)
}

/// What the agent core computes on both nodes for one egress policy "to 192.0.2.0/24 except 192.0.2.128/25 from the
/// pod, through the gateway node, SNAT to the egress IP", plus an ipcache entry for a remote pod (so the ipcache
/// and its shadowed fields are part of the round trip).
fn desired() -> MapContents {
    let mut d = MapContents::default();
    let (class, group) = (ClassId(1), GroupId(1));
    d.egress_src.insert(POD_IP.parse().unwrap(), class);
    d.egress_lpm.insert((class, "192.0.2.0/24".parse().unwrap()), EgressVerdict::Steer(group));
    d.egress_lpm.insert((class, "192.0.2.128/25".parse().unwrap()), EgressVerdict::Excluded);
    d.egress_groups.insert(
        group,
        EgressGroup {
            gateways: vec![Gateway {
                node_ip: GATEWAY.parse().unwrap(),
                egress_v4: Some(EGRESS_IP.parse().unwrap()),
                egress_v6: None,
            }],
        },
    );
    d.ipcache.insert(
        "10.99.0.0/24".parse().unwrap(),
        IpcacheValue {
            identity: 70001,
            cluster_id: 2,
            tunnel_endpoint: Some("fd00::99".parse().unwrap()),
            encrypt_key: 1,
        },
    );
    d
}

/// One reconcile as the agent core does it: read back, plan, apply. Returns the ops applied.
fn reconcile(dp: &mut KernelDatapath, desired: &MapContents) -> Result<Vec<Op>> {
    let current = dp.read_programmed()?;
    let ops = plan(&current, desired);
    for op in &ops {
        dp.apply(op)?;
    }
    Ok(ops)
}

/// A TCP server in `ns` that sends every client the address it sees the connection coming from, then echoes.
fn tcp_server(ns: &Netns, addr: &str) -> Result<SocketAddr> {
    let addr: SocketAddr = addr.parse()?;
    let listener = ns.run_in(move || TcpListener::bind(addr))??;
    let local = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let peer = c.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                if c.write_all(format!("{peer:<40}").as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(local)
}

/// The peer address a TCP client in `ns` is seen from.
fn tcp_peer_seen(ns: &Netns, server: SocketAddr) -> Result<String> {
    ns.run_in(move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut seen = [0u8; 40];
        s.read_exact(&mut seen)?;
        Ok(String::from_utf8_lossy(&seen).trim().to_owned())
    })?
}

/// A UDP server in `ns` answering each datagram with the sender's address; the client's view of that answer.
fn udp_peer_seen(client: &Netns, server_ns: &Netns) -> Result<String> {
    let sock = server_ns.run_in(|| UdpSocket::bind((SERVER_IP, 0)))??;
    let server = sock.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(from.ip().to_string().as_bytes(), from);
        }
    });
    client.run_in(move || -> Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 1500];
        // The first datagrams may be lost while neighbours resolve.
        for _ in 0..10 {
            s.send_to(b"who am i", server)?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        anyhow::bail!("no UDP answer from {server}")
    })?
}

fn privileged(name: &str) -> bool {
    netns::privileged(name)
}

#[test]
fn kernel_datapath_round_trips_and_restarts_without_reapplying() -> Result<()> {
    if !privileged("kernel_datapath_round_trips_and_restarts_without_reapplying") {
        return Ok(());
    }
    let ns = Netns::new("cwkdp")?;
    ns.ip("link add lxc0 type veth peer name lxc0p")?;
    ns.ip("link set lxc0 up")?;
    let st = NodeState::new("rt");
    let installed = install_node(&ns, &st, "172.31.0.1", &["lxc0"], None)?;
    let mut dp = open_dp(&st, "172.31.0.1")?;
    assert_eq!(dp.read_programmed()?, MapContents::default(), "fresh maps are empty");

    let want = desired();
    let ops = reconcile(&mut dp, &want)?;
    assert_eq!(ops.len(), 5, "{ops:?}");
    // What the kernel holds, read back, is exactly what was asked for (shadowed fields included).
    assert_eq!(dp.read_programmed()?, want);
    // The programs see it: the steering map lookups are in the pinned maps the programs use.
    let maps = causeway_datapath::bpf::BpfMaps::open(&st.pin_dir)?;
    assert_eq!(maps.egress_src.get(POD_IP.parse()?)?, Some(causeway_datapath::bpf::maps::ClassId(1)));
    let g = maps.egress_groups.get(causeway_datapath::bpf::maps::GroupId(1))?.context("group 1 programmed")?;
    assert_eq!(g.egress_ip, EGRESS_IP.parse::<IpAddr>()?);
    assert_eq!(reconcile(&mut dp, &want)?, vec![], "a second reconcile changes nothing");

    // Restart: everything dropped, programs reloaded into the same pinned links, maps and shadow reopened.
    drop(dp);
    drop(installed);
    let installed = install_node(&ns, &st, "172.31.0.1", &["lxc0"], None)?;
    let mut dp = open_dp(&st, "172.31.0.1")?;
    assert_eq!(dp.read_programmed()?, want, "the pinned state survived the restart");
    assert_eq!(reconcile(&mut dp, &want)?, vec![], "nothing is re-applied after a restart");

    // A change after the restart is applied as a diff only.
    let mut less = want.clone();
    less.egress_lpm.remove(&(ClassId(1), "192.0.2.128/25".parse()?));
    let ops = reconcile(&mut dp, &less)?;
    assert_eq!(ops, vec![Op::DeleteEgressLpm(ClassId(1), "192.0.2.128/25".parse()?)]);
    assert_eq!(dp.read_programmed()?, less);
    // A map edited behind the agent's back is seen as it is (the kernel is the truth, not the shadow).
    let mut ipcache = causeway_datapath::bpf::maps::IpcacheMap::open(&st.pin_dir)?;
    ipcache.delete("10.99.0.0/24".parse()?)?;
    let ops = reconcile(&mut dp, &less)?;
    assert!(matches!(ops.as_slice(), [Op::UpsertIpcache(..)]), "{ops:?}");
    drop(installed);
    Ok(())
}

#[test]
fn egress_through_gateway_with_real_traffic_survives_restart() -> Result<()> {
    if !privileged("egress_through_gateway_with_real_traffic_survives_restart") {
        return Ok(());
    }
    let t = topology()?;
    let (st_a, st_gw) = (NodeState::new("a"), NodeState::new("gw"));
    let inst_a = install_node(&t.node_a, &st_a, NODE_A, &["lxc0"], None)?;
    let inst_gw = install_node(&t.gw, &st_gw, GATEWAY, &[], Some("ext0"))?;
    let mut dp_a = open_dp(&st_a, NODE_A)?;
    let mut dp_gw = open_dp(&st_gw, GATEWAY)?;
    let want = desired();
    reconcile(&mut dp_a, &want)?;
    reconcile(&mut dp_gw, &want)?;

    let counters = NftCounters::ingress(
        &t.ext,
        "eth0",
        &[
            ("from_pod", &format!("ip saddr {POD_IP}")),
            ("from_egress", &format!("ip saddr {EGRESS_IP}")),
            ("vxlan_leak", "udp dport 4789"),
        ],
    )?;
    let underlay = NftCounters::ingress(&t.gw, "und0", &[("vxlan", "udp dport 4789")])?;

    // ping, UDP and TCP: replies come back, and the server only ever sees the egress IP.
    netns::ping(&t.pod, SERVER_IP).context("ping through the gateway")?;
    assert_eq!(udp_peer_seen(&t.pod, &t.ext)?, EGRESS_IP, "UDP server's view of the client");
    let server = tcp_server(&t.ext, &format!("{SERVER_IP}:0"))?;
    assert_eq!(tcp_peer_seen(&t.pod, server)?, EGRESS_IP, "TCP server's view of the client");
    ensure!(underlay.read("vxlan")?.0 > 0, "the traffic went through the VXLAN tunnel to the gateway");
    ensure!(counters.read("from_egress")?.0 > 0, "packets from the egress IP arrived");

    // A long TCP transfer runs while both nodes' datapath is restarted (programs reloaded into their pinned links,
    // maps and shadow reopened, reconciled): it must not notice.
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let flow = {
        let (stop, echoed) = (stop.clone(), echoed.clone());
        t.pod.enter(move || -> Result<u64> {
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut seen = [0u8; 40];
            s.read_exact(&mut seen)?;
            ensure!(String::from_utf8_lossy(&seen).trim() == EGRESS_IP, "long flow seen from the egress IP");
            let chunk = vec![0x5au8; 32 * 1024];
            let mut back = vec![0u8; chunk.len()];
            while !stop.load(Ordering::Relaxed) {
                s.write_all(&chunk)?;
                s.read_exact(&mut back).context("echo of a chunk")?;
                ensure!(back == chunk, "echo corrupted");
                echoed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            s.shutdown(Shutdown::Write)?;
            Ok(echoed.load(Ordering::Relaxed))
        })?
    };
    let progressed = |what: &str| -> Result<()> {
        let before = echoed.load(Ordering::Relaxed);
        ensure!(
            netns::wait_for(Duration::from_secs(10), || echoed.load(Ordering::Relaxed) > before + 1024 * 1024),
            "the long TCP flow made no progress {what}"
        );
        Ok(())
    };
    progressed("before the restart")?;

    drop(dp_a);
    drop(dp_gw);
    drop(inst_a);
    drop(inst_gw);
    let restart = Instant::now();
    let inst_a = install_node(&t.node_a, &st_a, NODE_A, &["lxc0"], None)?;
    let inst_gw = install_node(&t.gw, &st_gw, GATEWAY, &[], Some("ext0"))?;
    let mut dp_a = open_dp(&st_a, NODE_A)?;
    let mut dp_gw = open_dp(&st_gw, GATEWAY)?;
    assert_eq!(reconcile(&mut dp_a, &want)?, vec![], "node A re-applied nothing after the restart");
    assert_eq!(reconcile(&mut dp_gw, &want)?, vec![], "the gateway re-applied nothing after the restart");
    eprintln!("datapath restarted in {:?}", restart.elapsed());
    progressed("after the restart")?;

    stop.store(true, Ordering::Relaxed);
    let total = flow.join().map_err(|_| anyhow::anyhow!("flow thread panicked"))??;
    eprintln!("long flow echoed {total} bytes across the restart");
    // The SNAT conntrack saw the flows, translated to the egress IP, and the agent can read them for GC.
    let ct = dp_gw.conntrack()?;
    let (egress, pod): (IpAddr, IpAddr) = (EGRESS_IP.parse()?, POD_IP.parse()?);
    ensure!(
        ct.iter().any(|e| e.snat.map(|s| s.0) == Some(egress) && e.src.0 == pod),
        "SNAT conntrack holds the pod's flows: {ct:?}"
    );
    ensure!(!dp_a.conntrack()?.is_empty(), "node A pinned the flows to the gateway");
    // GC's delete path: the UDP flows go from both SNAT maps (and from node A's pins).
    let udp: Vec<_> = ct.iter().filter(|e| e.proto == Proto::Udp).map(|e| e.key()).collect();
    ensure!(!udp.is_empty(), "a UDP flow in the SNAT conntrack");
    assert_eq!(dp_gw.delete_conntrack(&udp)?, udp.len());
    ensure!(!dp_gw.conntrack()?.iter().any(|e| e.proto == Proto::Udp), "UDP SNAT entries deleted");
    let pins: Vec<_> = dp_a.conntrack()?.iter().filter(|e| e.proto == Proto::Udp).map(|e| e.key()).collect();
    assert_eq!(dp_a.delete_conntrack(&pins)?, pins.len());

    // The group loses its last gateway: node A drops the pod's traffic (counted) instead of letting it out.
    let mut none = want.clone();
    none.egress_groups.insert(GroupId(1), EgressGroup::default());
    assert_eq!(reconcile(&mut dp_a, &none)?.len(), 1);
    let before = dp_a.drop_counters()?.get(&DropReason::NoGateway).copied().unwrap_or(0);
    let ping = t.pod.exec_unchecked(&["ping", "-n", "-c", "2", "-W", "1", SERVER_IP])?;
    ensure!(!ping.status.success(), "traffic left without a gateway");
    let after = dp_a.drop_counters()?.get(&DropReason::NoGateway).copied().unwrap_or(0);
    ensure!(after >= before + 2, "no_gateway drops counted: {before} -> {after}");

    // No packet with the pod address ever reached the external host, and no VXLAN leaked there.
    assert_eq!(counters.read("from_pod")?.0, 0, "pod IP leaked to the external network");
    assert_eq!(counters.read("vxlan_leak")?.0, 0);
    // The excluded range is not steered: it would leave node A unencapsulated (and here has no route at all).
    drop((inst_a, inst_gw));
    Ok(())
}

// ------------------------------------------------------------------ the real agent binary in the node netns

mod binary {
    use std::pin::Pin;
    use std::process::{Child, Command, Stdio};

    use causeway_api::v1 as pb;
    use causeway_api::v1::egress_assignments_server::{EgressAssignments, EgressAssignmentsServer};
    use causeway_api::v1::egress_watch_event::Kind as EKind;
    use causeway_store::{ClusterId, ClusterName, MaxConnectedClusters, RemoteContext};
    use futures::Stream;
    use identity_sync::core::{CoreConfig, MergedView};
    use identity_sync::stream::{MeshViewHub, StreamConfig, StreamMetrics};
    use tonic::{Request, Response, Status};

    use super::*;

    /// An EgressAssignments server with one fixed policy: a snapshot, then nothing.
    struct OnePolicy(pb::EgressPolicyAssignment);

    type EgressStream = Pin<Box<dyn Stream<Item = Result<pb::EgressWatchEvent, Status>> + Send>>;

    #[tonic::async_trait]
    impl EgressAssignments for OnePolicy {
        type WatchStream = EgressStream;
        async fn watch(&self, _req: Request<pb::EgressWatchRequest>) -> Result<Response<EgressStream>, Status> {
            let ev = |kind: EKind, policy| pb::EgressWatchEvent { kind: kind as i32, revision: 1, epoch: 1, policy };
            let first = vec![
                Ok(ev(EKind::SnapshotBegin, None)),
                Ok(ev(EKind::Upsert, Some(self.0.clone()))),
                Ok(ev(EKind::SnapshotEnd, None)),
            ];
            let all = futures::StreamExt::chain(futures::stream::iter(first), futures::stream::pending());
            Ok(Response::new(Box::pin(all)))
        }
    }

    fn mesh_hub() -> Result<MeshViewHub> {
        let mut v = MergedView::new(CoreConfig::default());
        let mode = MaxConnectedClusters::C255;
        v.remote_added("west")?;
        v.remote_validated(RemoteContext {
            name: ClusterName::new("west").context("cluster name")?,
            id: ClusterId::new(2, mode).context("cluster id")?,
            mode,
        })?;
        Ok(MeshViewHub::new(v, StreamConfig::default(), StreamMetrics::default()))
    }

    /// A listener bound inside `ns` (sockets keep the namespace they were created in), for tokio.
    fn listener_in(ns: &Netns, addr: &str) -> Result<tokio::net::TcpListener> {
        let addr: SocketAddr = addr.parse()?;
        let l = ns.run_in(move || std::net::TcpListener::bind(addr))??;
        l.set_nonblocking(true)?;
        Ok(tokio::net::TcpListener::from_std(l)?)
    }

    /// The agent process, entered into the node's network namespace only (nsenter --net: it keeps the host's
    /// mounts, so its pins land in the real bpffs and outlive it). SIGTERM and reaped on drop.
    struct Agent(Child);

    impl Agent {
        fn start(ns: &Netns, st: &NodeState, node_ip: &str, extra: &[&str], servers: (&str, &str)) -> Result<Agent> {
            let bin = env!("CARGO_BIN_EXE_causeway-node-agent");
            let state_dir = st.shadow.with_extension("state");
            let child = Command::new("nsenter")
                .arg(format!("--net={}", ns.path().display()))
                .arg(bin)
                .args(["--node-name", ns.name(), "--node-ip", node_ip, "--metrics-addr", &format!("{node_ip}:9964")])
                .args(["--identity-sync-addr", servers.0, "--egress-addr", servers.1])
                .args(["--bpffs-root", &st.pin_dir.to_string_lossy(), "--state-dir", &state_dir.to_string_lossy()])
                .args(["--vxlan-device", VXLAN, "--gc-interval", "1"])
                .args(extra)
                .env_remove("CAUSEWAY_DRY_RUN")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()?;
            Ok(Agent(child))
        }
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            if !netns::wait_for(Duration::from_secs(5), || matches!(self.0.try_wait(), Ok(Some(_)))) {
                let _ = self.0.kill();
            }
            let _ = self.0.wait();
        }
    }

    /// `GET path` on the agent's metrics server, from inside the node's namespace.
    fn http_get(ns: &Netns, node_ip: &str, path: &str) -> Option<String> {
        let (addr, path) = (format!("{node_ip}:9964"), path.to_owned());
        ns.run_in(move || -> Option<String> {
            let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").as_bytes()).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let ok = out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200");
            ok.then_some(out)
        })
        .ok()
        .flatten()
    }

    fn ready_metrics(ns: &Netns, node_ip: &str) -> Result<String> {
        let mut metrics = None;
        ensure!(
            netns::wait_for(Duration::from_secs(120), || {
                if http_get(ns, node_ip, "/readyz").is_some() {
                    metrics = http_get(ns, node_ip, "/metrics");
                }
                metrics.is_some()
            }),
            "the agent in {} never became ready",
            ns.name()
        );
        metrics.context("metrics")
    }

    #[test]
    fn node_agent_binary_programs_egress_and_restarts_under_traffic() -> Result<()> {
        if !privileged("node_agent_binary_programs_egress_and_restarts_under_traffic") {
            return Ok(());
        }
        let t = topology()?;
        let rt = tokio::runtime::Runtime::new()?;
        let _guard = rt.enter();
        // The control plane's two streams, served on node A's underlay address (both agents reach it there).
        let mesh_l = listener_in(&t.node_a, &format!("{NODE_A}:0"))?;
        let egress_l = listener_in(&t.node_a, &format!("{NODE_A}:0"))?;
        let (mesh_addr, egress_addr) = (mesh_l.local_addr()?.to_string(), egress_l.local_addr()?.to_string());
        let hub = mesh_hub()?;
        rt.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(mesh_l);
            let _ = tonic::transport::Server::builder().add_service(hub.server()).serve_with_incoming(incoming).await;
        });
        let policy = pb::EgressPolicyAssignment {
            name: "billing".into(),
            generation: 1,
            destination_cidrs: vec!["192.0.2.0/24".into()],
            excluded_cidrs: vec![],
            source_ips: vec![POD_IP.into()],
            groups: vec![pb::EgressGroupAssignment {
                egress_ips: vec![EGRESS_IP.into()],
                gateways: vec![pb::GatewayAssignment { node_ip: GATEWAY.into(), egress_ips: vec![] }],
            }],
        };
        rt.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(egress_l);
            let _ = tonic::transport::Server::builder()
                .add_service(EgressAssignmentsServer::new(OnePolicy(policy)))
                .serve_with_incoming(incoming)
                .await;
        });
        let servers = (mesh_addr.as_str(), egress_addr.as_str());
        let (st_a, st_gw) = (NodeState::new("ba"), NodeState::new("bgw"));
        let mut agent_a = Agent::start(&t.node_a, &st_a, NODE_A, &["--pod-interfaces", "lxc0"], servers)?;
        let mut agent_gw = Agent::start(&t.gw, &st_gw, GATEWAY, &["--external-interface", "ext0"], servers)?;
        let m = ready_metrics(&t.node_a, NODE_A)?;
        assert!(m.contains(r#"causeway_node_agent_ops_applied_total{map="egress_src",op="upsert"} 1"#), "{m}");
        ready_metrics(&t.gw, GATEWAY)?;
        // What the agent wrote is in the pinned maps the programs read.
        let maps = causeway_datapath::bpf::BpfMaps::open(&st_a.pin_dir)?;
        ensure!(maps.egress_src.get(POD_IP.parse()?)?.is_some(), "pod's egress source entry pinned");

        let counters = NftCounters::ingress(&t.ext, "eth0", &[("from_pod", &format!("ip saddr {POD_IP}"))])?;
        netns::ping(&t.pod, SERVER_IP).context("ping through the agent-programmed gateway")?;
        assert_eq!(udp_peer_seen(&t.pod, &t.ext)?, EGRESS_IP);
        let server = tcp_server(&t.ext, &format!("{SERVER_IP}:0"))?;
        assert_eq!(tcp_peer_seen(&t.pod, server)?, EGRESS_IP);

        // A TCP flow runs while both agents are stopped (SIGTERM) and started again.
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let flow = {
            let (stop, echoed) = (stop.clone(), echoed.clone());
            t.pod.enter(move || -> Result<u64> {
                let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut seen = [0u8; 40];
                s.read_exact(&mut seen)?;
                let chunk = vec![0xa5u8; 32 * 1024];
                let mut back = vec![0u8; chunk.len()];
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&chunk)?;
                    s.read_exact(&mut back).context("echo of a chunk")?;
                    ensure!(back == chunk, "echo corrupted");
                    echoed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Ok(echoed.load(Ordering::Relaxed))
            })?
        };
        let progressed = |what: &str| -> Result<()> {
            let before = echoed.load(Ordering::Relaxed);
            ensure!(
                netns::wait_for(Duration::from_secs(10), || echoed.load(Ordering::Relaxed) > before + 1024 * 1024),
                "the TCP flow made no progress {what}"
            );
            Ok(())
        };
        progressed("before the restart")?;
        drop(agent_a);
        drop(agent_gw);
        progressed("while no agent runs")?;
        agent_a = Agent::start(&t.node_a, &st_a, NODE_A, &["--pod-interfaces", "lxc0"], servers)?;
        agent_gw = Agent::start(&t.gw, &st_gw, GATEWAY, &["--external-interface", "ext0"], servers)?;
        let m = ready_metrics(&t.node_a, NODE_A)?;
        assert!(!m.contains("causeway_node_agent_ops_applied_total{"), "the restarted agent re-applied: {m}");
        assert!(m.contains(r#"causeway_node_agent_map_entries{map="egress_src"} 1"#), "{m}");
        let m = ready_metrics(&t.gw, GATEWAY)?;
        assert!(!m.contains("causeway_node_agent_ops_applied_total{"), "the restarted gateway agent re-applied: {m}");
        progressed("after the restart")?;
        stop.store(true, Ordering::Relaxed);
        let total = flow.join().map_err(|_| anyhow::anyhow!("flow thread panicked"))??;
        eprintln!("flow echoed {total} bytes across the agents' restart");
        assert_eq!(counters.read("from_pod")?.0, 0, "pod IP leaked to the external network");
        drop(agent_a);
        drop(agent_gw);

        // Uninstall on node A: programs detached, pins and VXLAN device gone, the pod's traffic is no longer
        // steered (node A has no route of its own to the external network).
        let out = Command::new("nsenter")
            .arg(format!("--net={}", t.node_a.path().display()))
            .arg(env!("CARGO_BIN_EXE_causeway-node-agent"))
            .args(["--uninstall", "--node-name", "a", "--node-ip", NODE_A, "--identity-sync-addr", servers.0])
            .args(["--bpffs-root", &st_a.pin_dir.to_string_lossy(), "--vxlan-device", VXLAN])
            .args(["--state-dir", &st_a.shadow.with_extension("state").to_string_lossy()])
            .output()?;
        ensure!(out.status.success(), "uninstall failed: {}", String::from_utf8_lossy(&out.stderr));
        ensure!(!st_a.pin_dir.exists(), "pins removed");
        ensure!(!t.node_a.ip("-o link show")?.stdout.windows(VXLAN.len()).any(|w| w == VXLAN.as_bytes()));
        let ping = t.pod.exec_unchecked(&["ping", "-n", "-c", "2", "-W", "1", SERVER_IP])?;
        ensure!(!ping.status.success(), "the pod still reaches the external host after uninstall");
        Ok(())
    }
}

// ------------------------------------------------------------------ pod to pod across the WireGuard tunnel

mod wireguard {
    use std::collections::BTreeMap;

    use causeway_datapath::agent::classes::EgressIds;
    use causeway_datapath::agent::desired::Inputs;
    use causeway_datapath::agent::mesh::{MeshKey, MeshObject, RemoteNode};
    use causeway_datapath::agent::model::WgKey;
    use causeway_datapath::agent::{DesiredState, LocalNode};
    use causeway_datapath::wireguard::{PrivateKey, Tunnel, TunnelConfig};
    use causeway_testsupport::netns::TwoNodes;

    use super::*;

    const WG_PORT: u16 = 51871;

    /// What the agent core computes on one node from the other node's record (as identity-sync streams it).
    fn desired_from_remote(local_ip: &str, remote_ip: &str, remote_cidr: &str, remote_key: WgKey) -> MapContents {
        let mut mesh = BTreeMap::new();
        mesh.insert(
            MeshKey::Node { cluster: "west".into(), name: format!("node-{remote_ip}") },
            MeshObject::Node(RemoteNode {
                cluster_id: 2,
                internal_ips: vec![remote_ip.parse().unwrap()],
                pod_cidrs: vec![remote_cidr.parse().unwrap()],
                zone: None,
                wg_key: Some(remote_key),
            }),
        );
        let local = LocalNode::new("me", local_ip.parse().unwrap(), WG_PORT);
        let (egress, policy) = (BTreeMap::new(), BTreeMap::new());
        let inputs = Inputs { mesh: &mesh, egress: &egress, identity_policy: &policy, local: &local };
        DesiredState::compute(&inputs, &mut EgressIds::default(), &MapContents::default()).maps
    }

    #[test]
    fn pod_to_pod_across_wireguard_programmed_from_node_records() -> Result<()> {
        if !privileged("pod_to_pod_across_wireguard_programmed_from_node_records") {
            return Ok(());
        }
        let t = TwoNodes::new()?;
        let nodes = [
            (&t.node_a, TwoNodes::NODE_A_IP, NodeState::new("wga"), netns::unique_ifname("cwwg")),
            (&t.node_b, TwoNodes::NODE_B_IP, NodeState::new("wgb"), netns::unique_ifname("cwwg")),
        ];
        let mut dps = Vec::new();
        for (ns, ip, st, wg) in &nodes {
            let cfg = TunnelConfig::new(wg.clone(), PrivateKey::generate(), WG_PORT);
            let tunnel = ns.run_in(move || Tunnel::create(cfg))??;
            let key = WgKey(*tunnel.public_key().as_bytes());
            let opts = InstallOptions {
                pin_dir: st.pin_dir.clone(),
                node_ipv4: ip.parse()?,
                pod_interfaces: vec!["pod0".into()],
                pod_prefix: None,
                vxlan_device: VXLAN.into(),
                external_interface: None,
                wireguard_interface: Some(wg.clone()),
                enforce_policy: false,
            };
            let installed = ns.run_in(move || install::install(&opts))??;
            let dp = KernelDatapath::open(KernelConfig {
                pin_dir: st.pin_dir.clone(),
                shadow_path: st.shadow.clone(),
                local_ip: ip.parse()?,
                tunnel: Some(tunnel),
            })?;
            dps.push((dp, key, installed));
        }
        let (key_a, key_b) = (dps[0].1, dps[1].1);
        let want = [
            desired_from_remote(TwoNodes::NODE_A_IP, TwoNodes::NODE_B_IP, TwoNodes::POD_B_CIDR, key_b),
            desired_from_remote(TwoNodes::NODE_B_IP, TwoNodes::NODE_A_IP, TwoNodes::POD_A_CIDR, key_a),
        ];
        for (i, (ns, ..)) in nodes.iter().enumerate() {
            let dp = &mut dps[i].0;
            let want = &want[i];
            let (ops, back) = ns.run_in(|| -> Result<_> { Ok((reconcile(dp, want)?, dp.read_programmed()?)) })??;
            ensure!(ops.iter().any(|o| matches!(o, Op::UpsertWgPeer(..))), "a peer was configured: {ops:?}");
            ensure!(ops.iter().any(|o| matches!(o, Op::AddRoute(..))), "a route was added: {ops:?}");
            assert_eq!(&back, want, "node {i}: peers, routes and ipcache read back as programmed");
        }
        let underlay = NftCounters::ingress(
            &t.node_b,
            TwoNodes::UNDERLAY_IF,
            &[("wg", &format!("udp dport {WG_PORT}")), ("plain", "ip saddr 10.244.0.0/16")],
        )?;
        netns::ping(&t.pod_a, TwoNodes::POD_B_IP).context("pod A -> pod B through the tunnel")?;
        let server = tcp_server(&t.pod_b, &format!("{}:0", TwoNodes::POD_B_IP))?;
        assert_eq!(tcp_peer_seen(&t.pod_a, server)?, TwoNodes::POD_A_IP, "inside the mesh there is no SNAT");
        ensure!(underlay.read("wg")?.0 > 0, "the traffic crossed the underlay as WireGuard");
        assert_eq!(underlay.read("plain")?.0, 0, "no pod packet crossed the underlay unencrypted");
        // Applied once, nothing more to do.
        for (i, (ns, ..)) in nodes.iter().enumerate() {
            let dp = &mut dps[i].0;
            let want = &want[i];
            assert_eq!(ns.run_in(|| reconcile(dp, want))??, vec![], "node {i} second reconcile");
        }
        // Removing the remote node removes its peer and route; the pods are cut off.
        let dp = &mut dps[0].0;
        let ops = t.node_a.run_in(|| reconcile(dp, &MapContents::default()))??;
        ensure!(ops.iter().any(|o| matches!(o, Op::RemoveWgPeer(_))), "{ops:?}");
        ensure!(t.pod_a.exec_unchecked(&["ping", "-c", "1", "-W", "1", TwoNodes::POD_B_IP])?.status.code() != Some(0));
        for (dp, _, _) in dps.iter_mut() {
            if let Some(t) = dp.take_tunnel() {
                t.shutdown()?;
            }
        }
        Ok(())
    }
}
