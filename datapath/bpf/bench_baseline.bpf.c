/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * BENCHMARK BASELINE ONLY: never loaded by the agent.
 *
 * A Cilium-style egress lookup (cilium#22805): one LPM trie keyed {prefixlen, saddr, daddr}, queried with
 * prefix 64, one entry per (pod IP x destination CIDR). bench/src/bin/egress-lookup.rs measures it beside
 * cw_from_pod to show what the flat (class, CIDR) keys save. Same tail work as cw_from_pod on a hit (mark,
 * tunnel key, redirect); no ipcache check and no per-flow pin, so it does strictly less work per packet.
 */
#include "causeway.h"

struct cw_bench_baseline_key {
	__u32 prefixlen;  /* 32 (saddr, exact) + destination prefix */
	__be32 saddr;
	__be32 daddr;
};

struct cw_bench_baseline_value {
	__be32 egress_ip;
	__be32 gateway_ip;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cw_bench_baseline_key);
	__type(value, struct cw_bench_baseline_value);
} cw_bench_baseline SEC(".maps");

SEC("classifier")
int cw_bench_baseline_from_pod(struct __sk_buff *skb)
{
	struct cw_flow f;
	int r = cw_parse(skb, ETH_HLEN, &f);
	if (r != CW_PARSE_OK || f.family != CW_AF_INET)
		return TC_ACT_OK;
	struct cw_bench_baseline_key k = {.prefixlen = 64};
	__builtin_memcpy(&k.saddr, f.saddr, 4);
	__builtin_memcpy(&k.daddr, f.daddr, 4);
	struct cw_bench_baseline_value *v = bpf_map_lookup_elem(&cw_bench_baseline, &k);
	if (!v)
		return TC_ACT_OK;
	skb->mark = 0xce000001u;
	struct bpf_tunnel_key tk = {};
	tk.remote_ipv4 = bpf_ntohl(v->gateway_ip);
	tk.tunnel_id = 1;
	tk.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), BPF_F_ZERO_CSUM_TX) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(1, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
