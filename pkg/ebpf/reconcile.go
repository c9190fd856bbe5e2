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

// checkCapacity fails, naming the map and its flag, when writing want over
// cur (all of it, or only what changes) would overflow a map at any point:
// new entries are written before old ones are deleted, so the peak is cur
// plus the keys of want it does not hold.
func checkCapacity(ms mapSet, cur, want *table) error {
	var errs []error
	for _, m := range ms {
		if peak := m.union(cur, want); peak > m.maxEntries() {
			errs = append(errs, capacityError(m, peak))
		}
	}
	return errors.Join(errs...)
}

func capacityError(m desiredMap, peak int) error {
	how := "it has a fixed size"
	if m.info().flag != "" {
		how = "raise " + m.info().flag
	}
	return fmt.Errorf("map %s holds %d entries, this sync needs %d while old entries are replaced: %s",
		m.info().name, m.maxEntries(), peak, how)
}

// apply rewrites the maps from cur to want in the order that never shows
// the datapath a half-written Service (see columns):
//
//  1. new and changed backends, Service info and source ranges;
//  2. memberships, then slots, so that every slot below a new, larger
//     count exists and names a member;
//  3. frontends with their counts: one atomic value per frontend;
//  4. frontends that are gone;
//  5. slots at or above a new, smaller count, and other unused entries;
//  6. backends no slot names any more, last.
//
// apply stops at the first failure; the caller then reads the kernel back
// before trying again.
func apply(ms mapSet, cur, want *table) error {
	for _, m := range ms {
		if err := m.putChanged(cur, want); err != nil {
			return err
		}
	}
	for _, m := range slices.Backward(ms) {
		if err := m.deleteGone(cur, want); err != nil {
			return err
		}
	}
	return nil
}

// reconciler keeps the maps equal to the desired state. It re-encodes only
// the ServicePorts that changed since the last successful sync and writes
// only the entries that differ; after a failure it reads the kernel back
// and compares everything.
type reconciler struct {
	maps mapSet
	ids  *ids // nil until adopted from the kernel
	// written is what the maps hold, nil when unknown (at start or after a
	// failed write); frags and refs describe it per ServicePort and per
	// backend (how many ServicePorts name it).
	written *table
	frags   map[model.ServicePortName]fragment
	refs    map[uint32]int32
	// old and next are syncChanges' scratch tables, kept between syncs.
	old, next *table
	// removed are the endpoints the last sync removed from the maps: flows
	// may still point at them; removedUDP those a UDP ServicePort used:
	// connected sockets may still point at them.
	removed, removedUDP []svcnatBackend
	// failed are the ServicePorts the maps do not hold, with the reason:
	// they could not be encoded or did not fit.
	failed dataplane.PortErrors
	// writes counts the syncs that wrote or may have written, so that a
	// comparison with the kernel that ran beside one can tell (drift.go).
	writes uint64
}

