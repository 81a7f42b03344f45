/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * SNAT with conntrack on the egress gateway (programs in snat.bpf.c, Rust mirror in src/bpf/snat.rs).
 *
 * Two LRU hash maps hold each translated flow, written together by cw_snat_out when the flow's first
 * packet leaves:
 *   cw_snat_fwd: original tuple (pod addr/port -> remote addr/port)        -> egress addr/port
 *   cw_snat_rev: reply tuple   (remote addr/port -> egress addr/port)      -> pod addr/port
 * The reply tuple is also the port allocation: a translated port is taken by inserting its reverse key
 * with BPF_NOEXIST, so a port is unique per (egress IP, remote IP, remote port, proto) and the same port
 * is reused toward other destinations (no cilium#21346-style exhaustion toward one destination while
 * ports are free elsewhere), and two CPUs racing for one port cannot both win.
 *
 * ICMP echo: the identifier plays the role of the pod-side port; the remote-side port is 0.
 *
 * Each direction refreshes only its own entry (last_seen_ns, TCP state bits), so the fast path never
 * writes the other map; the garbage collector in user space (src/bpf/snat.rs) merges both entries of a
 * flow, decides expiry and deletes both together.
 *
 * Any change here must be mirrored in src/bpf/snat.rs (its layout test compares against this object's BTF).
 */
#pragma once

#include "causeway.h"

/* TCP state bits, per direction (cw_snat_entry.tcp_state). */
#define CW_SNAT_TCP_SYN 0x01  /* a SYN was seen */
#define CW_SNAT_TCP_EST 0x02  /* an ACK without SYN was seen: the handshake completed */
#define CW_SNAT_TCP_FIN 0x04  /* a FIN was seen: closing */
#define CW_SNAT_TCP_RST 0x08  /* a RST was seen: closing */

/* One direction of a flow. Addresses as in struct cw_flow: 16 bytes, IPv4 in the first 4. */
struct cw_snat_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;   /* ICMP echo: the identifier on the pod side, 0 on the remote side */
	__be16 dport;
	__u8 proto;     /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP or IPPROTO_ICMPV6 */
	__u8 family;    /* CW_AF_INET or CW_AF_INET6 */
	__u8 pad[2];    /* always zero: part of the hash key */
};

/* Value of both maps: the address/port to write (egress side in cw_snat_fwd, pod side in cw_snat_rev). */
struct cw_snat_entry {
	__u8 addr[16];
	__be16 port;
	__u8 tcp_state;      /* CW_SNAT_TCP_* seen in this map's direction */
	__u8 pad;
	__u32 group;         /* egress group id from the packet mark when the flow was created */
	__u64 created_ns;    /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) at creation */
	__u64 last_seen_ns;  /* bpf_ktime_get_ns() of the last packet in this direction */
};

/* Port range used for translated ports and ICMP echo identifiers (host byte order). Written by the agent;
 * all zero means the defaults below. Keep it disjoint from net.ipv4.ip_local_port_range when the egress IP
 * is also an address of the gateway node, so translated flows never collide with the node's own sockets. */
struct cw_snat_config {
	__u16 port_min;
	__u16 port_max;
	__u32 probes;   /* ports tried per new flow before giving up; 0 or > CW_SNAT_MAX_PROBES = the maximum */
	__u32 seed;     /* mixed into the probe start, so port choice is not predictable across gateways */
	__u32 pad;
};

#define CW_SNAT_DEFAULT_PORT_MIN 32768
#define CW_SNAT_DEFAULT_PORT_MAX 65535
#define CW_SNAT_MAX_PROBES 64

/* Per-CPU event counters (cw_snat_stats), summed by the agent's metrics. */
enum cw_snat_stat {
	CW_SNAT_STAT_OUT_TRANSLATED = 0,  /* packets translated by cw_snat_out */
	CW_SNAT_STAT_OUT_NEW_FLOW = 1,    /* new mappings created */
	CW_SNAT_STAT_IN_TRANSLATED = 2,   /* replies reverse-translated by cw_snat_in */
	CW_SNAT_STAT_IN_NO_STATE = 3,     /* packets to an egress address with no mapping, passed unchanged */
	CW_SNAT_STAT_IN_ICMP_ERROR = 4,   /* ICMP errors about a translated flow, reverse-translated */
	CW_SNAT_STAT_OUT_REPAIRED = 5,    /* forward entry whose reverse entry was evicted: re-allocated */
	CW_SNAT_STAT_RACE_LOST = 6,       /* another CPU created the same flow first; its mapping was used */
	CW_SNAT_STAT_IN_UNTRACKABLE = 7,  /* later fragments / malformed packets seen on ingress, passed unchanged */
	CW_SNAT_STAT_MAX = 16,
};
