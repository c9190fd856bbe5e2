package ebpf

//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type svc_key -type svc_value -type slot_key -type backend -type svc_info -type source_range_key -type cidr_key -type affinity_key -type affinity_value -type member_key -type sock_state -type counter_key -type counter_value svcnat ../../bpf/svcnat.c
//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -no-global-types -type tc_stat tc ../../bpf/tc.c
//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -no-global-types destroy ../../bpf/destroy.c
//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -no-global-types -type trace_connect -type trace_verdict trace ../../bpf/trace.c
