/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Egress steering.
 *
 * cw_from_pod: TC ingress on the host side of each pod's veth (the pod's egress). Decides per packet
 * whether it leaves the cluster through an egress gateway, pins the flow to one gateway of the group, marks
 * it CW_MARK_EGRESS | group, and either lets it continue (the gateway is this node: the local SNAT program
 * on the external interface translates it) or sends it to the gateway through the VXLAN collect-metadata
 * device with the group id as VNI.
 *
 * cw_from_overlay: TC ingress on the VXLAN device of gateway nodes. Turns the VNI back into the mark, so
 * SNAT sees the same contract whether the pod was local or remote (see egress_group.h).
 */
#include "maps.h"

#include <linux/if_packet.h>

/* murmur3's finaliser step applied word by word: enough spread for picking 1 of <= 8 gateways. */
static __always_inline __u32 cw_mix(__u32 h, __u32 v)
{
	h ^= v;
	h *= 0xcc9e2d51u;
	h = (h << 15) | (h >> 17);
	h *= 0x1b873593u;
	return h;
}

static __always_inline __u32 cw_hash_tuple(const struct cw_egress_ct_key *k)
{
	const __u32 *s = (const __u32 *)k->saddr;
	const __u32 *d = (const __u32 *)k->daddr;
	__u32 h = 0x5ca1ab1eu;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		h = cw_mix(h, s[i]);
		h = cw_mix(h, d[i]);
	}
	h = cw_mix(h, ((__u32)k->sport << 16) | k->dport);
	h = cw_mix(h, ((__u32)k->family << 8) | k->proto);
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

static __always_inline int cw_group_has(const struct cw_egress_group *g, __u32 n, __be32 gw)
{
#pragma unroll
	for (int i = 0; i < CW_MAX_GATEWAYS; i++) {
		if ((__u32)i < n && g->gateways[i] == gw)
			return 1;
	}
	return 0;
}

/* Longest-prefix match over the prefix lengths in use, longest first: one hash lookup per length. */
static __always_inline struct cw_egress_policy_value *cw_egress_policy_lookup(__u32 class_id, const struct cw_flow *f)
{
	__u32 fam = f->family;
	struct cw_egress_plens *pl = bpf_map_lookup_elem(&cw_egress_plens, &fam);
	if (!pl)
		return 0;
	__u32 n = pl->n;
	const __u32 *d = (const __u32 *)f->daddr;
	__u32 d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
	__u32 max = f->family == CW_AF_INET ? 32 : 128;

	struct cw_egress_policy_key k = {};
	k.class_id = class_id;
	k.family = f->family;
	__u32 *ka = (__u32 *)k.addr;
	for (__u32 i = 0; i < CW_MAX_PLENS; i++) {
		if (i >= n)
			break;
		__u32 plen = pl->len[i];
		if (plen > max)
			continue;
		k.prefixlen = plen;
		ka[0] = cw_mask_word(d0, 0, plen);
		ka[1] = cw_mask_word(d1, 1, plen);
		ka[2] = cw_mask_word(d2, 2, plen);
		ka[3] = cw_mask_word(d3, 3, plen);
		struct cw_egress_policy_value *v = bpf_map_lookup_elem(&cw_egress_policy, &k);
		if (v)
			return v;
	}
	return 0;
}

