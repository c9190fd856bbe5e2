/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tc.h: Service translation for traffic that reaches the node from outside
 * (NodePort, LoadBalancer ingress IPs, externalIPs, and ClusterIPs routed to
 * the node), attached to the ingress (TCX) of the node's interfaces.
 *
 * The program decides, the kernel translates. For the first packet of a flow
 * to a frontend (no conntrack entry yet; for TCP only a SYN) it checks the
 * source ranges, picks an endpoint (or rejects, or drops) and creates the
 * flow's conntrack entry itself, with the DNAT to the endpoint and, when the
 * flow is masqueraded, the SNAT to the address the node would send from
 * toward the endpoint (port left to nf_nat, which picks one no other flow or
 * host socket uses). From there nf_conntrack and nf_nat do the rest, as they
 * do for kube-proxy: every later packet and the replies, whatever device they
 * leave through; timeouts by TCP state and UDP idle time; early drop of
 * unassured entries when the table is full; ICMP errors about the flow
 * (path MTU); reassembly of fragments. Nothing here rewrites a packet except
 * reject(). Needs a nat-type base chain in the netns (pkg/ebpf makes one),
 * without which nf_nat does not run.
 *
 * Packets svcnat has nothing to do with go on to the next TCX program
 * (TCX_NEXT), and so do the ones it handled: it only drops, or redirects
 * an ICMP error it built.
 */
#ifndef SVCNAT_TC_H
#define SVCNAT_TC_H

#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/netfilter/nf_conntrack_tcp.h>
#include <bpf/bpf_endian.h>
#include "trace.h"

/* TCX verdicts (uapi enum tcx_action_base, Linux 6.6). */
#define SVCNAT_TCX_NEXT (-1)
#define SVCNAT_TCX_DROP 2

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define IP6_OFFSET 0xfff8
#define AF_INET 2
#define AF_INET6 10

/* ---- conntrack kfuncs (nf_conntrack_bpf.c, nf_nat_bpf.c) ---- */

/* The 12-byte form every kernel since 6.0 accepts. */
struct bpf_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};

struct ip_ct_tcp {
	__u8 state;
} __attribute__((preserve_access_index));

union nf_conntrack_proto {
	struct ip_ct_tcp tcp;
} __attribute__((preserve_access_index));

struct nf_conn {
	__u32 mark;
	union nf_conntrack_proto proto;
} __attribute__((preserve_access_index));

struct nf_conn___init {
	struct nf_conn ct;
} __attribute__((preserve_access_index));

union nf_inet_addr {
	__u32 all[4];
};

enum nf_nat_manip_type {
	NF_NAT_MANIP_SRC,
	NF_NAT_MANIP_DST,
};

extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *, struct bpf_sock_tuple *, __u32,
					 struct bpf_ct_opts *, __u32) __ksym;
extern struct nf_conn___init *bpf_skb_ct_alloc(struct __sk_buff *, struct bpf_sock_tuple *, __u32,
					       struct bpf_ct_opts *, __u32) __ksym;
extern struct nf_conn *bpf_ct_insert_entry(struct nf_conn___init *) __ksym;
extern void bpf_ct_release(struct nf_conn *) __ksym;
extern int bpf_ct_change_timeout(struct nf_conn *, __u32) __ksym;
extern int bpf_ct_set_nat_info(struct nf_conn___init *, union nf_inet_addr *, int,
			       enum nf_nat_manip_type) __ksym;

/* ---- maps of the tc programs alone (not pinned) ---- */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, enum tc_stat);
	__type(value, __u64);
	__uint(max_entries, TC_STAT_MAX);
} svcnat_tc_stats SEC(".maps");

static __always_inline void count(enum tc_stat stat)
{
	__u64 *c = bpf_map_lookup_elem(&svcnat_tc_stats, &stat);

	if (c)
		*c += 1;
}

/* A parsed packet. Addresses as in the maps (IPv4 v4-mapped). */
struct pkt {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 v6;
	__u8 tcp_flags; /* byte 13 of the TCP header */
	__u8 pad;
	__u32 l3off;
	__u32 l4off;
};

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

enum {
	PARSE_OK = 0,
	PARSE_SKIP, /* not ours to look at: TCX_NEXT */
	PARSE_DROP, /* must not be on the wire */
};

