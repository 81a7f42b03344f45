//! The node's WireGuard interface: thin I/O around the sans-IO [`PeerSet`] reconciler.
//!
//! Userspace: a boringtun `DeviceHandle` on a TUN device in this process (its UAPI socket is
//! `/var/run/wireguard/<ifname>.sock`), configured through wireguard-control's `Backend::Userspace`.
//! Kernel: an `ip link add type wireguard` interface configured through wireguard-control's netlink backend.
//! Link state, addresses and routes go through `ip` (iproute2), which every node has.
//!
//! The interface outlives the process, like the pinned BPF maps: the userspace TUN is created persistent
//! (`ip tuntap add … multi_queue`, TUNSETPERSIST) before boringtun opens its queues on it by name, so when the agent
//! exits or is killed the device keeps its addresses and the routes through it, and packets routed there are
//! dropped by the TUN driver (no queue attached) instead of falling through to another route unencrypted. The next
//! [`Tunnel::create`] with the same name re-attaches: boringtun opens new queues on the existing device, the key
//! and port are set again, and the caller re-applies the peers (a fresh boringtun has none); [`Tunnel::apply`] then
//! starts a handshake with each of them at once, so the node is reachable again one round trip later even when it
//! has nothing to send itself (see [`Tunnel::apply`]). Only [`Tunnel::shutdown`] or [`delete_interface`] (uninstall) remove the device.
//!
//! The tunnel remembers the network namespace of the thread that created it and runs every later kernel-facing
//! command there, so the agent (or a test) may call it from any thread.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use boringtun::device::{DeviceConfig, DeviceHandle};
use ipnet::IpNet;
use nix::sched::{setns, CloneFlags};
use tracing::{debug, info, warn};
use wireguard_control::{DeviceUpdate, InterfaceName};

use super::backend::{choose_backend, probe_kernel_wireguard, BackendKind, BackendPreference, KernelSupport};
use super::keys::{PrivateKey, PublicKey};
use super::peers::{
    device_updates, handshake_probe_address, peers_without_session, route_changes, NodeRecord, PeerChange, PeerSet,
    PeerSetError, UpdateStyle,
};
use super::uapi::{self, DeviceStatus, PeerStatus};
use super::Error;

/// Where userspace WireGuard implementations put their UAPI sockets (shared by every netns on the machine).
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// WireGuard's overhead is 60 bytes over IPv4 and 80 over IPv6; 1420 fits a 1500-byte underlay either way.
pub const DEFAULT_MTU: u32 = 1420;

/// How to build a [`Tunnel`].
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Interface name, at most 15 bytes and unique on the machine (UAPI sockets are global).
    pub ifname: String,
    pub private_key: PrivateKey,
    /// UDP port; 0 picks a free one (see [`Tunnel::listen_port`]).
    pub listen_port: u16,
    /// Addresses on the interface (e.g. the node's router IP), optional.
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
    pub backend: BackendPreference,
    /// Persistent keepalive given to every peer (None = off); needed only behind NAT.
    pub keepalive: Option<u16>,
    /// boringtun worker threads (each with its own TUN queue).
    pub threads: usize,
}

impl TunnelConfig {
    pub fn new(ifname: impl Into<String>, private_key: PrivateKey, listen_port: u16) -> Self {
        TunnelConfig {
            ifname: ifname.into(),
            private_key,
            listen_port,
            addresses: Vec::new(),
            mtu: DEFAULT_MTU,
            backend: BackendPreference::Auto,
            keepalive: None,
            // Measured by bench/src/bin/wireguard-throughput.rs on 2 cores: see docs/benchmarks.md.
            threads: 2,
        }
    }
}

/// What one [`Tunnel::apply_nodes`] / [`Tunnel::apply`] did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    pub changes: Vec<PeerChange>,
    pub routes_added: Vec<IpNet>,
    pub routes_removed: Vec<IpNet>,
    /// Node records that were left out (bad key, conflicting allowed IPs...).
    pub rejected: Vec<PeerSetError>,
    /// Peers left without a session (added, or recreated by boringtun) that were sent a handshake initiation.
    pub handshakes_started: Vec<PublicKey>,
}

