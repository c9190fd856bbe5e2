//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tc.c is the object of the tc programs (tc.h). It is separate from
 * svcnat.c because it calls the conntrack kfuncs, which only a kernel with
 * nf_conntrack and nf_nat has: the socket hooks load without them. Its maps
 * are svcnat.c's, pinned by name.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>

#include "tc.h"

char __license[] SEC("license") = "Dual BSD/GPL";
