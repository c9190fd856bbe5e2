package ebpf

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// bpfMap is what the reconciler needs of a BPF map. The kernel's maps
// satisfy it through kernelMap; tests use an in-memory fake that fails on
// demand.
type bpfMap interface {
	// Put creates or replaces the entries for keys (a slice) with values
	// (a slice as long), in order, and stops at the first failure.
	Put(keys, values any) error
	// Delete removes the entries for keys (a slice); missing keys are not
	// an error.
	Delete(keys any) error
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
	services, info, slots, members, backends, sourceRanges, clusterCIDRs sizedMap
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
		readMap(ms.members, t.members),
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
// cur (all of it, or only what changes) would overflow a map at any point:
// new entries are written before old ones are deleted, so the peak is cur
// plus the keys of want it does not hold.
func checkCapacity(ms *mapSet, cur, want *table) error {
	var errs []error
	check := func(sm sizedMap, peak int) {
		if peak > sm.capacity {
			errs = append(errs, capacityError(sm, peak))
		}
	}
	check(ms.services, unionLen(cur.services, want.services))
	check(ms.info, unionLen(cur.info, want.info))
	check(ms.slots, unionLen(cur.slots, want.slots))
	check(ms.members, unionLen(cur.members, want.members))
	check(ms.backends, unionLen(cur.backends, want.backends))
	check(ms.sourceRanges, unionLen(cur.sourceRanges, want.sourceRanges))
	check(ms.clusterCIDRs, unionLen(cur.clusterCIDRs, want.clusterCIDRs))
	return errors.Join(errs...)
}

func capacityError(sm sizedMap, peak int) error {
	how := "it has a fixed size"
	if sm.flag != "" {
		how = "raise " + sm.flag
	}
	return fmt.Errorf("map %s holds %d entries, this sync needs %d while old entries are replaced: %s",
		sm.name, sm.capacity, peak, how)
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
//  2. memberships, then slots, so that every slot below a new, larger
//     count exists and names a member;
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
		func() error { return putChanged(ms.members, cur.members, want.members) },
		func() error { return putChanged(ms.slots, cur.slots, want.slots) },
		func() error { return putChanged(ms.services, cur.services, want.services) },
		func() error { return deleteGone(ms.services, cur.services, want.services) },
		func() error { return deleteGone(ms.slots, cur.slots, want.slots) },
		func() error { return deleteGone(ms.members, cur.members, want.members) },
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
	var (
		keys   []K
		values []V
	)
	for k, v := range want {
		if old, ok := cur[k]; ok && old == v {
			continue
		}
		keys, values = append(keys, k), append(values, v)
	}
	if len(keys) == 0 {
		return nil
	}
	if err := sm.m.Put(keys, values); err != nil {
		return fmt.Errorf("write %d entries to map %s: %w", len(keys), sm.name, err)
	}
	return nil
}

func deleteGone[K, V comparable](sm sizedMap, cur, want map[K]V) error {
	var keys []K
	for k := range cur {
		if _, ok := want[k]; !ok {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil
	}
	if err := sm.m.Delete(keys); err != nil {
		return fmt.Errorf("delete %d entries from map %s: %w", len(keys), sm.name, err)
	}
	return nil
}

// reconciler keeps the maps equal to the desired state. It re-encodes only
// the ServicePorts that changed since the last successful sync and writes
// only the entries that differ; after a failure it reads the kernel back
// and compares everything.
type reconciler struct {
	maps *mapSet
	ids  *ids // nil until adopted from the kernel
	// written is what the maps hold, nil when unknown (at start or after a
	// failed write); frags and refs describe it per ServicePort and per
	// backend (how many ServicePorts name it).
	written *table
	frags   map[model.ServicePortName]*fragment
	refs    map[uint32]int
	// removed are the endpoints the last sync removed from the maps: flows
	// may still point at them; removedUDP those a UDP ServicePort used:
	// connected sockets may still point at them.
	removed, removedUDP []svcnatBackend
	// failed are the ServicePorts the last full sync could not program;
	// an incremental sync leaves them failed while they stay the same and
	// nothing was removed.
	failed dataplane.PortErrors
}

// sync makes the maps hold s. A ServicePort that cannot be encoded, claims
// a frontend another ServicePort has, or does not fit the maps fails alone:
// sync programs the others and returns dataplane.PortErrors naming it, and
// it holds no entries. On a write error the maps hold, per ServicePort, the
// old or the new entries or a mix the datapath can use (every slot below a
// count exists); the next sync repairs them.
//
// With s.Change set, sync encodes only the ServicePorts it names; one that
// changes nothing (the periodic reconcile) reads the maps back and rewrites
// what differs, so that entries changed or deleted by hand are repaired.
// Without, it encodes everything and compares it with the maps.
func (r *reconciler) sync(s *model.State) error {
	r.removed, r.removedUDP = nil, nil
	if r.written != nil && s.Change != nil {
		switch err := r.syncChanges(s); {
		case errors.Is(err, errUnchanged) && len(r.failed) > 0:
			// The periodic sync tries the failed ServicePorts again.
		case errors.Is(err, errUnchanged):
			// Comparing what the kernel holds with what was written is
			// cheaper than encoding everything again.
			cur, err := readTable(r.maps)
			if err != nil {
				return err
			}
			if cur.equal(r.written) {
				return nil
			}
		case !errors.Is(err, errSyncAll):
			return err
		}
	}
	return r.syncAll(s)
}

// errSyncAll is syncChanges' way to say that only a full sync can do it;
// errUnchanged that s changes nothing since the last sync.
var (
	errSyncAll   = errors.New("needs a full sync")
	errUnchanged = errors.New("nothing changed")
)

// syncAll compares everything with what the kernel holds.
func (r *reconciler) syncAll(s *model.State) error {
	for pass := 0; ; pass++ {
		cur, err := readTable(r.maps)
		if err != nil {
			return err
		}
		if r.ids == nil {
			// At start: continue the numbering a previous run left. After a
			// failed write the numbers in memory stay, so a retry writes only
			// what is still missing.
			if r.ids, err = adoptIDs(cur); err != nil {
				return err
			}
		}
		want, frags, failed := encode(s, r.ids)
		want, full := admit(r.maps, cur, want, frags, failed)
		if err := checkCapacity(r.maps, cur, want); err != nil {
			return fmt.Errorf("check capacity: %w", err)
		}
		if err := apply(r.maps, cur, want); err != nil {
			r.written = nil
			return err
		}
		r.noteRemoved(cur, want)
		r.written, r.frags, r.refs = want, frags, map[uint32]int{}
		r.failed = failed
		for _, f := range frags {
			for bid := range f.backends {
				r.refs[bid]++
			}
		}
		r.ids.release(want)
		// What did not fit beside the entries this pass deleted may fit
		// now that they are gone.
		if full && pass == 0 && shrank(cur, want) {
			continue
		}
		if len(failed) > 0 {
			return maps.Clone(failed)
		}
		return nil
	}
}

// noteRemoved adds the endpoints that writing want over cur removed to
// r.removed, and to r.removedUDP those a UDP ServicePort named.
func (r *reconciler) noteRemoved(cur, want *table) {
	udp := map[uint32]bool{}
	for k, bid := range cur.slots {
		if _, kept := want.backends[bid]; !kept && cur.info[k.Id].Proto == protoUDP {
			udp[bid] = true
		}
	}
	for bid, b := range cur.backends {
		if _, kept := want.backends[bid]; kept {
			continue
		}
		r.removed = append(r.removed, b)
		if udp[bid] {
			r.removedUDP = append(r.removedUDP, b)
		}
	}
}

// admit keeps, in name order, the ServicePorts of want whose entries fit
// the maps on top of cur and of those admitted before; the others fail
// alone (in failed, and removed from frags). It returns the table of the
// admitted ones and whether any did not fit. When all of want fits, that
// is want itself: the usual case, where counting each ServicePort's
// entries would cost a third of the first sync.
func admit(ms *mapSet, cur, want *table, frags map[model.ServicePortName]*fragment, failed dataplane.PortErrors) (*table, bool) {
	if checkCapacity(ms, cur, want) == nil {
		return want, false
	}
	out := newTable()
	out.clusterCIDRs = want.clusterCIDRs
	names := slices.SortedFunc(maps.Keys(frags), model.ServicePortName.Compare)
	// peak[i] is how many entries map i holds at the peak of the write:
	// cur and what was admitted.
	sized := []sizedMap{ms.services, ms.info, ms.slots, ms.members, ms.backends, ms.sourceRanges}
	peak := []int{len(cur.services), len(cur.info), len(cur.slots), len(cur.members), len(cur.backends), len(cur.sourceRanges)}
	full := false
	for _, name := range names {
		f := frags[name]
		grow := []int{
			fresh(f.services, cur.services, out.services),
			fresh(map[uint32]svcnatSvcInfo{f.id: f.info}, cur.info, out.info),
			fresh(f.slots, cur.slots, out.slots),
			fresh(f.members, cur.members, out.members),
			fresh(f.backends, cur.backends, out.backends),
			fresh(f.sourceRanges, cur.sourceRanges, out.sourceRanges),
		}
		var errs []string
		for i, sm := range sized {
			if peak[i]+grow[i] > sm.capacity {
				errs = append(errs, capacityError(sm, peak[i]+grow[i]).Error())
			}
		}
		if len(errs) > 0 {
			failed[name] = fmt.Errorf("does not fit the maps: %s", strings.Join(errs, "; "))
			delete(frags, name)
			full = true
			continue
		}
		for i := range peak {
			peak[i] += grow[i]
		}
		addFragment(out, f)
	}
	return out, full
}

// fresh counts the keys of m in neither a nor b.
func fresh[K comparable, V any](m, a, b map[K]V) int {
	n := 0
	for k := range m {
		_, inA := a[k]
		_, inB := b[k]
		if !inA && !inB {
			n++
		}
	}
	return n
}

// shrank says whether writing want over cur deleted entries.
func shrank(cur, want *table) bool {
	return unionLen(want.services, cur.services) > len(want.services) ||
		unionLen(want.info, cur.info) > len(want.info) ||
		unionLen(want.slots, cur.slots) > len(want.slots) ||
		unionLen(want.members, cur.members) > len(want.members) ||
		unionLen(want.backends, cur.backends) > len(want.backends) ||
		unionLen(want.sourceRanges, cur.sourceRanges) > len(want.sourceRanges)
}

// syncChanges writes the entries of the ServicePorts s.Change names: old
// holds what they replace, next what replaces it.
func (r *reconciler) syncChanges(s *model.State) error {
	old, next := newTable(), newTable()
	replaced := map[uint32]bool{} // ids of ServicePorts changed or removed
	frags := map[model.ServicePortName]*fragment{}
	var removed []*fragment
	delta := map[uint32]int{}
	usedByUDP := map[uint32]bool{} // backends that changed or removed UDP ServicePorts named
	drop := func(prev *fragment) {
		replaced[prev.id] = true
		maps.Copy(old.services, prev.services)
		addOwnEntries(old, prev)
		for bid := range prev.backends {
			delta[bid]--
			usedByUDP[bid] = usedByUDP[bid] || prev.udp
		}
	}
	for _, name := range s.Change.Updated {
		sp := s.ServicePorts[name]
		f, err := encodeServicePort(sp, r.ids)
		if err != nil {
			return errSyncAll // it fails alone there
		}
		for key, v := range f.services {
			if _, dup := next.services[key]; dup {
				return errSyncAll
			}
			next.services[key] = v
		}
		addOwnEntries(next, f)
		for bid, b := range f.backends {
			delta[bid]++
			next.backends[bid] = b
		}
		frags[name] = f
		if prev := r.frags[name]; prev != nil {
			drop(prev)
		}
	}
	for _, name := range s.Change.Removed {
		if prev := r.frags[name]; prev != nil {
			drop(prev)
			removed = append(removed, prev)
		}
	}
	for key, v := range next.services {
		if cur, ok := r.written.services[key]; ok && cur.Id != v.Id && !replaced[cur.Id] {
			return errSyncAll
		}
	}
	// A backend is written when the first ServicePort names it and deleted
	// when the last one stops.
	var orphans []uint32
	for bid, d := range delta {
		before := r.refs[bid]
		switch after := before + d; {
		case before > 0 && after > 0:
			b := r.written.backends[bid]
			old.backends[bid], next.backends[bid] = b, b
		case before > 0:
			old.backends[bid] = r.written.backends[bid]
			delete(next.backends, bid)
			orphans = append(orphans, bid)
		default:
			// New: next holds it already.
		}
	}
	if cidrs := encodeClusterCIDRs(s.ClusterCIDRs); !maps.Equal(cidrs, r.written.clusterCIDRs) {
		old.clusterCIDRs, next.clusterCIDRs = r.written.clusterCIDRs, cidrs
	}
	if s.Change.Empty() && len(next.clusterCIDRs) == 0 && len(old.clusterCIDRs) == 0 {
		return errUnchanged
	}
	if len(removed) > 0 && len(r.failed) > 0 {
		return errSyncAll // what failed may fit now
	}
	if checkCapacity(r.maps, r.written, next) != nil {
		return errSyncAll
	}
	if err := apply(r.maps, old, next); err != nil {
		r.written, r.frags, r.refs = nil, nil, nil
		return err
	}

	replaceEntries(r.written.services, old.services, next.services)
	replaceEntries(r.written.info, old.info, next.info)
	replaceEntries(r.written.slots, old.slots, next.slots)
	replaceEntries(r.written.members, old.members, next.members)
	replaceEntries(r.written.backends, old.backends, next.backends)
	replaceEntries(r.written.sourceRanges, old.sourceRanges, next.sourceRanges)
	replaceEntries(r.written.clusterCIDRs, old.clusterCIDRs, next.clusterCIDRs)
	for _, f := range removed {
		delete(r.frags, f.name)
		r.ids.services.forget(f.id)
	}
	maps.Copy(r.frags, frags)
	for _, name := range slices.Concat(s.Change.Updated, s.Change.Removed) {
		delete(r.failed, name)
	}
	for bid, d := range delta {
		if r.refs[bid] += d; r.refs[bid] <= 0 {
			delete(r.refs, bid)
		}
	}
	for _, bid := range orphans {
		r.ids.backends.forget(bid)
		r.removed = append(r.removed, old.backends[bid])
		if usedByUDP[bid] {
			r.removedUDP = append(r.removedUDP, old.backends[bid])
		}
	}
	if len(r.failed) > 0 {
		return maps.Clone(r.failed)
	}
	return nil
}

// addFragment adds all of a ServicePort's entries to t.
func addFragment(t *table, f *fragment) {
	maps.Copy(t.services, f.services)
	maps.Copy(t.backends, f.backends)
	addOwnEntries(t, f)
}

// addOwnEntries adds a ServicePort's own entries, not its frontends or
// backends, to t.
func addOwnEntries(t *table, f *fragment) {
	t.info[f.id] = f.info
	maps.Copy(t.slots, f.slots)
	maps.Copy(t.members, f.members)
	maps.Copy(t.sourceRanges, f.sourceRanges)
}

// replaceEntries makes dst, which held old, hold next instead.
func replaceEntries[K comparable, V any](dst, old, next map[K]V) {
	for k := range old {
		delete(dst, k)
	}
	maps.Copy(dst, next)
}
