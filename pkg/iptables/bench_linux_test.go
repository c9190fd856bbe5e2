//go:build linux

package iptables

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/model"
)

const envBenchNetns = "SVCNAT_TEST_NETNS"

// inBenchNetns runs a privileged benchmark in a network namespace of its
// own. Called in the parent, it re-runs this one benchmark as a child under
// `ip netns exec`, prints its output, removes the namespace and skips;
// called in the child it returns true.
func inBenchNetns(b *testing.B) bool {
	b.Helper()
	if os.Getenv(envBenchNetns) != "" {
		self, _ := os.Readlink("/proc/self/ns/net")
		if self == os.Getenv("SVCNAT_BENCH_PARENT_NETNS") {
			b.Fatal("benchmark child runs in its parent's network namespace")
		}
		return true
	}
	if os.Geteuid() != 0 {
		b.Skip("needs root: programs iptables in a network namespace of its own")
	}
	ns := fmt.Sprintf("sn-b%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		b.Fatalf("create namespace %s: %v: %s", ns, err, out)
	}
	defer func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			b.Errorf("delete namespace %s: %v: %s", ns, err, out)
		}
	}()
	parts := strings.Split(b.Name(), "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	args := []string{"netns", "exec", ns, os.Args[0], "-test.run", "^$", "-test.bench", strings.Join(parts, "/"), "-test.benchmem"}
	if f := flag.Lookup("test.benchtime"); f != nil {
		args = append(args, "-test.benchtime", f.Value.String())
	}
	cmd := exec.Command("ip", args...)
	parent, _ := os.Readlink("/proc/self/ns/net")
	cmd.Env = append(os.Environ(), envBenchNetns+"="+ns, "SVCNAT_BENCH_PARENT_NETNS="+parent)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		b.Fatalf("benchmark in namespace %s: %v", ns, err)
	}
	b.Skip("ran in namespace " + ns + "; results above")
	return false
}

func benchBackend(b *testing.B, mode string) *Backend {
	b.Helper()
	be, err := New(Options{Mode: mode, Families: []model.Family{model.IPv4}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	if err := be.Init(b.Context()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := be.Cleanup(context.Background()); err != nil {
			b.Error(err)
		}
	})
	return be
}

// syncedBackend10k returns a backend that programmed 10,000 Services x 10
// endpoints, and their State.
func syncedBackend10k(b *testing.B, mode string) (*Backend, *model.State) {
	s := bigState(10000, 10)
	be := benchBackend(b, mode)
	if err := be.Sync(b.Context(), s); err != nil {
		b.Fatal(err)
	}
	return be, s
}

// toggleEndpoint adds an endpoint to sp, or takes it away again.
func toggleEndpoint(sp *model.ServicePort) {
	extra := model.Endpoint{IP: netip.MustParseAddr("10.245.0.1"), Port: 8080}
	if n := len(sp.ClusterEndpoints); n > 0 && sp.ClusterEndpoints[n-1] == extra {
		sp.ClusterEndpoints = sp.ClusterEndpoints[:n-1]
	} else {
		sp.ClusterEndpoints = append(sp.ClusterEndpoints, extra)
	}
}

// BenchmarkSync10k measures a full sync (the first one after Init) of
// 10,000 Services x 10 endpoints into empty tables.
func BenchmarkSync10k(b *testing.B) {
	for _, mode := range []string{ModeNFT, ModeLegacy} {
		b.Run(mode, func(b *testing.B) { benchmarkSync10k(b, mode) })
	}
}

func benchmarkSync10k(b *testing.B, mode string) {
	if !inBenchNetns(b) {
		return
	}
	s := bigState(10000, 10)
	be := benchBackend(b, mode)
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		if err := be.Cleanup(b.Context()); err != nil {
			b.Fatal(err)
		}
		if err := be.Init(b.Context()); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := be.Sync(b.Context(), s); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(be.families[0].prog.rules[tableNAT]), "nat-rules")
	b.ReportMetric(float64(len(be.families[0].prog.sums[tableNAT])), "nat-chains")
}

// BenchmarkSyncOneServiceChange10k measures the sync after one Service's
// endpoints changed among 10,000 Services x 10 endpoints, named in the
// State's Change as the agent does, and once the comparison of every chain
// (CheckDrift, beside the sync loop) as checkdrift-s and the bytes it
// allocates (streamed, never held whole) as checkdrift-alloc-MB.
func BenchmarkSyncOneServiceChange10k(b *testing.B) {
	for _, mode := range []string{ModeNFT, ModeLegacy} {
		b.Run(mode, func(b *testing.B) { benchmarkSyncOneServiceChange10k(b, mode) })
	}
}

