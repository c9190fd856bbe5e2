//go:build linux

package ebpf

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// manyServices returns n ServicePorts of 10 endpoints each (addresses
// nothing listens on), plus extra.
func manyServices(n int, extra *model.ServicePort) *model.State {
	s := stateOf(extra)
	for i := range n {
		p := sp(fmt.Sprintf("svc-%d", i), model.IPv4, model.TCP, netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)}).String(), 80)
		for j := range 10 {
			p.ClusterEndpoints = append(p.ClusterEndpoints, model.Endpoint{IP: netip.AddrFrom4([4]byte{10, 245, byte(i >> 8), byte(i)}), Port: uint16(8000 + j)})
		}
		s.ServicePorts[p.Name] = p
	}
	return s
}

func median(ds []time.Duration) time.Duration {
	slices.Sort(ds)
	return ds[len(ds)/2]
}

// TestConnectLatency is the benchmark the README quotes: new-connection
// latency through a Service at 1 and at 10,001 Services against a direct
// connection, and the time to apply a one-Service change at 10,001
// Services. Two backends with maps of their own, on two cgroups, hold the
// 1-Service and the 10,001-Service state; the test process moves between
// the cgroups so that the measurements interleave and share the machine's
// noise. Run it with
//
//	SVCNAT_BENCH=1 go test -run TestConnectLatency -v ./pkg/ebpf
func TestConnectLatency(t *testing.T) {
	if os.Getenv("SVCNAT_BENCH") == "" {
		t.Skip("a benchmark: set SVCNAT_BENCH=1 to run it")
	}
	if !netnstest.InNetns(t) {
		return
	}
	envOne, envMany := newTestEnv(t), newTestEnv(t)
	one, many := envOne.backend(t), envMany.backend(t)
	p := newPod(t, "10.244.1.2/24")
	p.serveTCP(t, "10.244.1.2:8080")
	netnstest.Run(t, "", "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000")
	web := sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint("10.244.1.2", 8080))
	if err := one.Sync(t.Context(), stateOf(web)); err != nil {
		t.Fatal(err)
	}
	big := manyServices(10000, web)
	start := time.Now()
	if err := many.Sync(t.Context(), big); err != nil {
		t.Fatal(err)
	}
	initial := time.Since(start)

	home := envOne.cgroupRoot
	if path, err := ownCgroup(); err == nil {
		home = filepath.Join(envOne.cgroupRoot, path)
	}
	envOne.enterCgroup(t) // and back home at the end
	moveTo := func(dir string) {
		if err := os.WriteFile(dir+"/cgroup.procs", []byte(fmt.Sprint(os.Getpid())), 0); err != nil {
			t.Fatalf("move to cgroup %s: %v", dir, err)
		}
	}
	// Connections alternate between the three ways one by one, so that
	// all see the same load on the machine; each is timed alone.
	const n = 2000
	targets := []struct {
		cgroup, addr string
		took         []time.Duration
	}{
		{home, "10.244.1.2:8080", nil},
		{envOne.cgroup, "10.96.0.10:80", nil},
		{envMany.cgroup, "10.96.0.10:80", nil},
	}
	for range n {
		for i := range targets {
			tg := &targets[i]
			moveTo(tg.cgroup)
			start := time.Now()
			c, err := net.Dial("tcp", tg.addr)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, c); err != nil {
				t.Fatal(err)
			}
			c.Close()
			tg.took = append(tg.took, time.Since(start))
		}
	}
	moveTo(envOne.cgroup)
	direct, viaOne, viaMany := targets[0].took, targets[1].took, targets[2].took

	var changes []time.Duration
	for i := range 21 {
		changed := big.ServicePorts[model.ServicePortName{Namespace: "default", Name: fmt.Sprintf("svc-%d", i*97), Family: model.IPv4}]
		changed.ClusterEndpoints = changed.ClusterEndpoints[1:]
		start := time.Now()
		if err := many.Sync(t.Context(), big); err != nil {
			t.Fatal(err)
		}
		changes = append(changes, time.Since(start))
	}
	// A sync without a Change (as after a failure): it reads the maps back
	// and compares everything.
	start = time.Now()
	if err := many.Sync(t.Context(), big); err != nil {
		t.Fatal(err)
	}
	periodic := time.Since(start)

	d, o, m := median(direct), median(viaOne), median(viaMany)
	t.Logf("new TCP connection (connect, read to EOF, close), median of %d, interleaved one by one:", n)
	t.Logf("  direct to the pod, no hook:           %v", d)
	t.Logf("  through a ClusterIP, 1 Service:       %v (%+.1f%% vs direct)", o, pct(o, d))
	t.Logf("  through a ClusterIP, 10,001 Services: %v (%+.1f%% vs 1 Service)", m, pct(m, o))
	t.Logf("  p90: direct %v, 1 Service %v, 10,001 Services %v", p90(direct), p90(viaOne), p90(viaMany))
	t.Logf("first sync of 10,001 Services x 10 endpoints: %v", initial)
	t.Logf("one-Service change at 10,001 Services: median %v, max %v (21 changes)", median(changes), slices.Max(changes))
	t.Logf("sync without a Change (maps read back) at 10,001 Services: %v", periodic)
}

func p90(ds []time.Duration) time.Duration {
	slices.Sort(ds)
	return ds[len(ds)*9/10]
}

func pct(a, b time.Duration) float64 { return 100 * (float64(a) - float64(b)) / float64(b) }

// BenchmarkFirstSync10k is the eBPF backend's initial programming at
// 10,000 Services x 10 endpoints: Init (maps made and programs loaded and
// attached in a fresh bpffs and cgroup), and the first Sync into those
// real, empty maps. cpu-s/op is the process's user and system time. Profile
// it with
//
//	go test -run '^$' -bench FirstSync10k -benchtime 3x -cpuprofile cpu.prof ./pkg/ebpf
//	go tool pprof -top pkg/ebpf.test cpu.prof.netns
func BenchmarkFirstSync10k(b *testing.B) {
	if !netnstest.InNetns(b) {
		return
	}
	s := benchState(10000)
	b.Run("Init", func(b *testing.B) {
		b.ReportAllocs()
		var cpu time.Duration
		for b.Loop() {
			start := cpuTime(b)
			newTestEnv(b).backend(b)
			cpu += cpuTime(b) - start
		}
		b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
	})
	b.Run("Sync", func(b *testing.B) {
		b.ReportAllocs()
		var cpu time.Duration
		for b.Loop() {
			b.StopTimer()
			be := newTestEnv(b).backend(b)
			b.StartTimer()
			start := cpuTime(b)
			if err := be.Sync(b.Context(), s); err != nil {
				b.Fatal(err)
			}
			cpu += cpuTime(b) - start
		}
		b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
	})
}

// cpuTime is the user and system time the process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
