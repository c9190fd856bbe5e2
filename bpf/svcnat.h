/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * svcnat.h defines every BPF map key and value svcnat uses, once, for the BPF
 * programs and (through bpf2go -type) for the Go side in pkg/ebpf.
 *
 * Addresses are 16 bytes in network order: IPv6 as is, IPv4 as the IPv4-mapped
 * IPv6 address ::ffff:a.b.c.d, so one map serves both families and a
 * dual-stack socket connecting to ::ffff:a.b.c.d finds the IPv4 Service.
 * Ports are in network byte order. All padding is explicit so that the Go
 * types have no hidden holes and map keys hash the same on both sides.
 */
#ifndef SVCNAT_H
#define SVCNAT_H

#include <linux/types.h>

/*
 * Values pkg/ebpf uses too are enums, not #defines, so that they reach the
 * BTF and bpf2go -type generates them: one definition for both sides.
 */

/* Frontend kinds (svc_value.kind), as model.FrontendKind. */
enum frontend_kind {
	SVCNAT_KIND_CLUSTER_IP = 1,
	SVCNAT_KIND_NODE_PORT = 2,
	SVCNAT_KIND_EXTERNAL_IP = 3,
	SVCNAT_KIND_LOAD_BALANCER = 4,
};

/* svc_value.flags */
enum svc_flag {
	SVCNAT_F_INTERNAL_LOCAL = 0x1, /* internalTrafficPolicy: Local */
	SVCNAT_F_EXTERNAL_LOCAL = 0x2, /* externalTrafficPolicy: Local */
	SVCNAT_F_SOURCE_RANGES = 0x4,  /* loadBalancerSourceRanges set: see source_ranges */
};

/* Endpoint sets (slot_key.set). */
enum endpoint_set {
	SVCNAT_SET_CLUSTER = 0,
	SVCNAT_SET_LOCAL = 1,
	/* Memberships only (no slots): the endpoints of a UDP Service port that
	 * still serve, terminating ones included. An unconnected UDP socket keeps
	 * such an endpoint until it stops serving, as kube-proxy keeps the
	 * conntrack entry of a flow to it. */
	SVCNAT_SET_SERVING = 2,
};

/* backend.flags */
enum backend_flag {
	SVCNAT_BACKEND_LOCAL = 0x1, /* the endpoint runs on this node */
};

/* affinity_key.origin */
#define SVCNAT_AFFINITY_NETNS 0  /* client is a network namespace cookie (socket hooks) */
#define SVCNAT_AFFINITY_ADDR 1   /* client is an address (tc) */

/* One frontend of a Service port: the lookup key of every program. */
struct svc_key {
	__u8 addr[16];
	__u16 port;
	__u8 proto; /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP */
	__u8 pad;
};

/*
 * What a frontend leads to. Every frontend of a Service port carries the same
 * id, counts and flags; kind says which endpoint set applies. Rewriting this
 * value is the one atomic step that switches a Service to new counts.
 */
struct svc_value {
	__u32 id;             /* ServicePort id: svc_info and slots key */
	__u16 cluster_count;  /* slots [0, cluster_count) of SVCNAT_SET_CLUSTER */
	__u16 local_count;    /* slots [0, local_count) of SVCNAT_SET_LOCAL */
	__u8 kind;            /* SVCNAT_KIND_* */
	__u8 flags;           /* SVCNAT_F_* */
	__u16 pad;
	__u32 affinity_timeout; /* seconds; 0 means no session affinity */
};

/* The endpoint in position slot of one endpoint set of one Service port. */
struct slot_key {
	__u32 id;
	__u16 slot;
	__u8 set; /* SVCNAT_SET_* */
	__u8 pad;
};

/* An endpoint, shared by every slot that names it; value of backends[id]. */
struct backend {
	__u8 addr[16];
	__u16 port;
	__u8 flags; /* SVCNAT_BACKEND_* */
	__u8 pad;
};

/*
 * What the datapath does not need but Dump does to give back the model:
 * the Service port's name and the fields no frontend carries.
 */
struct svc_info {
	char namespace[64]; /* DNS label, at most 63 bytes */
	char name[64];      /* DNS label, at most 63 bytes */
	char port_name[64]; /* DNS label, at most 63 bytes (the API's limit) */
	__u8 family;        /* 4 or 6 */
	__u8 proto;
	__u16 health_check_node_port; /* host byte order */
	__u32 pad;
};

/* An LPM trie key for loadBalancerSourceRanges: id, then the address. */
struct source_range_key {
	__u32 prefixlen; /* 32 + prefix length in the 16-byte address */
	__u32 id;
	__u8 addr[16];
};

