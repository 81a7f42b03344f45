/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Identity policy for traffic arriving from other clusters of the mesh.
 *
 * cw_from_remote: TC ingress on the WireGuard TUN device (an L3 device: the IP header is at offset 0).
 * cw_from_remote_eth: the same on an Ethernet-framed device such as the VXLAN overlay (IP at ETH_HLEN).
 *
 * The source address gives the remote identity through the ipcache (unknown addresses are "world"); the
 * identity policy map, filled by the cross-cluster policy work, decides. Only enforced while the node
 * config's CW_CFG_ENFORCE_POLICY flag is set, so policy can be staged before it bites.
 */
#include "maps.h"

static __always_inline int cw_policy_verdict(__u32 identity, __u16 dport, __u8 proto, __u8 dir)
{
	struct cw_policy_key k = {.identity = identity, .dport = dport, .proto = proto, .direction = dir};
	struct cw_policy_value *v = bpf_map_lookup_elem(&cw_policy, &k);
	if (!v) {
		k.dport = 0;
		v = bpf_map_lookup_elem(&cw_policy, &k);
	}
	if (!v) {
		k.proto = 0;
		v = bpf_map_lookup_elem(&cw_policy, &k);
	}
	return v ? v->verdict : 0;
}

static __always_inline int cw_from_remote_at(struct __sk_buff *skb, __u16 l3_off)
{
	struct cw_flow f;
	int r = cw_parse(skb, l3_off, &f);
	if (r == CW_PARSE_NOT_IP)
		return TC_ACT_OK;
	if (r != CW_PARSE_OK)
		return cw_drop(CW_DROP_MALFORMED);

	struct cw_config *cfg = cw_get_config();
	if (!cfg || !(cfg->flags & CW_CFG_ENFORCE_POLICY))
		return TC_ACT_OK;

	struct cw_ipcache_value *src = cw_ipcache_lookup(f.family, f.saddr);
	__u32 identity = src ? src->identity : CW_IDENTITY_WORLD;
	/* Later fragments carry no ports: only port-wildcard entries can match them. ICMP has dport 0. */
	__u16 dport = f.frag == CW_FRAG_LATER ? 0 : bpf_ntohs(f.dport);
	if (cw_policy_verdict(identity, dport, f.proto, CW_DIR_INGRESS) == CW_VERDICT_ALLOW)
		return TC_ACT_OK;
	/* No entry, or an explicit deny: enforcement is default-deny. */
	return cw_drop(CW_DROP_POLICY_DENIED);
}

SEC("classifier")
int cw_from_remote(struct __sk_buff *skb)
{
	return cw_from_remote_at(skb, 0);
}

SEC("classifier")
int cw_from_remote_eth(struct __sk_buff *skb)
{
	return cw_from_remote_at(skb, ETH_HLEN);
}

char _license[] SEC("license") = "Dual BSD/GPL";
