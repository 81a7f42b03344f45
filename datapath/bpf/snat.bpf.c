/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * SNAT with conntrack on the gateway's external interface (see snat.h for the maps).
 *
 * cw_snat_out (TC egress): packets marked CW_MARK_EGRESS | group get their source rewritten to the group's
 * egress IP and a translated port (ICMP echo: identifier). Marked packets that cannot be translated are
 * dropped, never sent with the pod address: a pod IP must not leave the gateway.
 *
 * cw_snat_in (TC ingress): replies (and ICMP errors quoting a translated packet) addressed to an egress
 * address with a reverse mapping get their destination rewritten back to the pod's address and port. The
 * kernel then routes them to the pod's node through the encap routes the agent installs.
 * Packets to an egress address without a mapping are passed unchanged and counted (CW_SNAT_STAT_IN_NO_STATE):
 * the egress IP may be an address of the node itself (egressGroups[].interface), whose own traffic must keep
 * working; if it is not, the kernel has no socket for them and answers with a RST/port unreachable as for any
 * closed port.
 *
 * Known gaps (documented in src/bpf/snat.rs):
 * - later IP fragments of marked flows are dropped (CW_DROP_UNSUPPORTED_L4): they carry no ports, and
 *   sending them untranslated would leak the pod IP. Inbound later fragments are passed unchanged.
 * - in ICMP errors, the checksum of the quoted transport header is not updated (receivers do not verify it).
 */
#include "causeway.h"
#include "egress_group.h"
#include "snat.h"

#define CW_L3_OFF ETH_HLEN

#ifndef offsetof
#define offsetof(t, m) __builtin_offsetof(t, m)
#endif

/* 16-byte address equality without a libc memcmp call (the BPF target has none). */
static __always_inline int cw_addr_eq(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct cw_snat_key);
	__type(value, struct cw_snat_entry);
	CW_PIN;
} cw_snat_fwd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct cw_snat_key);
	__type(value, struct cw_snat_entry);
	CW_PIN;
} cw_snat_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cw_snat_config);
	CW_PIN;
} cw_snat_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CW_SNAT_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	CW_PIN;
} cw_snat_stats SEC(".maps");

static __always_inline void cw_snat_count(__u32 stat)
{
	__u64 *c = bpf_map_lookup_elem(&cw_snat_stats, &stat);
	if (c)
		*c += 1;
}

static __always_inline __u8 cw_snat_tcp_bits(__u8 flags)
{
	__u8 s = 0;
	if (flags & 0x02)
		s |= CW_SNAT_TCP_SYN;
	else if (flags & 0x10)
		s |= CW_SNAT_TCP_EST;
	if (flags & 0x01)
		s |= CW_SNAT_TCP_FIN;
	if (flags & 0x04)
		s |= CW_SNAT_TCP_RST;
	return s;
}

static __always_inline __u32 cw_mix(__u32 h, __u32 v)
{
	h ^= v;
	h *= 0x9e3779b1u;
	h ^= h >> 16;
	return h;
}

/* Probe start for a new flow: a hash of the original tuple, so the same flow re-created after a GC tends
 * to get the same port back, and different flows toward one destination start at different ports. */
static __always_inline __u32 cw_snat_hash(const struct cw_snat_key *k, __u32 seed)
{
	const __u32 *w = (const __u32 *)k;
	__u32 h = seed ^ 0x5bd1e995u;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*k) / 4); i++)
		h = cw_mix(h, w[i]);
	return h;
}

/* L4 checksum offset and helper flags for proto; -1 if the protocol is not translated. */
static __always_inline int cw_l4_csum(const struct cw_flow *f, __u32 *csum_off, __u64 *flags, int *pseudo)
{
	*flags = 0;
	*pseudo = 1;
	switch (f->proto) {
	case IPPROTO_TCP:
		*csum_off = f->l4_off + 16;
		return 0;
	case IPPROTO_UDP:
		/* IPv4 UDP may carry no checksum (0): it must stay 0, and a computed 0 is sent as 0xffff. */
		*csum_off = f->l4_off + 6;
		*flags = BPF_F_MARK_MANGLED_0;
		return 0;
	case IPPROTO_ICMP:
		/* ICMPv4 has no pseudo header: only the identifier counts. */
		*csum_off = f->l4_off + 2;
		*pseudo = 0;
		return 0;
	case IPPROTO_ICMPV6:
		*csum_off = f->l4_off + 2;
		return 0;
	}
	return -1;
}