/// ICMP identifier of the echo reply that starts a handshake (see [`send_echo_reply`]); "cw", only to recognise
/// it in a capture.
const HANDSHAKE_PROBE_ID: u16 = 0x6377;

/// One WireGuard interface, up, with its routes. Removed on [`Tunnel::shutdown`]; dropping the tunnel (or the
/// process dying) only stops boringtun and leaves the interface, its addresses and routes in place for the next
/// [`Tunnel::create`] to re-attach to.
pub struct Tunnel {
    ifname: String,
    wg_name: InterfaceName,
    kind: BackendKind,
    device: Option<DeviceHandle>,
    netns: File,
    private_key: PrivateKey,
    listen_port: u16,
    keepalive: Option<u16>,
    routes: BTreeSet<IpNet>,
    reattached: bool,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("ifname", &self.ifname)
            .field("backend", &self.kind)
            .field("public_key", &self.private_key.public_key())
            .field("listen_port", &self.listen_port)
            .field("reattached", &self.reattached)
            .finish()
    }
}

impl Tunnel {
    /// Creates the interface in the calling thread's network namespace, sets key and port, brings it up. If an
    /// interface of that name is already there (left by a previous run of the agent), it is re-attached to rather
    /// than recreated, so its routes never disappear (see [`Tunnel::reattached`]).
    pub fn create(cfg: TunnelConfig) -> Result<Tunnel, Error> {
        let span = tracing::info_span!("wireguard_tunnel", ifname = %cfg.ifname);
        let _enter = span.enter();
        let wg_name: InterfaceName = cfg
            .ifname
            .parse()
            .map_err(|e| Error::InterfaceName { name: cfg.ifname.clone(), reason: format!("{e}") })?;
        let netns = File::open("/proc/thread-self/ns/net").map_err(|e| Error::Netns(e.to_string()))?;
        let support = match cfg.backend {
            BackendPreference::Userspace => KernelSupport::Unavailable("userspace requested".into()),
            _ => probe_kernel_wireguard(),
        };
        let kind = choose_backend(cfg.backend, &support)?;

        let (device, reattached) = match kind {
            BackendKind::Userspace => {
                let sock = uapi_socket(&cfg.ifname);
                // boringtun would silently unlink and take over another live device's socket (and share its TUN
                // queues). A socket file nobody answers on is what a killed agent leaves behind: reusable.
                if UnixStream::connect(&sock).is_ok() {
                    return Err(Error::InterfaceInUse(cfg.ifname.clone()));
                }
                let reattached = ensure_persistent_tun(&cfg.ifname)?;
                info!(?kind, ?support, reattached, "starting boringtun on a persistent TUN device");
                let config = DeviceConfig {
                    n_threads: cfg.threads.max(1),
                    use_connected_socket: true,
                    use_multi_queue: true,
                    uapi_fd: -1,
                };
                match start_boringtun(&cfg.ifname, config) {
                    Ok(d) => (Some(d), reattached),
                    Err(e) => {
                        if !reattached {
                            let _ = run_ip(&["link", "del", "dev", &cfg.ifname]);
                        }
                        return Err(e);
                    }
                }
            }
            BackendKind::Kernel => {
                let reattached = match link_kind(&cfg.ifname)? {
                    Some(k) if k == "wireguard" => true,
                    Some(other) => {
                        return Err(Error::WrongLinkKind {
                            ifname: cfg.ifname.clone(),
                            want: "wireguard",
                            found: other,
                        })
                    }
                    None => {
                        run_ip(&["link", "add", &cfg.ifname, "type", "wireguard"])?;
                        false
                    }
                };
                info!(?kind, ?support, reattached, "kernel WireGuard interface");
                (None, reattached)
            }
        };
        let mut tunnel = Tunnel {
            ifname: cfg.ifname.clone(),
            wg_name,
            kind,
            device,
            netns,
            private_key: cfg.private_key.clone(),
            listen_port: cfg.listen_port,
            keepalive: cfg.keepalive,
            routes: BTreeSet::new(),
            reattached,
        };
        if let Err(e) = tunnel.set_up(&cfg) {
            // A device this call created goes again; one it re-attached to keeps carrying (dropping) traffic as
            // before, for the next attempt.
            if !reattached {
                let _ = tunnel.teardown();
            }
            return Err(e);
        }
        Ok(tunnel)
    }

