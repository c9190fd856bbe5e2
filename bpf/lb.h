/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * lb.h: endpoint choice shared by the socket hooks and the tc programs.
 */
#ifndef SVCNAT_LB_H
#define SVCNAT_LB_H

#include "maps.h"

#define NSEC_PER_SEC 1000000000ULL
/* lb_select's slot for live traffic: choose at random (trace.h). */
#define SVCNAT_LB_LIVE 0xffffffff

enum lb_verdict {
	LB_FORWARD = 0, /* an endpoint was chosen */
	LB_REJECT,      /* no endpoint at all: the client gets connection refused */
	LB_DROP,        /* endpoints exist, none for this traffic (Local policy) */
};

/*
 * lb_set returns the endpoint set a frontend leads to. external_client is true
 * for traffic from another host (the tc path); traffic from this node or one
 * of its pods (the socket hooks) goes to the cluster set even with
 * externalTrafficPolicy Local, as kube-proxy short-circuits it.
 */
static __always_inline __u8 lb_set(const struct svc_value *sv, int external_client)
{
	if (sv->kind == SVCNAT_KIND_CLUSTER_IP)
		return (sv->flags & SVCNAT_F_INTERNAL_LOCAL) ? SVCNAT_SET_LOCAL : SVCNAT_SET_CLUSTER;
	if (external_client && (sv->flags & SVCNAT_F_EXTERNAL_LOCAL))
		return SVCNAT_SET_LOCAL;
	return SVCNAT_SET_CLUSTER;
}

/* lb_count is the number of endpoints in set. */
static __always_inline __u16 lb_count(const struct svc_value *sv, __u8 set)
{
	return set == SVCNAT_SET_LOCAL ? sv->local_count : sv->cluster_count;
}

/* lb_empty is the verdict for a set without endpoints. */
static __always_inline enum lb_verdict lb_empty(const struct svc_value *sv)
{
	return sv->cluster_count == 0 ? LB_REJECT : LB_DROP;
}

/*
 * lb_member copies endpoint backend_id to out when it is in set of Service
 * port id (whatever its slot) and returns 1; 0 otherwise. Every function
 * here copies an endpoint to the caller's stack as soon as it is found, and
 * reads a map value once: a hash map element that an update replaced can be
 * reused for another key at once, under a reader still holding it.
 */
static __always_inline int lb_member(__u32 id, __u8 set, __u32 backend_id, struct backend *out)
{
	struct member_key mk = { .id = id, .backend_id = backend_id, .set = set };
	struct backend *b;

	if (!backend_id || !bpf_map_lookup_elem(&svcnat_members, &mk))
		return 0;
	b = bpf_map_lookup_elem(&svcnat_backends, &backend_id);
	if (!b)
		return 0;
	*out = *b;
	return 1;
}

/*
 * lb_slot copies the endpoint in slot of set of Service port id to out and
 * its id to backend_id, and returns 1; 0 when the set has no endpoint any
 * more.
 *
 * A reader that loaded a frontend's count just before a write shrank it
 * can pick a slot the write has deleted since, or a slot whose backend it
 * has deleted. It then takes slot 0 of the same set instead: slot 0 exists
 * whenever the set has an endpoint, because the agent writes slots before
 * the count that covers them and deletes them only after the count that no
 * longer does (pkg/ebpf/reconcile.go, apply), and deletes a backend only
 * after no slot names it. So only a set that really emptied misses twice,
 * and its frontend then rejects. Slot 0 rather than a fresh lookup of the
 * frontend and a new random slot below its new count: that needs the
 * frontend's key here and one more lookup, and can miss again under the
 * next write; slot 0 needs neither. The cost: the readers racing a write
 * (nanoseconds, or a preempted hook) all go to slot 0's endpoint, and one
 * racing a frontend given to another Service port still refuses.
 *
 * A global function: the verifier checks it once, not again on every path
 * of the caller that reaches it (the retry doubles them: 30,000 -> 71,000
 * instructions per connect hook when inline).
 */
__attribute__((noinline)) int lb_slot(__u32 id, __u32 set, __u32 slot, struct backend *out, __u32 *backend_id)
{
	struct slot_key sk = { .id = id, .slot = slot, .set = set };

	if (!out || !backend_id) /* the verifier checks a global function for any pointers */
		return 0;
	for (int try = 0; try < 2; try++) {
		__u32 *v = bpf_map_lookup_elem(&svcnat_slots, &sk);
		struct backend *b;
		__u32 bid;

		if (v) {
			bid = *v;
			b = bpf_map_lookup_elem(&svcnat_backends, &bid);
			if (b) {
				*out = *b;
				*backend_id = bid;
				return 1;
			}
		}
		sk.slot = 0;
	}
	return 0;
}

/*
 * lb_affinity copies to out the endpoint client ak was sent to last, and its
 * id to backend_id, and returns 1 when session affinity holds: within the
 * timeout, and the endpoint still a member of set (an endpoint removed from
 * the Service is never reached again; adding or removing others does not
 * matter); 0 otherwise. touch refreshes the entry's last use (0 for a
 * trace, which changes nothing), before the membership check: an entry
 * whose endpoint left is overwritten by the new choice anyway.
 */
