package ebpf

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/dataplane/conformance"
	"github.com/svcnat/svcnat/pkg/model"
)

var errInjected = errors.New("injected failure")

// fakeKernel is the kernel as the reconciler sees it: one in-memory BPF
// hash map per desired-state map, each with a capacity like max_entries (a
// new key beyond it fails as the kernel's E2BIG does), writes that fail when
// fail says so, and a hook that sees the maps after every write that took
// effect.
type fakeKernel struct {
	maps     mapSet
	capacity int
	fail     func() bool
	after    func()
	reads    int      // how many times a map was iterated
	read     func()   // called as an iteration begins, after reads counts it
	clears   []func() // empty each map
}

func newFakeKernel(capacity int) *fakeKernel {
	k := &fakeKernel{capacity: capacity}
	for _, c := range columns {
		k.maps = append(k.maps, c.(interface{ inFake(*fakeKernel) desiredMap }).inFake(k))
	}
	return k
}

func (c *column[K, V]) inFake(k *fakeKernel) desiredMap {
	m := &fakeMap[K, V]{k: k, entries: map[K]V{}}
	k.clears = append(k.clears, func() { clear(m.entries) })
	return c.bind(k.capacity, m)
}

// equal reports whether t and o hold the same entries.
func (t *table) equal(o *table) bool {
	return maps.Equal(t.services, o.services) && maps.Equal(t.info, o.info) &&
		maps.Equal(t.slots, o.slots) && maps.Equal(t.members, o.members) && maps.Equal(t.backends, o.backends) &&
		maps.Equal(t.sourceRanges, o.sourceRanges) && maps.Equal(t.clusterCIDRs, o.clusterCIDRs)
}

// checkDatapath makes every write check the datapath's invariant;
// inconsistent returns the first violation since it was last called.
func (k *fakeKernel) checkDatapath() (inconsistent func() error) {
	var first error
	k.after = func() {
		reads := k.reads // the check's own reads are not the reconciler's
		if err := datapathConsistent(k.maps); err != nil && first == nil {
			first = err
		}
		k.reads = reads
	}
	return func() error {
		err := first
		first = nil
		return err
	}
}

// fakeEntries are the entries of the fake map name, to change by hand.
func fakeEntries[K, V comparable](k *fakeKernel, name string) map[K]V {
	for _, m := range k.maps {
		if m.info().name == name {
			return m.(*tableMap[K, V]).m.(*fakeMap[K, V]).entries
		}
	}
	panic("no map " + name)
}

type fakeMap[K comparable, V any] struct {
	k       *fakeKernel
	entries map[K]V
}

// Put writes the entries one by one, as the kernel's batch update does, and
// stops at the first failure.
func (f *fakeMap[K, V]) Put(keys []K, values []V) error {
	for i, key := range keys {
		if f.k.fail != nil && f.k.fail() {
			return errInjected
		}
		if _, ok := f.entries[key]; !ok && len(f.entries) >= f.k.capacity {
			return errors.New("map full")
		}
		f.entries[key] = values[i]
		if f.k.after != nil {
			f.k.after()
		}
	}
	return nil
}

func (f *fakeMap[K, V]) Delete(keys []K) error {
	for _, key := range keys {
		if f.k.fail != nil && f.k.fail() {
			return errInjected
		}
		delete(f.entries, key)
		if f.k.after != nil {
			f.k.after()
		}
	}
	return nil
}

func (f *fakeMap[K, V]) Iterate(fn func(K, V)) error {
	f.k.reads++
	if f.k.read != nil {
		f.k.read()
	}
	for k, v := range f.entries {
		fn(k, v)
	}
	return nil
}

// datapathConsistent checks what the BPF programs rely on, at any instant:
// every frontend's count covers slots that exist and name backends that
// exist and are members.
func datapathConsistent(ms mapSet) error {
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
				if _, ok := t.members[svcnatMemberKey{Id: v.Id, BackendId: bid, Set: uint8(set)}]; !ok {
					return fmt.Errorf("frontend %s:%d: backend %d in slot %d is not a member", addrString(k.Addr), ntohs(k.Port), bid, i)
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
		k := newFakeKernel(1 << 20)
		k.fail = func() bool { return failing && r.IntN(100) < 5 }
		inconsistent := k.checkDatapath()
		rec := &reconciler{maps: k.maps}
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
			if err := inconsistent(); err != nil {
				t.Fatalf("seed %d step %d: datapath saw a half-written service: %v", seed, step, err)
			}
			failing = false
			got, err := readTable(k.maps)
			if err != nil {
				t.Fatal(err)
			}
			if !got.equal(rec.written) {
				t.Fatalf("seed %d step %d: maps differ from what the reconciler believes it wrote", seed, step)
			}
			dumped, _, err := decode(got)
			if err != nil {
				t.Fatalf("seed %d step %d: decode: %v", seed, step, err)
			}
			statesEqual(t, want, dumped)
		}
	}
}

