/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * lb.h: endpoint choice shared by the socket hooks and the tc programs.
 */
#ifndef SVCNAT_LB_H
#define SVCNAT_LB_H

#include "maps.h"

#define NSEC_PER_SEC 1000000000ULL

enum lb_verdict {
	LB_FORWARD = 0, /* an endpoint was chosen */
	LB_REJECT,      /* no endpoint at all: the client gets connection refused */
	LB_DROP,        /* endpoints exist, none for this traffic (Local policy) */
};

/*
 * lb_set returns the endpoint set a frontend leads to. external_client is true
 * for traffic from outside the node and outside the cluster CIDRs; traffic from
 * this node or a pod goes to the cluster set even with externalTrafficPolicy
 * Local, as kube-proxy short-circuits it.
 */
static __always_inline __u8 lb_set(const struct svc_value *sv, int external_client)
{
	if (sv->kind == SVCNAT_KIND_CLUSTER_IP)
		return (sv->flags & SVCNAT_F_INTERNAL_LOCAL) ? SVCNAT_SET_LOCAL : SVCNAT_SET_CLUSTER;
	if (external_client && (sv->flags & SVCNAT_F_EXTERNAL_LOCAL))
		return SVCNAT_SET_LOCAL;
	return SVCNAT_SET_CLUSTER;
}

/*
 * lb_select chooses an endpoint of set for the Service sv, uniformly at
 * random, or the one client used last when session affinity holds, and
 * copies it to out.
 */
static __always_inline enum lb_verdict lb_select(const struct svc_value *sv, __u8 set,
						 struct affinity_key *ak, struct backend *out)
{
	__u16 count = set == SVCNAT_SET_LOCAL ? sv->local_count : sv->cluster_count;
	struct slot_key sk = { .id = sv->id, .set = set };
	struct affinity_value *av;
	struct backend *b;
	__u32 *backend_id;
	__u64 now;

	if (count == 0)
		return sv->cluster_count == 0 ? LB_REJECT : LB_DROP;

	now = bpf_ktime_get_ns();
	if (sv->affinity_timeout) {
		ak->id = sv->id;
		av = bpf_map_lookup_elem(&svcnat_affinity, ak);
		if (av && av->set == set && av->slot < count &&
		    now - av->last_used <= (__u64)sv->affinity_timeout * NSEC_PER_SEC) {
			sk.slot = av->slot;
			backend_id = bpf_map_lookup_elem(&svcnat_slots, &sk);
			/* The slot must still hold that endpoint: an endpoint
			 * removed from the Service is never reached again. */
			if (backend_id && *backend_id == av->backend_id) {
				b = bpf_map_lookup_elem(&svcnat_backends, backend_id);
				if (b) {
					av->last_used = now;
					*out = *b;
					return LB_FORWARD;
				}
			}
		}
	}

	sk.slot = bpf_get_prandom_u32() % count;
	backend_id = bpf_map_lookup_elem(&svcnat_slots, &sk);
	if (!backend_id)
		return LB_REJECT; /* never with ordered writes; refuse rather than guess */
	b = bpf_map_lookup_elem(&svcnat_backends, backend_id);
	if (!b)
		return LB_REJECT;
	*out = *b;
	if (sv->affinity_timeout) {
		struct affinity_value nv = {
			.last_used = now,
			.backend_id = *backend_id,
			.slot = sk.slot,
			.set = set,
		};
		bpf_map_update_elem(&svcnat_affinity, ak, &nv, BPF_ANY);
	}
	return LB_FORWARD;
}

#endif /* SVCNAT_LB_H */
