//! Gratuitous ARP when this node takes over an egress IP.
//!
//! The egress IP must already be configured on the gateway's interface (the agent does not add or move
//! addresses; see docs/datapath-agent.md). When this node becomes an active gateway for an egress IPv4 address
//! that sits on one of its Ethernet interfaces, the agent broadcasts a few gratuitous ARPs (RFC 5227 ARP
//! announcements: sender and target protocol address both the egress IP) so that routers, firewalls and hosts on
//! that segment point the address at this node's MAC now, instead of after their cache entry for the previous
//! gateway times out. For an IPv6 egress address it sends unsolicited neighbour advertisements (override flag)
//! instead.
//!
//! [`frame`], [`unsolicited_na`] and [`Announcer`] are sans-IO; [`send`] is the AF_PACKET socket; [`run`] is the task the binary runs.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use causeway_runtime::prometheus_client::metrics::counter::Counter;
use causeway_runtime::prometheus_client::metrics::gauge::Gauge;
use causeway_runtime::Health;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::interfaces::{self, HostNetwork};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
/// Ethernet header (14) + ARP for IPv4 over Ethernet (28).
pub const FRAME_LEN: usize = 42;

/// A broadcast gratuitous ARP from `mac` for `ip`: an ARP request whose sender and target protocol addresses are
/// both `ip` and whose target hardware address is zero (RFC 5227's announcement). Linux updates an existing
/// entry from it, and creates one where `arp_accept` is on.
pub fn frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // f[32..38]: target hardware address, zero.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

const ETH_P_IPV6: u16 = 0x86dd;
/// Ethernet (14) + IPv6 (40) + neighbour advertisement (24) + target link-layer address option (8).
pub const NA_FRAME_LEN: usize = 86;

/// An unsolicited IPv6 neighbour advertisement (RFC 4861 7.2.6) from `mac` for `ip`, to all nodes (ff02::1),
/// with the override flag and the target link-layer address option: Linux neighbours replace an existing entry's
/// MAC from it (and create one where `accept_untracked_na` is on).
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> [u8; NA_FRAME_LEN] {
    const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut f = [0u8; NA_FRAME_LEN];
    f[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    // IPv6: version 6, payload 32 bytes, next header ICMPv6 (58), hop limit 255 (receivers drop NDP otherwise).
    f[14] = 0x60;
    f[18..20].copy_from_slice(&32u16.to_be_bytes());
    f[20] = 58;
    f[21] = 255;
    f[22..38].copy_from_slice(&ip.octets());
    f[38..54].copy_from_slice(&ALL_NODES);
    // ICMPv6 neighbour advertisement: type 136, code 0, checksum, flags (override), target, TLLA option.
    f[54] = 136;
    f[58] = 0x20;
    f[62..78].copy_from_slice(&ip.octets());
    f[78] = 2;
    f[79] = 1;
    f[80..86].copy_from_slice(&mac);
    let sum = icmpv6_checksum(&ip.octets(), &ALL_NODES, &f[54..86]);
    f[56..58].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The Internet checksum of the ICMPv6 message over its pseudo-header (the checksum field must be zero).
fn icmpv6_checksum(src: &[u8; 16], dst: &[u8; 16], msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(src);
    add(dst);
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One announcement to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub ip: IpAddr,
    pub ifindex: u32,
    pub ifname: String,
    pub mac: [u8; 6],
}

/// What one [`Announcer::step`] decided.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    pub announce: Vec<Announcement>,
    /// Active egress IPs found on no interface of this node (misconfiguration: SNAT translates to an address
    /// replies will not come back to). Retried at every step.
    pub missing: Vec<IpAddr>,
    /// Missing ones that were not missing at the previous step (to log once).
    pub newly_missing: Vec<IpAddr>,
}

/// Remembers which active egress IPs have been announced, so each takeover is announced once.
#[derive(Debug, Default)]
pub struct Announcer {
    announced: BTreeSet<IpAddr>,
    missing: BTreeSet<IpAddr>,
}

impl Announcer {
    pub fn new() -> Self {
        Self::default()
    }

    /// `active`: the egress IPs this node SNATs to now; `net`: its interfaces now. An IP that stops being active
    /// is forgotten, so taking it over again (a failback) is announced again. An IP on no interface is announced
    /// once it appears.
    pub fn step(&mut self, active: &BTreeSet<IpAddr>, net: &HostNetwork) -> Step {
        self.announced.retain(|ip| active.contains(ip));
        let mut step = Step::default();
        let mut missing = BTreeSet::new();
        let fresh: Vec<IpAddr> = active.iter().filter(|ip| !self.announced.contains(ip)).copied().collect();
        for ip in &fresh {
            let Some(link) = interfaces::holder(net, *ip) else {
                missing.insert(*ip);
                continue;
            };
            self.announced.insert(*ip);
            match link.mac {
                Some(mac) => {
                    step.announce.push(Announcement { ip: *ip, ifindex: link.index, ifname: link.name.clone(), mac })
                }
                // A layer-3 device (TUN, WireGuard) has no neighbours to tell.
                None => debug!(%ip, ifname = %link.name, "egress IP on a layer-3 device: nothing to announce"),
            }
        }
        step.newly_missing = missing.difference(&self.missing).copied().collect();
        step.missing = missing.iter().copied().collect();
        self.missing = missing;
        step
    }
}

/// The frame announcing `a`, and its ethertype: gratuitous ARP for IPv4, unsolicited NA for IPv6.
pub fn announcement_frame(a: &Announcement) -> (Vec<u8>, u16) {
    match a.ip {
        IpAddr::V4(v4) => (frame(a.mac, v4).to_vec(), ETH_P_ARP),
        IpAddr::V6(v6) => (unsolicited_na(a.mac, v6).to_vec(), ETH_P_IPV6),
    }
}

/// Sends `count` copies of the announcement's frame out of its interface, `gap` apart.
pub async fn send(a: &Announcement, count: u32, gap: Duration) -> io::Result<()> {
    let sock = PacketSocket::open()?;
    let (f, ethertype) = announcement_frame(a);
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        sock.send(a.ifindex, ethertype, &f)?;
    }
    Ok(())
}