func TestReconcilerWritesOnlyTheDifference(t *testing.T) {
	writes := 0
	k := newFakeKernel(1 << 20)
	k.fail = func() bool { writes++; return false }
	rec := &reconciler{maps: k.maps}
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
	// One more endpoint for one ServicePort: a backend, a slot, a
	// membership, and the ServicePort's frontends.
	sp := s.Sorted()[0]
	sp.ClusterEndpoints = append(sp.ClusterEndpoints, model.Endpoint{IP: sp.Frontends[0].IP.Next(), Port: 9})
	if err := rec.sync(s); err != nil {
		t.Fatal(err)
	}
	if want := 3 + len(sp.Frontends); writes != want {
		t.Errorf("adding one endpoint made %d writes, want %d", writes, want)
	}
}

func TestReconcilerRestartAdoptsNumbers(t *testing.T) {
	k := newFakeKernel(1 << 20)
	s := randomState(rand.New(rand.NewPCG(4, 4)), 20)
	if err := (&reconciler{maps: k.maps}).sync(s); err != nil {
		t.Fatal(err)
	}
	before, _ := readTable(k.maps)
	writes := 0
	k.fail = func() bool { writes++; return false }
	// A new reconciler, as after an agent restart, finds everything in place.
	if err := (&reconciler{maps: k.maps}).sync(s); err != nil {
		t.Fatal(err)
	}
	if writes != 0 {
		t.Errorf("restarted reconciler made %d writes for an unchanged state, want 0", writes)
	}
	after, _ := readTable(k.maps)
	if !after.equal(before) {
		t.Error("restarted reconciler changed the maps")
	}
}

