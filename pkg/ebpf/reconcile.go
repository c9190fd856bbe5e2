package ebpf

import (
	"errors"
	"fmt"

	"github.com/svcnat/svcnat/pkg/model"
)

// bpfMap is what the reconciler needs of a BPF map. The kernel's maps
// satisfy it through kernelMap; tests use an in-memory fake that fails on
// demand.
type bpfMap interface {
	// Put creates or replaces the entry for key.
	Put(key, value any) error
	// Delete removes the entry for key; a missing key is not an error.
	Delete(key any) error
	// Iterate walks the entries.
	Iterate() entryIterator
}

// entryIterator walks a map's entries; *ebpf.MapIterator is one.
type entryIterator interface {
	Next(key, value any) bool
	Err() error
}

// mapSet is the maps holding the desired state, each with its capacity and
// the flag that sets it.
type mapSet struct {
	services, info, slots, backends, sourceRanges, clusterCIDRs sizedMap
}

type sizedMap struct {
	name     string // the BPF map's name
	flag     string // the agent flag that sizes it, "" when fixed
	capacity int
	m        bpfMap
}

// readTable reads the desired-state maps from the kernel.
func readTable(ms *mapSet) (*table, error) {
	t := newTable()
	return t, errors.Join(
		readMap(ms.services, t.services),
		readMap(ms.info, t.info),
		readMap(ms.slots, t.slots),
		readMap(ms.backends, t.backends),
		readMap(ms.sourceRanges, t.sourceRanges),
		readMap(ms.clusterCIDRs, t.clusterCIDRs),
	)
}

func readMap[K comparable, V any](sm sizedMap, dst map[K]V) error {
	var (
		k K
		v V
	)
	it := sm.m.Iterate()
	for it.Next(&k, &v) {
		dst[k] = v
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read map %s: %w", sm.name, err)
	}
	return nil
}

// checkCapacity fails, naming the map and its flag, when writing want over
// cur would overflow a map at any point: new entries are written before old
// ones are deleted, so the peak is their union.
func checkCapacity(ms *mapSet, cur, want *table) error {
	var errs []error
	check := func(sm sizedMap, peak, needed int) {
		if peak <= sm.capacity {
			return
		}
		how := "it has a fixed size"
		if sm.flag != "" {
			how = "raise " + sm.flag
		}
		errs = append(errs, fmt.Errorf("map %s holds %d entries, the new state needs %d (%d while old entries are replaced): %s",
			sm.name, sm.capacity, needed, peak, how))
	}
	check(ms.services, unionLen(cur.services, want.services), len(want.services))
	check(ms.info, unionLen(cur.info, want.info), len(want.info))
	check(ms.slots, unionLen(cur.slots, want.slots), len(want.slots))
	check(ms.backends, unionLen(cur.backends, want.backends), len(want.backends))
	check(ms.sourceRanges, unionLen(cur.sourceRanges, want.sourceRanges), len(want.sourceRanges))
	check(ms.clusterCIDRs, unionLen(cur.clusterCIDRs, want.clusterCIDRs), len(want.clusterCIDRs))
	return errors.Join(errs...)
}

func unionLen[K comparable, V any](a, b map[K]V) int {
	n := len(a)
	for k := range b {
		if _, ok := a[k]; !ok {
			n++
		}
	}
	return n
}

// apply rewrites the maps from cur to want in the order that never shows
// the datapath a half-written Service:
//
//  1. new and changed backends, Service info and source ranges;
//  2. slots, so that every slot below a new, larger count exists;
//  3. frontends with their counts: one atomic value per frontend;
//  4. frontends that are gone;
//  5. slots at or above a new, smaller count, and other unused entries;
//  6. backends no slot names any more, last.
//
// Cluster CIDRs only steer masquerading; they are added before and removed
// after the Services. apply stops at the first failure; the caller then
// reads the kernel back before trying again.
func apply(ms *mapSet, cur, want *table) error {
	steps := []func() error{
		func() error { return putChanged(ms.clusterCIDRs, cur.clusterCIDRs, want.clusterCIDRs) },
		func() error { return putChanged(ms.backends, cur.backends, want.backends) },
		func() error { return putChanged(ms.info, cur.info, want.info) },
		func() error { return putChanged(ms.sourceRanges, cur.sourceRanges, want.sourceRanges) },
		func() error { return putChanged(ms.slots, cur.slots, want.slots) },
		func() error { return putChanged(ms.services, cur.services, want.services) },
		func() error { return deleteGone(ms.services, cur.services, want.services) },
		func() error { return deleteGone(ms.slots, cur.slots, want.slots) },
		func() error { return deleteGone(ms.sourceRanges, cur.sourceRanges, want.sourceRanges) },
		func() error { return deleteGone(ms.info, cur.info, want.info) },
		func() error { return deleteGone(ms.backends, cur.backends, want.backends) },
		func() error { return deleteGone(ms.clusterCIDRs, cur.clusterCIDRs, want.clusterCIDRs) },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

func putChanged[K, V comparable](sm sizedMap, cur, want map[K]V) error {
	for k, v := range want {
		if old, ok := cur[k]; ok && old == v {
			continue
		}
		if err := sm.m.Put(k, v); err != nil {
			return fmt.Errorf("write map %s entry %+v: %w", sm.name, k, err)
		}
	}
	return nil
}

func deleteGone[K, V comparable](sm sizedMap, cur, want map[K]V) error {
	for k := range cur {
		if _, ok := want[k]; ok {
			continue
		}
		if err := sm.m.Delete(k); err != nil {
			return fmt.Errorf("delete map %s entry %+v: %w", sm.name, k, err)
		}
	}
	return nil
}

// reconciler keeps the maps equal to the desired state, writing only the
// difference to what it last wrote, and reading the kernel back after any
// failure.
type reconciler struct {
	maps *mapSet
	ids  *ids // nil until adopted from the kernel
	// written is what the maps hold, nil when unknown (at start or after a
	// failed write).
	written *table
}

// sync makes the maps hold s. On error the maps hold either the previous
// state or, for a ServicePort the failed write reached, a consistent mix
// of the old and new endpoint sets; the next sync repairs them.
func (r *reconciler) sync(s *model.State) error {
	if r.written == nil {
		cur, err := readTable(r.maps)
		if err != nil {
			return err
		}
		if r.ids == nil {
			// At start: continue the numbering a previous run left. After
			// a failed write the numbers in memory stay, so a retry writes
			// only what is still missing.
			if r.ids, err = adoptIDs(cur); err != nil {
				return err
			}
		}
		r.written = cur
	}
	want, err := encode(s, r.ids)
	if err != nil {
		return err
	}
	if err := checkCapacity(r.maps, r.written, want); err != nil {
		return fmt.Errorf("check capacity: %w", err)
	}
	if err := apply(r.maps, r.written, want); err != nil {
		r.written = nil
		return err
	}
	r.written = want
	r.ids.release(want)
	return nil
}
