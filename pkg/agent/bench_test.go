package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/svcnat/svcnat/pkg/model"
)

// nopBackend programs nothing: the benchmarks measure the agent's own work.
type nopBackend struct{ fakeBackend }

func (*nopBackend) Sync(context.Context, *model.State) error { return nil }

func benchSlice(i, variant int) *discoveryv1.EndpointSlice {
	name := fmt.Sprintf("svc%d", i)
	ips := make([]string, 10)
	for j := range ips {
		k := i*10 + j + variant
		ips[j] = fmt.Sprintf("10.%d.%d.%d", 128+k>>16, k>>8&255, k&255)
	}
	return endpointSlice(name, name+"-1", ips...)
}

func benchService(i int) *corev1.Service {
	return service(fmt.Sprintf("svc%d", i), fmt.Sprintf("10.%d.%d.%d", 96+i>>16, i>>8&255, i&255))
}

// benchSources holds n Services of 10 endpoints each.
func benchSources(n int) *fakeSources {
	src := newFakeSources()
	for i := range n {
		src.put(benchService(i), benchSlice(i, 0))
	}
	return src
}

// firstSync makes an agent on src and runs its first, full sync.
func firstSync(b *testing.B, src *fakeSources) *Agent {
	a := New(&nopBackend{}, src, Options{
		NodeName: "node1", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Metrics: NewMetrics(prometheus.NewRegistry()),
	})
	if err := a.sync(b.Context()); err != nil {
		b.Fatal(err)
	}
	return a
}

// benchAgent returns an agent that has programmed n Services of 10
// endpoints each, and the live heap it holds for them.
func benchAgent(b *testing.B, n int) (*Agent, *fakeSources, uint64) {
	src := benchSources(n)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	a := firstSync(b, src)
	runtime.GC()
	runtime.ReadMemStats(&after)
	return a, src, after.HeapAlloc - before.HeapAlloc
}

// BenchmarkSync10k is the agent's cost per sync at 10,000 Services x 10
// endpoints: the first, full sync (the model built from the caches and its
// conflicts resolved); one Service's endpoints change; a new Service, then
// its EndpointSlice (two syncs); the periodic sync, which changes nothing;
// and the live heap the agent holds per Service beside the informer caches.
func BenchmarkSync10k(b *testing.B) {
	const n = 10000
	b.Run("FirstSync", func(b *testing.B) {
		src := benchSources(n)
		b.ReportAllocs()
		for b.Loop() {
			firstSync(b, src)
		}
	})
	b.Run("OneServiceChange", func(b *testing.B) {
		a, src, _ := benchAgent(b, n)
		key := types.NamespacedName{Namespace: "ns", Name: "svc77"}
		slices := []*discoveryv1.EndpointSlice{benchSlice(77, 0), benchSlice(77, 1)}
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			src.put(benchService(77), slices[i%2])
			a.ServiceChanged(key)
			if err := a.sync(b.Context()); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("NewServiceThenSlice", func(b *testing.B) {
		a, src, _ := benchAgent(b, n)
		b.ReportAllocs()
		for i := n; b.Loop(); i++ {
			key := src.put(benchService(i))
			a.ServiceChanged(key)
			if err := a.sync(b.Context()); err != nil {
				b.Fatal(err)
			}
			src.put(benchService(i), benchSlice(i, 0))
			a.ServiceChanged(key)
			if err := a.sync(b.Context()); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Periodic", func(b *testing.B) {
		a, _, _ := benchAgent(b, n)
		b.ReportAllocs()
		for b.Loop() {
			if err := a.sync(b.Context()); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("LiveHeap", func(b *testing.B) {
		var heap uint64
		for b.Loop() {
			_, _, heap = benchAgent(b, n)
		}
		b.ReportMetric(float64(heap)/n, "heapB/service")
	})
}
