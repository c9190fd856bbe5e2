//go:build linux

package ebpf

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/svcnat/svcnat/pkg/model"
)

// BenchmarkPruneCounters10k is the once-a-minute counter prune at 10,000
// Services x 10 endpoints, every Service port and one endpoint of each
// counted (20,000 rows, none dead): the walk of the map, in the
// background, and what the Sync after it does. Needs root (a BPF map, no
// program, nothing attached).
func BenchmarkPruneCounters10k(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root to create a BPF map")
	}
	rec := &reconciler{maps: newFakeKernel(1 << 20).maps}
	if err := rec.sync(benchState(10000)); err != nil {
		b.Fatal(err)
	}
	spec, err := loadSvcnat()
	if err != nil {
		b.Fatal(err)
	}
	ms := spec.Maps[svcnatMapSvcnatCounters].Copy()
	ms.Pinning, ms.MaxEntries = ebpf.PinNone, 1<<16
	m, err := ebpf.NewMap(ms)
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	zero := make([]svcnatCounterValue, ebpf.MustPossibleCPU())
	counted := map[uint32]bool{}
	for k := range rec.written.members {
		if counted[k.Id] {
			continue
		}
		counted[k.Id] = true
		for _, row := range []svcnatCounterKey{{Id: k.Id}, {Id: k.Id, BackendId: k.BackendId}} {
			if err := m.Put(row, zero); err != nil {
				b.Fatal(err)
			}
		}
	}
	keys, err := counterKeys(m)
	if err != nil || len(keys) != 2*len(counted) {
		b.Fatalf("%d rows (%v), want %d", len(keys), err, 2*len(counted))
	}
	b.Run("BackgroundWalk", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := counterKeys(m); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("SyncPath", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := deleteDeadCounters(m, rec.written, keys); err != nil {
				b.Fatal(err)
			}
		}
	})
	if n, _ := counterKeys(m); len(n) != len(keys) {
		b.Fatalf("prune deleted live rows: %d left of %d", len(n), len(keys))
	}
}

// TestDestroyGoneIdleWhenNothingChanged: while a UDP endpoint drains, a
// sync that changes no ServicePort (the periodic reconcile) does not
// look through every UDP ServicePort for it.
func TestDestroyGoneIdleWhenNothingChanged(t *testing.T) {
	s := benchState(10000)
	for _, p := range s.ServicePorts {
		p.Protocol = model.UDP
		p.ServingEndpoints = p.ClusterEndpoints
	}
	e := s.Sorted()[0].ServingEndpoints[0]
	draining := svcnatBackend{Addr: addr16(e.IP), Port: htons(e.Port)}
	b := &Backend{rec: &reconciler{}, draining: map[svcnatBackend]bool{draining: true}}
	s.Change = &model.Change{}
	if allocs := testing.AllocsPerRun(5, func() { b.destroyGone(s) }); allocs != 0 {
		t.Errorf("a sync that changes nothing allocates %v times for a draining endpoint", allocs)
	}
	if !b.draining[draining] {
		t.Error("a draining endpoint is forgotten by a sync that changes nothing")
	}
}
