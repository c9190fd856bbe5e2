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

/*
 * xlate looks the frontend key up and, when it is a Service, rewrites the
 * address held in *ip (4 words for IPv6 contexts, the last word for IPv4) and
 * the port, and records the reverse translation for this socket.
 */
static __always_inline int xlate(struct bpf_sock_addr *ctx, struct svc_key *key,
				 struct backend *b)
{
	struct affinity_key ak = { .origin = SVCNAT_AFFINITY_NETNS };
	struct svc_value *sv;
	__u64 netns;

	sv = bpf_map_lookup_elem(&svcnat_services, key);
	if (!sv)
		return NOT_A_SERVICE;
	netns = bpf_get_netns_cookie(ctx);
	__builtin_memcpy(ak.client, &netns, sizeof(netns));
	/* Sockets on the node (host and pods) are never external clients. */
	return lb_select(sv, lb_set(sv, 0), &ak, b);
}

static __always_inline void remember(struct bpf_sock_addr *ctx, const struct svc_key *key,
				     const struct backend *b)
{
	struct revnat_key rk = { .cookie = bpf_get_socket_cookie(ctx), .port = b->port };
	struct revnat_value rv = { .port = key->port };

	__builtin_memcpy(rk.addr, b->addr, 16);
	__builtin_memcpy(rv.addr, key->addr, 16);
	bpf_map_update_elem(&svcnat_sock_revnat, &rk, &rv, BPF_ANY);
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
	remember(ctx, &key, &b);
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
	remember(ctx, &key, &b);
	return SYS_PROCEED;
}

/* revnat4 shows the frontend instead of the endpoint a socket talks to. */
static __always_inline int revnat4(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = { .cookie = bpf_get_socket_cookie(ctx) };
	struct revnat_value *rv;
	__u32 ip4;

	addr_from_ip4(rk.addr, ctx->user_ip4);
	rk.port = (__u16)ctx->user_port;
	rv = bpf_map_lookup_elem(&svcnat_sock_revnat, &rk);
	if (!rv)
		return SYS_PROCEED;
	__builtin_memcpy(&ip4, &rv->addr[12], 4);
	ctx->user_ip4 = ip4;
	ctx->user_port = (__u32)rv->port;
	return SYS_PROCEED;
}

static __always_inline int revnat6(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = { .cookie = bpf_get_socket_cookie(ctx) };
	struct revnat_value *rv;
	__u32 w[4];

	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	__builtin_memcpy(rk.addr, w, 16);
	rk.port = (__u16)ctx->user_port;
	rv = bpf_map_lookup_elem(&svcnat_sock_revnat, &rk);
	if (!rv)
		return SYS_PROCEED;
	__builtin_memcpy(w, rv->addr, 16);
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = (__u32)rv->port;
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
