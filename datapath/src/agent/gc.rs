//! Conntrack/SNAT garbage collection policy and SNAT port accounting, as plain functions of entries and a clock
//! value (nanoseconds of the same monotonic clock the datapath stamps `last_seen` with).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// L4 protocol of a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Other(u8),
}

/// TCP flags the datapath accumulated for a flow (both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpSeen {
    pub syn: bool,
    /// Both directions sent something after the handshake (the datapath's "established" bit).
    pub established: bool,
    pub fin: bool,
    pub rst: bool,
}

/// A conntrack (and, on a gateway, SNAT) entry as the datapath reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    pub proto: Proto,
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    pub tcp: TcpSeen,
    /// Monotonic nanoseconds of the last packet.
    pub last_seen_ns: u64,
    /// For SNATed flows: the egress IP and port the flow was translated to.
    pub snat: Option<(IpAddr, u16)>,
}

/// Identifies an entry to delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    pub proto: Proto,
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
}

impl CtEntry {
    pub fn key(&self) -> CtKey {
        CtKey { proto: self.proto, src: self.src, dst: self.dst }
    }
}

/// Idle timeouts. The defaults follow what Linux conntrack and Cilium use, rounded: an established TCP flow may idle
/// for hours (long-lived database connections through an egress gateway must survive), while a half-open or closing
/// one is reclaimed fast, since those are what port scans and SYN floods leave behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPolicy {
    pub tcp_established: Duration,
    /// Handshake not completed (only SYNs seen).
    pub tcp_syn: Duration,
    /// FIN or RST seen.
    pub tcp_closing: Duration,
    pub udp: Duration,
    pub icmp: Duration,
    pub other: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            tcp_established: Duration::from_secs(21_600),
            tcp_syn: Duration::from_secs(60),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(30),
            other: Duration::from_secs(60),
        }
    }
}

impl GcPolicy {
    /// The idle timeout of a flow of protocol `proto` with TCP flags `tcp` seen. This is the one timeouts table:
    /// the agent's conntrack sweep and the SNAT map GC ([`crate::bpf::snat::expiry`]) both decide through it.
    pub fn timeout_for(&self, proto: Proto, tcp: TcpSeen) -> Duration {
        match proto {
            Proto::Tcp if tcp.rst || tcp.fin => self.tcp_closing,
            Proto::Tcp if tcp.established => self.tcp_established,
            Proto::Tcp => self.tcp_syn,
            Proto::Udp => self.udp,
            Proto::Icmp => self.icmp,
            Proto::Other(_) => self.other,
        }
    }

    pub fn timeout(&self, e: &CtEntry) -> Duration {
        self.timeout_for(e.proto, e.tcp)
    }

    /// True when a flow last seen at `last_seen_ns` has been idle longer than its timeout at `now_ns`. A flow
    /// stamped in the future (clock read on another CPU a moment later) is not expired.
    pub fn expired_at(&self, proto: Proto, tcp: TcpSeen, last_seen_ns: u64, now_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(last_seen_ns);
        u128::from(idle) > self.timeout_for(proto, tcp).as_nanos()
    }

    /// True when the entry has been idle longer than its timeout (see [`GcPolicy::expired_at`]).
    pub fn expired(&self, e: &CtEntry, now_ns: u64) -> bool {
        self.expired_at(e.proto, e.tcp, e.last_seen_ns, now_ns)
    }

    /// The keys to delete.
    pub fn sweep<'a>(&self, entries: impl IntoIterator<Item = &'a CtEntry>, now_ns: u64) -> Vec<CtKey> {
        entries.into_iter().filter(|e| self.expired(e, now_ns)).map(CtEntry::key).collect()
    }
}

/// SNAT ports in use per (egress IP, destination IP), against the size of the port range: the figure that shows
/// exhaustion toward one destination (cilium#21346) before connections fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnatUsage {
    pub in_use: BTreeMap<(IpAddr, IpAddr), u64>,
}