// TestReconcilerCapacity: with maps too small for the whole state, the
// ServicePorts that fit are programmed (whole, decodable) and the others
// fail alone, named in dataplane.PortErrors with the flag to raise, and hold
// nothing; once the state shrinks they are all programmed again.
func TestReconcilerCapacity(t *testing.T) {
	k := newFakeKernel(40)
	rec := &reconciler{maps: k.maps}
	small := randomState(rand.New(rand.NewPCG(5, 5)), 5)
	if err := rec.sync(small); err != nil {
		t.Fatal(err)
	}
	big := randomState(rand.New(rand.NewPCG(6, 6)), 60)
	err := rec.sync(big)
	var failed dataplane.PortErrors
	if !errors.As(err, &failed) {
		t.Fatalf("sync of a state larger than the maps: got %v, want PortErrors", err)
	}
	if len(failed) == 0 || len(failed) == len(big.ServicePorts) {
		t.Fatalf("%d of %d service ports failed, want some but not all", len(failed), len(big.ServicePorts))
	}
	for name, err := range failed {
		if _, ok := big.ServicePorts[name]; !ok {
			t.Errorf("failed %s is not in the state", name)
		}
		if !strings.Contains(err.Error(), "raise --bpf-map-max-") {
			t.Errorf("%s: error %q names no flag to raise", name, err)
		}
	}
	// What the maps hold is exactly the ServicePorts that did not fail.
	programmed := &model.State{ClusterCIDRs: big.ClusterCIDRs, ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for name, sp := range big.ServicePorts {
		if failed[name] == nil {
			programmed.ServicePorts[name] = sp
		}
	}
	dumped, _, err := readState(k.maps)
	if err != nil {
		t.Fatal(err)
	}
	statesEqual(t, programmed, dumped)
	if err := datapathConsistent(k.maps); err != nil {
		t.Fatal(err)
	}
	// The reconciler still works afterwards.
	if err := rec.sync(small); err != nil {
		t.Fatal(err)
	}
	dumped, _, err = readState(k.maps)
	if err != nil {
		t.Fatal(err)
	}
	statesEqual(t, small, dumped)
}

// mutate changes a few ServicePorts of s the way Kubernetes updates do:
// endpoints come and go, policies flip, ServicePorts are added and removed,
// and a frontend moves from one ServicePort to another.
func mutate(r *rand.Rand, s *model.State, fresh *model.State) {
	for range 1 + r.IntN(4) {
		sps := s.Sorted()
		if len(sps) == 0 {
			break
		}
		sp := sps[r.IntN(len(sps))].Clone()
		switch r.IntN(6) {
		case 0:
			if len(sp.ClusterEndpoints) > 0 {
				sp.ClusterEndpoints = sp.ClusterEndpoints[1:]
			}
		case 1:
			ip := sp.Frontends[0].IP
			sp.ClusterEndpoints = append(sp.ClusterEndpoints, model.Endpoint{IP: ip.Next(), Port: uint16(r.IntN(3) + 1)})
		case 2:
			sp.InternalTrafficLocal = !sp.InternalTrafficLocal
			sp.LocalEndpoints = nil
		case 3:
			delete(s.ServicePorts, sp.Name)
			continue
		case 4:
			// Move this ServicePort's last frontend to another one of the
			// same family and protocol.
			for _, other := range sps {
				if other.Name != sp.Name && other.Name.Family == sp.Name.Family && other.Protocol == sp.Protocol && len(sp.Frontends) > 1 {
					o := other.Clone()
					o.Frontends = append(o.Frontends, sp.Frontends[len(sp.Frontends)-1])
					slices.SortFunc(o.Frontends, func(a, b model.Frontend) int {
						return cmp.Or(cmp.Compare(a.Kind, b.Kind), a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
					})
					sp.Frontends = sp.Frontends[:len(sp.Frontends)-1]
					s.ServicePorts[o.Name] = o
					break
				}
			}
		case 5:
			// A new ServicePort, on frontend addresses no other uses.
			for _, n := range fresh.Sorted() {
				if _, ok := s.ServicePorts[n.Name]; !ok {
					for i := range n.Frontends {
						n.Frontends[i].IP = uniqueAddr(n.Name.Family)
					}
					slices.SortFunc(n.Frontends, func(a, b model.Frontend) int {
						return cmp.Or(cmp.Compare(a.Kind, b.Kind), a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
					})
					s.ServicePorts[n.Name] = n
					break
				}
			}
			continue
		}
		s.ServicePorts[sp.Name] = sp
	}
}

var uniqueCounter uint16

func uniqueAddr(f model.Family) netip.Addr {
	uniqueCounter++
	if f == model.IPv4 {
		return netip.AddrFrom4([4]byte{10, 200, byte(uniqueCounter >> 8), byte(uniqueCounter)})
	}
	return netip.AddrFrom16([16]byte{0xfd, 0xc8, 14: byte(uniqueCounter >> 8), 15: byte(uniqueCounter)})
}

// checkWritten fails the test, naming the sync at, when the datapath saw a
// half-written Service during it (inconsistent, from checkDatapath) or
// the maps differ from what rec believes it wrote; it returns what the maps
// hold.
func checkWritten(t *testing.T, rec *reconciler, inconsistent func() error, at string) *table {
	t.Helper()
	if err := inconsistent(); err != nil {
		t.Fatalf("%s: datapath saw a half-written service: %v", at, err)
	}
	got, err := readTable(rec.maps)
	if err != nil {
		t.Fatal(err)
	}
	if !got.equal(rec.written) {
		t.Fatalf("%s: maps differ from what the reconciler believes it wrote", at)
	}
	return got
}

func TestReconcilerIncremental(t *testing.T) {
	for seed := range uint64(10) {
		r := rand.New(rand.NewPCG(seed, 9))
		k := newFakeKernel(1 << 20)
		inconsistent := k.checkDatapath()
		rec := &reconciler{maps: k.maps}
		s := randomState(r, 30)
		for step := range 40 {
			if err := rec.sync(s); err != nil {
				t.Fatalf("seed %d step %d: %v", seed, step, err)
			}
			got := checkWritten(t, rec, inconsistent, fmt.Sprintf("seed %d step %d", seed, step))
			// Exactly the entries a fresh encoding has: nothing left over.
			fresh, _, failed := encode(s, newIDs(), newTable())
			if len(failed) > 0 {
				t.Fatal(failed)
			}
			if len(got.backends) != len(fresh.backends) || len(got.slots) != len(fresh.slots) ||
				len(got.services) != len(fresh.services) || len(got.info) != len(fresh.info) {
				t.Fatalf("seed %d step %d: %d backends, %d slots, %d frontends, %d service ports; want %d, %d, %d, %d", seed, step,
					len(got.backends), len(got.slots), len(got.services), len(got.info),
					len(fresh.backends), len(fresh.slots), len(fresh.services), len(fresh.info))
			}
			dumped, _, err := decode(got)
			if err != nil {
				t.Fatalf("seed %d step %d: decode: %v", seed, step, err)
			}
			statesEqual(t, s, dumped)
			if t.Failed() {
				t.Fatalf("seed %d step %d", seed, step)
			}
			prev := &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: maps.Clone(s.ServicePorts)}
			mutate(r, s, randomState(r, 40))
			s = conformance.WithChange(prev, s)
		}
	}
}

// TestReconcilerRepairsDrift: a sync without a Change reads the maps back
// and rewrites entries deleted or changed by hand.
func TestReconcilerRepairsDrift(t *testing.T) {
	k := newFakeKernel(1 << 20)
	rec := &reconciler{maps: k.maps}
	s := randomState(rand.New(rand.NewPCG(7, 7)), 20)
	if err := rec.sync(s); err != nil {
		t.Fatal(err)
	}
	want, _ := readTable(k.maps)
	services := fakeEntries[svcnatSvcKey, svcnatSvcValue](k, svcnatMapSvcnatServices)
	slots := fakeEntries[svcnatSlotKey, uint32](k, svcnatMapSvcnatSlots)
	for key := range services {
		delete(services, key)
		break
	}
	for key, v := range slots {
		slots[key] = v + 1000
		break
	}
	if err := rec.sync(s); err != nil {
		t.Fatal(err)
	}
	got, _ := readTable(k.maps)
	if !got.equal(want) {
		t.Fatal("a sync without changes left a deleted frontend and a changed slot as they were")
	}
}

// TestReconcilerFailedStayIncremental: while a ServicePort does not fit,
// changes to the others are still written incrementally (no full read of
// the maps), and the failure is reported every time; once capacity frees
// up, it is programmed.
func TestReconcilerFailedStayIncremental(t *testing.T) {
	k := newFakeKernel(40)
	rec := &reconciler{maps: k.maps}
	s := randomState(rand.New(rand.NewPCG(6, 6)), 60)
	var failed dataplane.PortErrors
	if err := rec.sync(s); !errors.As(err, &failed) {
		t.Fatalf("first sync: %v, want PortErrors", err)
	}
	k.reads = 0
	// Change one programmed ServicePort: a policy flip.
	prev := &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: maps.Clone(s.ServicePorts)}
	for _, sp := range s.Sorted() {
		if failed[sp.Name] == nil {
			sp = sp.Clone()
			sp.InternalTrafficLocal = !sp.InternalTrafficLocal
			s.ServicePorts[sp.Name] = sp
			break
		}
	}
	var again dataplane.PortErrors
	if err := rec.sync(conformance.WithChange(prev, s)); !errors.As(err, &again) || len(again) != len(failed) {
		t.Fatalf("incremental sync: %v, want the same %d PortErrors", err, len(failed))
	}
	if k.reads != 0 {
		t.Errorf("an incremental sync beside a failed ServicePort read the maps %d times", k.reads)
	}
	// Remove every programmed ServicePort: the failed ones fit now.
	prev = &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: maps.Clone(s.ServicePorts)}
	for name := range s.ServicePorts {
		if failed[name] == nil {
			delete(s.ServicePorts, name)
		}
	}
	err := rec.sync(conformance.WithChange(prev, s))
	if errors.As(err, &again) && len(again) >= len(failed) {
		t.Fatalf("after the others were removed, still %d failed: %v", len(again), err)
	}
}