    fn set_up(&mut self, cfg: &TunnelConfig) -> Result<(), Error> {
        self.configure(DeviceUpdate::new().set_private_key(cfg.private_key.to_wg()).set_listen_port(cfg.listen_port))?;
        if cfg.listen_port == 0 {
            self.listen_port = self.status()?.listen_port.unwrap_or(0);
        }
        let mtu = cfg.mtu.to_string();
        self.ip(&["link", "set", "dev", &cfg.ifname, "mtu", &mtu])?;
        for addr in &cfg.addresses {
            self.ip(&["addr", "replace", &addr.to_string(), "dev", &cfg.ifname])?;
        }
        self.ip(&["link", "set", "dev", &cfg.ifname, "up"])
    }

    /// True when [`Tunnel::create`] found the interface already there (an agent restart) and attached to it: its
    /// addresses and routes were kept, its peers must be applied again.
    pub fn reattached(&self) -> bool {
        self.reattached
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn backend(&self) -> BackendKind {
        self.kind
    }

    /// The key remote nodes must configure for this node (publish it in the node record).
    pub fn public_key(&self) -> PublicKey {
        self.private_key.public_key()
    }

    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// Routes currently installed through the interface by this tunnel.
    pub fn routes(&self) -> &BTreeSet<IpNet> {
        &self.routes
    }

    /// The device as the implementation reports it (listen port, peers, handshakes, byte counters).
    pub fn status(&self) -> Result<DeviceStatus, Error> {
        match self.kind {
            BackendKind::Userspace => uapi::get(&uapi_socket(&self.ifname))
                .map_err(|e| Error::Uapi { ifname: self.ifname.clone(), op: "get", source: e })?
                .map_err(|e| Error::UapiReply { ifname: self.ifname.clone(), source: e }),
            BackendKind::Kernel => {
                let name = self.wg_name;
                let device = self
                    .in_netns(move || wireguard_control::Device::get(&name, wireguard_control::Backend::Kernel))?
                    .map_err(|e| Error::Uapi { ifname: self.ifname.clone(), op: "get", source: e })?;
                Ok(status_from_device(&device))
            }
        }
    }

    /// The peers the device has now.
    pub fn peers(&self) -> Result<PeerSet, Error> {
        Ok(PeerSet::from_specs(self.status()?.peers.into_iter().map(|p| p.spec)))
    }

    /// Reconciles peers and routes with the remote node records. Bad records are skipped and reported (see
    /// [`PeerSet::from_nodes_lenient`]); the rest is applied.
    pub fn apply_nodes(&mut self, nodes: &[NodeRecord]) -> Result<ApplyReport, Error> {
        let (desired, rejected) = PeerSet::from_nodes_lenient(&self.public_key(), nodes, self.keepalive);
        for err in &rejected {
            warn!(ifname = %self.ifname, error = %err, "node record not configured as a WireGuard peer");
        }
        let mut report = self.apply(&desired)?;
        report.rejected = rejected;
        Ok(report)
    }

    /// Makes the device's peers equal to `desired` with the minimal change (nothing when they already are), then
    /// the routes through the interface equal to `desired.routes()`, then starts a handshake with every peer the
    /// change left without a session (all of them after a re-attach: a fresh boringtun has none).
    ///
    /// Why: WireGuard only initiates a handshake when it has a packet for the peer. After the agent restarts, the
    /// remote node still holds the old session and keeps sending data on it, which the fresh device drops; if this
    /// node has nothing to send (the receiving end of a stream), nothing happens until the remote gives up waiting
    /// for an answer (KEEPALIVE + REKEY timeout, 15 s) and starts a handshake itself, and TCP's backoff stretches
    /// the stall to 20-25 s. So the tunnel sends one packet towards the peer itself: the device queues it and sends
    /// a handshake initiation at once, and the remote switches to the new session on the answer.
    ///
    /// Why a packet and not something else: boringtun 0.7 offers no API to reach its peers (`DeviceHandle` hides
    /// the device), its UAPI has no "initiate" command, and a persistent keepalive set over UAPI only fires after a
    /// full interval (then forever, and changing it later recreates the peer). A packet is what triggers the
    /// handshake in every implementation (boringtun, wireguard-go, the kernel). It is an ICMP echo *reply* to an
    /// address the device maps to that peer (see [`handshake_probe_address`]), sent from a raw socket bound to the
    /// interface (SO_BINDTODEVICE: into the tunnel whatever the routes say, never out of another interface in
    /// clear). Once the handshake delivers it, the remote stack drops it without answering (nothing answers an
    /// unsolicited echo reply), whereas a UDP datagram or an echo request would draw an answer from the remote
    /// node, sent from its pod-network address to our underlay address, i.e. outside the tunnel. Failing to send it
    /// is logged, not an error: the peer then handshakes on its first real packet, as before.
    pub fn apply(&mut self, desired: &PeerSet) -> Result<ApplyReport, Error> {
        let span = tracing::info_span!("wireguard_apply", ifname = %self.ifname);
        let _enter = span.enter();
        let current = self.peers()?;
        let changes = current.diff(desired);
        let style = match self.kind {
            BackendKind::Userspace => UpdateStyle::RemoveThenAdd,
            BackendKind::Kernel => UpdateStyle::InPlace,
        };
        if !changes.is_empty() {
            info!(changes = changes.len(), "updating WireGuard peers");
            for update in device_updates(&changes, style) {
                self.configure(update)?;
            }
        }
        let (add, del) = route_changes(&self.routes, &desired.routes());
        for net in &del {
            // Already gone (e.g. removed by hand) is fine: the goal is that it is not there.
            let _ = self.ip(&["route", "del", &net.to_string(), "dev", &self.ifname]);
            self.routes.remove(net);
        }
        for net in &add {
            self.ip(&["route", "replace", &net.to_string(), "dev", &self.ifname])?;
            self.routes.insert(*net);
        }
        debug!(added = add.len(), removed = del.len(), "routes through the tunnel");
        let mut handshakes_started = Vec::new();
        for spec in peers_without_session(&changes, style) {
            let Some(addr) = handshake_probe_address(desired, &spec.public_key) else {
                debug!(peer = %spec.public_key, "no address to start a handshake with; it starts on the first packet");
                continue;
            };
            match self.start_handshake(addr) {
                Ok(()) => {
                    debug!(peer = %spec.public_key, %addr, "handshake started");
                    handshakes_started.push(spec.public_key);
                }
                Err(e) => warn!(peer = %spec.public_key, %addr, error = %e, "could not start a handshake"),
            }
        }
        Ok(ApplyReport { changes, routes_added: add, routes_removed: del, rejected: Vec::new(), handshakes_started })
    }

    /// Sends the packet that makes the device start a handshake with the peer owning `addr` (see [`Tunnel::apply`]).
    fn start_handshake(&self, addr: IpAddr) -> Result<(), Error> {
        let ifname = self.ifname.clone();
        self.in_netns(move || send_echo_reply(&ifname, addr))?.map_err(|e| Error::Handshake {
            ifname: self.ifname.clone(),
            addr,
            source: e.into(),
        })
    }

    /// Replaces the private key without taking the interface down and returns the new public key, which must be
    /// published so that peers update their view of this node. Peers and routes stay; packets sent before the
    /// peers know the new key are lost and retransmitted by TCP once the next handshake succeeds.
    pub fn rotate_key(&mut self) -> Result<PublicKey, Error> {
        let new = PrivateKey::generate();
        self.configure(DeviceUpdate::new().set_private_key(new.to_wg()))?;
        self.private_key = new;
        let public = self.public_key();
        info!(ifname = %self.ifname, %public, "rotated WireGuard key");
        Ok(public)
    }

    /// Removes the interface (and, for boringtun, its UAPI socket and worker threads) and waits until it is gone.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), Error> {
        if let Some(mut device) = self.device.take() {
            // boringtun's workers exit when they see their UAPI socket gone (checked every second); joining them
            // guarantees its TUN queues are closed before the device is deleted.
            let _ = std::fs::remove_file(uapi_socket(&self.ifname));
            device.wait();
            drop(device);
        }
        // The TUN is persistent (and a kernel link always is): only deleting the link removes it. That also ends it
        // for a process forked while boringtun's queues were still inheritable, if one holds a queue open.
        if self.link_exists() {
            let _ = self.ip(&["link", "del", "dev", &self.ifname]);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.link_exists() {
            if Instant::now() > deadline {
                return Err(Error::Shutdown(self.ifname.clone()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn link_exists(&self) -> bool {
        self.ip(&["link", "show", "dev", &self.ifname]).is_ok()
    }

    fn check_alive(&self) -> Result<(), Error> {
        // If the UAPI socket is gone, wireguard-control would try to start `wireguard-go <ifname>` in its place.
        if self.kind == BackendKind::Userspace && UnixStream::connect(uapi_socket(&self.ifname)).is_err() {
            return Err(Error::DeviceGone(self.ifname.clone()));
        }
        Ok(())
    }

    fn configure(&self, update: DeviceUpdate) -> Result<(), Error> {
        self.check_alive()?;
        let (name, backend) = (self.wg_name, self.kind.wg_backend());
        self.in_netns(move || update.apply(&name, backend))?.map_err(|e| Error::Uapi {
            ifname: self.ifname.clone(),
            op: "set",
            source: e,
        })
    }

    /// Runs `ip <args>` in the tunnel's network namespace.
    fn ip(&self, args: &[&str]) -> Result<(), Error> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.in_netns(move || run_ip(&args.iter().map(String::as_str).collect::<Vec<_>>()))?
    }

    /// Runs `f` on a short-lived thread inside the tunnel's network namespace: processes it starts and netlink
    /// sockets it opens belong there, whatever namespace the caller's thread is in.
    fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        let ns = &self.netns;
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Netns(format!("setns: {e}")))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Not shut down explicitly (the agent exiting, a panic): stop boringtun's workers and leave the interface,
        // exactly as if the process had been killed, so the next agent re-attaches to it.
        if let Some(device) = self.device.take() {
            debug!(ifname = %self.ifname, "stopping boringtun; the persistent interface stays");
            drop(device);
        }
    }
}

/// Sends one ICMP (v6) echo reply to `addr` through interface `ifname` from a raw socket (the agent has
/// CAP_NET_RAW: it creates TUN devices and BPF programs). The kernel writes the IP header and picks the source.
fn send_echo_reply(ifname: &str, addr: IpAddr) -> nix::Result<()> {
    use nix::sys::socket::{
        sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
        SockaddrIn6,
    };
    use std::os::fd::AsRawFd;
    let (family, protocol, kind) = match addr {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, 0u8),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, 129u8),
    };
    let fd = socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, protocol)?;
    setsockopt(&fd, sockopt::BindToDevice, &OsString::from(ifname))?;
    let [id_hi, id_lo] = HANDSHAKE_PROBE_ID.to_be_bytes();
    // type, code, checksum (2), identifier (2), sequence number (2).
    let mut msg = [kind, 0, 0, 0, id_hi, id_lo, 0, 1];
    match addr {
        IpAddr::V4(ip) => {
            let [c_hi, c_lo] = icmp_checksum(&msg).to_be_bytes();
            msg[2] = c_hi;
            msg[3] = c_lo;
            sendto(fd.as_raw_fd(), &msg, &SockaddrIn::from(SocketAddrV4::new(ip, 0)), MsgFlags::empty())?;
        }
        // ICMPv6 raw sockets have the kernel fill in the checksum (it covers the pseudo-header).
        IpAddr::V6(ip) => {
            sendto(fd.as_raw_fd(), &msg, &SockaddrIn6::from(SocketAddrV6::new(ip, 0, 0, 0)), MsgFlags::empty())?;
        }
    }
    Ok(())
}