static __always_inline int v4mapped(const struct in6_addr *a)
{
	return a->in6_u.u6_addr32[0] == 0 && a->in6_u.u6_addr32[1] == 0 &&
	       a->in6_u.u6_addr32[2] == bpf_htonl(0xffff);
}

/*
 * parse reads the tuple of an IPv4 or IPv6 TCP or UDP packet whose network
 * header starts at l3off (0 on L3 devices, 14 after an Ethernet header).
 * bpf_skb_load_bytes reads non-linear data too, so headers outside the
 * linear area need no pull. IPv6 extension headers are walked (at most 4);
 * a fragment other than the first has no ports and is skipped: conntrack
 * reassembles it before NAT.
 */
static __always_inline int parse(struct __sk_buff *skb, __u32 l3off, struct pkt *p)
{
	__u8 nexthdr;
	__u32 off;

	p->l3off = l3off;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, l3off, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
			return PARSE_SKIP;
		if (ip.frag_off & bpf_htons(IP_OFFSET))
			return PARSE_SKIP;
		p->saddr[10] = p->saddr[11] = 0xff;
		__builtin_memcpy(&p->saddr[12], &ip.saddr, 4);
		p->daddr[10] = p->daddr[11] = 0xff;
		__builtin_memcpy(&p->daddr[12], &ip.daddr, 4);
		nexthdr = ip.protocol;
		off = l3off + ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, l3off, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
			return PARSE_SKIP;
		/* RFC 4291 2.5.5.2: never on the wire; the maps key IPv4
		 * frontends and source ranges by exactly these addresses. */
		if (v4mapped(&ip6.saddr) || v4mapped(&ip6.daddr))
			return PARSE_DROP;
		__builtin_memcpy(p->saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->daddr, &ip6.daddr, 16);
		p->v6 = 1;
		nexthdr = ip6.nexthdr;
		off = l3off + sizeof(ip6);
#pragma unroll
		for (int i = 0; i < 4; i++) {
			__u8 h[8];

			if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
			    nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_FRAGMENT)
				break;
			if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
				return PARSE_SKIP;
			if (nexthdr == IPPROTO_FRAGMENT) {
				__be16 frag_off;

				__builtin_memcpy(&frag_off, &h[2], 2);
				if (frag_off & bpf_htons(IP6_OFFSET))
					return PARSE_SKIP;
				off += 8;
			} else {
				off += (h[1] + 1) * 8;
			}
			nexthdr = h[0];
		}
	} else {
		return PARSE_SKIP;
	}
	if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP)
		return PARSE_SKIP;
	p->proto = nexthdr;
	p->l4off = off;
	if (bpf_skb_load_bytes(skb, off, &p->sport, 4) < 0)
		return PARSE_SKIP;
	if (nexthdr == IPPROTO_TCP && bpf_skb_load_bytes(skb, off + 13, &p->tcp_flags, 1) < 0)
		return PARSE_SKIP;
	return PARSE_OK;
}

/* tuple fills a conntrack tuple of p and returns its size. */
static __always_inline __u32 tuple(const struct pkt *p, struct bpf_sock_tuple *t)
{
	if (p->v6) {
		__builtin_memcpy(t->ipv6.saddr, p->saddr, 16);
		__builtin_memcpy(t->ipv6.daddr, p->daddr, 16);
		t->ipv6.sport = p->sport;
		t->ipv6.dport = p->dport;
		return sizeof(t->ipv6);
	}
	__builtin_memcpy(&t->ipv4.saddr, &p->saddr[12], 4);
	__builtin_memcpy(&t->ipv4.daddr, &p->daddr[12], 4);
	t->ipv4.sport = p->sport;
	t->ipv4.dport = p->dport;
	return sizeof(t->ipv4);
}

/* in_cluster reports whether addr is in the cluster CIDRs. */
static __always_inline int in_cluster(const __u8 addr[16])
{
	struct cidr_key k = { .prefixlen = 128 };

	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&svcnat_cluster_cidrs, &k) != NULL;
}

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u64 s = (__u64)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~(__u16)s;
}

/* ICMP errors are built in a per-CPU buffer: not on the stack, which the
 * caller fills. */
struct icmp4_reject {
	struct iphdr ip;
	__u8 type, code;
	__u16 check;
	__u32 unused;
	__u8 quote[28]; /* IP header without options, 8 bytes of L4 */
};

