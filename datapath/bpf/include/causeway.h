/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Shared by every Causeway eBPF program: packet parsing into a flow tuple, address helpers, the drop
 * reasons and the shared counters map. Each .bpf.c includes this once.
 *
 * Addresses are kept as 16 bytes in network order; IPv4 uses the first 4 bytes and zeroes the rest, so
 * one key layout serves both families.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* linux/icmp.h drags in glibc's socket headers, which do not build for the BPF target. ICMP and
 * ICMPv6 share this layout for the fields we use. */
struct cw_icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};

#define CW_AF_INET 4
#define CW_AF_INET6 6

/* Pin shared maps by name under the loader's pin directory (/sys/fs/bpf/causeway in production). */
#define CW_PIN __uint(pinning, LIBBPF_PIN_BY_NAME)

enum cw_parse_result {
	CW_PARSE_OK = 0,
	CW_PARSE_NOT_IP = 1,     /* not IPv4/IPv6 (ARP, LLDP, ...): not ours, pass it */
	CW_PARSE_MALFORMED = 2,  /* truncated or invalid IP/L4 header */
};

enum cw_frag {
	CW_FRAG_NONE = 0,
	CW_FRAG_FIRST = 1,  /* first fragment: carries the L4 header */
	CW_FRAG_LATER = 2,  /* later fragment: no L4 header, ports unknown */
};

struct cw_flow {
	__u8 family;     /* CW_AF_INET or CW_AF_INET6 */
	__u8 proto;      /* IPPROTO_*, after IPv6 extension headers */
	__u8 frag;       /* enum cw_frag */
	__u8 tcp_flags;  /* byte 13 of the TCP header (FIN=1 SYN=2 RST=4 ACK=16) */
	__be16 sport;    /* ICMP/ICMPv6 echo: the identifier; 0 when unknown */
	__be16 dport;
	__u16 l3_off;    /* offset of the IP header from skb->data */
	__u16 l4_off;    /* offset of the L4 header; 0 for later fragments */
	__u8 icmp_type;  /* ICMP/ICMPv6 type, else 0 */
	__u8 pad[3];
	__u8 saddr[16];
	__u8 daddr[16];
};

/* Why a packet was dropped; index into the counters map, read by the agent's metrics. */
enum cw_drop_reason {
	CW_DROP_MALFORMED = 0,
	CW_DROP_POLICY_DENIED = 1,
	CW_DROP_NO_GATEWAY = 2,
	CW_DROP_SNAT_PORTS_EXHAUSTED = 3,
	CW_DROP_SNAT_NO_STATE = 4,
	CW_DROP_TUNNEL_ERROR = 5,
	CW_DROP_UNSUPPORTED_L4 = 6,
	CW_DROP_MAX = 16,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CW_DROP_MAX);
	__type(key, __u32);
	__type(value, __u64);
	CW_PIN;
} cw_drops SEC(".maps");

static __always_inline int cw_drop(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&cw_drops, &reason);
	if (c)
		*c += 1;
	return TC_ACT_SHOT;
}

static __always_inline void cw_copy16(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, 16);
}

#define CW_MAX_IPV6_EXT 4

/*
 * Parse the packet at l3_off into *f. skb->protocol tells the family, so the same code serves Ethernet
 * devices (l3_off = ETH_HLEN) and L3 devices (l3_off = 0). Never touches the packet.
 */