/// The Internet checksum (RFC 1071) of an ICMPv4 message whose checksum field is zero.
fn icmp_checksum(msg: &[u8]) -> u16 {
    let mut sum: u32 =
        msg.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Makes sure a persistent multi-queue TUN device named `ifname` exists in the calling thread's network namespace
/// (boringtun opens its queues by name with `IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE`, which attaches to an existing
/// device with the same queue mode). Returns whether it already existed.
fn ensure_persistent_tun(ifname: &str) -> Result<bool, Error> {
    match link_kind(ifname)? {
        Some(k) if k == "tun" => {
            let details = run_ip_output(&["-d", "-o", "link", "show", "dev", ifname])?;
            if !details.split_whitespace().any(|w| w == "multi_queue") {
                return Err(Error::WrongLinkKind {
                    ifname: ifname.to_owned(),
                    want: "multi-queue tun",
                    found: "single-queue tun".to_owned(),
                });
            }
            Ok(true)
        }
        Some(other) => Err(Error::WrongLinkKind { ifname: ifname.to_owned(), want: "tun", found: other }),
        None => {
            run_ip(&["tuntap", "add", "dev", ifname, "mode", "tun", "multi_queue"])?;
            Ok(false)
        }
    }
}

/// The `kind` of link `ifname` in the calling thread's namespace (`tun`, `wireguard`, … or `device` for one without
/// a kind), `None` when there is no such link.
fn link_kind(ifname: &str) -> Result<Option<String>, Error> {
    let out = Command::new("ip")
        .args(["-d", "-o", "link", "show", "dev", ifname])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command { command: "ip -d link show".into(), stderr: e.to_string() })?;
    if !out.status.success() {
        // "Device does not exist" (and nothing else, for a name that parsed) is the only failure here.
        return Ok(None);
    }
    Ok(Some(parse_link_kind(&String::from_utf8_lossy(&out.stdout))))
}

