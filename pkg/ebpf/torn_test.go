package ebpf

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/svcnat/svcnat/pkg/model"
)

// threeEndpoints is stateWithEndpoints with a third endpoint.
func threeEndpoints() *model.State {
	s := stateWithEndpoints()
	for _, sp := range s.ServicePorts {
		sp.ClusterEndpoints = append(sp.ClusterEndpoints, model.Endpoint{IP: netip.MustParseAddr("10.244.1.4"), Port: 8080})
	}
	return s
}

// TestDecodeTornSet: a set that a write in progress has torn, as a reader
// racing it meets the maps (the count says 3, a slot or its backend is
// gone), decodes as the datapath reads it (lb_slot: a missing slot takes
// slot 0), and is named, instead of failing the whole decode.
func TestDecodeTornSet(t *testing.T) {
	s := threeEndpoints()
	sp := s.ServicePorts[model.ServicePortName{Namespace: "default", Name: "web", Family: model.IPv4}]
	eps := sp.ClusterEndpoints
	for _, tc := range []struct {
		name string
		tear func(tab *table, id uint32)
		want []model.Endpoint
		torn []uint16
	}{
		{"intact", func(*table, uint32) {}, eps, nil},
		{"last slot gone", func(tab *table, id uint32) {
			delete(tab.slots, svcnatSlotKey{Id: id, Slot: 2, Set: setCluster})
		}, eps[:2], []uint16{2}},
		{"backend of the last slot gone", func(tab *table, id uint32) {
			delete(tab.backends, tab.slots[svcnatSlotKey{Id: id, Slot: 2, Set: setCluster}])
		}, eps[:2], []uint16{2}},
		// Slot 0 gone: its picks and the fallback miss (refused); the
		// other slots reach their endpoints.
		{"first slot gone", func(tab *table, id uint32) {
			delete(tab.slots, svcnatSlotKey{Id: id, Slot: 0, Set: setCluster})
		}, eps[1:], []uint16{0}},
		{"every slot gone", func(tab *table, id uint32) {
			for i := range uint16(3) {
				delete(tab.slots, svcnatSlotKey{Id: id, Slot: i, Set: setCluster})
			}
		}, nil, []uint16{0, 1, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab, frags, failed := encode(s, newIDs(), newTable())
			if len(failed) > 0 {
				t.Fatal(failed)
			}
			tc.tear(tab, frags[sp.Name].id)
			got, torn, err := decode(tab)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if g := got.ServicePorts[sp.Name].ClusterEndpoints; !slices.Equal(g, tc.want) {
				t.Errorf("endpoints %v, want %v", g, tc.want)
			}
			var want []tornSet
			if tc.torn != nil {
				want = []tornSet{{name: sp.Name, set: setCluster, count: 3, slots: tc.torn}}
			}
			if !slices.EqualFunc(torn, want, func(a, b tornSet) bool {
				return a.name == b.name && a.set == b.set && a.count == b.count && slices.Equal(a.slots, b.slots)
			}) {
				t.Errorf("torn %v, want %v", torn, want)
			}
		})
	}
}

// TestReadStateRetriesTornRead: a write that grows a set lands while a
// reader is between the backends map and the slots map, as the reconciler
// and `svcnat dump` really interleave; the reader then meets a slot naming
// a backend it did not see. readState reads once more and returns the
// state the write made.
func TestReadStateRetriesTornRead(t *testing.T) {
	k := newFakeKernel(1 << 10)
	rec := &reconciler{maps: k.maps}
	two, three := stateWithEndpoints(), threeEndpoints()
	// growDuringRead makes the sync to three endpoints land as the third
	// map's iteration begins: after the backends (columns' second map).
	growDuringRead := func() {
		if err := rec.sync(two); err != nil {
			t.Fatal(err)
		}
		start := k.reads
		k.read = func() {
			if k.reads == start+3 {
				k.read = nil
				if err := rec.sync(three); err != nil {
					t.Fatal(err)
				}
			}
		}
	}

	growDuringRead()
	tab, err := readTable(k.maps)
	if err != nil {
		t.Fatal(err)
	}
	if _, torn, err := decode(tab); err != nil || len(torn) != 1 || !slices.Equal(torn[0].slots, []uint16{2}) {
		t.Fatalf("one read racing the write: torn %v, %v; want slot 2 torn (the race this test is about did not happen)", torn, err)
	}

	growDuringRead()
	got, torn, err := readState(k.maps)
	if err != nil || len(torn) > 0 {
		t.Fatalf("readState racing the write: torn %v, %v; want the state the write made", torn, err)
	}
	statesEqual(t, three, got)
}