// TestReconcilerOverCapacity: with maps too small for the state, every
// change, the periodic sync included, is written incrementally (the maps are
// never read back; a full read at 30,000 Services took seconds), the maps
// hold exactly the ServicePorts that did not fail, and none fails that
// would fit.
func TestReconcilerOverCapacity(t *testing.T) {
	const capacity = 40
	failures := 0
	for seed := range uint64(10) {
		r := rand.New(rand.NewPCG(seed, 11))
		k := newFakeKernel(capacity)
		inconsistent := k.checkDatapath()
		rec := &reconciler{maps: k.maps}
		s := randomState(r, 30)
		for step := range 60 {
			k.reads = 0
			err := rec.sync(s)
			var failed dataplane.PortErrors
			if err != nil && !errors.As(err, &failed) {
				t.Fatalf("seed %d step %d: %v", seed, step, err)
			}
			failures += len(failed)
			if step > 0 && k.reads > 0 {
				t.Fatalf("seed %d step %d: an incremental sync with %d ServicePorts failed read the maps %d times", seed, step, len(failed), k.reads)
			}
			got := checkWritten(t, rec, inconsistent, fmt.Sprintf("seed %d step %d", seed, step))
			// Numbers are held by what the maps hold, and by nothing else.
			if len(rec.ids.services.byKey) != len(got.info) || len(rec.ids.backends.byKey) != len(got.backends) {
				t.Fatalf("seed %d step %d: %d ServicePort and %d backend numbers held for %d and %d in the maps", seed, step,
					len(rec.ids.services.byKey), len(rec.ids.backends.byKey), len(got.info), len(got.backends))
			}
			programmed := &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
			for name, sp := range s.ServicePorts {
				if failed[name] == nil {
					programmed.ServicePorts[name] = sp
				}
			}
			dumped, _, err := decode(got)
			if err != nil {
				t.Fatalf("seed %d step %d: decode: %v", seed, step, err)
			}
			statesEqual(t, programmed, dumped)
			// Encoded alone, with numbers of its own, a ServicePort has at
			// least the entries it would add to the maps.
			for name, ferr := range failed {
				own := newTable()
				if _, err := encodeServicePort(s.ServicePorts[name], newIDs(), newTable(), own); err != nil {
					t.Fatal(err)
				}
				fits := true
				for _, m := range k.maps {
					fits = fits && m.count(got)+m.count(own) <= capacity
				}
				if fits {
					t.Errorf("seed %d step %d: %s failed (%v) but fits the maps", seed, step, name, ferr)
				}
			}
			if t.Failed() {
				t.Fatalf("seed %d step %d", seed, step)
			}
			prev := &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: maps.Clone(s.ServicePorts)}
			mutate(r, s, randomState(r, 40))
			s = conformance.WithChange(prev, s)
		}
	}
	if failures == 0 {
		t.Fatal("no ServicePort ever failed: the maps are not too small for the states")
	}
}