static __always_inline int cw_parse(struct __sk_buff *skb, __u16 l3_off, struct cw_flow *f)
{
	__builtin_memset(f, 0, sizeof(*f));
	__u16 proto = bpf_ntohs(skb->protocol);
	if (proto != ETH_P_IP && proto != ETH_P_IPV6)
		return CW_PARSE_NOT_IP;

	/* Make the headers we read linear; 128 bytes covers IPv6 + 4 small extension headers + TCP. */
	__u32 want = l3_off + 128;
	if (want > skb->len)
		want = skb->len;
	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	f->l3_off = l3_off;
	__u32 l4_off;
	__u8 l4_proto;

	if (proto == ETH_P_IP) {
		struct iphdr *ip = data + l3_off;
		if ((void *)(ip + 1) > data_end)
			return CW_PARSE_MALFORMED;
		if (ip->version != 4 || ip->ihl < 5)
			return CW_PARSE_MALFORMED;
		__u32 hlen = ip->ihl * 4;
		if (bpf_ntohs(ip->tot_len) < hlen)
			return CW_PARSE_MALFORMED;
		if ((void *)ip + hlen > data_end)
			return CW_PARSE_MALFORMED;
		f->family = CW_AF_INET;
		__builtin_memcpy(f->saddr, &ip->saddr, 4);
		__builtin_memcpy(f->daddr, &ip->daddr, 4);
		l4_proto = ip->protocol;
		__u16 frag = bpf_ntohs(ip->frag_off);
		if (frag & 0x1fff) {
			f->frag = CW_FRAG_LATER;
			f->proto = l4_proto;
			return CW_PARSE_OK;
		}
		if (frag & 0x2000)
			f->frag = CW_FRAG_FIRST;
		l4_off = l3_off + hlen;
	} else {
		struct ipv6hdr *ip6 = data + l3_off;
		if ((void *)(ip6 + 1) > data_end)
			return CW_PARSE_MALFORMED;
		if (ip6->version != 6)
			return CW_PARSE_MALFORMED;
		f->family = CW_AF_INET6;
		__builtin_memcpy(f->saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->daddr, &ip6->daddr, 16);
		l4_proto = ip6->nexthdr;
		l4_off = l3_off + sizeof(*ip6);
#pragma unroll
		for (int i = 0; i < CW_MAX_IPV6_EXT; i++) {
			if (l4_proto != IPPROTO_HOPOPTS && l4_proto != IPPROTO_ROUTING && l4_proto != IPPROTO_DSTOPTS &&
			    l4_proto != IPPROTO_FRAGMENT && l4_proto != IPPROTO_AH)
				break;
			__u8 *ext = data + l4_off;
			if ((void *)(ext + 8) > data_end)
				return CW_PARSE_MALFORMED;
			if (l4_proto == IPPROTO_FRAGMENT) {
				__u16 off = ((__u16)ext[2] << 8) | ext[3];
				l4_proto = ext[0];
				l4_off += 8;
				if (off & 0xfff8) {
					f->frag = CW_FRAG_LATER;
					f->proto = l4_proto;
					return CW_PARSE_OK;
				}
				if (off & 1)
					f->frag = CW_FRAG_FIRST;
				continue;
			}
			__u32 len = l4_proto == IPPROTO_AH ? ((__u32)ext[1] + 2) * 4 : ((__u32)ext[1] + 1) * 8;
			l4_proto = ext[0];
			l4_off += len;
		}
		if (l4_off > 0xffff)
			return CW_PARSE_MALFORMED;
	}

	f->proto = l4_proto;
	f->l4_off = l4_off;
	void *l4 = data + (l4_off & 0xffff);
	switch (l4_proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end || th->doff < 5)
			return CW_PARSE_MALFORMED;
		f->sport = th->source;
		f->dport = th->dest;
		f->tcp_flags = ((__u8 *)th)[13];
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return CW_PARSE_MALFORMED;
		f->sport = uh->source;
		f->dport = uh->dest;
		break;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		struct cw_icmphdr *ih = l4;
		if ((void *)(ih + 1) > data_end)
			return CW_PARSE_MALFORMED;
		f->icmp_type = ih->type;
		/* Echo request/reply (ICMP 8/0, ICMPv6 128/129) carry an identifier that NAT treats as a port. */
		if (ih->type == 8 || ih->type == 0 || ih->type == 128 || ih->type == 129)
			f->sport = ih->id;
		break;
	}
	default:
		break;
	}
	return CW_PARSE_OK;
}