/// The link kind from one line of `ip -d -o link show`: iproute2 prints `<header> \    link/<type> … \    <kind> …`,
/// the kind being the first word of the segment after the `link/` one (`tun type tun …`, `wireguard …`); a device
/// without a kind (loopback, a physical NIC) has no such segment and is reported as `device`.
fn parse_link_kind(line: &str) -> String {
    let mut segments = line.split('\\').map(str::trim).skip_while(|seg| !seg.starts_with("link/"));
    let _link = segments.next();
    segments.next().and_then(|seg| seg.split_whitespace().next()).unwrap_or("device").to_owned()
}

/// Deletes the node's WireGuard interface `ifname` from the calling thread's network namespace, and the UAPI
/// socket file a killed boringtun left behind: the uninstall counterpart of the interface outliving the agent.
/// Returns whether there was an interface. It is deleted even while an agent's boringtun still serves it (the
/// documented uninstall runs `--uninstall` inside the running agent's pod, and nothing would delete the device once
/// the agent is gone): boringtun sees its TUN queues fail and stops, and removes its own socket.
pub fn delete_interface(ifname: &str) -> Result<bool, Error> {
    let sock = uapi_socket(ifname);
    if UnixStream::connect(&sock).is_ok() {
        warn!(ifname, "deleting a WireGuard interface a running agent still serves; its tunnel stops now");
    } else {
        let _ = std::fs::remove_file(&sock);
    }
    if link_kind(ifname)?.is_none() {
        return Ok(false);
    }
    run_ip(&["link", "del", "dev", ifname])?;
    info!(ifname, "WireGuard interface deleted");
    Ok(true)
}