/*
 * Rewrite one address and port of the packet (the source when is_src, else the destination), with the IPv4
 * header checksum and the L4 checksum (pseudo header + port) updated incrementally.
 */
static __always_inline int cw_nat_rewrite(struct __sk_buff *skb, const struct cw_flow *f, int is_src,
					  const __u8 *old_addr, const __u8 *new_addr, __be16 old_port, __be16 new_port)
{
	__u32 csum_off;
	__u64 l4flags;
	int pseudo;
	if (cw_l4_csum(f, &csum_off, &l4flags, &pseudo))
		return -1;
	__u32 l3 = f->l3_off;
	__u32 port_off;
	if (f->proto == IPPROTO_ICMP || f->proto == IPPROTO_ICMPV6)
		port_off = f->l4_off + 4;
	else
		port_off = f->l4_off + (is_src ? 0 : 2);

	if (f->family == CW_AF_INET) {
		__be32 o, n;
		__builtin_memcpy(&o, old_addr, 4);
		__builtin_memcpy(&n, new_addr, 4);
		__u32 addr_off = l3 + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
		if (pseudo && bpf_l4_csum_replace(skb, csum_off, o, n, BPF_F_PSEUDO_HDR | l4flags | 4))
			return -1;
		if (bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), o, n, 4))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &n, 4, 0))
			return -1;
	} else {
		__u8 o[16], n[16];
		cw_copy16(o, old_addr);
		cw_copy16(n, new_addr);
		__u32 addr_off = l3 + (is_src ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));
		__s64 diff = bpf_csum_diff((__be32 *)o, 16, (__be32 *)n, 16, 0);
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_IPV6 | l4flags))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, n, 16, 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4flags | 2))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0))
			return -1;
	}
	return 0;
}

static __always_inline int cw_is_echo_request(const struct cw_flow *f)
{
	return (f->proto == IPPROTO_ICMP && f->icmp_type == 8) || (f->proto == IPPROTO_ICMPV6 && f->icmp_type == 128);
}

static __always_inline int cw_is_echo_reply(const struct cw_flow *f)
{
	return (f->proto == IPPROTO_ICMP && f->icmp_type == 0) || (f->proto == IPPROTO_ICMPV6 && f->icmp_type == 129);
}

/* The reverse key of a translated flow: what a reply looks like. */
static __always_inline void cw_rev_key(struct cw_snat_key *rk, const struct cw_snat_key *fk, const __u8 *nat_addr,
				       __be16 nat_port)
{
	__builtin_memset(rk, 0, sizeof(*rk));
	cw_copy16(rk->saddr, fk->daddr);
	cw_copy16(rk->daddr, nat_addr);
	rk->sport = fk->dport;
	rk->dport = nat_port;
	rk->proto = fk->proto;
	rk->family = fk->family;
}

/*
 * Find or create the mapping of an outbound flow. Returns the forward entry (a map value) or NULL with
 * *reason set to the drop reason.
 */