// sync makes the maps hold s. A ServicePort that cannot be encoded, claims
// a frontend another ServicePort has, or does not fit the maps fails alone:
// sync programs the others and returns dataplane.PortErrors naming it, and
// it holds no entries. On a write error the maps hold, per ServicePort, the
// old or the new entries or a mix the datapath can use (every slot below a
// count exists); the next sync repairs them.
//
// With s.Change set, sync encodes only the ServicePorts it names, and the
// failed ones when they may fit now (syncChanges); one that changes nothing
// (the periodic sync) writes nothing unless ServicePorts failed. It does
// not read the kernel, which CheckDrift compares beside the sync loop (it
// forgets written when it finds entries changed or deleted by hand, so that
// the next sync repairs them). Without s.Change, sync encodes everything and
// compares it with the maps.
func (r *reconciler) sync(s *model.State) error {
	r.removed, r.removedUDP = nil, nil
	if r.written != nil && s.Change != nil {
		switch err := r.syncChanges(s); {
		case errors.Is(err, errUnchanged):
			return nil
		case !errors.Is(err, errSyncAll):
			r.writes++
			return err
		}
	}
	r.writes++
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
			r.ids = adoptIDs(cur)
		}
		want, frags, failed := encode(s, r.ids, cur)
		want, full := admit(r.maps, cur, want, frags, failed)
		// When everything fits, admit has checked it; the cluster CIDRs
		// are no ServicePort's and may not fit all the same.
		if full {
			if err := checkCapacity(r.maps, cur, want); err != nil {
				return fmt.Errorf("check capacity: %w", err)
			}
		}
		if err := apply(r.maps, cur, want); err != nil {
			r.written = nil
			return err
		}
		r.noteRemoved(cur, want)
		r.written, r.frags, r.refs = want, frags, make(map[uint32]int32, len(want.backends))
		r.failed = failed
		var bids []uint32
		for _, f := range frags {
			bids = f.appendBackendIDs(bids[:0], want)
			for _, bid := range bids {
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
func admit(ms mapSet, cur, want *table, frags map[model.ServicePortName]fragment, failed dataplane.PortErrors) (*table, bool) {
	if checkCapacity(ms, cur, want) == nil {
		return want, false
	}
	out := newTable()
	out.clusterCIDRs = want.clusterCIDRs
	names := slices.SortedFunc(maps.Keys(frags), model.ServicePortName.Compare)
	// peak[i] is how many entries map i holds at the peak of the write:
	// cur and what was admitted.
	peak := make([]int, len(ms))
	for i, m := range ms {
		peak[i] = m.count(cur)
	}
	grow := make([]int, len(ms))
	full := false
	own := newTable()
	for _, name := range names {
		f := frags[name]
		for _, c := range columns {
			c.clear(own)
		}
		f.copyTo(own, want)
		var errs []string
		for i, m := range ms {
			grow[i] = m.fresh(own, cur, out)
			if peak[i]+grow[i] > m.maxEntries() {
				errs = append(errs, capacityError(m, peak[i]+grow[i]).Error())
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
		f.copyTo(out, want)
	}
	return out, full
}

// shrank says whether writing want over cur deleted entries.
func shrank(cur, want *table) bool {
	for _, c := range columns {
		if c.union(want, cur) > c.count(want) {
			return true
		}
	}
	return false
}

// syncChanges writes what s.Change names. When that freed room in a map,
// or changed nothing (the periodic sync), it tries the ServicePorts that
// failed again, as a second change: over capacity, a change costs what it
// touches plus, when room frees up, what waits for room; never a full sync.
func (r *reconciler) syncChanges(s *model.State) error {
	before := r.counts()
	err := r.writeChanges(s, s.Change.Updated, s.Change.Removed)
	unchanged := errors.Is(err, errUnchanged)
	if (err != nil && !unchanged) || len(r.failed) == 0 {
		return err
	}
	freed := false
	for i, n := range r.counts() {
		freed = freed || n < before[i]
	}
	if unchanged || freed {
		var retry, gone []model.ServicePortName
		for name := range r.failed {
			if _, ok := s.ServicePorts[name]; ok {
				retry = append(retry, name)
			} else {
				gone = append(gone, name)
			}
		}
		if err := r.writeChanges(s, retry, gone); err != nil {
			return err
		}
	}
	if len(r.failed) > 0 {
		return maps.Clone(r.failed)
	}
	return nil
}

// counts are how many entries each map holds.
func (r *reconciler) counts() []int {
	out := make([]int, len(r.maps))
	for i, m := range r.maps {
		out[i] = m.count(r.written)
	}
	return out
}

// writeChanges writes the entries of the ServicePorts updated and removed
// name: old holds what they replace, next what replaces it. Those that
// cannot be encoded, or, in name order, do not fit the maps (admit) fail
// alone: they join r.failed and hold no entries.
func (r *reconciler) writeChanges(s *model.State, updated, removed []model.ServicePortName) error {
	old, next := r.scratch()
	updated = slices.SortedFunc(slices.Values(updated), model.ServicePortName.Compare)
	replaced := map[uint32]bool{} // ids of ServicePorts changed or removed
	for _, name := range slices.Concat(updated, removed) {
		if prev, ok := r.frags[name]; ok {
			replaced[prev.id] = true
		}
	}
	frags := map[model.ServicePortName]fragment{}
	rejected := dataplane.PortErrors{}
	for _, name := range updated {
		f, err := encodeServicePort(s.ServicePorts[name], r.ids, r.written, next)
		if err != nil {
			rejected[name] = err
			continue
		}
		frags[name] = f
	}
	for key, v := range next.services {
		if cur, ok := r.written.services[key]; ok && cur.Id != v.Id && !replaced[cur.Id] {
			return errSyncAll // name order decides who has it
		}
	}
	if cidrs := encodeClusterCIDRs(s.ClusterCIDRs); !maps.Equal(cidrs, r.written.clusterCIDRs) {
		maps.Copy(old.clusterCIDRs, r.written.clusterCIDRs)
		maps.Copy(next.clusterCIDRs, cidrs)
	}
	if len(updated) == 0 && len(removed) == 0 && len(next.clusterCIDRs) == 0 && len(old.clusterCIDRs) == 0 {
		return errUnchanged
	}
	encoded := maps.Clone(frags)
	next, full := admit(r.maps, r.written, next, frags, rejected)
	// When everything fits, admit has checked it; the cluster CIDRs are no
	// ServicePort's and may not fit all the same.
	if full && checkCapacity(r.maps, r.written, next) != nil {
		return errSyncAll
	}

	// A backend is written when the first ServicePort names it and deleted
	// when the last one stops.
	delta := map[uint32]int32{}
	usedByUDP := map[uint32]bool{} // backends that changed or removed UDP ServicePorts named
	var bids []uint32
	for _, f := range frags {
		bids = f.appendBackendIDs(bids[:0], next)
		for _, bid := range bids {
			delta[bid]++
		}
	}
	var gone []model.ServicePortName // written before, not after
	for _, name := range slices.Concat(updated, removed) {
		prev, ok := r.frags[name]
		if !ok {
			continue
		}
		if _, ok := frags[name]; !ok {
			gone = append(gone, name)
		}
		prev.copyTo(old, r.written)
		bids = prev.appendBackendIDs(bids[:0], r.written)
		for _, bid := range bids {
			delta[bid]--
			usedByUDP[bid] = usedByUDP[bid] || prev.udp
		}
	}
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
	if err := apply(r.maps, old, next); err != nil {
		r.written, r.frags, r.refs = nil, nil, nil
		return err
	}

	for _, c := range columns {
		c.replace(r.written, old, next)
	}
	// The numbers of what did not fit go, unless written (gone forgets
	// those below).
	for name, f := range encoded {
		if _, ok := frags[name]; ok {
			continue
		}
		r.ids.services.forget(name, f.id)
		for _, bid := range f.appendBackendIDs(bids[:0], r.next) {
			if _, ok := r.written.backends[bid]; !ok {
				r.ids.backends.forget(r.next.backends[bid], bid)
			}
		}
	}
	for _, name := range gone {
		r.ids.services.forget(name, r.frags[name].id)
		delete(r.frags, name)
	}
	maps.Copy(r.frags, frags)
	for _, name := range slices.Concat(updated, removed) {
		delete(r.failed, name)
	}
	maps.Copy(r.failed, rejected)
	for bid, d := range delta {
		if r.refs[bid] += d; r.refs[bid] <= 0 {
			delete(r.refs, bid)
		}
	}
	for _, bid := range orphans {
		r.ids.backends.forget(old.backends[bid], bid)
		r.removed = append(r.removed, old.backends[bid])
		if usedByUDP[bid] {
			r.removedUDP = append(r.removedUDP, old.backends[bid])
		}
	}
	return nil
}

// scratchLimit is the most entries a scratch table keeps between syncs:
// clearing a map keeps its room, and one large change must not hold it.
const scratchLimit = 1024

// scratch returns syncChanges' two scratch tables, empty. Each sync made
// them anew before; as they reach the maps through an interface they
// escaped to the heap, seven maps each.
func (r *reconciler) scratch() (old, next *table) {
	for _, t := range []**table{&r.old, &r.next} {
		size := 0
		if *t != nil {
			for _, c := range columns {
				size += c.count(*t)
				c.clear(*t)
			}
		}
		if *t == nil || size > scratchLimit {
			*t = newTable()
		}
	}
	return r.old, r.next
}