struct icmp6_reject {
	struct ipv6hdr ip;
	__u8 type, code;
	__u16 check;
	__u32 unused;
	__u8 quote[48]; /* IPv6 header, 8 bytes after it */
};

struct icmp6_pseudo {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 len;
	__be32 next;
};

/* Room for either reply (plain bytes, so the Go side needs no type for
 * it), the rest of what reject builds, and this CPU's rate limit state. */
struct icmp_scratch {
	__u8 reply[96];
	__u8 mac[12];
	__u8 swapped[12];
	struct icmp6_pseudo pseudo;
	__u64 tat; /* theoretical arrival time of the next reject (GCRA) */
};

_Static_assert(sizeof(struct icmp4_reject) <= 96, "icmp4_reject");
_Static_assert(sizeof(struct icmp6_reject) <= 96, "icmp6_reject");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct icmp_scratch);
	__uint(max_entries, 1);
} svcnat_reject_buf SEC(".maps");

/* Rejects each CPU sends: at most SVCNAT_REJECT_RATE a second after a
 * burst of SVCNAT_REJECT_BURST, like the kernel's icmp_ratelimit. */
#define SVCNAT_REJECT_RATE 1000
#define SVCNAT_REJECT_BURST 50

/*
 * reject answers the packet with an ICMP (ICMPv6) port unreachable from the
 * frontend, as kube-proxy's REJECT does, and sends it back out of the
 * interface it came in on. The error quotes the packet's IP header and the
 * first 8 bytes after it. IPv4 packets with options are dropped instead, and
 * so is everything over the rate limit. Not inlined, to keep the stack of
 * each function small.
 */
static __attribute__((noinline)) int reject(struct __sk_buff *skb, const struct pkt *p)
{
	const __u64 interval = NSEC_PER_SEC / SVCNAT_REJECT_RATE;
	struct icmp_scratch *u;
	__u32 zero = 0, l3off = p->l3off;
	__u64 now, tat;
	__s64 sum;

	u = bpf_map_lookup_elem(&svcnat_reject_buf, &zero);
	if (!u)
		return SVCNAT_TCX_DROP;
	now = bpf_ktime_get_ns();
	tat = u->tat > now ? u->tat : now;
	if (tat - now > SVCNAT_REJECT_BURST * interval) {
		count(TC_STAT_REJECT_LIMITED);
		return SVCNAT_TCX_DROP;
	}
	__builtin_memset(u, 0, sizeof(*u));
	u->tat = tat + interval;
	if (l3off != 0 && l3off != ETH_HLEN)
		return SVCNAT_TCX_DROP;
	if (l3off) {
		if (bpf_skb_load_bytes(skb, 0, u->mac, 12) < 0)
			return SVCNAT_TCX_DROP;
		__builtin_memcpy(u->swapped, &u->mac[6], 6);
		__builtin_memcpy(&u->swapped[6], u->mac, 6);
	}
	if (!p->v6) {
		struct icmp4_reject *r = (void *)u->reply;

		if (p->l4off != l3off + 20 ||
		    bpf_skb_load_bytes(skb, l3off, r->quote, sizeof(r->quote)) < 0)
			return SVCNAT_TCX_DROP;
		r->type = 3; /* destination unreachable */
		r->code = 3; /* port unreachable */
		sum = bpf_csum_diff(0, 0, (__be32 *)&r->type, 36, 0);
		r->check = csum_fold(sum);
		r->ip.version = 4;
		r->ip.ihl = 5;
		r->ip.tot_len = bpf_htons(sizeof(*r));
		r->ip.ttl = 64;
		r->ip.protocol = IPPROTO_ICMP;
		__builtin_memcpy(&r->ip.saddr, &p->daddr[12], 4);
		__builtin_memcpy(&r->ip.daddr, &p->saddr[12], 4);
		sum = bpf_csum_diff(0, 0, (__be32 *)&r->ip, 20, 0);
		r->ip.check = csum_fold(sum);
		if (bpf_skb_change_tail(skb, l3off + sizeof(*r), 0) < 0 ||
		    bpf_skb_store_bytes(skb, l3off, r, sizeof(*r), 0) < 0)
			return SVCNAT_TCX_DROP;
	} else {
		struct icmp6_reject *r = (void *)u->reply;

		if (bpf_skb_load_bytes(skb, l3off, r->quote, sizeof(r->quote)) < 0)
			return SVCNAT_TCX_DROP;
		r->type = 1; /* destination unreachable */
		r->code = 4; /* port unreachable */
		__builtin_memcpy(u->pseudo.saddr, p->daddr, 16);
		__builtin_memcpy(u->pseudo.daddr, p->saddr, 16);
		u->pseudo.len = bpf_htonl(56);
		u->pseudo.next = bpf_htonl(IPPROTO_ICMPV6);
		sum = bpf_csum_diff(0, 0, (__be32 *)&u->pseudo, sizeof(u->pseudo), 0);
		sum = bpf_csum_diff(0, 0, (__be32 *)&r->type, 56, sum);
		r->check = csum_fold(sum);
		r->ip.version = 6;
		r->ip.payload_len = bpf_htons(56);
		r->ip.nexthdr = IPPROTO_ICMPV6;
		r->ip.hop_limit = 64;
		__builtin_memcpy(&r->ip.saddr, p->daddr, 16);
		__builtin_memcpy(&r->ip.daddr, p->saddr, 16);
		if (bpf_skb_change_tail(skb, l3off + sizeof(*r), 0) < 0 ||
		    bpf_skb_store_bytes(skb, l3off, r, sizeof(*r), 0) < 0)
			return SVCNAT_TCX_DROP;
	}
	if (l3off && bpf_skb_store_bytes(skb, 0, u->swapped, 12, 0) < 0)
		return SVCNAT_TCX_DROP;
	bpf_set_hash_invalid(skb);
	count(TC_STAT_REJECT);
	return bpf_redirect(skb->ifindex, 0);
}

