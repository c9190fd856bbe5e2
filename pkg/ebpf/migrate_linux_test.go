//go:build linux

package ebpf

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// TestMapSizeFlags: sizes too small to work are refused, naming the flag
// and the least value.
func TestMapSizeFlags(t *testing.T) {
	for _, tc := range []struct {
		opts Options
		want string
	}{
		{Options{MaxAffinity: 100}, "--bpf-map-max-affinity=100: want 1024"},
		{Options{MaxServices: -1}, "--bpf-map-max-services=-1: want 1"},
		{Options{MaxBackends: -5}, "--bpf-map-max-backends=-5: want 1"},
	} {
		if _, err := New(tc.opts); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v): %v, want an error containing %q", tc.opts, err, tc.want)
		}
	}
}

// TestMigration: an agent started with other map sizes, or finding maps
// pinned with another layout, takes over without svcnat cleanup and with
// no gap: the old programs translate until the first sync has filled the
// new maps, then the new ones do, and only the new maps stay pinned.
func TestMigration(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	p := newPod(t, "10.244.1.2/24")
	p.serveTCP(t, "10.244.1.2:8080")
	s := stateOf(sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint("10.244.1.2", 8080)))
	start := func(opts Options) *Backend {
		t.Helper()
		opts.BPFFSPath, opts.CgroupPath = env.bpffs, env.cgroup
		b, err := New(opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Init(t.Context()); err != nil {
			t.Fatalf("init with %+v: %v", opts, err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	}
	reaches := func(when string) {
		t.Helper()
		if got, err := dialRead(t, "tcp", "10.96.0.10:80"); err != nil || got != "10.244.1.2:8080" {
			t.Fatalf("%s: got %q, %v", when, got, err)
		}
	}
	first := start(Options{})
	if err := first.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	first.Close()
	env.enterCgroup(t)
	reaches("with the first agent gone")

	// Other sizes.
	second := start(Options{MaxServices: 1000, MaxBackends: 5000})
	reaches("after Init with other map sizes, before the first sync")
	if err := second.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	reaches("after the first sync with other map sizes")
	pin := filepath.Join(env.bpffs, pinName(svcnatMapSvcnatServices, mustSpec(t).Maps[svcnatMapSvcnatServices]))
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.MaxEntries() != 1000 {
		t.Errorf("pinned %s holds %d entries, want 1000", pin, m.MaxEntries())
	}
	m.Close()
	second.Close()

	// Pins from before layouts were versioned: bare names.
	renamePins(t, env.bpffs, "")
	upgraded := start(Options{MaxServices: 1000, MaxBackends: 5000})
	reaches("after Init over unversioned pins, before the first sync")
	if err := upgraded.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	reaches("after the first sync over unversioned pins")
	if _, err := os.Stat(filepath.Join(env.bpffs, svcnatMapSvcnatServices)); err == nil {
		t.Errorf("the unversioned pin %s is left", svcnatMapSvcnatServices)
	}
	upgraded.Close()

	// Another layout: the pins carry another fingerprint.
	renamePins(t, env.bpffs, "-00000000")
	third := start(Options{MaxServices: 1000, MaxBackends: 5000})
	reaches("after Init over another layout, before the first sync")
	if err := third.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	reaches("after the first sync over another layout")
	dumped, err := third.Dump(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	statesEqual(t, s, dumped)
	entries, _ := os.ReadDir(env.bpffs)
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), "-00000000") {
			t.Errorf("pin %s of the old layout is left", e.Name())
		}
	}
	// A fresh connection goes through the new programs: they answer for a
	// Service the old maps never had.
	s2 := stateOf(s.ServicePorts[model.ServicePortName{Namespace: "default", Name: "web", Family: model.IPv4}],
		sp("new", model.IPv4, model.TCP, "10.96.0.11", 80, endpoint("10.244.1.2", 8080)))
	if err := third.Sync(t.Context(), s2); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		got, err := dialRead(t, "tcp", "10.96.0.11:80")
		if err == nil && got == "10.244.1.2:8080" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a Service added after the migration: got %q, %v", got, err)
		}
	}
}

// renamePins renames every map pin in dir to its map name and suffix, as
// another build would have pinned it.
func renamePins(t *testing.T, dir, suffix string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if name, _, ok := strings.Cut(e.Name(), "-"); ok && !e.IsDir() {
			if err := os.Rename(filepath.Join(dir, e.Name()), filepath.Join(dir, name+suffix)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func mustSpec(t *testing.T) *ebpf.CollectionSpec {
	t.Helper()
	spec, err := loadSvcnat()
	if err != nil {
		t.Fatal(err)
	}
	return spec
}
