package ebpf

import (
	"errors"
	"fmt"
	"hash/maphash"
	"maps"

	"github.com/svcnat/svcnat/pkg/model"
)

// bpfMap is the kernel layer under the reconciler: one BPF map, typed by its
// key and value. kernelMap is the kernel's; tests use an in-memory fake that
// models the kernel's semantics and fails on demand.
type bpfMap[K comparable, V any] interface {
	// Put creates or replaces the entries for keys with values (as many),
	// in order, and stops at the first failure.
	Put(keys []K, values []V) error
	// Delete removes the entries for keys; missing keys are not an error.
	Delete(keys []K) error
	// Iterate calls fn with every entry.
	Iterate(fn func(K, V)) error
}

// The flags that size the desired-state maps.
const (
	flagMaxServices = "--bpf-map-max-services"
	flagMaxBackends = "--bpf-map-max-backends"
)

// columns is the one list of the desired-state maps: each BPF map with the
// flag that sizes it and the table field that mirrors it. kernelMaps binds
// them to the kernel's maps, tests to in-memory fakes. The list is in write
// order: the datapath reaches a map's entries only through entries of maps
// after it (a frontend leads to its Service info, source ranges and slots,
// a slot to a backend, which must be a member), so apply writes new entries
// in this order and deletes old ones in the reverse. Cluster CIDRs only
// steer masquerading; they are added before and removed after the Services.
var columns = []tableColumn{
	newColumn(svcnatMapSvcnatClusterCidrs, "", func(t *table) map[svcnatCidrKey]uint8 { return t.clusterCIDRs }),
	newColumn(svcnatMapSvcnatBackends, flagMaxBackends, func(t *table) map[uint32]svcnatBackend { return t.backends }),
	newColumn(svcnatMapSvcnatSvcInfo, flagMaxServices, func(t *table) map[uint32]svcnatSvcInfo { return t.info }),
	newColumn(svcnatMapSvcnatSourceRanges, flagMaxServices, func(t *table) map[svcnatSourceRangeKey]uint8 { return t.sourceRanges }),
	newColumn(svcnatMapSvcnatMembers, flagMaxBackends, func(t *table) map[svcnatMemberKey]uint8 { return t.members }),
	newColumn(svcnatMapSvcnatSlots, flagMaxBackends, func(t *table) map[svcnatSlotKey]uint32 { return t.slots }),
	newColumn(svcnatMapSvcnatServices, flagMaxServices, func(t *table) map[svcnatSvcKey]svcnatSvcValue { return t.services }),
}

// mapInfo names a desired-state map.
type mapInfo struct {
	name string // the BPF map's name
	flag string // the agent flag that sizes it, "" when fixed
}

func (i mapInfo) info() mapInfo { return i }

// tableColumn is a column of any key and value type: what the reconciler
// does with one field of a table.
type tableColumn interface {
	info() mapInfo
	// count is how many entries t's field holds.
	count(t *table) int
	// union is how many keys a's and b's fields hold together.
	union(a, b *table) int
	// fresh is how many keys m's field holds that neither a's nor b's does.
	fresh(m, a, b *table) int
	// replace makes dst's field, which held old's, hold next's instead.
	replace(dst, old, next *table)
	// clear empties t's field.
	clear(t *table)
	// digest summarizes t's field (see digest).
	digest(t *table) digest
}

// digest summarizes a map's entries whatever their order: how many, and the
// sum of their hashes. Two digests that are equal say, but for a 64-bit hash
// collision, that the maps hold the same entries; CheckDrift compares the
// kernel's maps with what was written this way, without a copy of either.
type digest struct {
	n   int
	sum uint64
}

// digestSeed seeds the hashes of digests, which live only in this process.
var digestSeed = maphash.MakeSeed()

type entry[K, V comparable] struct {
	k K
	v V
}

// addDigest adds the entry k, v to d.
func addDigest[K, V comparable](d *digest, k K, v V) {
	d.n++
	d.sum += maphash.Comparable(digestSeed, entry[K, V]{k, v})
}

// column is a desired-state map as the table sees it.
type column[K, V comparable] struct {
	mapInfo
	field func(*table) map[K]V
}

func newColumn[K, V comparable](name, flag string, field func(*table) map[K]V) *column[K, V] {
	return &column[K, V]{mapInfo{name, flag}, field}
}

