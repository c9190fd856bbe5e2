/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tc.h: per-packet translation for traffic that reaches a Service from
 * outside the node (NodePort, LoadBalancer ingress IPs, externalIPs, and
 * ClusterIPs routed to the node). Attached to the node's interfaces:
 *
 *   ingress: a packet of a known flow is rewritten as its svcnat_nat entry
 *            says; the first packet to a frontend (for TCP: a SYN) picks an
 *            endpoint and is DNATed, and the flow's entries are recorded. A reply from a
 *            remote endpoint to the masquerade address gets the client as
 *            its destination.
 *   egress:  a flow that needs masquerading is SNATed to the address of the
 *            interface it arrived on (so the reply comes back here); a reply
 *            from an endpoint leaving toward the client gets the frontend as
 *            its source again.
 *
 * The agent attaches both to the node's interfaces (Options.Interfaces) and
 * to the interfaces toward local endpoints, where a masqueraded flow to a
 * local endpoint is SNATed (egress) and its reply un-SNATed (ingress).
 *
 * TCP and UDP over IPv4 and IPv6 without extension headers; anything else
 * passes untouched.
 */
#ifndef SVCNAT_TC_H
#define SVCNAT_TC_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include "lb.h"

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* A parsed packet: its tuple in the maps' form and where things are. */
struct pkt {
	struct nat_key key; /* saddr, daddr, sport, dport, proto */
	__u32 l3off;
	__u32 l4off;
	__u8 v6;
	/* A TCP segment that cannot open a connection (not a SYN without ACK). */
	__u8 tcp_midstream;
};

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u16 *ports;

	if ((void *)(eth + 1) > end)
		return -1;
	p->l3off = sizeof(*eth);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return -1;
		/* Fragments after the first carry no ports. */
		if (ip->frag_off & bpf_htons(IP_OFFSET))
			return -1;
		p->key.saddr[10] = 0xff;
		p->key.saddr[11] = 0xff;
		__builtin_memcpy(&p->key.saddr[12], &ip->saddr, 4);
		p->key.daddr[10] = 0xff;
		p->key.daddr[11] = 0xff;
		__builtin_memcpy(&p->key.daddr[12], &ip->daddr, 4);
		p->key.proto = ip->protocol;
		p->l4off = p->l3off + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		__builtin_memcpy(p->key.saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->key.daddr, &ip6->daddr, 16);
		p->key.proto = ip6->nexthdr;
		p->l4off = p->l3off + sizeof(*ip6);
		p->v6 = 1;
	} else {
		return -1;
	}
	if (p->key.proto != IPPROTO_TCP && p->key.proto != IPPROTO_UDP)
		return -1;
	ports = data + p->l4off;
	if ((void *)(ports + 2) > end)
		return -1;
	p->key.sport = ports[0];
	p->key.dport = ports[1];
	if (p->key.proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + p->l4off;

		if ((void *)(tcp + 1) > end)
			return -1;
		p->tcp_midstream = !tcp->syn || tcp->ack;
	}
	return 0;
}

/* rewrite changes the packet's tuple from p->key to v, fixing checksums. */
static __always_inline int rewrite(struct __sk_buff *skb, const struct pkt *p,
				   const struct nat_value *v)
{
	__u32 csum_off = p->l4off + (p->key.proto == IPPROTO_TCP ?
				     offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
	__u64 l4flags = BPF_F_PSEUDO_HDR | (p->key.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
	__s64 diff;

	if (p->v6) {
		diff = bpf_csum_diff((__be32 *)p->key.saddr, 16, (__be32 *)v->saddr, 16, 0);
		diff = bpf_csum_diff((__be32 *)p->key.daddr, 16, (__be32 *)v->daddr, 16, diff);
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, l4flags) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, p->l3off + offsetof(struct ipv6hdr, saddr), v->saddr, 16, 0) < 0 ||
		    bpf_skb_store_bytes(skb, p->l3off + offsetof(struct ipv6hdr, daddr), v->daddr, 16, 0) < 0)
			return -1;
	} else {
		__u32 os, od, ns, nd;

		__builtin_memcpy(&os, &p->key.saddr[12], 4);
		__builtin_memcpy(&od, &p->key.daddr[12], 4);
		__builtin_memcpy(&ns, &v->saddr[12], 4);
		__builtin_memcpy(&nd, &v->daddr[12], 4);
		if (os != ns) {
			if (bpf_l4_csum_replace(skb, csum_off, os, ns, l4flags | 4) < 0 ||
			    bpf_l3_csum_replace(skb, p->l3off + offsetof(struct iphdr, check), os, ns, 4) < 0 ||
			    bpf_skb_store_bytes(skb, p->l3off + offsetof(struct iphdr, saddr), &ns, 4, 0) < 0)
				return -1;
		}
		if (od != nd) {
			if (bpf_l4_csum_replace(skb, csum_off, od, nd, l4flags | 4) < 0 ||
			    bpf_l3_csum_replace(skb, p->l3off + offsetof(struct iphdr, check), od, nd, 4) < 0 ||
			    bpf_skb_store_bytes(skb, p->l3off + offsetof(struct iphdr, daddr), &nd, 4, 0) < 0)
				return -1;
		}
	}
	if (p->key.sport != v->sport) {
		if (bpf_l4_csum_replace(skb, csum_off, p->key.sport, v->sport, 2 | (p->key.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0)) < 0 ||
		    bpf_skb_store_bytes(skb, p->l4off, &v->sport, 2, 0) < 0)
			return -1;
	}
	if (p->key.dport != v->dport) {
		if (bpf_l4_csum_replace(skb, csum_off, p->key.dport, v->dport, 2 | (p->key.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0)) < 0 ||
		    bpf_skb_store_bytes(skb, p->l4off + 2, &v->dport, 2, 0) < 0)
			return -1;
	}
	return 0;
}

