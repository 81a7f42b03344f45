//! When a SNAT mapping is dead, and which map entries the garbage collector deletes: pure functions over
//! snapshots of the two maps and a clock reading, so that they are tested with a fake clock.
//!
//! The datapath refreshes each direction's entry on its own (the egress program the forward entry, the
//! ingress program the reverse entry), so a flow is judged on both: its last activity is the later of the
//! two `last_seen_ns`, its TCP state the union of both directions' bits.

use std::collections::HashMap;
use std::time::Duration;

use super::{SnatEntry, SnatKey, TCP_EST, TCP_FIN, TCP_RST, TCP_SYN};
use crate::agent::gc::{GcPolicy, Proto, TcpSeen};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

/// The agent's protocol of a map entry's IP protocol number (ICMP and ICMPv6 share the ICMP timeout).
pub fn proto(ip_proto: u8) -> Proto {
    match ip_proto {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => Proto::Icmp,
        o => Proto::Other(o),
    }
}

/// The agent's TCP flags of a map entry's `tcp_state` bits (for a flow, both directions' bits merged).
pub fn tcp_seen(tcp_state: u8) -> TcpSeen {
    TcpSeen {
        syn: tcp_state & TCP_SYN != 0,
        established: tcp_state & TCP_EST != 0,
        fin: tcp_state & TCP_FIN != 0,
        rst: tcp_state & TCP_RST != 0,
    }
}

/// The idle timeout of a flow of IP protocol `ip_proto` whose TCP state bits are `tcp_state`, from the agent's
/// [`GcPolicy`] (the single timeouts table, configured by the agent's flags).
pub fn timeout(policy: &GcPolicy, ip_proto: u8, tcp_state: u8) -> Duration {
    policy.timeout_for(proto(ip_proto), tcp_seen(tcp_state))
}

/// Whether a flow last seen at `last_seen_ns` has expired at `now_ns` (both CLOCK_MONOTONIC nanoseconds, the
/// clock of `bpf_ktime_get_ns`): idle longer than its timeout. A `last_seen_ns` in the future (an update raced the
/// clock reading) is alive.
pub fn expired(policy: &GcPolicy, ip_proto: u8, tcp_state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    policy.expired_at(proto(ip_proto), tcp_seen(tcp_state), last_seen_ns, now_ns)
}

/// The reverse-map key of a translated flow: what its replies look like.
pub fn reverse_key(fwd: &SnatKey, entry: &SnatEntry) -> SnatKey {
    SnatKey {
        saddr: fwd.daddr,
        daddr: entry.addr,
        sport: fwd.dport,
        dport: entry.port,
        proto: fwd.proto,
        family: fwd.family,
        pad: [0; 2],
    }
}

/// Whether reverse entry `rev` belongs to the flow `fwd` (the datapath checks the same before trusting a
/// forward entry; after an LRU eviction the port may belong to another flow).
pub fn owns(fwd: &SnatKey, rev: &SnatEntry) -> bool {
    rev.addr == fwd.saddr && rev.port == fwd.sport
}

/// What one garbage-collection pass deletes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcPlan {
    /// Flows whose both entries go: (forward key, reverse key).
    pub flows: Vec<(SnatKey, SnatKey)>,
    /// Forward entries without a matching reverse entry (evicted by the LRU), expired on their own.
    pub orphan_fwd: Vec<SnatKey>,
    /// Reverse entries without a forward entry, expired on their own: they hold a port.
    pub orphan_rev: Vec<SnatKey>,
    /// Flows kept.
    pub live: usize,
}