/// An AF_PACKET raw socket for ARP frames (needs CAP_NET_RAW), in the calling thread's network namespace.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the returned descriptor is checked and owned from here on.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(ETH_P_ARP.to_be())) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(PacketSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, ifindex: u32, ethertype: u16, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex =
            i32::try_from(ifindex).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex"))?;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(frame.get(..6).unwrap_or(&[0xff; 6]));
        // SAFETY: `frame` and `addr` are valid for the lengths given for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// `causeway_node_agent_garp_*` metrics.
#[derive(Clone, Default)]
pub struct GarpMetrics {
    pub sent: Counter,
    pub errors: Counter,
    pub egress_ips_missing: Gauge,
}

impl GarpMetrics {
    pub fn register(&self, health: &Health) {
        health.with_registry(|r| {
            r.register("node_agent_garp_sent", "Gratuitous ARP bursts sent on egress IP takeover", self.sent.clone());
            r.register("node_agent_garp_errors", "Gratuitous ARP bursts that failed", self.errors.clone());
            r.register(
                "node_agent_egress_ips_missing",
                "Egress IPs this node is an active gateway for that are configured on none of its interfaces",
                self.egress_ips_missing.clone(),
            );
        });
    }
}

/// How [`run`] announces.
#[derive(Debug, Clone)]
pub struct GarpConfig {
    /// Frames per takeover, and the gap between them.
    pub count: u32,
    pub gap: Duration,
    /// How often missing addresses are looked for again.
    pub recheck: Duration,
    /// `false` (--dry-run): decide and log, send nothing.
    pub send: bool,
}

impl Default for GarpConfig {
    fn default() -> Self {
        GarpConfig { count: 3, gap: Duration::from_millis(100), recheck: Duration::from_secs(2), send: true }
    }
}