/* An LPM trie key for the cluster (pod) CIDRs. */
struct cidr_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* --- desired-state and socket maps (owner: ebpf-maps) --- */

/*
 * Membership of an endpoint in one endpoint set of a Service port (value 1):
 * a remembered choice (session affinity, a UDP socket's endpoint) stays valid
 * while its endpoint is a member, whatever slot it has now.
 */
struct member_key {
	__u32 id;         /* ServicePort id */
	__u32 backend_id;
	__u8 set;         /* SVCNAT_SET_* */
	__u8 pad[3];
};

/* Session affinity: which endpoint a client was last sent to. */
struct affinity_key {
	__u8 client[16]; /* netns cookie (first 8 bytes) or address */
	__u32 id;
	__u8 origin;     /* SVCNAT_AFFINITY_* */
	__u8 pad[3];
};

struct affinity_value {
	__u64 last_used; /* bpf_ktime_get_ns */
	__u32 backend_id;
	__u8 set;
	__u8 pad[3];
};

/*
 * What the socket hooks remember per socket (svcnat_sock, socket-local
 * storage, freed with the socket): the frontends it sent to and the
 * endpoint each was translated to. An unconnected UDP socket keeps its
 * endpoint per frontend while that endpoint is a member, and recvmsg and
 * getpeername show the frontend again.
 */
#define SVCNAT_SOCK_PEERS 4

struct sock_peer {
	__u8 frontend[16];
	__u8 backend[16];
	__u16 frontend_port;
	__u16 backend_port;
	__u32 id;         /* the frontend's ServicePort id when translated */
	__u32 backend_id;
	__u32 pad;
};

struct sock_state {
	struct sock_peer peers[SVCNAT_SOCK_PEERS];
	__u32 next; /* the peer a new frontend replaces */
	__u32 pad;
};

/* --- end of desired-state and socket maps --- */

/*
 * Counters (svcnat_counters, per CPU, written by the datapath alone): one
 * row per Service port (backend_id 0) and one per Service port and
 * endpoint. connections counts translations of a new connection to an
 * endpoint: by the socket hooks, a socket's first connect() or sendmsg()
 * to a frontend (or a change of its endpoint); by the tc programs, a flow
 * whose conntrack entry they created. packets and bytes (IP header
 * included) count what the tc programs see: packets arriving on the
 * node's interfaces for a frontend, client to Service only, on the Service
 * port's row only. The socket hooks see no packets.
 */
struct counter_key {
	__u32 id;         /* ServicePort id */
	__u32 backend_id; /* endpoint id; 0 for the Service port itself */
};

struct counter_value {
	__u64 connections;
	__u64 packets;
	__u64 bytes;
};

/* ---- tc path (tc.h), begin ---- */

/*
 * The tc programs hand the translation of a flow from outside the node to the
 * kernel's conntrack and NAT: they create the conntrack entry, with its DNAT
 * (and SNAT when masquerading), and mark it so that the agent can tell
 * svcnat's flows from others (SVCNAT_CT_MARK under SVCNAT_CT_MARK_MASK).
 */
enum ct_mark {
	SVCNAT_CT_MARK = 0x53760000,
};
/* Outside the range of an enum (int): a #define, copied by pkg/ebpf, whose
 * TestCTMarkMaskMatchesC reads it from this file. The datapath does not use
 * it; the agent's nftables and iptables rules match the mark under it. */
#define SVCNAT_CT_MARK_MASK 0xffff0000

/* Counters of the tc programs (svcnat_tc_stats index), as the agent's
 * svcnat_ebpf_tc_packets_total{result} names them. */
enum tc_stat {
	TC_STAT_NEW_FLOW = 0,     /* a conntrack entry created for a new flow */
	TC_STAT_CT_FULL,          /* no conntrack entry could be allocated (table full) */
	TC_STAT_NAT_FAILED,       /* no free NAT tuple (ports exhausted) or NAT setup failed */
	TC_STAT_NO_ROUTE,         /* no route (or source address) toward the endpoint to masquerade with */
	TC_STAT_SOURCE_RANGE,     /* dropped: outside loadBalancerSourceRanges */
	TC_STAT_NO_LOCAL,         /* dropped: Local policy without a local endpoint */
	TC_STAT_REJECT,           /* answered with ICMP port unreachable */
	TC_STAT_REJECT_LIMITED,   /* dropped: would have been rejected, over the rate limit */
	TC_STAT_BAD_ADDRESS,      /* dropped: IPv4-mapped IPv6 address on the wire */
	TC_STAT_REOPENED,         /* a SYN reopened a flow in TIME_WAIT or CLOSE */
	TC_STAT_MAX,
};

/* ---- tc path, end ---- */

#endif /* SVCNAT_H */