/// Plans a GC pass over snapshots of both maps at `now_ns`.
pub fn plan(fwd: &[(SnatKey, SnatEntry)], rev: &[(SnatKey, SnatEntry)], now_ns: u64, timeouts: &GcPolicy) -> GcPlan {
    let rev_by_key: HashMap<&SnatKey, &SnatEntry> = rev.iter().map(|(k, v)| (k, v)).collect();
    let mut claimed: HashMap<&SnatKey, ()> = HashMap::with_capacity(fwd.len());
    let mut out = GcPlan::default();
    for (fk, fe) in fwd {
        let rk = reverse_key(fk, fe);
        match rev_by_key.get_key_value(&rk) {
            Some((rk_ref, re)) if owns(fk, re) => {
                claimed.insert(rk_ref, ());
                let last = fe.last_seen_ns.max(re.last_seen_ns);
                if expired(timeouts, fk.proto, fe.tcp_state | re.tcp_state, last, now_ns) {
                    out.flows.push((*fk, rk));
                } else {
                    out.live += 1;
                }
            }
            _ => {
                if expired(timeouts, fk.proto, fe.tcp_state, fe.last_seen_ns, now_ns) {
                    out.orphan_fwd.push(*fk);
                } else {
                    out.live += 1;
                }
            }
        }
    }
    for (rk, re) in rev {
        if claimed.contains_key(rk) {
            continue;
        }
        if expired(timeouts, rk.proto, re.tcp_state, re.last_seen_ns, now_ns) {
            out.orphan_rev.push(*rk);
        } else {
            out.live += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::AF_INET;
    use super::*;

    const S: u64 = 1_000_000_000;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut x = [0u8; 16];
        x[..4].copy_from_slice(&a);
        x
    }

    fn flow(proto: u8, sport: u16, nat_port: u16, fwd_seen: u64, rev_seen: u64, fwd_state: u8, rev_state: u8) -> Flow {
        let fk = SnatKey {
            saddr: v4([10, 0, 0, 1]),
            daddr: v4([203, 0, 113, 5]),
            sport: sport.to_be(),
            dport: 443u16.to_be(),
            proto,
            family: AF_INET,
            pad: [0; 2],
        };
        let fe = SnatEntry {
            addr: v4([192, 0, 2, 10]),
            port: nat_port.to_be(),
            tcp_state: fwd_state,
            group: 1,
            last_seen_ns: fwd_seen,
            ..Default::default()
        };
        let rk = reverse_key(&fk, &fe);
        let re = SnatEntry {
            addr: fk.saddr,
            port: fk.sport,
            tcp_state: rev_state,
            group: 1,
            last_seen_ns: rev_seen,
            ..Default::default()
        };
        Flow { fk, fe, rk, re }
    }

    struct Flow {
        fk: SnatKey,
        fe: SnatEntry,
        rk: SnatKey,
        re: SnatEntry,
    }

    #[test]
    fn timeouts_by_protocol_and_state() {
        // The agent's GcPolicy defaults (the single timeouts table); FIN/RST is its 10 s closing timeout.
        let t = GcPolicy::default();
        assert_eq!(timeout(&t, IPPROTO_TCP, TCP_SYN), Duration::from_secs(60));
        assert_eq!(timeout(&t, IPPROTO_TCP, TCP_SYN | TCP_EST), Duration::from_secs(21_600));
        assert_eq!(timeout(&t, IPPROTO_TCP, TCP_SYN | TCP_EST | TCP_FIN), Duration::from_secs(10));
        assert_eq!(timeout(&t, IPPROTO_TCP, TCP_EST | TCP_RST), Duration::from_secs(10));
        assert_eq!(timeout(&t, IPPROTO_UDP, 0), Duration::from_secs(60));
        assert_eq!(timeout(&t, 1, 0), Duration::from_secs(30));
        assert_eq!(timeout(&t, 58, 0), Duration::from_secs(30));
        assert_eq!(timeout(&t, 47, 0), Duration::from_secs(60));
        // Timeouts configured on the agent's policy are what the SNAT GC applies.
        let custom = GcPolicy { tcp_closing: Duration::from_secs(3), udp: Duration::from_secs(7), ..t };
        assert_eq!(timeout(&custom, IPPROTO_TCP, TCP_EST | TCP_FIN), Duration::from_secs(3));
        assert!(expired(&custom, IPPROTO_UDP, 0, 0, 8 * S));
    }

    #[test]
    fn expiry_boundaries() {
        // Expired once idle longer than the timeout (the agent's rule), not at exactly the timeout.
        let t = GcPolicy::default();
        assert!(!expired(&t, IPPROTO_UDP, 0, 100 * S, 160 * S));
        assert!(expired(&t, IPPROTO_UDP, 0, 100 * S, 160 * S + 1));
        // A refresh after the clock was read is not "idle for a negative time".
        assert!(!expired(&t, IPPROTO_UDP, 0, 200 * S, 100 * S));
        assert!(!expired(&t, IPPROTO_TCP, TCP_SYN | TCP_EST, 0, 21_600 * S));
        assert!(expired(&t, IPPROTO_TCP, TCP_SYN | TCP_EST, 0, 21_600 * S + 1));
    }

    #[test]
    fn a_flow_is_alive_while_either_direction_is() {
        let t = GcPolicy::default();
        // Outbound silent for 100 s, but replies 10 s ago: UDP flow alive.
        let f = flow(IPPROTO_UDP, 5000, 40000, 0, 90 * S, 0, 0);
        let p = plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 100 * S, &t);
        assert_eq!(p.live, 1);
        assert!(p.flows.is_empty() && p.orphan_fwd.is_empty() && p.orphan_rev.is_empty());
        // Both silent for 61 s: both entries go together.
        let p = plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 151 * S, &t);
        assert_eq!(p.flows, vec![(f.fk, f.rk)]);
        assert_eq!(p.live, 0);
    }

    #[test]
    fn tcp_state_is_merged_across_directions() {
        let t = GcPolicy::default();
        // SYN out, ACK (EST) seen only on the reply side: established, long timeout.
        let f = flow(IPPROTO_TCP, 5000, 40000, 0, 0, TCP_SYN, TCP_SYN | TCP_EST);
        assert_eq!(plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 3600 * S, &t).live, 1);
        // The remote sent a FIN: closing, short timeout.
        let f = flow(IPPROTO_TCP, 5000, 40000, 0, 0, TCP_SYN | TCP_EST, TCP_EST | TCP_FIN);
        assert_eq!(plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 10 * S, &t).live, 1);
        assert_eq!(plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 11 * S, &t).flows.len(), 1);
        // Only a SYN ever seen: expires after 60 s.
        let f = flow(IPPROTO_TCP, 5000, 40000, 0, 0, TCP_SYN, 0);
        assert_eq!(plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 60 * S, &t).live, 1);
        assert_eq!(plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 61 * S, &t).flows.len(), 1);
    }

    #[test]
    fn orphans_are_judged_on_their_own() {
        let t = GcPolicy::default();
        let a = flow(IPPROTO_UDP, 5000, 40000, 0, 0, 0, 0);
        let b = flow(IPPROTO_UDP, 5001, 40001, 100 * S, 100 * S, 0, 0);
        // a's reverse entry was evicted; b's forward entry was evicted.
        let p = plan(&[(a.fk, a.fe)], &[(b.rk, b.re)], 70 * S, &t);
        assert_eq!(p.orphan_fwd, vec![a.fk]);
        assert!(p.orphan_rev.is_empty());
        assert_eq!(p.live, 1);
        let p = plan(&[(a.fk, a.fe)], &[(b.rk, b.re)], 170 * S, &t);
        assert_eq!(p.orphan_rev, vec![b.rk]);
    }

    #[test]
    fn a_reverse_entry_of_another_flow_is_not_ours() {
        let t = GcPolicy::default();
        // a's reverse entry was evicted and flow c (another pod port) took the same translated port since.
        let a = flow(IPPROTO_UDP, 5000, 40000, 0, 0, 0, 0);
        let mut c = flow(IPPROTO_UDP, 6000, 40000, 100 * S, 100 * S, 0, 0);
        c.re.port = 6000u16.to_be();
        assert_eq!(a.rk, c.rk);
        let p = plan(&[(a.fk, a.fe), (c.fk, c.fe)], &[(c.rk, c.re)], 100 * S, &t);
        // a is an expired orphan; c is alive and its reverse entry must not be deleted with a.
        assert_eq!(p.orphan_fwd, vec![a.fk]);
        assert!(p.flows.is_empty());
        assert!(p.orphan_rev.is_empty());
        assert_eq!(p.live, 1);
    }
}
