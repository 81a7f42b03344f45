/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The contract between egress steering (source node) and SNAT (gateway node).
 *
 * The source node's classifier picks a policy group for a flow and marks the packet with
 * CW_MARK_EGRESS | group id. If the chosen gateway is another node, the packet is sent to it through the
 * VXLAN collect-metadata device with the group id as the VNI, and the gateway's overlay classifier
 * restores the same mark from the VNI. The SNAT classifier on the gateway's external interface reads
 * the mark, looks up the group, and translates the source to the group's egress IP. Replies are
 * reverse-translated on the way in and routed back to the pod's node by the kernel's encap routes.
 */
#pragma once

#include "causeway.h"

#define CW_MARK_EGRESS 0xce000000u
#define CW_MARK_MASK 0xff000000u
#define CW_GROUP_ID_MASK 0x00ffffffu
#define CW_MAX_GATEWAYS 8

struct cw_egress_group {
	__u8 egress_ip[16];   /* source address after SNAT; IPv4 in the first 4 bytes */
	__u8 family;          /* CW_AF_INET or CW_AF_INET6: the family of the traffic this group serves */
	__u8 n_gateways;      /* valid entries in gateways[], at most CW_MAX_GATEWAYS; 0 = no healthy gateway */
	__u16 pad;
	__be32 gateways[CW_MAX_GATEWAYS];  /* gateway node IPs on the underlay, in the controller's order */
};

/* group id (24 bits) -> group; written by the node agent from the egress-gw controller's assignments. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct cw_egress_group);
	CW_PIN;
} cw_egress_groups SEC(".maps");

static __always_inline __u32 cw_mark_group(__u32 mark)
{
	return (mark & CW_MARK_MASK) == CW_MARK_EGRESS ? (mark & CW_GROUP_ID_MASK) : 0;
}