static __always_inline struct cw_snat_entry *cw_snat_lookup_or_create(const struct cw_snat_key *fk,
								    const struct cw_egress_group *g, __u32 group,
								    __u64 now, __u32 *reason)
{
	struct cw_snat_key rk;
	struct cw_snat_entry *e = bpf_map_lookup_elem(&cw_snat_fwd, fk);
	if (e) {
		/* The reverse entry is the port's ownership. If the LRU evicted it (and maybe another flow took the
		 * port since), replies could not come back: drop our stale forward entry and allocate again. */
		cw_rev_key(&rk, fk, e->addr, e->port);
		struct cw_snat_entry *r = bpf_map_lookup_elem(&cw_snat_rev, &rk);
		if (r && r->port == fk->sport && cw_addr_eq(r->addr, fk->saddr))
			return e;
		bpf_map_delete_elem(&cw_snat_fwd, fk);
		cw_snat_count(CW_SNAT_STAT_OUT_REPAIRED);
	}

	__u32 zero = 0;
	__u32 pmin = CW_SNAT_DEFAULT_PORT_MIN, pmax = CW_SNAT_DEFAULT_PORT_MAX, probes = CW_SNAT_MAX_PROBES, seed = 0;
	struct cw_snat_config *cfg = bpf_map_lookup_elem(&cw_snat_config, &zero);
	if (cfg) {
		if (cfg->port_min && cfg->port_max >= cfg->port_min) {
			pmin = cfg->port_min;
			pmax = cfg->port_max;
		}
		if (cfg->probes && cfg->probes < CW_SNAT_MAX_PROBES)
			probes = cfg->probes;
		seed = cfg->seed;
	}
	__u32 range = pmax - pmin + 1;
	__u32 start = cw_snat_hash(fk, seed) % range;

	struct cw_snat_entry rv = {};
	cw_copy16(rv.addr, fk->saddr);
	rv.port = fk->sport;
	rv.group = group;
	rv.created_ns = now;
	rv.last_seen_ns = now;
	cw_rev_key(&rk, fk, g->egress_ip, 0);

	int found = 0;
	for (__u32 i = 0; i < CW_SNAT_MAX_PROBES; i++) {
		if (i >= probes || i >= range)
			break;
		__u32 port = pmin + (start + i) % range;
		rk.dport = bpf_htons((__u16)port);
		if (bpf_map_update_elem(&cw_snat_rev, &rk, &rv, BPF_NOEXIST) == 0) {
			found = 1;
			break;
		}
	}
	if (!found) {
		*reason = CW_DROP_SNAT_PORTS_EXHAUSTED;
		return NULL;
	}

	struct cw_snat_entry fv = {};
	cw_copy16(fv.addr, g->egress_ip);
	fv.port = rk.dport;
	fv.group = group;
	fv.created_ns = now;
	fv.last_seen_ns = now;
	if (bpf_map_update_elem(&cw_snat_fwd, fk, &fv, BPF_NOEXIST) != 0) {
		/* Another CPU created this flow between our lookup and now: give our port back, use theirs. */
		bpf_map_delete_elem(&cw_snat_rev, &rk);
		cw_snat_count(CW_SNAT_STAT_RACE_LOST);
	} else {
		cw_snat_count(CW_SNAT_STAT_OUT_NEW_FLOW);
	}
	e = bpf_map_lookup_elem(&cw_snat_fwd, fk);
	if (!e)
		*reason = CW_DROP_SNAT_NO_STATE;
	return e;
}

SEC("classifier")
int cw_snat_out(struct __sk_buff *skb)
{
	__u32 group = cw_mark_group(skb->mark);
	if (!group)
		return TC_ACT_OK;

	struct cw_flow f;
	int r = cw_parse(skb, CW_L3_OFF, &f);
	if (r == CW_PARSE_NOT_IP)
		return TC_ACT_OK;
	if (r != CW_PARSE_OK)
		return cw_drop(CW_DROP_MALFORMED);

	/* From here on the packet is marked for SNAT: anything we cannot translate is dropped, so that no pod
	 * address leaves the gateway. */
	struct cw_egress_group *g = bpf_map_lookup_elem(&cw_egress_groups, &group);
	if (!g || g->family != f.family)
		return cw_drop(CW_DROP_SNAT_NO_STATE);
	if (f.frag == CW_FRAG_LATER)
		return cw_drop(CW_DROP_UNSUPPORTED_L4);
	if (f.proto != IPPROTO_TCP && f.proto != IPPROTO_UDP && !cw_is_echo_request(&f))
		return cw_drop(CW_DROP_UNSUPPORTED_L4);

	struct cw_snat_key fk = {};
	cw_copy16(fk.saddr, f.saddr);
	cw_copy16(fk.daddr, f.daddr);
	fk.sport = f.sport;
	fk.dport = f.dport;
	fk.proto = f.proto;
	fk.family = f.family;

	__u64 now = bpf_ktime_get_ns();
	__u32 reason = CW_DROP_SNAT_NO_STATE;
	struct cw_snat_entry *e = cw_snat_lookup_or_create(&fk, g, group, now, &reason);
	if (!e)
		return cw_drop(reason);
	/* Copy what we write before touching the packet: the helpers below may not keep map values stable. */
	__u8 nat_addr[16];
	cw_copy16(nat_addr, e->addr);
	__be16 nat_port = e->port;
	e->last_seen_ns = now;
	if (f.proto == IPPROTO_TCP) {
		__u8 bits = cw_snat_tcp_bits(f.tcp_flags);
		if ((e->tcp_state | bits) != e->tcp_state)
			e->tcp_state |= bits;
	}

	if (cw_nat_rewrite(skb, &f, 1, f.saddr, nat_addr, f.sport, nat_port))
		return cw_drop(CW_DROP_MALFORMED);
	cw_snat_count(CW_SNAT_STAT_OUT_TRANSLATED);
	return TC_ACT_OK;
}

