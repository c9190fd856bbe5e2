//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * destroy.c: a UDP socket iterator that destroys (bpf_sock_destroy) the
 * sockets a connect() hook pointed at an endpoint that has since been
 * removed, so that a connected UDP client (a DNS resolver) gets an error at
 * once and reconnects, through the hook, to a live endpoint. A separate
 * object: it needs kernel BTF and Linux 6.5, the rest of svcnat does not.
 *
 * The agent fills svcnat_destroy with the removed endpoints and runs the
 * iterator once in every network namespace that may hold such sockets. Only
 * sockets the hooks translated to that endpoint (a peer in their svcnat_sock
 * storage) are destroyed, never a socket an application connected to the
 * endpoint's address itself.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include "svcnat.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10

/* The kernel's types, only the fields used; CO-RE finds their offsets. */
struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct udp_sock;

struct bpf_iter_meta;

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* An endpoint removed from every Service: address, port, protocol. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, __u8);
	__uint(max_entries, 4096);
} svcnat_destroy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__type(key, int);
	__type(value, struct sock_state);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svcnat_sock SEC(".maps");

SEC("iter/udp")
int svcnat_destroy_udp(struct bpf_iter__udp *ctx)
{
	struct sock *sk = (struct sock *)ctx->udp_sk;
	struct svc_key ek = { .proto = IPPROTO_UDP };
	struct sock_state *st;
	int translated = 0;

	if (!sk)
		return 0;
	if (sk->__sk_common.skc_family == AF_INET) {
		__be32 d = sk->__sk_common.skc_daddr;

		ek.addr[10] = 0xff;
		ek.addr[11] = 0xff;
		__builtin_memcpy(&ek.addr[12], &d, 4);
	} else if (sk->__sk_common.skc_family == AF_INET6) {
		struct in6_addr d = sk->__sk_common.skc_v6_daddr;

		__builtin_memcpy(ek.addr, &d, 16);
	} else {
		return 0;
	}
	ek.port = sk->__sk_common.skc_dport;
	if (!bpf_map_lookup_elem(&svcnat_destroy, &ek))
		return 0;
	st = bpf_sk_storage_get(&svcnat_sock, sk, 0, 0);
	if (!st)
		return 0;
	for (int i = 0; i < SVCNAT_SOCK_PEERS; i++) {
		struct sock_peer *p = &st->peers[i];

		if (p->id && p->backend_port == ek.port && !__builtin_memcmp(p->backend, ek.addr, 16))
			translated = 1;
	}
	if (!translated)
		return 0;
	bpf_sock_destroy((struct sock_common *)sk);
	return 0;
}
