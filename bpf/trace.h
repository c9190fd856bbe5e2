/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * trace.h: what `svcnat trace` asks the datapath and what it answers.
 *
 * A trace runs the datapath's own code on a made-up connection
 * (BPF_PROG_TEST_RUN) and must change no kernel state: no conntrack entry,
 * no affinity entry or refresh, no counter, no reject rate-limit credit.
 *
 * - Traffic from outside (tc): the loaded tc ingress program itself runs
 *   on a synthesized first packet whose skb mark is SVCNAT_TRACE_MARK and
 *   cb[0] SVCNAT_TRACE_MAGIC (together 64 bits no packet from the wire
 *   carries: the mark of a received packet is set on this node only). The
 *   program then takes cb[1] as the slot to choose instead of a random one,
 *   stops before anything it would write, and answers in cb[]
 *   (trace_out below).
 * - Sockets on the node (connect hooks): cgroup sock_addr programs cannot
 *   be test-run, so trace.c's svcnat_trace_connect, a syscall program built
 *   from the same lb.h functions the hooks use (lb_set, lb_count, lb_empty,
 *   lb_affinity, lb_slot), answers for a new socket.
 */
#ifndef SVCNAT_TRACE_H
#define SVCNAT_TRACE_H

#include "lb.h"

enum trace_mark {
	SVCNAT_TRACE_MARK = 0x53767472,  /* "Svtr" */
	SVCNAT_TRACE_MAGIC = 0x74726163, /* "trac" */
};

/* What the datapath would do with the traced connection. */
enum trace_verdict {
	TRACE_NOT_SERVICE = 1, /* no frontend at that address, port and protocol */
	TRACE_FLOW_EXISTS,     /* conntrack tracks the flow: the kernel translates it as before */
	TRACE_NOT_SYN,         /* TCP without SYN and without a flow: goes to the stack */
	TRACE_SOURCE_RANGE,    /* dropped: outside loadBalancerSourceRanges */
	TRACE_REJECT,          /* no endpoint at all: refused */
	TRACE_NO_LOCAL,        /* dropped: Local policy without a local endpoint */
	TRACE_NO_ROUTE,        /* dropped: no route to masquerade toward the endpoint */
	TRACE_FORWARD,         /* translated to the endpoint */
};

/* trace_out flags */
enum trace_flag {
	TRACE_F_PINNED = 0x1,     /* session affinity chose the endpoint */
	TRACE_F_MASQUERADE = 0x2, /* the flow is masqueraded */
};

/* svcnat_trace_connect's context: the question, then the answer. */
struct trace_connect {
	struct svc_key key;   /* in: the address connected to */
	__u32 pad0;
	__u64 netns_cookie;   /* in: the client's network namespace (affinity key) */
	__u32 slot;           /* in: the slot to choose without affinity */
	enum trace_verdict verdict; /* out */
	__u32 id;             /* out: ServicePort id */
	__u32 backend_id;     /* out */
	__u16 count;          /* out: endpoints in set */
	__u8 set;             /* out: SVCNAT_SET_* */
	__u8 pinned;          /* out: session affinity chose the endpoint */
	__u32 pad;
};

/* is_trace reports whether skb is a trace's synthesized packet. */
static __always_inline int is_trace(const struct __sk_buff *skb)
{
	return skb->mark == SVCNAT_TRACE_MARK && skb->cb[0] == SVCNAT_TRACE_MAGIC;
}

/*
 * trace_out answers a trace in skb->cb and lets the packet go on: cb[0] the
 * verdict | set << 8 | flags << 16, cb[1] the endpoint's backend id, cb[2]
 * the number of endpoints in the set, cb[3] the ServicePort id, cb[4] the
 * masquerade address (IPv4; 0 for IPv6).
 */
static __always_inline int trace_out(struct __sk_buff *skb, __u8 verdict, __u8 set, __u8 flags,
				     __u32 backend_id, __u32 count, __u32 id, __u32 snat4)
{
	skb->cb[0] = verdict | (__u32)set << 8 | (__u32)flags << 16;
	skb->cb[1] = backend_id;
	skb->cb[2] = count;
	skb->cb[3] = id;
	skb->cb[4] = snat4;
	return -1; /* TCX_NEXT */
}

#endif /* SVCNAT_TRACE_H */