/// Starts boringtun on its own thread (which inherits the caller's network namespace) because boringtun blocks
/// SIGINT/SIGTERM in the thread that creates the device (to read them from a signalfd); done on the caller's
/// thread, that would swallow the agent's own shutdown signal. The worker threads are spawned from there.
fn start_boringtun(ifname: &str, config: DeviceConfig) -> Result<DeviceHandle, Error> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let before = tun_fds().len();
            let handle = DeviceHandle::new(ifname, config)
                .map_err(|e| Error::Boringtun { ifname: ifname.to_owned(), reason: e.to_string() })?;
            // boringtun opens its TUN queues (one per worker, the workers open theirs as they start) and event fds
            // without O_CLOEXEC, so every process the node later starts would inherit them. Mark them
            // close-on-exec as soon as they exist.
            let deadline = Instant::now() + Duration::from_secs(2);
            while tun_fds().len() < before + config.n_threads && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            set_cloexec_on_inherited_fds();
            Ok(handle)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn fd_targets() -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd: i32 = e.file_name().to_str()?.parse().ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        Some((fd, target.to_string_lossy().into_owned()))
    })
    .collect()
}

fn tun_fds() -> Vec<i32> {
    fd_targets().into_iter().filter(|(_, t)| t == "/dev/net/tun").map(|(fd, _)| fd).collect()
}

