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

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// dialLoop measures one new TCP connection: connect, read the server's
// answer to EOF, close.
func dialLoop(addr string) func(b *testing.B) {
	return func(b *testing.B) {
		for b.Loop() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, c); err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	}
}

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
	const rounds = 9
	var direct, viaOne, viaMany []time.Duration
	ns := func(f func(*testing.B)) time.Duration { return time.Duration(testing.Benchmark(f).NsPerOp()) }
	for range rounds {
		moveTo(home)
		direct = append(direct, ns(dialLoop("10.244.1.2:8080")))
		moveTo(envOne.cgroup)
		viaOne = append(viaOne, ns(dialLoop("10.96.0.10:80")))
		moveTo(envMany.cgroup)
		viaMany = append(viaMany, ns(dialLoop("10.96.0.10:80")))
	}
	moveTo(envOne.cgroup)

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

	d, o, m := median(direct), median(viaOne), median(viaMany)
	t.Logf("new TCP connection (connect, read to EOF, close), median of %d interleaved runs:", rounds)
	t.Logf("  direct to the pod, no hook:           %v", d)
	t.Logf("  through a ClusterIP, 1 Service:       %v (%+.1f%% vs direct)", o, pct(o, d))
	t.Logf("  through a ClusterIP, 10,001 Services: %v (%+.1f%% vs 1 Service)", m, pct(m, o))
	t.Logf("first sync of 10,001 Services x 10 endpoints: %v", initial)
	t.Logf("one-Service change at 10,001 Services: median %v, max %v (21 changes)", median(changes), slices.Max(changes))
}

func pct(a, b time.Duration) float64 { return 100 * (float64(a) - float64(b)) / float64(b) }