func (c *column[K, V]) count(t *table) int { return len(c.field(t)) }

func (c *column[K, V]) union(a, b *table) int { return unionLen(c.field(a), c.field(b)) }

func (c *column[K, V]) fresh(m, a, b *table) int {
	fa, fb := c.field(a), c.field(b)
	n := 0
	for k := range c.field(m) {
		_, inA := fa[k]
		_, inB := fb[k]
		if !inA && !inB {
			n++
		}
	}
	return n
}

func (c *column[K, V]) clear(t *table) { clear(c.field(t)) }

func (c *column[K, V]) digest(t *table) digest {
	var d digest
	for k, v := range c.field(t) {
		addDigest(&d, k, v)
	}
	return d
}

func (c *column[K, V]) replace(dst, old, next *table) {
	d := c.field(dst)
	for k := range c.field(old) {
		delete(d, k)
	}
	maps.Copy(d, c.field(next))
}

// bind pairs the column with its map, of capacity entries.
func (c *column[K, V]) bind(capacity int, m bpfMap[K, V]) desiredMap {
	return &tableMap[K, V]{column: c, capacity: capacity, m: m}
}

// mapSet is the desired-state maps, in the order of columns.
type mapSet []desiredMap

// desiredMap is a column with its map: what the reconciler does with one
// desired-state map.
type desiredMap interface {
	tableColumn
	maxEntries() int
	// read adds the map's entries to t's field.
	read(t *table) error
	// digestKernel summarizes the map's entries as digest does a field's.
	digestKernel() (digest, error)
	// putChanged writes the entries of want's field that cur's lacks or
	// holds with another value.
	putChanged(cur, want *table) error
	// deleteGone deletes the keys of cur's field that want's lacks.
	deleteGone(cur, want *table) error
}

// tableMap is a desired-state map bound to its typed BPF map.
type tableMap[K, V comparable] struct {
	*column[K, V]
	capacity int
	m        bpfMap[K, V]
}

func (m *tableMap[K, V]) maxEntries() int { return m.capacity }

func (m *tableMap[K, V]) read(t *table) error {
	dst := m.field(t)
	if err := m.m.Iterate(func(k K, v V) { dst[k] = v }); err != nil {
		return fmt.Errorf("read map %s: %w", m.name, err)
	}
	return nil
}

func (m *tableMap[K, V]) digestKernel() (digest, error) {
	var d digest
	if err := m.m.Iterate(func(k K, v V) { addDigest(&d, k, v) }); err != nil {
		return digest{}, fmt.Errorf("read map %s: %w", m.name, err)
	}
	return d, nil
}

func (m *tableMap[K, V]) putChanged(cur, want *table) error {
	var (
		keys   []K
		values []V
	)
	have := m.field(cur)
	for k, v := range m.field(want) {
		if old, ok := have[k]; ok && old == v {
			continue
		}
		keys, values = append(keys, k), append(values, v)
	}
	if len(keys) == 0 {
		return nil
	}
	if err := m.m.Put(keys, values); err != nil {
		return fmt.Errorf("write %d entries to map %s: %w", len(keys), m.name, err)
	}
	return nil
}

func (m *tableMap[K, V]) deleteGone(cur, want *table) error {
	var keys []K
	keep := m.field(want)
	for k := range m.field(cur) {
		if _, ok := keep[k]; !ok {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil
	}
	if err := m.m.Delete(keys); err != nil {
		return fmt.Errorf("delete %d entries from map %s: %w", len(keys), m.name, err)
	}
	return nil
}

// readTable reads the desired-state maps.
func readTable(ms mapSet) (*table, error) {
	t := newTable()
	var errs []error
	for _, m := range ms {
		errs = append(errs, m.read(t))
	}
	return t, errors.Join(errs...)
}

// readState reads the desired-state maps and decodes them into the State
// they program. A read that meets a set torn by a write in progress is
// repeated once; a set still torn then is decoded as the datapath reads it
// and listed in torn.
func readState(ms mapSet) (s *model.State, torn []tornSet, err error) {
	for range 2 {
		t, err := readTable(ms)
		if err != nil {
			return nil, nil, err
		}
		if s, torn, err = decode(t); err != nil || len(torn) == 0 {
			return s, torn, err
		}
	}
	return s, torn, nil
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
