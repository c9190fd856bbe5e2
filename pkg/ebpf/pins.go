//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// Pinned maps carry their layout in their name: <map>-<fingerprint>, the
// fingerprint a hash of the map type, flags and the key and value types
// (field names, offsets, sizes), not of max_entries. A build with another
// layout never adopts a map it would misread: it creates its own, and the
// agent migrates (see mapPins). A change of meaning without a change of the
// struct must rename the struct or a field, so that the fingerprint changes.

// pinName is the name map name of spec ms is pinned under.
func pinName(name string, ms *ebpf.MapSpec) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %d %#x %d %d ", ms.Type, ms.Flags, ms.KeySize, ms.KeySize, ms.ValueSize)
	writeLayout(&b, ms.Key)
	b.WriteString(" ")
	writeLayout(&b, ms.Value)
	h := fnv.New32a()
	h.Write([]byte(b.String()))
	return fmt.Sprintf("%s-%08x", name, h.Sum32())
}

func writeLayout(b *strings.Builder, t btf.Type) {
	switch t := btf.UnderlyingType(t).(type) {
	case *btf.Struct:
		fmt.Fprintf(b, "struct %s %d{", t.Name, t.Size)
		writeMembers(b, t.Members)
	case *btf.Union:
		fmt.Fprintf(b, "union %s %d{", t.Name, t.Size)
		writeMembers(b, t.Members)
	case *btf.Array:
		fmt.Fprintf(b, "[%d]", t.Nelems)
		writeLayout(b, t.Type)
	case *btf.Int:
		fmt.Fprintf(b, "int%d/%d", t.Size, t.Encoding)
	case *btf.Enum:
		fmt.Fprintf(b, "enum%d", t.Size)
	case nil:
		b.WriteString("-")
	default:
		fmt.Fprintf(b, "%T", t)
	}
}

func writeMembers(b *strings.Builder, ms []btf.Member) {
	for _, m := range ms {
		fmt.Fprintf(b, "%s@%d/%d:", m.Name, m.Offset, m.BitfieldSize)
		writeLayout(b, m.Type)
		b.WriteString(";")
	}
	b.WriteString("}")
}

// desiredState names the maps the reconciler fills from the model; the
// other pinned maps hold state the datapath writes itself (LRU maps,
// per-socket storage).
var desiredState = map[string]bool{
	svcnatMapSvcnatServices: true, svcnatMapSvcnatSvcInfo: true, svcnatMapSvcnatSlots: true,
	svcnatMapSvcnatMembers: true, svcnatMapSvcnatBackends: true, svcnatMapSvcnatSourceRanges: true,
	svcnatMapSvcnatClusterCidrs: true,
}

// mapPins is what Init found pinned: the maps to load the programs with,
// and the new ones to pin once the programs run.
type mapPins struct {
	dir  string
	maps map[string]*ebpf.Map // by map name: adopted or made now
	pins map[string]string    // by map name: the pin name
	made map[string]bool      // the maps made now, not pinned yet
	// refill is set when a desired-state map an earlier run left is
	// replaced by an empty one (another layout or size): the programs must
	// not run with it until a sync has filled it.
	refill bool
}

// openPins adopts every map of spec pinned with the same layout and size,
// and makes the others. A pinned map of the same layout and another size
// that the datapath fills itself is copied into the new one (entries that
// do not fit are lost); one of another layout is left for the old
// programs until the new ones replace them.
func openPins(dir string, spec *ebpf.CollectionSpec) (*mapPins, error) {
	p := &mapPins{dir: dir, maps: map[string]*ebpf.Map{}, pins: map[string]string{}, made: map[string]bool{}}
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		ms.Pinning = ebpf.PinNone
		pin := pinName(name, ms)
		p.pins[name] = pin
		old, err := ebpf.LoadPinnedMap(filepath.Join(dir, pin), nil)
		switch {
		case err == nil && ms.Compatible(old) == nil:
			p.maps[name] = old
			continue
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			p.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", pin, err)
		}
		m, nerr := ebpf.NewMap(ms)
		if nerr != nil {
			if old != nil {
				old.Close()
			}
			p.Close()
			return nil, fmt.Errorf("create map %s: %w", name, nerr)
		}
		p.maps[name], p.made[name] = m, true
		if old != nil && !desiredState[name] {
			copyEntries(old, m)
		}
		if old != nil {
			old.Close()
		}
		if desiredState[name] && (old != nil || hasPins(dir, name)) {
			p.refill = true
		}
	}
	return p, nil
}

// hasPins says whether an earlier run pinned map name under another
// layout (or, before layouts were versioned, under the bare name).
func hasPins(dir, name string) bool {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.Name() == name || strings.HasPrefix(e.Name(), name+"-") {
			return true
		}
	}
	return false
}

// copyEntries copies what it can of from into to; best effort: the
// entries are state the datapath can rebuild.
func copyEntries(from, to *ebpf.Map) {
	k, v := make([]byte, from.KeySize()), make([]byte, from.ValueSize())
	it := from.Iterate()
	for it.Next(&k, &v) {
		if to.Put(k, v) != nil {
			return
		}
	}
}

// pinNew pins the maps made at Init and removes every other map pin in
// the directory: those of other layouts and of maps this build no longer
// has. Called once the programs that use the new maps are attached.
func (p *mapPins) pinNew() error {
	keep := map[string]bool{}
	for name, pin := range p.pins {
		keep[pin] = true
		if !p.made[name] {
			continue
		}
		path := filepath.Join(p.dir, pin)
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("unpin map %s: %w", path, err)
		}
		if err := p.maps[name].Pin(path); err != nil {
			return fmt.Errorf("pin map %s: %w", path, err)
		}
	}
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return fmt.Errorf("list pins in %s: %w", p.dir, err)
	}
	for _, e := range entries {
		if keep[e.Name()] || e.IsDir() {
			continue
		}
		if err := os.Remove(filepath.Join(p.dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("unpin old map %s: %w", e.Name(), err)
		}
	}
	p.made = map[string]bool{}
	p.refill = false
	return nil
}

// Close releases the maps; what is pinned stays.
func (p *mapPins) Close() {
	for _, m := range p.maps {
		m.Close()
	}
}