static __always_inline int lb_affinity(const struct svc_value *sv, __u8 set, struct affinity_key *ak,
				       __u64 now, struct backend *out, __u32 *backend_id, int touch)
{
	struct affinity_value *av;
	__u32 bid;

	if (!sv->affinity_timeout)
		return 0;
	ak->id = sv->id;
	av = bpf_map_lookup_elem(&svcnat_affinity, ak);
	if (!av || av->set != set || now - av->last_used > (__u64)sv->affinity_timeout * NSEC_PER_SEC)
		return 0;
	bid = av->backend_id;
	if (touch)
		av->last_used = now;
	if (!lb_member(sv->id, set, bid, out))
		return 0;
	*backend_id = bid;
	return 1;
}

/* lb_pin records that client ak was sent to endpoint backend_id. */
static __always_inline void lb_pin(const struct svc_value *sv, __u8 set, struct affinity_key *ak,
				   __u64 now, __u32 backend_id)
{
	struct affinity_value nv = { .last_used = now, .backend_id = backend_id, .set = set };

	if (!sv->affinity_timeout)
		return;
	ak->id = sv->id;
	bpf_map_update_elem(&svcnat_affinity, ak, &nv, BPF_ANY);
}

/*
 * counter_add adds to the counters of Service port id (backend_id 0) or of
 * one of its endpoints on this CPU, making the row when it is missing (the
 * agent deletes the rows of what is gone). Never fails the caller: a full
 * map loses the count, not the packet.
 */
static __always_inline void counter_add(__u32 id, __u32 backend_id, __u64 connections, __u64 packets,
					__u64 bytes)
{
	struct counter_key k = { .id = id, .backend_id = backend_id };
	struct counter_value *c = bpf_map_lookup_elem(&svcnat_counters, &k);

	if (!c) {
		struct counter_value v = { .connections = connections, .packets = packets, .bytes = bytes };

		if (!bpf_map_update_elem(&svcnat_counters, &k, &v, BPF_NOEXIST))
			return;
		c = bpf_map_lookup_elem(&svcnat_counters, &k); /* made by another CPU meanwhile */
		if (!c)
			return;
	}
	c->connections += connections;
	c->packets += packets;
	c->bytes += bytes;
}

/* count_connection counts a new connection of Service port id to endpoint
 * backend_id. A global function: the verifier checks it once, not again
 * on every path of the caller that reaches it. */
__attribute__((noinline)) int count_connection(__u32 id, __u32 backend_id)
{
	counter_add(id, 0, 1, 0, 0);
	counter_add(id, backend_id, 1, 0, 0);
	return 0;
}

/*
 * lb_select chooses an endpoint of set for the Service sv, uniformly at
 * random, or the one client used last when session affinity holds, and
 * copies it to out and its id to backend_id. Written out with one scratch
 * key, not through the helpers above: the tc programs have no stack to
 * spare. slot is SVCNAT_LB_LIVE for live traffic; a trace (trace.h) names
 * the slot to take instead of a random one, learns in *pinned whether
 * affinity chose, and writes nothing. A slot a concurrent write removed
 * gives slot 0 (lb_slot), as on the socket path.
 */
static __always_inline enum lb_verdict lb_select(const struct svc_value *sv, __u8 set,
						 struct affinity_key *ak, struct backend *out,
						 __u32 *backend_id, __u32 slot, __u8 *pinned)
{
	__u16 count = lb_count(sv, set);
	union {
		struct member_key mk;
		struct affinity_value nv;
	} k;
	struct affinity_value *av;
	struct backend *b;
	__u64 now;
	int live = slot == SVCNAT_LB_LIVE;

	if (count == 0)
		return lb_empty(sv);
	now = bpf_ktime_get_ns();
	if (sv->affinity_timeout) {
		ak->id = sv->id;
		av = bpf_map_lookup_elem(&svcnat_affinity, ak);
		if (av && av->set == set &&
		    now - av->last_used <= (__u64)sv->affinity_timeout * NSEC_PER_SEC) {
			*backend_id = av->backend_id;
			if (live)
				av->last_used = now;
			k.mk = (struct member_key){ .id = sv->id, .backend_id = *backend_id, .set = set };
			b = bpf_map_lookup_elem(&svcnat_members, &k.mk) ?
				    bpf_map_lookup_elem(&svcnat_backends, backend_id) : 0;
			if (b) {
				*out = *b;
				if (!live)
					*pinned = 1;
				return LB_FORWARD;
			}
		}
	}
	if (live)
		slot = bpf_get_prandom_u32();
	if (!lb_slot(sv->id, set, slot % count, out, backend_id))
		return LB_REJECT; /* the set emptied while we read it */
	if (sv->affinity_timeout && live) {
		k.nv = (struct affinity_value){ .last_used = now, .backend_id = *backend_id, .set = set };
		bpf_map_update_elem(&svcnat_affinity, ak, &k.nv, BPF_ANY);
	}
	return LB_FORWARD;
}

#endif /* SVCNAT_LB_H */