/// Watches the agent's active egress IPs (from [`crate::agent::run::RunHooks::local_egress`]) and announces each
/// takeover, reading the interfaces with `read` (the netlink reader, in this thread's namespace).
pub async fn run(
    mut active: watch::Receiver<BTreeSet<IpAddr>>,
    cfg: GarpConfig,
    mut read: impl FnMut() -> io::Result<HostNetwork>,
    metrics: GarpMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let mut announcer = Announcer::new();
    let mut tick = tokio::time::interval(cfg.recheck.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stream_open = true;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = active.changed(), if stream_open => {
                if r.is_err() {
                    // The agent loop ended; keep nothing pending.
                    stream_open = false;
                    continue;
                }
            }
            _ = tick.tick() => {}
        }
        let now = active.borrow_and_update().clone();
        if now.is_empty() && announcer.announced.is_empty() && announcer.missing.is_empty() {
            continue;
        }
        let net = match read() {
            Ok(n) => n,
            Err(e) => {
                metrics.errors.inc();
                warn!(error = %e, "reading this node's addresses for gratuitous ARP");
                continue;
            }
        };
        let step = announcer.step(&now, &net);
        metrics.egress_ips_missing.set(step.missing.len() as i64);
        for ip in &step.newly_missing {
            warn!(%ip, "this node is an active gateway for an egress IP that is on none of its interfaces; the \
                        agent does not add it: configure it on the external interface");
        }
        for a in step.announce {
            let span = tracing::info_span!("garp", ip = %a.ip, ifname = %a.ifname);
            let _e = span.enter();
            if !cfg.send {
                info!("--dry-run: would send gratuitous ARP");
                continue;
            }
            match send(&a, cfg.count, cfg.gap).await {
                Ok(()) => {
                    metrics.sent.inc();
                    info!(count = cfg.count, "sent gratuitous ARP for the egress IP");
                }
                Err(e) => {
                    metrics.errors.inc();
                    warn!(error = %e, "sending gratuitous ARP");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::interfaces::{Addr, Link};

    #[test]
    fn frame_bytes() {
        let f = frame([0x02, 0x11, 0x22, 0x33, 0x44, 0x55], Ipv4Addr::new(192, 0, 2, 10));
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,         // broadcast
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55,         // from the gateway's MAC
            0x08, 0x06,                                 // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4,               // Ethernet / IPv4, address lengths
            0x00, 0x01,                                 // request
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55,         // sender MAC
            192, 0, 2, 10,                              // sender IP = the egress IP
            0, 0, 0, 0, 0, 0,                           // target MAC unknown
            192, 0, 2, 10,                              // target IP = sender IP: gratuitous
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn unsolicited_na_is_a_valid_override_advertisement() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let ip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let f = unsolicited_na(mac, ip);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1], "all-nodes multicast MAC");
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv6(v6)) = &p.net else { panic!("not IPv6: {:?}", p.net) };
        assert_eq!(v6.header().hop_limit(), 255);
        assert_eq!(v6.header().source_addr(), ip);
        assert_eq!(v6.header().destination_addr(), "ff02::1".parse::<Ipv6Addr>().unwrap());
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = &p.transport else { panic!("not ICMPv6") };
        let etherparse::Icmpv6Type::NeighborAdvertisement(h) = icmp.icmp_type() else { panic!("not an NA") };
        assert!(h.r#override && !h.solicited && !h.router);
        // Target address, then the target link-layer address option (type 2, 8 bytes).
        assert_eq!(icmp.payload(), [ip.octets().as_slice(), &[2, 1], &mac].concat());
        let want = etherparse::Icmpv6Header::with_checksum(
            icmp.icmp_type(),
            ip.octets(),
            v6.header().destination(),
            icmp.payload(),
        )
        .unwrap();
        assert_eq!(icmp.checksum(), want.checksum, "checksum over the pseudo-header");
    }

    fn net(with_egress: bool) -> HostNetwork {
        let mut n = HostNetwork {
            links: vec![
                Link { index: 2, name: "eth1".into(), loopback: false, mac: Some([2, 0, 0, 0, 0, 2]) },
                Link { index: 3, name: "wg0".into(), loopback: false, mac: None },
            ],
            addrs: vec![
                Addr { index: 2, ip: "192.168.10.21".parse().unwrap(), prefix_len: 24 },
                Addr { index: 2, ip: "2001:db8::10".parse().unwrap(), prefix_len: 64 },
                Addr { index: 3, ip: "10.50.0.1".parse().unwrap(), prefix_len: 32 },
            ],
            default_routes: vec![],
        };
        if with_egress {
            n.addrs.push(Addr { index: 2, ip: "192.0.2.10".parse().unwrap(), prefix_len: 32 });
        }
        n
    }

    fn set(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn each_takeover_is_announced_once_and_missing_addresses_later() {
        let mut a = Announcer::new();
        // The egress IP is not on the interface yet: nothing to send, reported once.
        let s = a.step(&set(&["192.0.2.10"]), &net(false));
        assert!(s.announce.is_empty());
        assert_eq!(s.missing, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.newly_missing.len(), 1);
        let s = a.step(&set(&["192.0.2.10"]), &net(false));
        assert_eq!((s.missing.len(), s.newly_missing.len()), (1, 0), "logged once");
        // The operator adds it: announced on eth1 from eth1's MAC.
        let s = a.step(&set(&["192.0.2.10"]), &net(true));
        assert_eq!(
            s.announce,
            vec![Announcement {
                ip: "192.0.2.10".parse().unwrap(),
                ifindex: 2,
                ifname: "eth1".into(),
                mac: [2, 0, 0, 0, 0, 2]
            }]
        );
        assert!(s.missing.is_empty());
        // Still active: not again.
        assert_eq!(a.step(&set(&["192.0.2.10"]), &net(true)), Step::default());
        // Lost and taken over again (failback): announced again.
        assert_eq!(a.step(&set(&[]), &net(true)), Step::default());
        assert_eq!(a.step(&set(&["192.0.2.10"]), &net(true)).announce.len(), 1);
        // An IPv6 egress address is announced too (neighbour advertisement); one on a layer-3 device needs
        // nothing, and neither is reported missing.
        let s = a.step(&set(&["192.0.2.10", "2001:db8::10", "10.50.0.1"]), &net(true));
        assert_eq!(s.announce.iter().map(|a| a.ip.to_string()).collect::<Vec<_>>(), vec!["2001:db8::10"]);
        assert!(s.missing.is_empty());
        assert_eq!(announcement_frame(&s.announce[0]).1, 0x86dd);
    }
}
