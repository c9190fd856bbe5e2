//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * svcnat.c is the main compilation unit: the socket hooks (sock.h) and every
 * pinned map, so bpf2go generates each map type once. The tc programs, which
 * need the kernel's conntrack kfuncs, are a separate object (tc.c) loaded
 * only for --interfaces, on the same pinned maps.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>

#include "sock.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/*
 * Never called: its parameters bring svcnat.h's enums into the object's BTF,
 * which holds only the types something emitted refers to, so that bpf2go
 * -type generates them as Go constants for pkg/ebpf.
 */
static __attribute__((used)) int svcnat_enums(enum frontend_kind k, enum svc_flag f, enum endpoint_set s,
					      enum backend_flag b, enum ct_mark m)
{
	return k + f + s + b + m;
}
