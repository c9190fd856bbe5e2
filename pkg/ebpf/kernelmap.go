//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// kernelMap is a BPF map as a bpfMap: batch operations where the map type
// has them, one entry at a time otherwise (LPM tries).
type kernelMap[K comparable, V any] struct{ m *ebpf.Map }

func (k kernelMap[K, V]) Put(keys []K, values []V) error {
	_, err := k.m.BatchUpdate(keys, values, nil)
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return err
	}
	for i := range keys {
		if err := k.m.Put(keys[i], values[i]); err != nil {
			return err
		}
	}
	return nil
}

func (k kernelMap[K, V]) Delete(keys []K) error {
	for done := 0; done < len(keys); {
		n, err := k.m.BatchDelete(keys[done:], nil)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, ebpf.ErrKeyNotExist):
			done += n + 1 // the batch stopped at a missing key: skip it
		case errors.Is(err, ebpf.ErrNotSupported):
			for _, key := range keys[done:] {
				if err := k.m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
					return err
				}
			}
			return nil
		default:
			return err
		}
	}
	return nil
}

// batchSize is how many entries one batch lookup reads.
const batchSize = 4096

// Iterate walks the map with batch lookups, one system call per batchSize
// entries (the periodic sync reads every desired-state map); maps without
// batch operations (LPM tries) fall back to the map's iterator, two calls
// per entry.
func (k kernelMap[K, V]) Iterate(fn func(K, V)) error {
	keys, values := make([]K, batchSize), make([]V, batchSize)
	var cursor ebpf.MapBatchCursor
	for started := false; ; started = true {
		n, err := k.m.BatchLookup(&cursor, keys, values, nil)
		done := false
		switch {
		case errors.Is(err, ebpf.ErrNotSupported) && !started:
			return k.iterateEach(fn)
		case errors.Is(err, ebpf.ErrKeyNotExist):
			done = true
		case err != nil:
			return err
		}
		for i := range n {
			fn(keys[i], values[i])
		}
		if done {
			return nil
		}
	}
}

func (k kernelMap[K, V]) iterateEach(fn func(K, V)) error {
	var (
		key   K
		value V
	)
	it := k.m.Iterate()
	for it.Next(&key, &value) {
		fn(key, value)
	}
	return it.Err()
}

// kernelMaps binds the desired-state maps to the kernel's maps open gives
// by name.
func kernelMaps(open func(name string) (*ebpf.Map, error)) (mapSet, error) {
	ms := make(mapSet, len(columns))
	for i, c := range columns {
		m, err := open(c.info().name)
		if err != nil {
			return nil, err
		}
		ms[i] = c.(interface{ inKernel(*ebpf.Map) desiredMap }).inKernel(m)
	}
	return ms, nil
}

func (c *column[K, V]) inKernel(m *ebpf.Map) desiredMap {
	return c.bind(int(m.MaxEntries()), kernelMap[K, V]{m})
}

// sizes are the max_entries of the maps the options size.
func (o *Options) sizes() map[string]int {
	out := map[string]int{
		svcnatMapSvcnatAffinity: o.MaxAffinity,
		svcnatMapSvcnatCounters: o.MaxServices + o.MaxBackends,
	}
	for _, c := range columns {
		switch c.info().flag {
		case flagMaxServices:
			out[c.info().name] = o.MaxServices
		case flagMaxBackends:
			out[c.info().name] = o.MaxBackends
		}
	}
	return out
}

// pinnedMaps opens the desired-state maps pinned under the backend's
// directory, read-only, for a process that did not load them. It returns
// nil maps when nothing is pinned.
func (b *Backend) pinnedMaps() (mapSet, func(), error) {
	spec, err := loadSvcnat()
	if err != nil {
		return nil, nil, err
	}
	var opened []*ebpf.Map
	closeAll := func() {
		for _, m := range opened {
			m.Close()
		}
	}
	ms, err := kernelMaps(func(name string) (*ebpf.Map, error) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(b.opts.BPFFSPath, pinName(name, spec.Maps[name])), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		opened = append(opened, m)
		return m, nil
	})
	switch {
	case errors.Is(err, fs.ErrNotExist):
		closeAll()
		return nil, func() {}, nil
	case err != nil:
		closeAll()
		return nil, nil, err
	}
	return ms, closeAll, nil
}
