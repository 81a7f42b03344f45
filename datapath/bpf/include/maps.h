/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The maps shared by the steering and policy programs: node config, ipcache, egress policy (flat keys),
 * the per-flow gateway pin, and the identity policy. All pinned by name, so every object loaded with the
 * same pin directory (/sys/fs/bpf/causeway) shares one instance, and the agent can restart without
 * emptying them.
 *
 * The Rust mirrors live in datapath/src/bpf/types.rs; tests/bpf_layout.rs compares both through BTF.
 */
#pragma once

#include "causeway.h"
#include "egress_group.h"

/* ---- node config (array, one entry at index 0) ---- */

#define CW_CFG_ENFORCE_POLICY 0x1u  /* cw_from_remote drops traffic the identity policy does not allow */

struct cw_config {
	__be32 node_ipv4;      /* this node's underlay IPv4: a gateway equal to it is "local" */
	__u32 vxlan_ifindex;   /* VXLAN collect-metadata device that carries steered packets */
	__u32 flags;           /* CW_CFG_* */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cw_config);
	CW_PIN;
} cw_config SEC(".maps");

/* ---- ipcache: IP/prefix -> identity (LPM, both families in one trie) ---- */

/* Reserved identity for any address the ipcache does not know (Cilium's reserved:world is 2 as well). */
#define CW_IDENTITY_WORLD 2u

#define CW_IPCACHE_F_NODE 0x1u            /* the prefix is a node address, not a pod */
#define CW_IPCACHE_F_REMOTE_CLUSTER 0x2u  /* the entry came from another cluster of the mesh */

/* prefixlen counts bits after the prefixlen field: 32 (family + pad, always matched) + the address prefix. */
struct cw_ipcache_key {
	__u32 prefixlen;
	__u8 family;  /* CW_AF_INET / CW_AF_INET6 */
	__u8 pad[3];
	__u8 addr[16];
};

struct cw_ipcache_value {
	__u32 identity;
	__u16 cluster_id;
	__u16 flags;             /* CW_IPCACHE_F_* */
	__be32 tunnel_endpoint;  /* underlay IPv4 of the node hosting the address; 0 if none */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 131072);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cw_ipcache_key);
	__type(value, struct cw_ipcache_value);
	CW_PIN;
} cw_ipcache SEC(".maps");

#define CW_IPCACHE_FIXED_BITS 32

static __always_inline struct cw_ipcache_value *cw_ipcache_lookup(__u8 family, const __u8 *addr)
{
	struct cw_ipcache_key k = {};
	k.prefixlen = CW_IPCACHE_FIXED_BITS + (family == CW_AF_INET ? 32 : 128);
	k.family = family;
	cw_copy16(k.addr, addr);
	return bpf_map_lookup_elem(&cw_ipcache, &k);
}

/* ---- egress policy: pod IP -> source class; (class, destination prefix) -> group ----
 *
 * Pods selected by the same set of egress policies share a class id, so the policy map holds
 * classes x CIDRs entries instead of pods x CIDRs. Only this node's pods are in cw_egress_src (cw_from_pod
 * runs on their veths).
 *
 * The policy map is a hash keyed by the masked prefix, not an LPM trie: a trie's walk grows with the number
 * of entries (about 20 node visits at 100k), a hash lookup does not. Longest-prefix match is done by trying
 * the prefix lengths in use (cw_egress_plens, a list per family) from the longest down; the first hit wins.
 * So a packet costs one hash lookup for the pod plus one per distinct prefix length in use (a handful in
 * practice), whatever the number of pods, classes or CIDRs.
 */

struct cw_egress_src_key {
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cw_egress_src_key);
	__type(value, __u32);  /* source class id, never 0 */
	CW_PIN;
} cw_egress_src SEC(".maps");

#define CW_EGRESS_F_EXCLUDED 0x1u  /* an excludedCIDR: matching traffic is not steered */

/* addr is the destination masked to prefixlen (host bits zero). */
struct cw_egress_policy_key {
	__u32 class_id;
	__u8 family;
	__u8 prefixlen;  /* 0..32 (IPv4) or 0..128 (IPv6) */
	__u8 pad[2];
	__u8 addr[16];
};

struct cw_egress_policy_value {
	__u32 group_id;  /* key of cw_egress_groups; 0 for excluded entries */
	__u32 flags;     /* CW_EGRESS_F_* */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cw_egress_policy_key);
	__type(value, struct cw_egress_policy_value);
	CW_PIN;
} cw_egress_policy SEC(".maps");

/* Prefix lengths present in cw_egress_policy for a family (key CW_AF_INET / CW_AF_INET6), longest first.
 * A hash map, so the agent's update replaces the whole list at once (readers see the old or the new list).
 * A stale length only costs one missed lookup; a missing one hides entries, so the agent adds a length before
 * inserting entries of it and drops it only after the last such entry is gone. */
#define CW_MAX_PLENS 129

struct cw_egress_plens {
	__u8 n;
	__u8 pad[3];
	__u8 len[132];  /* len[0..n], descending */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct cw_egress_plens);
	CW_PIN;
} cw_egress_plens SEC(".maps");

/* Mask 32-bit word `word` (0..3) of an address to a prefix of `plen` bits; network order in and out. */
static __always_inline __u32 cw_mask_word(__u32 w, __u32 word, __u32 plen)
{
	__u32 lo = word * 32;
	if (plen >= lo + 32)
		return w;
	if (plen <= lo)
		return 0;
	return w & bpf_htonl(0xffffffffu << (lo + 32 - plen));
}

/* ---- per-flow gateway pin (LRU) ---- */

/* Unfragmented packets use the 5-tuple. Fragments (first or later) use the 3-tuple with ports 0, so every
 * fragment of a datagram follows the same gateway even though later fragments carry no ports. */
struct cw_egress_ct_key {
	__u8 family;
	__u8 proto;
	__be16 sport;
	__be16 dport;
	__u16 pad;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct cw_egress_ct_value {
	__be32 gateway;     /* pinned gateway node (underlay IPv4) */
	__u32 group_id;
	__u64 last_seen_ns; /* bpf_ktime_get_ns() of the last packet */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct cw_egress_ct_key);
	__type(value, struct cw_egress_ct_value);
	CW_PIN;
} cw_egress_ct SEC(".maps");

/* ---- identity policy for traffic from remote clusters ---- */

#define CW_DIR_INGRESS 0
#define CW_DIR_EGRESS 1

#define CW_VERDICT_ALLOW 1
#define CW_VERDICT_DENY 2

/* Wildcards: dport 0 = any port, proto 0 = any protocol. Lookups try {id, port, proto}, then
 * {id, 0, proto}, then {id, 0, 0}; the first entry found decides. */
struct cw_policy_key {
	__u32 identity;  /* remote identity */
	__u16 dport;     /* host byte order */
	__u8 proto;
	__u8 direction;  /* CW_DIR_* */
};

struct cw_policy_value {
	__u8 verdict;  /* CW_VERDICT_* */
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cw_policy_key);
	__type(value, struct cw_policy_value);
	CW_PIN;
} cw_policy SEC(".maps");

static __always_inline struct cw_config *cw_get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&cw_config, &zero);
}
