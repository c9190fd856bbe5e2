//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * svcnat.c is the one compilation unit: every program in one object, so they
 * share one set of maps (pinned by name) and bpf2go generates each map type
 * once. The programs live in sock.h (cgroup socket hooks) and tc.h (tc).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>

#include "sock.h"

char __license[] SEC("license") = "Dual BSD/GPL";
