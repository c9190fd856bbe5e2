//go:build linux

package ebpf

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// The datapath counts in svcnat_counters (bpf/svcnat.h): one row per
// Service port and one per Service port and endpoint, keyed by the numbers
// the maps give them, made by the datapath when it first counts. Numbers
// are not reused while the agent runs, so a row left by a Service port or
// endpoint that is gone never counts for another; the agent deletes such
// rows at Init and at most every counterPrunePeriod after a sync, and
// Counters shows only the rows of what the maps hold now.

// counterPrunePeriod is the least time between two prunes of the counter
// map (a walk of every row).
const counterPrunePeriod = time.Minute

var _ dataplane.CounterReader = (*Backend)(nil)

// liveCounters reports whether the counter row k belongs to a Service port
// (and endpoint) that t holds.
func liveCounters(t *table, k svcnatCounterKey) bool {
	if _, ok := t.info[k.Id]; !ok {
		return false
	}
	if k.BackendId == 0 {
		return true
	}
	for _, set := range []uint8{setCluster, setLocal, setServing} {
		if _, ok := t.members[svcnatMemberKey{Id: k.Id, BackendId: k.BackendId, Set: set}]; ok {
			return true
		}
	}
	return false
}

// memberPairs lists the Service port and endpoint pairs of t.
func memberPairs(t *table) map[svcnatCounterKey]bool {
	out := make(map[svcnatCounterKey]bool, len(t.members))
	for k := range t.members {
		out[svcnatCounterKey{Id: k.Id, BackendId: k.BackendId}] = true
	}
	return out
}

// pruneCounters deletes the rows of m that belong to nothing t holds.
// Best effort: a row left over only takes room.
func pruneCounters(m *ebpf.Map, t *table) error {
	keys, err := counterKeys(m)
	if err != nil {
		return err
	}
	return deleteDeadCounters(m, t, keys)
}

// deleteDeadCounters deletes the rows keys of m that belong to nothing t
// holds.
func deleteDeadCounters(m *ebpf.Map, t *table, keys []svcnatCounterKey) error {
	for _, k := range keys {
		if liveCounters(t, k) {
			continue
		}
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete from %s: %w", svcnatMapSvcnatCounters, err)
		}
	}
	return nil
}

// counterKeys lists the rows of the counter map m (keys only: the values
// are per CPU).
func counterKeys(m *ebpf.Map) ([]svcnatCounterKey, error) {
	var keys []svcnatCounterKey
	var prev any
	for {
		var k svcnatCounterKey
		err := m.NextKey(prev, &k)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return keys, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", svcnatMapSvcnatCounters, err)
		}
		keys = append(keys, k)
		prev = k
	}
}

// pruneCountersAfterSync prunes the counter map against what the last sync
// wrote, at most every counterPrunePeriod. Walking the map (a syscall per
// row) runs in the background; the sync after the walk ended deletes the
// rows it listed that belong to nothing the maps hold then (numbers are
// not reused, so a row dead then stays dead).
func (b *Backend) pruneCountersAfterSync() {
	if b.counterWalk != nil {
		select {
		case keys := <-b.counterWalk:
			b.counterWalk = nil
			if err := deleteDeadCounters(b.objs.SvcnatCounters, b.rec.written, keys); err != nil {
				b.log.Warn("prune counters", "error", err)
			}
		default:
		}
		return
	}
	if b.rec.written == nil || time.Since(b.countersPruned) < counterPrunePeriod {
		return
	}
	b.countersPruned = time.Now()
	// The walk reads its own descriptor of the map: Close need not wait.
	m, err := b.objs.SvcnatCounters.Clone()
	if err != nil {
		b.log.Warn("prune counters", "error", err)
		return
	}
	walk := make(chan []svcnatCounterKey, 1)
	b.counterWalk = walk
	go func() {
		defer m.Close()
		keys, err := counterKeys(m)
		if err != nil {
			b.log.Warn("prune counters", "error", err)
		}
		walk <- keys
	}()
}

// pruneCountersAtInit prunes the counter map against what the maps hold
// when the agent starts: an earlier run's numbers above the highest one in
// use may be given again, and must not inherit counts.
func (b *Backend) pruneCountersAtInit() error {
	t, err := readTable(b.rec.maps)
	if err != nil {
		return err
	}
	if err := pruneCounters(b.objs.SvcnatCounters, t); err != nil {
		return err
	}
	b.countersPruned = time.Now()
	return nil
}

// Counters reads the pinned counter map and sums it over the CPUs, for
// the Service ports and endpoints the pinned maps hold. It needs no Init;
// with nothing pinned it returns an empty map.
func (b *Backend) Counters(ctx context.Context) (map[model.ServicePortName]*dataplane.PortCounters, error) {
	out := map[model.ServicePortName]*dataplane.PortCounters{}
	ms, closeAll, err := b.pinnedMaps()
	if err != nil {
		return nil, fmt.Errorf("read ebpf counters: %w", err)
	}
	defer closeAll()
	if ms == nil {
		return out, nil
	}
	spec, err := loadSvcnat()
	if err != nil {
		return nil, fmt.Errorf("read ebpf counters: %w", err)
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(b.opts.BPFFSPath, pinName(svcnatMapSvcnatCounters, spec.Maps[svcnatMapSvcnatCounters])), &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read ebpf counters: open pinned map %s: %w", svcnatMapSvcnatCounters, err)
	}
	defer m.Close()
	t, err := readTable(ms)
	if err != nil {
		return nil, fmt.Errorf("read ebpf counters: %w", err)
	}
	return sumCounters(m, t)
}

// sumCounters adds up the per-CPU rows of m for what t holds.
func sumCounters(m *ebpf.Map, t *table) (map[model.ServicePortName]*dataplane.PortCounters, error) {
	out := map[model.ServicePortName]*dataplane.PortCounters{}
	port := func(id uint32) *dataplane.PortCounters {
		name, _, err := decodeInfo(t.info[id])
		if err != nil {
			return nil
		}
		pc := out[name]
		if pc == nil {
			var packets, bytes uint64
			pc = &dataplane.PortCounters{Counters: dataplane.Counters{Packets: &packets, Bytes: &bytes}}
			out[name] = pc
		}
		return pc
	}
	endpoint := func(bid uint32) (string, bool) {
		b, ok := t.backends[bid]
		if !ok {
			return "", false
		}
		ep, err := decodeBackend(b)
		return ep.String(), err == nil
	}
	// Every Service port and endpoint has its row, counted or not.
	for id := range t.info {
		port(id)
	}
	for k := range memberPairs(t) {
		pc := port(k.Id)
		if ep, ok := endpoint(k.BackendId); pc != nil && ok {
			if pc.Endpoints == nil {
				pc.Endpoints = map[string]uint64{}
			}
			pc.Endpoints[ep] += 0
		}
	}
	var k svcnatCounterKey
	var perCPU []svcnatCounterValue
	it := m.Iterate()
	for it.Next(&k, &perCPU) {
		if !liveCounters(t, k) {
			continue
		}
		var sum svcnatCounterValue
		for _, v := range perCPU {
			sum.Connections += v.Connections
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
		pc := port(k.Id)
		if pc == nil {
			continue
		}
		if k.BackendId == 0 {
			pc.Connections = sum.Connections
			*pc.Packets, *pc.Bytes = sum.Packets, sum.Bytes
			continue
		}
		if ep, ok := endpoint(k.BackendId); ok {
			pc.Endpoints[ep] += sum.Connections
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read ebpf counters: %w", err)
	}
	return out, nil
}
