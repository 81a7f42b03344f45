//! When a SNAT mapping is dead, and which map entries the garbage collector deletes: pure functions over
//! snapshots of the two maps and a clock reading, so that they are tested with a fake clock.
//!
//! The datapath refreshes each direction's entry on its own (the egress program the forward entry, the
//! ingress program the reverse entry), so a flow is judged on both: its last activity is the later of the
//! two `last_seen_ns`, its TCP state the union of both directions' bits.

use std::collections::HashMap;
use std::time::Duration;

use super::{SnatEntry, SnatKey, TCP_EST, TCP_FIN, TCP_RST};

/// Idle timeouts after which a mapping is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP after the handshake completed, while neither side closed. Long, as in Linux conntrack (5 days there;
    /// 6 h here because a gateway holds one port per flow and idle connections behind NAT rarely survive
    /// middleboxes that long anyway).
    pub tcp_established: Duration,
    /// TCP before the handshake completed (SYN seen) or after a FIN/RST: short, so that scans and closed
    /// connections give their ports back quickly.
    pub tcp_transient: Duration,
    /// UDP: no state to read, so a plain idle timeout (Linux conntrack: 30 s unreplied, 120 s streams).
    pub udp: Duration,
    /// ICMP echo (Linux conntrack: 30 s).
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established: Duration::from_secs(21_600),
            tcp_transient: Duration::from_secs(60),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(30),
        }
    }
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

impl Timeouts {
    /// The idle timeout of a flow of protocol `proto` whose TCP state bits (both directions merged) are
    /// `tcp_state`.
    pub fn for_flow(&self, proto: u8, tcp_state: u8) -> Duration {
        match proto {
            IPPROTO_TCP => {
                if tcp_state & (TCP_FIN | TCP_RST) != 0 || tcp_state & TCP_EST == 0 {
                    self.tcp_transient
                } else {
                    self.tcp_established
                }
            }
            IPPROTO_UDP => self.udp,
            _ => self.icmp,
        }
    }
}

/// Whether a flow last seen at `last_seen_ns` has expired at `now_ns` (both CLOCK_MONOTONIC nanoseconds, the
/// clock of `bpf_ktime_get_ns`). A `last_seen_ns` in the future (an update raced the clock reading) is alive.
pub fn expired(timeouts: &Timeouts, proto: u8, tcp_state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    let idle = now_ns.saturating_sub(last_seen_ns);
    u128::from(idle) >= timeouts.for_flow(proto, tcp_state).as_nanos()
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
pub fn plan(fwd: &[(SnatKey, SnatEntry)], rev: &[(SnatKey, SnatEntry)], now_ns: u64, timeouts: &Timeouts) -> GcPlan {
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
    use super::super::{AF_INET, TCP_SYN};
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
        let t = Timeouts::default();
        assert_eq!(t.for_flow(IPPROTO_TCP, TCP_SYN), Duration::from_secs(60));
        assert_eq!(t.for_flow(IPPROTO_TCP, TCP_SYN | TCP_EST), Duration::from_secs(21_600));
        assert_eq!(t.for_flow(IPPROTO_TCP, TCP_SYN | TCP_EST | TCP_FIN), Duration::from_secs(60));
        assert_eq!(t.for_flow(IPPROTO_TCP, TCP_EST | TCP_RST), Duration::from_secs(60));
        assert_eq!(t.for_flow(IPPROTO_UDP, 0), Duration::from_secs(60));
        assert_eq!(t.for_flow(1, 0), Duration::from_secs(30));
        assert_eq!(t.for_flow(58, 0), Duration::from_secs(30));
    }

    #[test]
    fn expiry_boundaries() {
        let t = Timeouts::default();
        assert!(!expired(&t, IPPROTO_UDP, 0, 100 * S, 159 * S));
        assert!(expired(&t, IPPROTO_UDP, 0, 100 * S, 160 * S));
        // A refresh after the clock was read is not "idle for a negative time".
        assert!(!expired(&t, IPPROTO_UDP, 0, 200 * S, 100 * S));
        assert!(!expired(&t, IPPROTO_TCP, TCP_SYN | TCP_EST, 0, 21_599 * S));
        assert!(expired(&t, IPPROTO_TCP, TCP_SYN | TCP_EST, 0, 21_600 * S));
    }

    #[test]
    fn a_flow_is_alive_while_either_direction_is() {
        let t = Timeouts::default();
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
        let t = Timeouts::default();
        // SYN out, ACK (EST) seen only on the reply side: established, long timeout.
        let f = flow(IPPROTO_TCP, 5000, 40000, 0, 0, TCP_SYN, TCP_SYN | TCP_EST);
        assert_eq!(plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 3600 * S, &t).live, 1);
        // The remote sent a FIN: closing, short timeout.
        let f = flow(IPPROTO_TCP, 5000, 40000, 0, 0, TCP_SYN | TCP_EST, TCP_EST | TCP_FIN);
        assert_eq!(plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 61 * S, &t).flows.len(), 1);
        // Only a SYN ever seen: expires after 60 s.
        let f = flow(IPPROTO_TCP, 5000, 40000, 0, 0, TCP_SYN, 0);
        assert_eq!(plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 59 * S, &t).live, 1);
        assert_eq!(plan(&[(f.fk, f.fe)], &[(f.rk, f.re)], 60 * S, &t).flows.len(), 1);
    }

    #[test]
    fn orphans_are_judged_on_their_own() {
        let t = Timeouts::default();
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
        let t = Timeouts::default();
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
