package ebpf

// Run through `make generate`, which sets BPF2GO_CC (the clang; bpf2go takes
// the llvm-strip of the same version) and BPF2GO_CFLAGS (the host's multiarch
// include directory, for <asm/types.h>). The flags below follow them.
//go:generate go tool bpf2go -target bpfel -type svc_key -type svc_value -type slot_key -type backend -type svc_info -type source_range_key -type cidr_key -type affinity_key -type affinity_value -type member_key -type sock_state -type counter_key -type counter_value -type frontend_kind -type svc_flag -type endpoint_set -type backend_flag -type ct_mark svcnat ../../bpf/svcnat.c -- -O2 -g -Wall -Werror
//go:generate go tool bpf2go -target bpfel -no-global-types -type tc_stat tc ../../bpf/tc.c -- -O2 -g -Wall -Werror
//go:generate go tool bpf2go -target bpfel -no-global-types destroy ../../bpf/destroy.c -- -O2 -g -Wall -Werror
//go:generate go tool bpf2go -target bpfel -no-global-types -type trace_connect -type trace_verdict -type trace_mark -type trace_flag trace ../../bpf/trace.c -- -O2 -g -Wall -Werror
