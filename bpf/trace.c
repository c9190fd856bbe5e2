//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * trace.c is loaded by `svcnat trace` only, against the pinned maps, and
 * never attached: its syscall program answers, for a new socket on the node,
 * what the connect hooks (sock.h) would do, with the same lb.h functions.
 * cgroup sock_addr programs cannot be test-run (trace.h).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>

#include "trace.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/*
 * svcnat_trace_connect follows xlate() (sock.h) for a socket without
 * storage (a new one): the endpoint set for traffic from the node, the
 * verdict without endpoints, the endpoint affinity names for the client's
 * network namespace (not refreshed), else the endpoint in slot c->slot
 * (slot 0 when a concurrent write removed it, as the hooks take).
 */
SEC("syscall")
int svcnat_trace_connect(struct trace_connect *c)
{
	struct affinity_key ak = { .origin = SVCNAT_AFFINITY_NETNS };
	struct svc_key key = c->key;
	__u64 netns = c->netns_cookie;
	struct svc_value sv, *p;
	struct backend b;
	__u32 bid = 0;
	__u16 count;
	__u8 set;

	p = bpf_map_lookup_elem(&svcnat_services, &key);
	if (!p) {
		c->verdict = TRACE_NOT_SERVICE;
		return 0;
	}
	sv = *p;
	c->id = sv.id;
	/* Sockets on the node (host and pods) are never external clients. */
	set = lb_set(&sv, 0);
	count = lb_count(&sv, set);
	c->set = set;
	c->count = count;
	if (count == 0) {
		c->verdict = lb_empty(&sv) == LB_REJECT ? TRACE_REJECT : TRACE_NO_LOCAL;
		return 0;
	}
	__builtin_memcpy(ak.client, &netns, sizeof(netns));
	if (lb_affinity(&sv, set, &ak, bpf_ktime_get_ns(), &b, &bid, 0))
		c->pinned = 1;
	else if (!lb_slot(sv.id, set, c->slot % count, &b, &bid)) {
		c->verdict = TRACE_REJECT; /* the set emptied while we read it */
		return 0;
	}
	c->backend_id = bid;
	c->verdict = TRACE_FORWARD;
	return 0;
}

/* Never called: brings trace.h's enums into the BTF for bpf2go -type (see
 * svcnat_enums in svcnat.c). */
static __attribute__((used)) int trace_enums(enum trace_mark m, enum trace_flag f)
{
	return m + f;
}
