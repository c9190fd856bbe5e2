package ebpf

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// benchState is n ClusterIP Services of one TCP port with 10 endpoints
// each.
func benchState(n int) *model.State {
	s := &model.State{ServicePorts: make(map[model.ServicePortName]*model.ServicePort, n)}
	for i := range n {
		sp := &model.ServicePort{
			Name:      model.ServicePortName{Namespace: "ns", Name: fmt.Sprintf("svc%d", i), Port: "http", Family: model.IPv4},
			Protocol:  model.TCP,
			Frontends: []model.Frontend{{Kind: model.ClusterIP, IP: netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}), Port: 80}},
		}
		for j := range 10 {
			k := i*10 + j
			sp.ClusterEndpoints = append(sp.ClusterEndpoints, model.Endpoint{IP: netip.AddrFrom4([4]byte{10, byte(128 + k>>16), byte(k >> 8), byte(k)}), Port: 8080})
		}
		s.ServicePorts[sp.Name] = sp
	}
	return s
}

// BenchmarkReconcile10k is the reconciler's cost per sync at 10,000
// Services x 10 endpoints (in-memory maps): one Service's endpoint
// changes, with room in the maps and with maps that hold 95 % of the
// endpoints (about 500 Services wait for room); a new Service, then its
// endpoints (two syncs); and the live heap per Service after the first
// sync, of the reconciler with its in-memory maps and of the reconciler
// alone.
func BenchmarkReconcile10k(b *testing.B) {
	const n = 10000
	setupSized := func(b *testing.B, capacity int) (*reconciler, *model.State) {
		rec := &reconciler{maps: newFakeKernel(capacity).maps}
		s := benchState(n)
		if err := rec.sync(s); err != nil && capacity >= n*10 {
			b.Fatal(err)
		}
		return rec, s
	}
	setup := func(b *testing.B) (*reconciler, *model.State) { return setupSized(b, 1<<20) }
	sync := func(b *testing.B, rec *reconciler, s *model.State, updated ...model.ServicePortName) {
		s.Change = &model.Change{Updated: updated}
		if err := rec.sync(s); err != nil && !errors.As(err, new(dataplane.PortErrors)) {
			b.Fatal(err)
		}
	}
	oneServiceChange := func(b *testing.B, rec *reconciler, s *model.State) {
		name := model.ServicePortName{Namespace: "ns", Name: "svc77", Port: "http", Family: model.IPv4}
		b.ReportAllocs()
		for b.Loop() {
			sp := s.ServicePorts[name].Clone()
			sp.ClusterEndpoints[0].Port ^= 1
			s.ServicePorts[name] = sp
			sync(b, rec, s, name)
		}
	}
	b.Run("OneServiceChange", func(b *testing.B) {
		rec, s := setup(b)
		oneServiceChange(b, rec, s)
	})
	b.Run("OneServiceChangeOverCapacity", func(b *testing.B) {
		rec, s := setupSized(b, n*10*95/100)
		if len(rec.failed) == 0 {
			b.Fatal("every Service fits the maps")
		}
		oneServiceChange(b, rec, s)
	})
	b.Run("NewServiceThenSlice", func(b *testing.B) {
		rec, s := setup(b)
		b.ReportAllocs()
		for i := n; b.Loop(); i++ {
			sp := benchState(1).ServicePorts[model.ServicePortName{Namespace: "ns", Name: "svc0", Port: "http", Family: model.IPv4}]
			sp.Name.Name = fmt.Sprintf("svc%d", i)
			sp.Frontends[0].IP = netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)})
			eps := sp.ClusterEndpoints
			sp.ClusterEndpoints = nil
			s.ServicePorts[sp.Name] = sp
			sync(b, rec, s, sp.Name)
			sp = sp.Clone()
			sp.ClusterEndpoints = eps
			s.ServicePorts[sp.Name] = sp
			sync(b, rec, s, sp.Name)
		}
	})
	b.Run("LiveHeap", func(b *testing.B) {
		var all, own uint64
		for b.Loop() {
			s := benchState(n)
			var before, after, without runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			k := newFakeKernel(1 << 20)
			rec := &reconciler{maps: k.maps}
			if err := rec.sync(s); err != nil {
				b.Fatal(err)
			}
			runtime.GC()
			runtime.ReadMemStats(&after)
			runtime.KeepAlive(rec)
			runtime.GC()
			runtime.ReadMemStats(&without)
			all, own = after.HeapAlloc-before.HeapAlloc, after.HeapAlloc-without.HeapAlloc
			runtime.KeepAlive(k)
			runtime.KeepAlive(s)
		}
		// heapB/service counts the in-memory maps, recB/service only what
		// the reconciler holds: in the agent the maps are the kernel's.
		b.ReportMetric(float64(all)/n, "heapB/service")
		b.ReportMetric(float64(own)/n, "recB/service")
	})
}