// TestReconcilerStartsOverGarbage: an agent starting over a Service info
// entry that does not decode (written by hand) programs the state and
// deletes the entry, instead of failing every sync.
func TestReconcilerStartsOverGarbage(t *testing.T) {
	k := newFakeKernel(1 << 20)
	fakeEntries[uint32, svcnatSvcInfo](k, svcnatMapSvcnatSvcInfo)[7] = svcnatSvcInfo{Family: 9}
	s := randomState(rand.New(rand.NewPCG(8, 8)), 5)
	if err := (&reconciler{maps: k.maps}).sync(s); err != nil {
		t.Fatal(err)
	}
	dumped, _, err := readState(k.maps)
	if err != nil {
		t.Fatal(err)
	}
	statesEqual(t, s, dumped)
}

// TestReconcilerIncrementalClusterCIDRs: incremental syncs that change the
// cluster CIDRs, then only a ServicePort, then nothing, keep what the
// reconciler believes it wrote equal to the maps (the scratch tables it
// reuses between syncs must not share maps with that record) and write
// nothing for the sync without changes.
func TestReconcilerIncrementalClusterCIDRs(t *testing.T) {
	k := newFakeKernel(1 << 20)
	writes := 0
	k.fail = func() bool { writes++; return false }
	rec := &reconciler{maps: k.maps}
	s := randomState(rand.New(rand.NewPCG(10, 10)), 10)
	if err := rec.sync(s); err != nil {
		t.Fatal(err)
	}
	check := func(step string, want *model.State) {
		t.Helper()
		got, err := readTable(k.maps)
		if err != nil {
			t.Fatal(err)
		}
		if !got.equal(rec.written) {
			t.Fatalf("%s: maps differ from what the reconciler believes it wrote", step)
		}
		dumped, torn, err := decode(got)
		if err != nil || len(torn) > 0 {
			t.Fatalf("%s: decode: %v; torn sets %v", step, err, torn)
		}
		statesEqual(t, want, dumped)
	}
	prev := &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: maps.Clone(s.ServicePorts)}
	s = conformance.WithChange(prev, &model.State{ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.42.0.0/16")}, ServicePorts: s.ServicePorts})
	if err := rec.sync(s); err != nil {
		t.Fatal(err)
	}
	check("new cluster CIDRs", s)
	prev = &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: maps.Clone(s.ServicePorts)}
	sp := s.Sorted()[0].Clone()
	sp.InternalTrafficLocal = !sp.InternalTrafficLocal
	s.ServicePorts[sp.Name] = sp
	if err := rec.sync(conformance.WithChange(prev, s)); err != nil {
		t.Fatal(err)
	}
	check("then a ServicePort", s)
	writes = 0
	if err := rec.sync(conformance.WithChange(s, s)); err != nil {
		t.Fatal(err)
	}
	if writes != 0 {
		t.Errorf("a sync without changes made %d writes, want 0", writes)
	}
	check("then nothing", s)
}
