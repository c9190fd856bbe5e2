/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * sock.h: connect-time Service translation. Attached to a cgroup v2, these
 * programs rewrite the destination of connect() and unconnected sendmsg() from
 * a Service frontend to an endpoint, so the flow itself needs no per-packet
 * NAT, and rewrite the peer address seen by recvmsg() and getpeername() back to
 * the frontend.
 */
#ifndef SVCNAT_SOCK_H
#define SVCNAT_SOCK_H

#include "lb.h"

#define SYS_REJECT 0
#define SYS_PROCEED 1
/* xlate: the destination is not a Service frontend; leave it alone. */
#define NOT_A_SERVICE -1

static __always_inline void addr_from_ip4(__u8 addr[16], __u32 ip4)
{
	__builtin_memset(addr, 0, 10);
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(&addr[12], &ip4, 4);
}

static __always_inline int addr_eq(const __u8 *a, const __u8 *b)
{
	__u32 x[4], y[4];

	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* sock_peer_of returns the peer of st for frontend key, NULL if none. */
static __always_inline struct sock_peer *sock_peer_of(struct sock_state *st, const struct svc_key *key)
{
	for (int i = 0; i < SVCNAT_SOCK_PEERS; i++) {
		struct sock_peer *p = &st->peers[i];

		if (p->frontend_port == key->port && p->id && addr_eq(p->frontend, key->addr))
			return p;
	}
	return 0;
}

/*
 * sock_backend_taken says whether st already translates another frontend
 * than key to endpoint b: replies from b would then be ambiguous. A global
 * function: the verifier checks it once, not again for every slot
 * sock_pick tries on every path of xlate (which took ~1 s of verifier CPU
 * per socket program, ~4 s of the agent's start, when inline).
 */
__attribute__((noinline)) int sock_backend_taken(struct sock_state *st, const struct svc_key *key,
						 const struct backend *b)
{
	if (!st || !key || !b) /* the verifier checks a global function for any pointers */
		return 0;
	for (int i = 0; i < SVCNAT_SOCK_PEERS; i++) {
		struct sock_peer *p = &st->peers[i];

		if (p->id && p->backend_port == b->port && addr_eq(p->backend, b->addr) &&
		    !(p->frontend_port == key->port && addr_eq(p->frontend, key->addr)))
			return 1;
	}
	return 0;
}

/*
 * sock_pick copies to out a random endpoint of set, preferring one that no
 * other frontend of this socket uses (else the last one tried), and returns
 * 1; 0 when the set has no endpoint any more (lb_slot).
 */
static __always_inline int sock_pick(struct sock_state *st, const struct svc_key *key,
				     const struct svc_value *sv, __u8 set, __u16 count,
				     struct backend *out, __u32 *backend_id)
{
	__u32 r = bpf_get_prandom_u32();

	for (int i = 0; i <= SVCNAT_SOCK_PEERS && i < count; i++) {
		if (!lb_slot(sv->id, set, (r + i) % count, out, backend_id))
			return 0;
		if (!st || !sock_backend_taken(st, key, out))
			break;
	}
	return 1;
}

/*
 * xlate looks the frontend key up and, when it is a Service, chooses the
 * endpoint: the one this socket used for key while it is still a member
 * (an unconnected UDP socket sticks to its endpoint, as conntrack makes it
 * under kube-proxy), else the one session affinity names, else a random
 * one (slot 0 when a concurrent write removed the slot: lb_slot). It
 * records the choice in the socket's storage for the reverse translation.
 */
static __always_inline int xlate(struct bpf_sock_addr *ctx, struct svc_key *key,
				 struct backend *out)
{
	struct affinity_key ak = { .origin = SVCNAT_AFFINITY_NETNS };
	struct sock_peer *peer = 0;
	struct sock_state *st;
	struct svc_value sv, *p;
	__u32 bid = 0;
	__u16 count;
	__u64 now, netns;
	__u8 set;
	int found = 0;

	p = bpf_map_lookup_elem(&svcnat_services, key);
	if (!p)
		return NOT_A_SERVICE;
	sv = *p;
	st = bpf_sk_storage_get(&svcnat_sock, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (st)
		peer = sock_peer_of(st, key);
	netns = bpf_get_netns_cookie(ctx);
	__builtin_memcpy(ak.client, &netns, sizeof(netns));
	now = bpf_ktime_get_ns();
	/* Sockets on the node (host and pods) are never external clients. */
	set = lb_set(&sv, 0);
	count = lb_count(&sv, set);
	if (count == 0)
		return lb_empty(&sv);
	if (peer && peer->id == sv.id) {
		bid = peer->backend_id;
		found = lb_member(sv.id, set, bid, out) || lb_member(sv.id, SVCNAT_SET_SERVING, bid, out);
	}
	if (!found)
		found = lb_affinity(&sv, set, &ak, now, out, &bid, 1);
	if (!found) {
		if (!sock_pick(st, key, &sv, set, count, out, &bid))
			return LB_REJECT; /* the set emptied while we read it */
		lb_pin(&sv, set, &ak, now, bid);
	}
	if (!st || (peer && peer->id == sv.id && peer->backend_id == bid))
		return LB_FORWARD;
	if (!peer) {
		__u32 i = st->next % SVCNAT_SOCK_PEERS;

		st->next = i + 1;
		peer = &st->peers[i];
	}
	__builtin_memcpy(peer->frontend, key->addr, 16);
	peer->frontend_port = key->port;
	__builtin_memcpy(peer->backend, out->addr, 16);
	peer->backend_port = out->port;
	peer->id = sv.id;
	peer->backend_id = bid;
	/* The socket's first translation to this endpoint: a new connection. */
	count_connection(sv.id, bid);
	return LB_FORWARD;
}

static __always_inline int verdict(int v)
{
	if (v == LB_REJECT) {
		/* A plain reject would be EPERM; an application expects
		 * "connection refused" from a Service without endpoints. */
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}
	/* LB_DROP: a Local policy without local endpoints. kube-proxy drops
	 * the packets and the client times out; fail fast instead. */
	bpf_set_retval(-EHOSTUNREACH);
	return SYS_REJECT;
}

static __always_inline int xlate4(struct bpf_sock_addr *ctx)
{
	struct svc_key key = { .proto = ctx->protocol };
	struct backend b;
	__u32 ip4;
	int v;

	addr_from_ip4(key.addr, ctx->user_ip4);
	key.port = (__u16)ctx->user_port;
	v = xlate(ctx, &key, &b);
	if (v == NOT_A_SERVICE)
		return SYS_PROCEED;
	if (v != LB_FORWARD)
		return verdict(v);
	__builtin_memcpy(&ip4, &b.addr[12], 4);
	ctx->user_ip4 = ip4;
	ctx->user_port = (__u32)b.port;
	return SYS_PROCEED;
}

static __always_inline int xlate6(struct bpf_sock_addr *ctx)
{
	struct svc_key key = { .proto = ctx->protocol };
	struct backend b;
	__u32 w[4];
	int v;

	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	__builtin_memcpy(key.addr, w, 16);
	key.port = (__u16)ctx->user_port;
	v = xlate(ctx, &key, &b);
	if (v == NOT_A_SERVICE)
		return SYS_PROCEED;
	if (v != LB_FORWARD)
		return verdict(v);
	__builtin_memcpy(w, b.addr, 16);
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = (__u32)b.port;
	return SYS_PROCEED;
}

/*
 * revnat finds the frontend this socket sent to that was translated to
 * endpoint addr:port and is still that Service's frontend, and copies it
 * to addr and port; it returns 0 when there is none.
 */
static __always_inline int revnat(struct bpf_sock_addr *ctx, __u8 addr[16], __u16 *port)
{
	struct svc_key key = { .proto = ctx->protocol };
	struct sock_state *st;
	struct svc_value *sv;

	st = bpf_sk_storage_get(&svcnat_sock, ctx->sk, 0, 0);
	if (!st)
		return 0;
	for (int i = 0; i < SVCNAT_SOCK_PEERS; i++) {
		struct sock_peer *p = &st->peers[i];

		if (!p->id || p->backend_port != *port || !addr_eq(p->backend, addr))
			continue;
		__builtin_memcpy(key.addr, p->frontend, 16);
		key.port = p->frontend_port;
		sv = bpf_map_lookup_elem(&svcnat_services, &key);
		if (!sv || sv->id != p->id)
			continue; /* the frontend is gone or names another Service now */
		__builtin_memcpy(addr, key.addr, 16);
		*port = key.port;
		return 1;
	}
	return 0;
}

/* revnat4 shows the frontend instead of the endpoint a socket talks to. */
static __always_inline int revnat4(struct bpf_sock_addr *ctx)
{
	__u8 addr[16];
	__u16 port = (__u16)ctx->user_port;
	__u32 ip4;

	addr_from_ip4(addr, ctx->user_ip4);
	if (!revnat(ctx, addr, &port))
		return SYS_PROCEED;
	__builtin_memcpy(&ip4, &addr[12], 4);
	ctx->user_ip4 = ip4;
	ctx->user_port = (__u32)port;
	return SYS_PROCEED;
}

static __always_inline int revnat6(struct bpf_sock_addr *ctx)
{
	__u16 port = (__u16)ctx->user_port;
	__u32 w[4];

	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	if (!revnat(ctx, (__u8 *)w, &port))
		return SYS_PROCEED;
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = (__u32)port;
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int svcnat_connect4(struct bpf_sock_addr *ctx) { return xlate4(ctx); }

SEC("cgroup/connect6")
int svcnat_connect6(struct bpf_sock_addr *ctx) { return xlate6(ctx); }

SEC("cgroup/sendmsg4")
int svcnat_sendmsg4(struct bpf_sock_addr *ctx) { return xlate4(ctx); }

SEC("cgroup/sendmsg6")
int svcnat_sendmsg6(struct bpf_sock_addr *ctx) { return xlate6(ctx); }

SEC("cgroup/recvmsg4")
int svcnat_recvmsg4(struct bpf_sock_addr *ctx) { return revnat4(ctx); }

SEC("cgroup/recvmsg6")
int svcnat_recvmsg6(struct bpf_sock_addr *ctx) { return revnat6(ctx); }

SEC("cgroup/getpeername4")
int svcnat_getpeername4(struct bpf_sock_addr *ctx) { return revnat4(ctx); }

SEC("cgroup/getpeername6")
int svcnat_getpeername6(struct bpf_sock_addr *ctx) { return revnat6(ctx); }

#endif /* SVCNAT_SOCK_H */