/* ICMP error types that quote the offending packet. */
static __always_inline int cw_is_icmp_error(const struct cw_flow *f)
{
	if (f->proto == IPPROTO_ICMP)
		return f->icmp_type == 3 || f->icmp_type == 11 || f->icmp_type == 12;
	if (f->proto == IPPROTO_ICMPV6)
		return f->icmp_type >= 1 && f->icmp_type <= 4;
	return 0;
}

/*
 * An ICMP error about a translated packet: it quotes our packet (source = egress address/port) and is
 * addressed to the egress address. Rewrite the outer destination, the quoted source address and the quoted
 * source port back to the pod's, keeping the outer IPv4 checksum, the quoted IPv4 header checksum and the
 * ICMP checksum valid. The quoted transport checksum is left alone (receivers do not check it).
 */
static __always_inline int cw_snat_icmp_error(struct __sk_buff *skb, struct cw_flow *f, __u64 now)
{
	/* outer L3 (<= 60) + ICMP header 8 + quoted IPv4 (<= 60) or IPv6 (40) + 8 bytes of L4. */
	__u32 want = f->l4_off + 8 + 60 + 8;
	if (want > skb->len)
		want = skb->len;
	bpf_skb_pull_data(skb, want);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	__u32 in_l3 = (f->l4_off + 8) & 0xff;
	struct cw_snat_key rk = {};
	__u32 in_l4;
	__u8 in_proto;
	if (f->family == CW_AF_INET) {
		struct iphdr *ip = data + in_l3;
		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
			return TC_ACT_OK;
		in_l4 = (in_l3 + ip->ihl * 4) & 0x1ff;
		in_proto = ip->protocol;
		/* quoted: egress -> remote; the reply key is remote -> egress */
		__builtin_memcpy(rk.saddr, &ip->daddr, 4);
		__builtin_memcpy(rk.daddr, &ip->saddr, 4);
	} else {
		struct ipv6hdr *ip6 = data + in_l3;
		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return TC_ACT_OK;
		in_l4 = in_l3 + sizeof(*ip6);
		in_proto = ip6->nexthdr;
		cw_copy16(rk.saddr, (__u8 *)&ip6->daddr);
		cw_copy16(rk.daddr, (__u8 *)&ip6->saddr);
	}
	__u8 *l4 = data + in_l4;
	if ((void *)(l4 + 8) > data_end)
		return TC_ACT_OK;
	__be16 q_sport, q_dport;
	__u32 q_port_off;
	if (in_proto == IPPROTO_TCP || in_proto == IPPROTO_UDP) {
		__builtin_memcpy(&q_sport, l4, 2);
		__builtin_memcpy(&q_dport, l4 + 2, 2);
		q_port_off = in_l4;
	} else if ((in_proto == IPPROTO_ICMP && l4[0] == 8) || (in_proto == IPPROTO_ICMPV6 && l4[0] == 128)) {
		__builtin_memcpy(&q_sport, l4 + 4, 2);
		q_dport = 0;
		q_port_off = in_l4 + 4;
	} else {
		return TC_ACT_OK;
	}
	/* The error must be about a packet we sent from the address it is addressed to. */
	if (!cw_addr_eq(rk.daddr, f->daddr))
		return TC_ACT_OK;
	rk.sport = q_dport;
	rk.dport = q_sport;
	rk.proto = in_proto;
	rk.family = f->family;
	struct cw_snat_entry *e = bpf_map_lookup_elem(&cw_snat_rev, &rk);
	if (!e) {
		cw_snat_count(CW_SNAT_STAT_IN_NO_STATE);
		return TC_ACT_OK;
	}
	__u8 pod_addr[16];
	cw_copy16(pod_addr, e->addr);
	__be16 pod_port = e->port;
	e->last_seen_ns = now;

	__u32 icmp_csum = f->l4_off + 2;
	__u32 l3 = f->l3_off;
	if (f->family == CW_AF_INET) {
		__be32 o, n;
		__builtin_memcpy(&o, f->daddr, 4);
		__builtin_memcpy(&n, pod_addr, 4);
		/* Outer destination: IPv4 header checksum only (ICMPv4 has no pseudo header). */
		if (bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), o, n, 4) ||
		    bpf_skb_store_bytes(skb, l3 + offsetof(struct iphdr, daddr), &n, 4, 0))
			return cw_drop(CW_DROP_MALFORMED);
		/* Quoted source and its header checksum change together, which leaves the ICMP sum unchanged. */
		if (bpf_l3_csum_replace(skb, in_l3 + offsetof(struct iphdr, check), o, n, 4) ||
		    bpf_skb_store_bytes(skb, in_l3 + offsetof(struct iphdr, saddr), &n, 4, 0))
			return cw_drop(CW_DROP_MALFORMED);
	} else {
		__u8 o[16];
		cw_copy16(o, f->daddr);
		__s64 diff = bpf_csum_diff((__be32 *)o, 16, (__be32 *)pod_addr, 16, 0);
		/* ICMPv6 covers the outer pseudo header (destination) and the quoted source as data. */
		if (bpf_l4_csum_replace(skb, icmp_csum, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_IPV6) ||
		    bpf_l4_csum_replace(skb, icmp_csum, 0, diff, 0) ||
		    bpf_skb_store_bytes(skb, l3 + offsetof(struct ipv6hdr, daddr), pod_addr, 16, 0) ||
		    bpf_skb_store_bytes(skb, in_l3 + offsetof(struct ipv6hdr, saddr), pod_addr, 16, 0))
			return cw_drop(CW_DROP_MALFORMED);
	}
	if (q_sport != pod_port) {
		if (bpf_l4_csum_replace(skb, icmp_csum, q_sport, pod_port, 2) ||
		    bpf_skb_store_bytes(skb, q_port_off, &pod_port, 2, 0))
			return cw_drop(CW_DROP_MALFORMED);
	}
	cw_snat_count(CW_SNAT_STAT_IN_ICMP_ERROR);
	return TC_ACT_OK;
}