static __always_inline int translate(struct __sk_buff *skb, struct pkt *p, __u8 dir)
{
	struct nat_value *v;

	p->key.dir = dir;
	v = bpf_map_lookup_elem(&svcnat_nat, &p->key);
	if (!v)
		return 0;
	return rewrite(skb, p, v) < 0 ? -1 : 1;
}

/* in_prefix reports whether addr is in the cluster CIDRs. */
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
	__u8 quote[48]; /* IPv6 header, 8 bytes of L4 */
};

struct icmp6_pseudo {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 len;
	__be32 next;
};

/* Room for either reply (plain bytes, so the Go side needs no type for
 * it) and the rest of what reject builds. */
struct icmp_scratch {
	__u8 reply[96];
	__u8 mac[12];
	__u8 swapped[12];
	struct icmp6_pseudo pseudo;
};

_Static_assert(sizeof(struct icmp4_reject) <= 96, "icmp4_reject");
_Static_assert(sizeof(struct icmp6_reject) <= 96, "icmp6_reject");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct icmp_scratch);
	__uint(max_entries, 1);
} svcnat_reject_buf SEC(".maps");

/*
 * reject answers the packet with an ICMP (ICMPv6) port unreachable from the
 * frontend, as kube-proxy's REJECT does, and sends it back out of the
 * interface it came in on. The error quotes the packet's IP header and the
 * first 8 bytes after it. IPv4 packets with options are dropped instead.
 * Not inlined, to keep the stack of each function small.
 */
