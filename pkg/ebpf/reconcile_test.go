package ebpf

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"github.com/svcnat/svcnat/pkg/model"
)

var errInjected = errors.New("injected failure")

// fakeMap is an in-memory BPF hash map: a capacity like max_entries (a new
// key beyond it fails as the kernel's E2BIG does), writes that fail when
// fail says so, and a hook that sees the maps after every write that took
// effect.
type fakeMap struct {
	entries  map[any]any
	capacity int
	fail     func() bool
	after    func()
}

func (f *fakeMap) Put(key, value any) error {
	if f.fail != nil && f.fail() {
		return errInjected
	}
	if _, ok := f.entries[key]; !ok && len(f.entries) >= f.capacity {
		return errors.New("map full")
	}
	f.entries[key] = value
	if f.after != nil {
		f.after()
	}
	return nil
}

func (f *fakeMap) Delete(key any) error {
	if f.fail != nil && f.fail() {
		return errInjected
	}
	delete(f.entries, key)
	if f.after != nil {
		f.after()
	}
	return nil
}

func (f *fakeMap) Iterate() entryIterator {
	it := &fakeIterator{}
	for k, v := range f.entries {
		it.keys = append(it.keys, k)
		it.values = append(it.values, v)
	}
	return it
}

type fakeIterator struct {
	keys, values []any
}

func (it *fakeIterator) Next(key, value any) bool {
	if len(it.keys) == 0 {
		return false
	}
	reflect.ValueOf(key).Elem().Set(reflect.ValueOf(it.keys[0]))
	reflect.ValueOf(value).Elem().Set(reflect.ValueOf(it.values[0]))
	it.keys, it.values = it.keys[1:], it.values[1:]
	return true
}

func (it *fakeIterator) Err() error { return nil }

func fakeMaps(capacity int, fail func() bool) *mapSet {
	sized := func(name, flag string) sizedMap {
		return sizedMap{name: name, flag: flag, capacity: capacity, m: &fakeMap{entries: map[any]any{}, capacity: capacity, fail: fail}}
	}
	return &mapSet{
		services:     sized("svcnat_services", "--bpf-map-max-services"),
		info:         sized("svcnat_svc_info", "--bpf-map-max-services"),
		slots:        sized("svcnat_slots", "--bpf-map-max-backends"),
		backends:     sized("svcnat_backends", "--bpf-map-max-backends"),
		sourceRanges: sized("svcnat_source_ranges", "--bpf-map-max-services"),
		clusterCIDRs: sized("svcnat_cluster_cidrs", ""),
	}
}

// datapathConsistent checks what the BPF programs rely on, at any instant:
// every frontend's count covers slots that exist and name backends that
// exist.
func datapathConsistent(ms *mapSet) error {
	t, err := readTable(ms)
	if err != nil {
		return err
	}
	for k, v := range t.services {
		for set, count := range []uint16{v.ClusterCount, v.LocalCount} {
			for i := range count {
				bid, ok := t.slots[svcnatSlotKey{Id: v.Id, Slot: i, Set: uint8(set)}]
				if !ok {
					return fmt.Errorf("frontend %s:%d: slot %d of set %d missing", addrString(k.Addr), ntohs(k.Port), i, set)
				}
				if _, ok := t.backends[bid]; !ok {
					return fmt.Errorf("frontend %s:%d: slot %d names missing backend %d", addrString(k.Addr), ntohs(k.Port), i, bid)
				}
			}
		}
	}
	return nil
}

