//go:build linux

package ebpf

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
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
// latency through a Service at 1 and 10,000 Services against a direct
// connection, and the time to apply a one-Service change at 10,000
// Services. Run it with
//
//	SVCNAT_BENCH=1 go test -run TestConnectLatency -v ./pkg/ebpf
func TestConnectLatency(t *testing.T) {
	if os.Getenv("SVCNAT_BENCH") == "" {
		t.Skip("a benchmark: set SVCNAT_BENCH=1 to run it")
	}
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	be := env.backend(t)
	p := newPod(t, "10.244.1.2/24")
	p.serveTCP(t, "10.244.1.2:8080")
	netnstest.Run(t, "", "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000")
	web := sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint("10.244.1.2", 8080))
	if err := be.Sync(t.Context(), stateOf(web)); err != nil {
		t.Fatal(err)
	}
	rounds := 3
	measure := func(addr string) time.Duration {
		var ds []time.Duration
		for range rounds {
			r := testing.Benchmark(dialLoop(addr))
			ds = append(ds, time.Duration(r.NsPerOp()))
		}
		return median(ds)
	}

	direct := measure("10.244.1.2:8080")
	env.enterCgroup(t)
	directHook := measure("10.244.1.2:8080")
	one := measure("10.96.0.10:80")

	big := manyServices(10000, web)
	start := time.Now()
	if err := be.Sync(t.Context(), big); err != nil {
		t.Fatal(err)
	}
	initial := time.Since(start)
	many := measure("10.96.0.10:80")
	directHookMany := measure("10.244.1.2:8080")

	var changes []time.Duration
	for i := range 21 {
		changed := big.ServicePorts[model.ServicePortName{Namespace: "default", Name: fmt.Sprintf("svc-%d", i*97), Family: model.IPv4}]
		changed.ClusterEndpoints = changed.ClusterEndpoints[1:]
		start := time.Now()
		if err := be.Sync(t.Context(), big); err != nil {
			t.Fatal(err)
		}
		changes = append(changes, time.Since(start))
	}

	t.Logf("new TCP connection (connect, read, close), median of %d runs:", rounds)
	t.Logf("  direct to the pod, no hook:                %v", direct)
	t.Logf("  direct to the pod, hook attached:          %v", directHook)
	t.Logf("  through a ClusterIP, 1 Service:            %v", one)
	t.Logf("  through a ClusterIP, 10,001 Services:      %v (%+.1f%% vs 1 Service)", many, 100*(float64(many)-float64(one))/float64(one))
	t.Logf("  direct to the pod, hook, 10,001 Services:  %v", directHookMany)
	t.Logf("first sync of 10,001 Services x 10 endpoints: %v", initial)
	t.Logf("one-Service change at 10,001 Services: median %v, max %v (21 changes)", median(changes), slices.Max(changes))
}