static __attribute__((noinline)) int reject(struct __sk_buff *skb, const struct pkt *p)
{
	struct icmp_scratch *u;
	__u32 zero = 0;
	__s64 sum;

	u = bpf_map_lookup_elem(&svcnat_reject_buf, &zero);
	if (!u)
		return TC_ACT_SHOT;
	__builtin_memset(u, 0, sizeof(*u));
	if (bpf_skb_load_bytes(skb, 0, u->mac, 12) < 0)
		return TC_ACT_SHOT;
	__builtin_memcpy(u->swapped, &u->mac[6], 6);
	__builtin_memcpy(&u->swapped[6], u->mac, 6);
	if (!p->v6) {
		struct icmp4_reject *r = (void *)u->reply;

		if (p->l4off != p->l3off + 20 ||
		    bpf_skb_load_bytes(skb, p->l3off, r->quote, sizeof(r->quote)) < 0)
			return TC_ACT_SHOT;
		r->type = 3; /* destination unreachable */
		r->code = 3; /* port unreachable */
		sum = bpf_csum_diff(0, 0, (__be32 *)&r->type, 36, 0);
		r->check = csum_fold(sum);
		r->ip.version = 4;
		r->ip.ihl = 5;
		r->ip.tot_len = bpf_htons(sizeof(*r));
		r->ip.ttl = 64;
		r->ip.protocol = IPPROTO_ICMP;
		__builtin_memcpy(&r->ip.saddr, &p->key.daddr[12], 4);
		__builtin_memcpy(&r->ip.daddr, &p->key.saddr[12], 4);
		sum = bpf_csum_diff(0, 0, (__be32 *)&r->ip, 20, 0);
		r->ip.check = csum_fold(sum);
		if (bpf_skb_change_tail(skb, 14 + sizeof(*r), 0) < 0 ||
		    bpf_skb_store_bytes(skb, 0, u->swapped, 12, 0) < 0 ||
		    bpf_skb_store_bytes(skb, 14, r, sizeof(*r), 0) < 0)
			return TC_ACT_SHOT;
	} else {
		struct icmp6_reject *r = (void *)u->reply;

		if (bpf_skb_load_bytes(skb, p->l3off, r->quote, sizeof(r->quote)) < 0)
			return TC_ACT_SHOT;
		r->type = 1; /* destination unreachable */
		r->code = 4; /* port unreachable */
		__builtin_memcpy(u->pseudo.saddr, p->key.daddr, 16);
		__builtin_memcpy(u->pseudo.daddr, p->key.saddr, 16);
		u->pseudo.len = bpf_htonl(56);
		u->pseudo.next = bpf_htonl(IPPROTO_ICMPV6);
		sum = bpf_csum_diff(0, 0, (__be32 *)&u->pseudo, sizeof(u->pseudo), 0);
		sum = bpf_csum_diff(0, 0, (__be32 *)&r->type, 56, sum);
		r->check = csum_fold(sum);
		r->ip.version = 6;
		r->ip.payload_len = bpf_htons(56);
		r->ip.nexthdr = IPPROTO_ICMPV6;
		r->ip.hop_limit = 64;
		__builtin_memcpy(&r->ip.saddr, p->key.daddr, 16);
		__builtin_memcpy(&r->ip.daddr, p->key.saddr, 16);
		if (bpf_skb_change_tail(skb, 14 + sizeof(*r), 0) < 0 ||
		    bpf_skb_store_bytes(skb, 0, u->swapped, 12, 0) < 0 ||
		    bpf_skb_store_bytes(skb, 14, r, sizeof(*r), 0) < 0)
			return TC_ACT_SHOT;
	}
	return bpf_redirect(skb->ifindex, 0);
}

/*
 * new_flow picks an endpoint for the first packet of a flow to a frontend,
 * records both directions, and rewrites the packet.
 */