func benchmarkSyncOneServiceChange10k(b *testing.B, mode string) {
	if !inBenchNetns(b) {
		return
	}
	be, s := syncedBackend10k(b, mode)
	sp := s.ServicePorts[model.ServicePortName{Namespace: "ns7", Name: "svc1007", Port: "http", Family: model.IPv4}]
	s.Change = &model.Change{Updated: []model.ServicePortName{sp.Name}}
	b.ReportAllocs()
	for b.Loop() {
		toggleEndpoint(sp)
		if err := be.Sync(b.Context(), s); err != nil {
			b.Fatal(err)
		}
		if be.lastWrite.full || be.lastWrite.written != 1 {
			b.Fatalf("one endpoint changed: sync wrote %+v, want one chain", be.lastWrite)
		}
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	if drift, err := be.CheckDrift(b.Context()); err != nil || drift {
		b.Fatalf("CheckDrift = %v, %v; want no drift", drift, err)
	}
	b.ReportMetric(time.Since(start).Seconds(), "checkdrift-s")
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(after.TotalAlloc-before.TotalAlloc)/1e6, "checkdrift-alloc-MB")
}

// BenchmarkSyncBurst10k programs a burst of burstChanges changes, each to
// another Service among 10,000 Services x 10 endpoints and burstGap after
// the previous one, batched as the agent's loop batches them with a given
// --min-sync-period (a sync starts as soon as a change is pending and the
// window since the previous sync's start has passed; it takes every change
// arrived by then). It reports the CPU the burst costs (this process and
// the iptables-restore it runs; the latter also alone), the syncs it takes, and the p90 and
// maximum time from a change's arrival to the end of the sync that
// programmed it.
func BenchmarkSyncBurst10k(b *testing.B) {
	for _, mode := range []string{ModeNFT, ModeLegacy} {
		for _, window := range []time.Duration{time.Second, 250 * time.Millisecond, 100 * time.Millisecond} {
			b.Run(fmt.Sprintf("%s/window=%v", mode, window), func(b *testing.B) { benchmarkSyncBurst(b, mode, window) })
		}
	}
}

const (
	burstChanges = 1000
	burstGap     = 2 * time.Millisecond // the rate of make bench's 1000-change burst
)

func benchmarkSyncBurst(b *testing.B, mode string, window time.Duration) {
	if !inBenchNetns(b) {
		return
	}
	be, s := syncedBackend10k(b, mode)
	sps := s.Sorted()[:burstChanges]
	var latencies []time.Duration
	var self, children time.Duration
	syncs := 0
	for b.Loop() {
		self0, children0 := cpuTime(b)
		start := time.Now()
		var lastStart time.Time
		for next := 0; next < burstChanges; {
			at := start.Add(time.Duration(next) * burstGap)
			if w := lastStart.Add(window); w.After(at) {
				at = w
			}
			time.Sleep(time.Until(at))
			lastStart = time.Now()
			arrived := min(burstChanges, int(lastStart.Sub(start)/burstGap)+1)
			s.Change = &model.Change{}
			for _, sp := range sps[next:arrived] {
				toggleEndpoint(sp)
				s.Change.Updated = append(s.Change.Updated, sp.Name)
			}
			if err := be.Sync(b.Context(), s); err != nil {
				b.Fatal(err)
			}
			end := time.Now()
			for i := next; i < arrived; i++ {
				latencies = append(latencies, end.Sub(start.Add(time.Duration(i)*burstGap)))
			}
			next = arrived
			syncs++
		}
		self1, children1 := cpuTime(b)
		self, children = self+self1-self0, children+children1-children0
	}
	slices.Sort(latencies)
	b.ReportMetric((self+children).Seconds()/float64(b.N), "cpu-s/burst")
	b.ReportMetric(children.Seconds()/float64(b.N), "restore-cpu-s/burst")
	b.ReportMetric(float64(syncs)/float64(b.N), "syncs/burst")
	b.ReportMetric(float64(latencies[len(latencies)*9/10].Milliseconds()), "p90-ms")
	b.ReportMetric(float64(latencies[len(latencies)-1].Milliseconds()), "max-ms")
}

// cpuTime is the CPU time used by this process and by the children it
// waited for (iptables-restore).
func cpuTime(b *testing.B) (self, children time.Duration) {
	var out [2]time.Duration
	for i, who := range []int{syscall.RUSAGE_SELF, syscall.RUSAGE_CHILDREN} {
		var ru syscall.Rusage
		if err := syscall.Getrusage(who, &ru); err != nil {
			b.Fatal(err)
		}
		out[i] = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return out[0], out[1]
}