func TestReconcilerConvergesDespiteWriteFailures(t *testing.T) {
	for seed := range uint64(20) {
		r := rand.New(rand.NewPCG(seed, 2))
		failing := false
		ms := fakeMaps(1<<20, func() bool { return failing && r.IntN(100) < 5 })
		var inconsistent error
		for _, sm := range []sizedMap{ms.services, ms.info, ms.slots, ms.backends, ms.sourceRanges, ms.clusterCIDRs} {
			sm.m.(*fakeMap).after = func() {
				if err := datapathConsistent(ms); err != nil && inconsistent == nil {
					inconsistent = err
				}
			}
		}
		rec := &reconciler{maps: ms}
		for step := range 8 {
			want := randomState(r, r.IntN(25))
			failing = true
			var err error
			for attempt := 0; attempt < 300; attempt++ {
				if err = rec.sync(want); err == nil {
					break
				}
				if !errors.Is(err, errInjected) {
					t.Fatalf("seed %d step %d: sync: %v", seed, step, err)
				}
			}
			if err != nil {
				t.Fatalf("seed %d step %d: no success in 300 attempts: %v", seed, step, err)
			}
			if inconsistent != nil {
				t.Fatalf("seed %d step %d: datapath saw a half-written service: %v", seed, step, inconsistent)
			}
			failing = false
			got, err := readTable(ms)
			if err != nil {
				t.Fatal(err)
			}
			if !got.equal(rec.written) {
				t.Fatalf("seed %d step %d: maps differ from what the reconciler believes it wrote", seed, step)
			}
			dumped, err := decode(got)
			if err != nil {
				t.Fatalf("seed %d step %d: decode: %v", seed, step, err)
			}
			statesEqual(t, want, dumped)
		}
	}
}

func TestReconcilerWritesOnlyTheDifference(t *testing.T) {
	writes := 0
	ms := fakeMaps(1<<20, func() bool { writes++; return false })
	rec := &reconciler{maps: ms}
	s := randomState(rand.New(rand.NewPCG(3, 3)), 50)
	if err := rec.sync(s); err != nil {
		t.Fatal(err)
	}
	writes = 0
	if err := rec.sync(s); err != nil {
		t.Fatal(err)
	}
	if writes != 0 {
		t.Errorf("second sync of the same state made %d writes, want 0", writes)
	}
	// One more endpoint for one ServicePort: a backend, a slot, and the
	// ServicePort's frontends.
	sp := s.Sorted()[0]
	sp.ClusterEndpoints = append(sp.ClusterEndpoints, model.Endpoint{IP: sp.Frontends[0].IP.Next(), Port: 9})
	if err := rec.sync(s); err != nil {
		t.Fatal(err)
	}
	if want := 2 + len(sp.Frontends); writes != want {
		t.Errorf("adding one endpoint made %d writes, want %d", writes, want)
	}
}

func TestReconcilerRestartAdoptsNumbers(t *testing.T) {
	ms := fakeMaps(1<<20, nil)
	s := randomState(rand.New(rand.NewPCG(4, 4)), 20)
	if err := (&reconciler{maps: ms}).sync(s); err != nil {
		t.Fatal(err)
	}
	before, _ := readTable(ms)
	writes := 0
	for _, sm := range []sizedMap{ms.services, ms.info, ms.slots, ms.backends, ms.sourceRanges, ms.clusterCIDRs} {
		sm.m.(*fakeMap).fail = func() bool { writes++; return false }
	}
	// A new reconciler, as after an agent restart, finds everything in place.
	if err := (&reconciler{maps: ms}).sync(s); err != nil {
		t.Fatal(err)
	}
	if writes != 0 {
		t.Errorf("restarted reconciler made %d writes for an unchanged state, want 0", writes)
	}
	after, _ := readTable(ms)
	if !after.equal(before) {
		t.Error("restarted reconciler changed the maps")
	}
}

func TestReconcilerCapacity(t *testing.T) {
	ms := fakeMaps(40, nil)
	rec := &reconciler{maps: ms}
	small := randomState(rand.New(rand.NewPCG(5, 5)), 5)
	if err := rec.sync(small); err != nil {
		t.Fatal(err)
	}
	before, _ := readTable(ms)
	err := rec.sync(randomState(rand.New(rand.NewPCG(6, 6)), 60))
	if err == nil {
		t.Fatal("sync of a state larger than the maps succeeded")
	}
	for _, want := range []string{"svcnat_services", "--bpf-map-max-services"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	after, _ := readTable(ms)
	if !after.equal(before) {
		t.Error("a sync that did not fit changed the maps")
	}
	// The reconciler still works afterwards.
	if err := rec.sync(small); err != nil {
		t.Fatal(err)
	}
}
