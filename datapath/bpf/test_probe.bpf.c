/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TEST ONLY: never loaded by the agent.
 *
 * BPF_PROG_TEST_RUN cannot hand a program a packet that arrived through a tunnel. This probe stands in for
 * the VXLAN device's decap: it sets the tunnel key the test asks for (skb->cb[0] = VNI, cb[1] = remote
 * IPv4 in host order) and tail-calls the program the test placed in slot 0 of cw_test_progs
 * (cw_from_overlay), which then reads the key as it would on a real VXLAN device.
 */
#include "causeway.h"

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} cw_test_progs SEC(".maps");

#define CW_TEST_TAIL_CALL_FAILED 99

SEC("classifier")
int cw_test_tunnel_probe(struct __sk_buff *skb)
{
	struct bpf_tunnel_key tk = {};
	tk.tunnel_id = skb->cb[0];
	tk.remote_ipv4 = skb->cb[1];
	tk.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), 0) < 0)
		return CW_TEST_TAIL_CALL_FAILED;
	bpf_tail_call(skb, &cw_test_progs, 0);
	return CW_TEST_TAIL_CALL_FAILED;
}

char _license[] SEC("license") = "Dual BSD/GPL";
