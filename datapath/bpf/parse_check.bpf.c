/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Compile check of the shared header; replaced by the real programs. */
#include "causeway.h"

SEC("classifier")
int cw_parse_only(struct __sk_buff *skb)
{
	struct cw_flow f;
	int r = cw_parse(skb, ETH_HLEN, &f);
	if (r == CW_PARSE_MALFORMED)
		return cw_drop(CW_DROP_MALFORMED);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