impl SnatUsage {
    /// Counts distinct (proto, egress port) per (egress IP, destination) among SNATed entries.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a CtEntry>) -> SnatUsage {
        let mut ports: BTreeMap<(IpAddr, IpAddr), std::collections::BTreeSet<(Proto, u16)>> = BTreeMap::new();
        for e in entries {
            if let Some((egress, port)) = e.snat {
                ports.entry((egress, e.dst.0)).or_default().insert((e.proto, port));
            }
        }
        SnatUsage { in_use: ports.into_iter().map(|(k, v)| (k, v.len() as u64)).collect() }
    }

    /// The `limit` busiest pairs (metric labels must stay bounded), busiest first, ties by address.
    pub fn top(&self, limit: usize) -> Vec<((IpAddr, IpAddr), u64)> {
        let mut v: Vec<_> = self.in_use.iter().map(|(k, n)| (*k, *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(limit);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn entry(proto: Proto, tcp: TcpSeen, last: u64) -> CtEntry {
        CtEntry {
            proto,
            src: ("10.0.0.1".parse().unwrap(), 40000),
            dst: ("203.0.113.5".parse().unwrap(), 443),
            tcp,
            last_seen_ns: last,
            snat: None,
        }
    }

    #[test]
    fn timeouts_by_protocol_and_state() {
        let p = GcPolicy::default();
        let now = 100_000 * S;
        let est = TcpSeen { syn: true, established: true, ..Default::default() };
        assert!(!p.expired(&entry(Proto::Tcp, est, now - 21_600 * S), now));
        assert!(p.expired(&entry(Proto::Tcp, est, now - 21_601 * S), now));
        let syn = TcpSeen { syn: true, ..Default::default() };
        assert!(!p.expired(&entry(Proto::Tcp, syn, now - 59 * S), now));
        assert!(p.expired(&entry(Proto::Tcp, syn, now - 61 * S), now));
        let fin = TcpSeen { syn: true, established: true, fin: true, rst: false };
        assert!(p.expired(&entry(Proto::Tcp, fin, now - 11 * S), now));
        let rst = TcpSeen { rst: true, ..Default::default() };
        assert!(!p.expired(&entry(Proto::Tcp, rst, now - 9 * S), now));
        assert!(p.expired(&entry(Proto::Udp, TcpSeen::default(), now - 61 * S), now));
        assert!(!p.expired(&entry(Proto::Udp, TcpSeen::default(), now - 59 * S), now));
        assert!(p.expired(&entry(Proto::Icmp, TcpSeen::default(), now - 31 * S), now));
        assert!(p.expired(&entry(Proto::Other(47), TcpSeen::default(), now - 61 * S), now));
        // Stamped after `now` (another CPU's clock read): not expired, no underflow.
        assert!(!p.expired(&entry(Proto::Udp, TcpSeen::default(), now + 5 * S), now));
        // Custom timeouts are honoured.
        let short = GcPolicy { udp: Duration::from_secs(1), ..p };
        assert!(short.expired(&entry(Proto::Udp, TcpSeen::default(), now - 2 * S), now));
    }

    #[test]
    fn sweep_returns_only_expired_keys() {
        let p = GcPolicy::default();
        let now = 1_000 * S;
        let mut old = entry(Proto::Udp, TcpSeen::default(), now - 120 * S);
        old.src.1 = 1;
        let fresh = entry(Proto::Udp, TcpSeen::default(), now - S);
        let keys = p.sweep([&old, &fresh], now);
        assert_eq!(keys, vec![old.key()]);
    }

    #[test]
    fn snat_ports_counted_per_egress_ip_and_destination() {
        let eg: IpAddr = "192.0.2.10".parse().unwrap();
        let mut es = Vec::new();
        for port in 0..5u16 {
            let mut e = entry(Proto::Tcp, TcpSeen::default(), 0);
            e.src.1 = 40000 + port;
            e.snat = Some((eg, 30000 + port));
            es.push(e);
        }
        // The same port twice (both directions' entries) counts once; another destination counts apart.
        let mut dup = es[0].clone();
        dup.src.1 = 1;
        es.push(dup);
        let mut other = entry(Proto::Udp, TcpSeen::default(), 0);
        other.dst.0 = "198.51.100.1".parse().unwrap();
        other.snat = Some((eg, 30000));
        es.push(other);
        es.push(entry(Proto::Tcp, TcpSeen::default(), 0)); // not SNATed
        let u = SnatUsage::from_entries(&es);
        assert_eq!(u.in_use[&(eg, "203.0.113.5".parse().unwrap())], 5);
        assert_eq!(u.in_use[&(eg, "198.51.100.1".parse().unwrap())], 1);
        assert_eq!(u.top(1), vec![((eg, "203.0.113.5".parse().unwrap()), 5)]);
    }
}