static __always_inline int new_flow(struct __sk_buff *skb, struct pkt *p)
{
	struct svc_key sk = { .port = p->key.dport, .proto = p->key.proto };
	struct affinity_key ak = { .origin = SVCNAT_AFFINITY_ADDR };
	struct nat_key fwd, rev;
	struct nat_value fv = {}, rv = {};
	struct svc_value *sv;
	struct backend b;
	int external, v, masquerade;
	__u8 set;

	__builtin_memcpy(sk.addr, p->key.daddr, 16);
	sv = bpf_map_lookup_elem(&svcnat_services, &sk);
	if (!sv)
		return TC_ACT_OK;
	if (sv->kind == SVCNAT_KIND_LOAD_BALANCER && (sv->flags & SVCNAT_F_SOURCE_RANGES)) {
		struct source_range_key rk = { .prefixlen = 32 + 128, .id = sv->id };

		__builtin_memcpy(rk.addr, p->key.saddr, 16);
		if (!bpf_map_lookup_elem(&svcnat_source_ranges, &rk))
			return TC_ACT_SHOT;
	}
	external = !in_cluster(p->key.saddr);
	__builtin_memcpy(ak.client, p->key.saddr, 16);
	set = lb_set(sv, external);
	v = lb_select(sv, set, &ak, &b);
	if (v == LB_REJECT)
		return reject(skb, p);
	if (v != LB_FORWARD)
		return TC_ACT_SHOT;

	/* Forward: client -> frontend becomes client -> endpoint. */
	__builtin_memcpy(fv.saddr, p->key.saddr, 16);
	__builtin_memcpy(fv.daddr, b.addr, 16);
	fv.sport = p->key.sport;
	fv.dport = b.port;
	fwd = p->key;
	fwd.dir = SVCNAT_NAT_FORWARD;

	/* Reply: endpoint -> client becomes frontend -> client, on egress. */
	__builtin_memcpy(rev.saddr, b.addr, 16);
	__builtin_memcpy(rev.daddr, p->key.saddr, 16);
	rev.sport = b.port;
	rev.dport = p->key.sport;
	rev.proto = p->key.proto;
	rev.dir = SVCNAT_NAT_REPLY;
	rev.pad = 0;
	__builtin_memcpy(rv.saddr, p->key.daddr, 16);
	__builtin_memcpy(rv.daddr, p->key.saddr, 16);
	rv.sport = p->key.dport;
	rv.dport = p->key.sport;

	/*
	 * Masquerade external traffic unless a Local policy sent it to a local
	 * endpoint, internal traffic from outside the cluster CIDRs, and any
	 * flow to another node (so that the reply comes back through this
	 * one). Sources are rewritten on egress and destinations on ingress
	 * only: a packet arriving with one of the node's own addresses as
	 * source is dropped as martian. For a local endpoint that is the
	 * egress and ingress of the interface toward the pod, where the agent
	 * attaches these programs too.
	 */
	if (sv->kind == SVCNAT_KIND_CLUSTER_IP)
		masquerade = external;
	else
		masquerade = set != SVCNAT_SET_LOCAL;
	if (masquerade || !(b.flags & SVCNAT_BACKEND_LOCAL)) {
		struct snat_key nk = { .ifindex = skb->ifindex, .family = p->v6 ? 6 : 4 };
		struct nat_key out = fwd, back = rev;
		struct nat_value outv = fv, backv = {};
		__u8 *snat = bpf_map_lookup_elem(&svcnat_snat_addrs, &nk);

		if (!snat)
			return TC_ACT_SHOT;
		__builtin_memcpy(outv.saddr, snat, 16);
		__builtin_memcpy(back.daddr, snat, 16);
		back.dir = SVCNAT_NAT_UNSNAT;
		/* A source port not in use toward this endpoint, a few tries. */
		for (int i = 0; i < 8; i++) {
			outv.sport = bpf_htons(32768 + (bpf_get_prandom_u32() % 28232));
			back.dport = outv.sport;
			if (!bpf_map_lookup_elem(&svcnat_nat, &back))
				break;
		}
		__builtin_memcpy(out.daddr, fv.daddr, 16);
		out.dport = fv.dport;
		out.dir = SVCNAT_NAT_SNAT;
		__builtin_memcpy(backv.saddr, b.addr, 16);
		__builtin_memcpy(backv.daddr, p->key.saddr, 16);
		backv.sport = b.port;
		backv.dport = p->key.sport;
		if (bpf_map_update_elem(&svcnat_nat, &back, &backv, BPF_ANY) < 0 ||
		    bpf_map_update_elem(&svcnat_nat, &out, &outv, BPF_ANY) < 0)
			return TC_ACT_SHOT;
	}
	if (bpf_map_update_elem(&svcnat_nat, &rev, &rv, BPF_ANY) < 0 ||
	    bpf_map_update_elem(&svcnat_nat, &fwd, &fv, BPF_ANY) < 0)
		return TC_ACT_SHOT;
	return rewrite(skb, p, &fv) < 0 ? TC_ACT_SHOT : TC_ACT_OK;
}

SEC("tc")
int svcnat_tc_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int r;

	if (parse(skb, &p) < 0)
		return TC_ACT_OK;
	/* A later packet of a flow from outside. */
	r = translate(skb, &p, SVCNAT_NAT_FORWARD);
	if (r)
		return r < 0 ? TC_ACT_SHOT : TC_ACT_OK;
	/* A reply from a remote endpoint to the masquerade address. */
	r = translate(skb, &p, SVCNAT_NAT_UNSNAT);
	if (r)
		return r < 0 ? TC_ACT_SHOT : TC_ACT_OK;
	/*
	 * Only a SYN opens a TCP flow. A later segment without an entry belongs
	 * to a connection netfilter translated (kube-proxy's, before svcnat took
	 * over; its conntrack entry still holds) and passes untouched.
	 */
	if (p.tcp_midstream)
		return TC_ACT_OK;
	return new_flow(skb, &p);
}

SEC("tc")
int svcnat_tc_egress(struct __sk_buff *skb)
{
	struct pkt p = {};

	int r;

	if (parse(skb, &p) < 0)
		return TC_ACT_OK;
	/* A flow from outside leaving for a remote endpoint: masquerade. */
	r = translate(skb, &p, SVCNAT_NAT_SNAT);
	if (r)
		return r < 0 ? TC_ACT_SHOT : TC_ACT_OK;
	/* A reply from a local endpoint on its way to the client. */
	return translate(skb, &p, SVCNAT_NAT_REPLY) < 0 ? TC_ACT_SHOT : TC_ACT_OK;
}

#endif /* SVCNAT_TC_H */