SEC("classifier")
int cw_snat_in(struct __sk_buff *skb)
{
	struct cw_flow f;
	int r = cw_parse(skb, CW_L3_OFF, &f);
	if (r == CW_PARSE_NOT_IP)
		return TC_ACT_OK;
	/* Ingress traffic is not ours to police: what we cannot read goes to the kernel untouched, which
	 * validates it as it would without us. */
	if (r != CW_PARSE_OK || f.frag == CW_FRAG_LATER) {
		cw_snat_count(CW_SNAT_STAT_IN_UNTRACKABLE);
		return TC_ACT_OK;
	}
	__u64 now = bpf_ktime_get_ns();
	if (cw_is_icmp_error(&f))
		return cw_snat_icmp_error(skb, &f, now);

	struct cw_snat_key rk = {};
	cw_copy16(rk.saddr, f.saddr);
	cw_copy16(rk.daddr, f.daddr);
	rk.proto = f.proto;
	rk.family = f.family;
	if (f.proto == IPPROTO_TCP || f.proto == IPPROTO_UDP) {
		rk.sport = f.sport;
		rk.dport = f.dport;
	} else if (cw_is_echo_reply(&f)) {
		rk.dport = f.sport; /* the echo identifier is our side's "port" */
	} else {
		return TC_ACT_OK;
	}
	struct cw_snat_entry *e = bpf_map_lookup_elem(&cw_snat_rev, &rk);
	if (!e) {
		cw_snat_count(CW_SNAT_STAT_IN_NO_STATE);
		return TC_ACT_OK;
	}
	__u8 pod_addr[16];
	cw_copy16(pod_addr, e->addr);
	__be16 pod_port = e->port;
	e->last_seen_ns = now;
	if (f.proto == IPPROTO_TCP) {
		__u8 bits = cw_snat_tcp_bits(f.tcp_flags);
		if ((e->tcp_state | bits) != e->tcp_state)
			e->tcp_state |= bits;
	}
	/* The port we rewrite is the destination port, or for echo replies the identifier. */
	__be16 old_port = rk.dport;
	if (cw_nat_rewrite(skb, &f, 0, f.daddr, pod_addr, old_port, pod_port))
		return cw_drop(CW_DROP_MALFORMED);
	cw_snat_count(CW_SNAT_STAT_IN_TRANSLATED);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