/*
 * masquerade_addr sets *src to the address the node sends from toward the
 * endpoint, as routing picks it for this packet (the egress device's, be it
 * an uplink, a second uplink or an overlay device). It returns 1, 0 when the
 * endpoint is the node itself (no masquerade: the packet never leaves), or
 * -1 without a usable route.
 */
static __attribute__((noinline)) int masquerade_addr(struct __sk_buff *skb, const struct pkt *p,
						     const struct backend *b, union nf_inet_addr *src)
{
	struct bpf_fib_lookup f = {
		.l4_protocol = p->proto,
		.sport = p->sport,
		.dport = b->port,
		.ifindex = skb->ingress_ifindex,
	};
	int r;

	if (p->v6) {
		f.family = AF_INET6;
		__builtin_memcpy(f.ipv6_src, p->saddr, 16);
		__builtin_memcpy(f.ipv6_dst, b->addr, 16);
	} else {
		f.family = AF_INET;
		__builtin_memcpy(&f.ipv4_src, &p->saddr[12], 4);
		__builtin_memcpy(&f.ipv4_dst, &b->addr[12], 4);
	}
	r = bpf_fib_lookup(skb, &f, sizeof(f), BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (r == BPF_FIB_LKUP_RET_NOT_FWDED)
		return 0;
	/* FRAG_NEEDED is about this packet's size, not the route; the source
	 * is set all the same. */
	if (r != BPF_FIB_LKUP_RET_SUCCESS && r != BPF_FIB_LKUP_RET_NO_NEIGH &&
	    r != BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return -1;
	if (p->v6)
		__builtin_memcpy(src->all, f.ipv6_src, 16);
	else
		src->all[0] = f.ipv4_src;
	return 1;
}

/*
 * new_flow picks an endpoint for the first packet of a flow to a frontend
 * and creates the flow's conntrack entry with its NAT.
 */
static __attribute__((noinline)) int new_flow(struct __sk_buff *skb, const struct pkt *p,
					      const struct svc_value *sv)
{
	struct affinity_key ak = { .origin = SVCNAT_AFFINITY_ADDR };
	struct bpf_ct_opts opts = { .netns_id = -1, .l4proto = p->proto };
	struct bpf_sock_tuple t = {};
	union nf_inet_addr dst = {}, src = {};
	struct nf_conn___init *ct;
	struct nf_conn *ins;
	struct backend b;
	int external, masquerade, failed;
	int trace = is_trace(skb);
	__u32 tsize, bid = 0;
	__u8 set, pinned = 0;

	if (sv->kind == SVCNAT_KIND_LOAD_BALANCER && (sv->flags & SVCNAT_F_SOURCE_RANGES)) {
		struct source_range_key rk = { .prefixlen = 32 + 128, .id = sv->id };

		__builtin_memcpy(rk.addr, p->saddr, 16);
		if (!bpf_map_lookup_elem(&svcnat_source_ranges, &rk)) {
			if (trace)
				return trace_out(skb, TRACE_SOURCE_RANGE, 0, 0, 0, 0, sv->id, 0);
			count(TC_STAT_SOURCE_RANGE);
			return SVCNAT_TCX_DROP;
		}
	}
	external = !in_cluster(p->saddr);
	__builtin_memcpy(ak.client, p->saddr, 16);
	/* Every packet here came from another host, a pod of another node
	 * included: an external client of this node's NodePort, LoadBalancer
	 * IP or externalIP. Only this node's own sockets (the cgroup hooks)
	 * are short-circuited to the cluster set under a Local policy;
	 * kube-proxy's cluster-CIDR short-circuit sends a remote pod to an
	 * endpoint that answers it directly, past this node's NAT, and the
	 * connection breaks (upstream e2e: "fallback to local terminating
	 * endpoints ... externalTrafficPolicy=Local"). */
	set = lb_set(sv, 1);
	switch (lb_select(sv, set, &ak, &b, &bid, trace ? skb->cb[1] : SVCNAT_LB_LIVE, &pinned)) {
	case LB_FORWARD:
		break;
	case LB_REJECT:
		if (trace)
			return trace_out(skb, TRACE_REJECT, set, 0, 0, lb_count(sv, set), sv->id, 0);
		return reject(skb, p);
	default:
		if (trace)
			return trace_out(skb, TRACE_NO_LOCAL, set, 0, 0, 0, sv->id, 0);
		count(TC_STAT_NO_LOCAL);
		return SVCNAT_TCX_DROP;
	}

	/*
	 * Masquerade external traffic unless a Local policy sent it to a local
	 * endpoint, internal traffic from outside the cluster CIDRs, and any
	 * flow to another node (so that the reply comes back through this one).
	 */
	if (sv->kind == SVCNAT_KIND_CLUSTER_IP)
		masquerade = external;
	else
		masquerade = set != SVCNAT_SET_LOCAL;
	if (masquerade || !(b.flags & SVCNAT_BACKEND_LOCAL)) {
		masquerade = masquerade_addr(skb, p, &b, &src);
		if (masquerade < 0) {
			if (trace)
				return trace_out(skb, TRACE_NO_ROUTE, set, 0, bid, lb_count(sv, set), sv->id, 0);
			count(TC_STAT_NO_ROUTE);
			return SVCNAT_TCX_DROP;
		}
	}
	/* A trace stops here: everything below writes kernel state. */
	if (trace)
		return trace_out(skb, TRACE_FORWARD, set,
				 (pinned ? TRACE_F_PINNED : 0) | (masquerade > 0 ? TRACE_F_MASQUERADE : 0),
				 bid, lb_count(sv, set), sv->id, p->v6 ? 0 : src.all[0]);

	tsize = tuple(p, &t);
	ct = bpf_skb_ct_alloc(skb, &t, tsize, &opts, sizeof(opts));
	if (!ct) {
		count(TC_STAT_CT_FULL);
		return SVCNAT_TCX_DROP;
	}
	/* DNAT first, as PREROUTING before POSTROUTING: the SNAT port is
	 * then chosen unique toward the endpoint. Port 0: nf_nat keeps the
	 * client's port when free, else picks one. */
	if (p->v6)
		__builtin_memcpy(dst.all, b.addr, 16);
	else
		__builtin_memcpy(&dst.all[0], &b.addr[12], 4);
	failed = bpf_ct_set_nat_info(ct, &dst, bpf_ntohs(b.port), NF_NAT_MANIP_DST) < 0;
	if (masquerade > 0)
		failed |= bpf_ct_set_nat_info(ct, &src, 0, NF_NAT_MANIP_SRC) < 0;
	ct->ct.mark = SVCNAT_CT_MARK;
	/* An allocated entry can only be given back by inserting it. */
	ins = bpf_ct_insert_entry(ct);
	if (!ins) {
		/* Another CPU inserted this flow first (then it goes on with
		 * that entry), or the NAT tuple is taken: no free port. */
		struct nf_conn *other = bpf_skb_ct_lookup(skb, &t, tsize, &opts, sizeof(opts));

		if (other) {
			bpf_ct_release(other);
			return SVCNAT_TCX_NEXT;
		}
		count(TC_STAT_NAT_FAILED);
		return SVCNAT_TCX_DROP;
	}
	if (failed) {
		bpf_ct_change_timeout(ins, 0);
		bpf_ct_release(ins);
		count(TC_STAT_NAT_FAILED);
		return SVCNAT_TCX_DROP;
	}
	bpf_ct_release(ins);
	count(TC_STAT_NEW_FLOW);
	count_connection(sv->id, bid);
	return SVCNAT_TCX_NEXT;
}

/*
 * flow_exists reports whether conntrack already tracks the packet's flow
 * (then the kernel translates it). A SYN to a flow in TIME_WAIT or CLOSE
 * starts a new one, as conntrack would: the old entry is expired so that
 * the lookup that follows drops it.
 */
static __always_inline int flow_exists(struct __sk_buff *skb, const struct pkt *p, int trace)
{
	struct bpf_ct_opts opts = { .netns_id = -1, .l4proto = p->proto };
	struct bpf_sock_tuple t = {};
	__u32 tsize = tuple(p, &t);
	struct nf_conn *ct;
	__u8 state;

	ct = bpf_skb_ct_lookup(skb, &t, tsize, &opts, sizeof(opts));
	if (!ct)
		return 0;
	if (p->proto != IPPROTO_TCP || (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN) {
		bpf_ct_release(ct);
		return 1;
	}
	state = ct->proto.tcp.state;
	if (state != TCP_CONNTRACK_TIME_WAIT && state != TCP_CONNTRACK_CLOSE) {
		bpf_ct_release(ct);
		return 1;
	}
	if (trace) {
		/* A trace's SYN would reopen the flow: show the new one. */
		bpf_ct_release(ct);
		return 0;
	}
	bpf_ct_change_timeout(ct, 0);
	bpf_ct_release(ct);
	count(TC_STAT_REOPENED);
	ct = bpf_skb_ct_lookup(skb, &t, tsize, &opts, sizeof(opts));
	if (!ct)
		return 0;
	bpf_ct_release(ct);
	return 1;
}

static __always_inline int ingress(struct __sk_buff *skb, __u32 l3off)
{
	struct svc_key sk = {};
	struct svc_value sv, *v;
	struct pkt p = {};
	int trace = is_trace(skb);

	/* Frames for other hosts (a flooded LAN) are not ours to answer. */
	if (skb->pkt_type == PACKET_OTHERHOST)
		return SVCNAT_TCX_NEXT;
	switch (parse(skb, l3off, &p)) {
	case PARSE_OK:
		break;
	case PARSE_DROP:
		count(TC_STAT_BAD_ADDRESS);
		return SVCNAT_TCX_DROP;
	default:
		return SVCNAT_TCX_NEXT;
	}
	__builtin_memcpy(sk.addr, p.daddr, 16);
	sk.port = p.dport;
	sk.proto = p.proto;
	v = bpf_map_lookup_elem(&svcnat_services, &sk);
	if (!v) {
		if (trace)
			return trace_out(skb, TRACE_NOT_SERVICE, 0, 0, 0, 0, 0, 0);
		return SVCNAT_TCX_NEXT;
	}
	sv = *v; /* read once: an element an update replaced can be reused at once */
	if (!trace)
		counter_add(sv.id, 0, 0, 1, skb->len - l3off);
	if (flow_exists(skb, &p, trace)) {
		if (trace)
			return trace_out(skb, TRACE_FLOW_EXISTS, 0, 0, 0, 0, sv.id, 0);
		return SVCNAT_TCX_NEXT;
	}
	/* A TCP flow starts with a SYN; anything else without a flow goes to
	 * the stack, which answers a NodePort's with a reset. */
	if (p.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN) {
		if (trace)
			return trace_out(skb, TRACE_NOT_SYN, 0, 0, 0, 0, sv.id, 0);
		return SVCNAT_TCX_NEXT;
	}
	return new_flow(skb, &p, &sv);
}

/* For Ethernet devices. */
SEC("tc")
int svcnat_tc_ingress(struct __sk_buff *skb)
{
	return ingress(skb, ETH_HLEN);
}

/* For L3 devices without a link-layer header (IPIP, WireGuard, tun). */
SEC("tc")
int svcnat_tc_ingress_l3(struct __sk_buff *skb)
{
	return ingress(skb, 0);
}

#endif /* SVCNAT_TC_H */