/// Sets FD_CLOEXEC on TUN and anonymous-inode (epoll, eventfd, timerfd, signalfd) descriptors. Rust's own
/// descriptors already have it, so this only changes boringtun's.
fn set_cloexec_on_inherited_fds() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use std::os::fd::BorrowedFd;
    for (fd, target) in fd_targets() {
        if fd > 2 && (target == "/dev/net/tun" || target.starts_with("anon_inode:")) {
            // SAFETY: the descriptor was listed as open a moment ago; if it was closed since, fcntl fails with
            // EBADF, which is ignored. F_SETFD only changes the descriptor's close-on-exec flag.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        }
    }
}

fn status_from_device(device: &wireguard_control::Device) -> DeviceStatus {
    let peers = device
        .peers
        .iter()
        .filter_map(|p| {
            let spec = PeerSet::from_peer_configs([&p.config]).iter().next().cloned()?;
            let since_epoch = p
                .stats
                .last_handshake_time
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .unwrap_or_default();
            Some(PeerStatus {
                spec,
                last_handshake_sec: since_epoch.as_secs(),
                last_handshake_nsec: since_epoch.subsec_nanos(),
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
            })
        })
        .collect();
    DeviceStatus { listen_port: device.listen_port, peers }
}

/// `/var/run/wireguard/<ifname>.sock`.
pub fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(UAPI_DIR).join(format!("{ifname}.sock"))
}

fn run_ip(args: &[&str]) -> Result<(), Error> {
    run_ip_output(args).map(|_| ())
}

fn run_ip_output(args: &[&str]) -> Result<String, Error> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command { command: format!("ip {}", args.join(" ")), stderr: e.to_string() })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{icmp_checksum, parse_link_kind};

    #[test]
    fn icmp_checksum_verifies_to_zero() {
        // An echo request as `ping` sends it (type 8, id 0x1234, seq 1, payload "abc"); its checksum by hand.
        let msg = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'a', b'b', b'c'];
        let sum = icmp_checksum(&msg);
        assert_eq!(sum, 0x2168);
        let mut with = msg;
        with[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(icmp_checksum(&with), 0, "a message carrying its checksum sums to zero");
    }

    #[test]
    fn link_kind_from_ip_detail_lines() {
        let tun = "6: cw0: <POINTOPOINT,MULTICAST,NOARP> mtu 1500 qdisc noop state DOWN mode DEFAULT group default \
                   qlen 500\\    link/none  promiscuity 0  allmulti 0 minmtu 68 maxmtu 65535 \\    tun type tun pi off \
                   vnet_hdr off multi_queue numqueues 0 numdisabled 0 persist on addrgenmode eui64";
        assert_eq!(parse_link_kind(tun), "tun");
        let wg = "7: wg0: <POINTOPOINT,NOARP> mtu 1420 qdisc noop state DOWN\\    link/none  promiscuity 0 \\    \
                  wireguard addrgenmode none numtxqueues 1";
        assert_eq!(parse_link_kind(wg), "wireguard");
        let lo = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN\\    link/loopback \
                  00:00:00:00:00:00 brd 00:00:00:00:00:00 promiscuity 0 gso_max_size 65536";
        assert_eq!(parse_link_kind(lo), "device");
        assert_eq!(parse_link_kind(""), "device");
    }
}
