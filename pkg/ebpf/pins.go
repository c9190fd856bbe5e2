//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
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

// desiredState names the maps the reconciler fills from the model
// (columns); the other pinned maps hold state the datapath writes itself
// (LRU maps, per-socket storage).
var desiredState = func() map[string]bool {
	out := map[string]bool{}
	for _, c := range columns {
		out[c.info().name] = true
	}
	return out
}()

// mapPins is what Init found pinned: the maps to load the programs with
// (shared by every object: svcnat, destroy), and the new ones to pin once
// the programs run.
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

func newMapPins(dir string) *mapPins {
	return &mapPins{dir: dir, maps: map[string]*ebpf.Map{}, pins: map[string]string{}, made: map[string]bool{}}
}

// open adopts every pinned map of spec pinned with the same layout and
// size, and makes the others, and returns them as the replacements to load
// spec with (ebpf.CollectionOptions.MapReplacements). A map an earlier call
// (another object's spec) opened is shared. A pinned map of the same layout
// and another size that the datapath fills itself is copied into the new
// one (entries that do not fit are lost); one of another layout is left for
// the old programs until the new ones replace them (pinNew).
func (p *mapPins) open(spec *ebpf.CollectionSpec) (map[string]*ebpf.Map, error) {
	repl := map[string]*ebpf.Map{}
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		ms.Pinning = ebpf.PinNone
		if m := p.maps[name]; m != nil {
			repl[name] = m
			continue
		}
		pin := pinName(name, ms)
		old, err := ebpf.LoadPinnedMap(filepath.Join(p.dir, pin), nil)
		switch {
		case err == nil && ms.Compatible(old) == nil:
			p.maps[name], p.pins[name], repl[name] = old, pin, old
			continue
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			return nil, fmt.Errorf("open pinned map %s: %w", pin, err)
		}
		m, nerr := ebpf.NewMap(ms)
		if nerr != nil {
			if old != nil {
				old.Close()
			}
			return nil, fmt.Errorf("create map %s: %w", name, nerr)
		}
		p.maps[name], p.pins[name], p.made[name], repl[name] = m, pin, true, m
		if old != nil && !desiredState[name] {
			copyEntries(old, m)
		}
		if old != nil {
			old.Close()
		}
		if desiredState[name] && (old != nil || len(p.stale(name)) > 0) {
			p.refill = true
		}
	}
	return repl, nil
}

// retired are maps earlier builds pinned that this one no longer has.
var retired = []string{"svcnat_sock_revnat"}

// stale lists the pins in the directory of map name other than its current
// one: other layouts, or the bare name pins had before layouts were
// versioned.
func (p *mapPins) stale(name string) []string {
	var out []string
	entries, _ := os.ReadDir(p.dir)
	for _, e := range entries {
		if e.Name() != p.pins[name] && !e.IsDir() && (e.Name() == name || strings.HasPrefix(e.Name(), name+"-")) {
			out = append(out, e.Name())
		}
	}
	return out
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

// pinNew pins the maps made by open and removes the pins of other layouts
// of the same maps and of maps this build no longer has. Called once the
// programs that use the new maps are attached.
func (p *mapPins) pinNew() error {
	for name := range p.made {
		path := filepath.Join(p.dir, p.pins[name])
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("unpin map %s: %w", path, err)
		}
		if err := p.maps[name].Pin(path); err != nil {
			return fmt.Errorf("pin map %s: %w", path, err)
		}
	}
	old := slices.Clone(retired)
	for name := range p.pins {
		old = append(old, p.stale(name)...)
	}
	for _, pin := range old {
		if err := os.Remove(filepath.Join(p.dir, pin)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("unpin old map %s: %w", pin, err)
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