SEC("classifier")
int cw_from_pod(struct __sk_buff *skb)
{
	struct cw_flow f;
	int r = cw_parse(skb, ETH_HLEN, &f);
	if (r == CW_PARSE_NOT_IP)
		return TC_ACT_OK;
	if (r != CW_PARSE_OK)
		return cw_drop(CW_DROP_MALFORMED);

	/* In-mesh destinations (local or remote-cluster pods and nodes) never leave through a gateway. */
	struct cw_ipcache_value *dst = cw_ipcache_lookup(f.family, f.daddr);
	if (dst && dst->identity != CW_IDENTITY_WORLD)
		return TC_ACT_OK;

	struct cw_egress_src_key sk = {};
	sk.family = f.family;
	cw_copy16(sk.addr, f.saddr);
	__u32 *class_id = bpf_map_lookup_elem(&cw_egress_src, &sk);
	if (!class_id)
		return TC_ACT_OK;

	struct cw_egress_policy_value *pv = cw_egress_policy_lookup(*class_id, &f);
	if (!pv || (pv->flags & CW_EGRESS_F_EXCLUDED))
		return TC_ACT_OK;

	__u32 group_id = pv->group_id & CW_GROUP_ID_MASK;
	struct cw_egress_group *g = bpf_map_lookup_elem(&cw_egress_groups, &group_id);
	if (!g || g->n_gateways == 0)
		return cw_drop(CW_DROP_NO_GATEWAY);
	__u32 n = g->n_gateways;
	if (n > CW_MAX_GATEWAYS)
		n = CW_MAX_GATEWAYS;

	struct cw_egress_ct_key ck = {};
	ck.family = f.family;
	ck.proto = f.proto;
	if (f.frag == CW_FRAG_NONE) {
		ck.sport = f.sport;
		ck.dport = f.dport;
	}
	cw_copy16(ck.saddr, f.saddr);
	cw_copy16(ck.daddr, f.daddr);

	__u64 now = bpf_ktime_get_ns();
	__be32 gw;
	struct cw_egress_ct_value *ct = bpf_map_lookup_elem(&cw_egress_ct, &ck);
	if (ct && ct->group_id == group_id && cw_group_has(g, n, ct->gateway)) {
		/* Pinned: a gateway added to the group since does not move this flow. */
		gw = ct->gateway;
		ct->last_seen_ns = now;
	} else {
		/* New flow, or its gateway left the group (failed over), or the flow moved to another group. */
		__u32 idx = cw_hash_tuple(&ck) % n;
		/* Constant-index reads: the verifier cannot bound a variable index into the map value. */
		gw = g->gateways[0];
#pragma unroll
		for (int i = 1; i < CW_MAX_GATEWAYS; i++) {
			if ((__u32)i == idx)
				gw = g->gateways[i];
		}
		struct cw_egress_ct_value nv = {.gateway = gw, .group_id = group_id, .last_seen_ns = now};
		bpf_map_update_elem(&cw_egress_ct, &ck, &nv, BPF_ANY);
	}

	skb->mark = CW_MARK_EGRESS | group_id;

	struct cw_config *cfg = cw_get_config();
	if (cfg && cfg->node_ipv4 == gw)
		return TC_ACT_OK;
	if (!cfg || cfg->vxlan_ifindex == 0)
		return cw_drop(CW_DROP_TUNNEL_ERROR);

	struct bpf_tunnel_key tk = {};
	tk.remote_ipv4 = bpf_ntohl(gw);
	tk.tunnel_id = group_id;
	tk.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), BPF_F_ZERO_CSUM_TX) < 0)
		return cw_drop(CW_DROP_TUNNEL_ERROR);
	return bpf_redirect(cfg->vxlan_ifindex, 0);
}

SEC("classifier")
int cw_from_overlay(struct __sk_buff *skb)
{
	struct bpf_tunnel_key tk = {};
	/* No IPv4 tunnel metadata: not a steered packet. */
	if (bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), 0) < 0)
		return TC_ACT_OK;
	__u32 id = tk.tunnel_id;
	if (id == 0 || id > CW_GROUP_ID_MASK)
		return TC_ACT_OK;
	/* Only VNIs that name a group we know are egress traffic; other VNIs are left alone. */
	if (!bpf_map_lookup_elem(&cw_egress_groups, &id))
		return TC_ACT_OK;
	skb->mark = CW_MARK_EGRESS | id;
	/* The inner destination MAC is the source node's veth, so the stack would drop the frame as
	 * PACKET_OTHERHOST; it is addressed to this host, to be routed out and SNATed. */
	bpf_skb_change_type(skb, PACKET_HOST);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
