//go:build linux

package ebpf

import (
	"log/slog"
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/svcnat/svcnat/pkg/model"
)

// TestCheckDrift: the periodic sync (a Change naming nothing) reads no map;
// CheckDrift, beside the loop, finds entries deleted or changed by hand,
// and the next periodic sync repairs them; a sync that writes while
// CheckDrift reads makes the read inconclusive, not drift.
func TestCheckDrift(t *testing.T) {
	k := newFakeKernel(1 << 20)
	rec := &reconciler{maps: k.maps}
	b := &Backend{rec: rec, log: slog.New(slog.DiscardHandler)}
	s := randomState(rand.New(rand.NewPCG(8, 8)), 20)
	if err := rec.sync(s); err != nil {
		t.Fatal(err)
	}
	want, _ := readTable(k.maps)
	periodic := *s
	periodic.Change = &model.Change{}
	check := func(step string, wantDrift bool) {
		t.Helper()
		if drift, err := b.CheckDrift(t.Context()); err != nil || drift != wantDrift {
			t.Fatalf("%s: CheckDrift = %v, %v; want %v", step, drift, err, wantDrift)
		}
	}

	check("right after a sync", false)
	k.reads = 0
	if err := rec.sync(&periodic); err != nil {
		t.Fatal(err)
	}
	if k.reads != 0 {
		t.Errorf("the periodic sync read %d maps; CheckDrift compares beside the loop", k.reads)
	}

	services := fakeEntries[svcnatSvcKey, svcnatSvcValue](k, svcnatMapSvcnatServices)
	for key := range services {
		delete(services, key)
		break
	}
	slots := fakeEntries[svcnatSlotKey, uint32](k, svcnatMapSvcnatSlots)
	for key, v := range slots {
		slots[key] = v + 1000
		break
	}
	check("after a frontend was deleted and a slot changed by hand", true)
	if err := rec.sync(&periodic); err != nil {
		t.Fatal(err)
	}
	if got, _ := readTable(k.maps); !got.equal(want) {
		t.Fatal("the periodic sync after CheckDrift found drift left the maps as they were")
	}
	check("after the repair", false)

	// A sync lands while CheckDrift reads the third map: the maps it read
	// first show the old state, the others the new one.
	next := randomState(rand.New(rand.NewPCG(9, 9)), 20)
	start := k.reads
	k.read = func() {
		if k.reads == start+3 {
			k.read = nil
			b.mu.Lock()
			defer b.mu.Unlock()
			if err := rec.sync(next); err != nil {
				t.Error(err)
			}
		}
	}
	check("with a sync during the read", false)
	if rec.written == nil {
		t.Fatal("an inconclusive check forgot what was written")
	}
	check("after that sync", false)
}

// TestCheckDriftKeepsNoCopy: CheckDrift compares digests, not a copy of the
// maps: a check of 2,000 ServicePorts' entries allocates a few hundred
// bytes, where a copy took about a megabyte (garbage every --sync-period).
func TestCheckDriftKeepsNoCopy(t *testing.T) {
	k := newFakeKernel(1 << 20)
	rec := &reconciler{maps: k.maps}
	b := &Backend{rec: rec, log: slog.New(slog.DiscardHandler)}
	if err := rec.sync(randomState(rand.New(rand.NewPCG(10, 10)), 2000)); err != nil {
		t.Fatal(err)
	}
	const checks = 5
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range checks {
		if drift, err := b.CheckDrift(t.Context()); err != nil || drift {
			t.Fatalf("CheckDrift = %v, %v; want no drift", drift, err)
		}
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / checks; per > 4096 {
		t.Errorf("a check allocated %d bytes, want at most 4096", per)
	}
}
