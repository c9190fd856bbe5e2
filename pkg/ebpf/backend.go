//go:build linux

package ebpf

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// Options configures the eBPF backend.
type Options struct {
	// BPFFSPath is the directory maps and links are pinned in; its parent
	// must be a mounted bpffs. Default /sys/fs/bpf/svcnat.
	BPFFSPath string
	// CgroupPath is the cgroup v2 whose processes (and its descendants')
	// get connect-time translation. Init requires it (the node's cgroup v2
	// root in production, a child cgroup in tests); Dump, Raw and Cleanup do
	// not use it.
	CgroupPath string
	// Interfaces are the node's interfaces that traffic from outside the
	// node arrives on; each gets the tc ingress program (TCX), which hands
	// the translation of such flows to conntrack and nf_nat (see
	// bpf/README.md). Needs the conntrack kfuncs; Init creates the nftables
	// table inet svcnat (a nat chain) so that nf_nat runs.
	Interfaces []string
	// Map sizes; zero means the default. MaxServices sizes the frontend,
	// Service info and source range maps (--bpf-map-max-services);
	// MaxBackends the endpoint, slot and membership maps
	// (--bpf-map-max-backends); MaxAffinity the session affinity map
	// (--bpf-map-max-affinity). The flows of the tc path live in conntrack
	// (net.netfilter.nf_conntrack_max), and what the socket hooks remember
	// per socket is freed with the socket.
	MaxServices, MaxBackends, MaxAffinity int
	// Registerer, when set, receives the backend's metrics.
	Registerer prometheus.Registerer
	// Logger, when set, receives the backend's logs.
	Logger *slog.Logger
}

// Defaults for Options.
const (
	DefaultBPFFSPath   = "/sys/fs/bpf/svcnat"
	DefaultMaxServices = 65536
	DefaultMaxBackends = 262144
	DefaultMaxAffinity = 65536
	// MinLRUEntries is the least size of the maps the datapath fills
	// itself (LRU hashes): the kernel hands their free entries to CPUs in
	// batches of 128, so a smaller map evicts live entries at once (Cilium
	// has the same floor for its tables).
	MinLRUEntries = 1024
)

// Backend is the eBPF dataplane. It implements dataplane.Backend and the
// agent's DriftChecker; CheckDrift may run beside the other methods once
// Init has returned.
type Backend struct {
	// mu is held by Sync and Close throughout, and by CheckDrift while it
	// looks at the reconciler; checking by CheckDrift throughout and by
	// Close, which closes the maps CheckDrift reads.
	mu       sync.Mutex
	checking sync.Mutex
	opts     Options
	log      *slog.Logger
	objs     *svcnatObjects
	links    []link.Link
	pins     *mapPins
	rec      *reconciler
	entries  *prometheus.GaugeVec
	// destroyer is nil when the kernel cannot destroy sockets.
	destroyer *socketDestroyer
	// draining are UDP endpoints gone from the maps whose connected sockets
	// are kept because the endpoint still serves (it terminates).
	draining map[svcnatBackend]bool
	// tc holds the tc programs, loaded when Options.Interfaces is set;
	// tcStats is their counter map, for the metrics collector.
	tc      *tcLoaded
	tcStats atomic.Pointer[ebpf.Map]
	// reported are the tc failure counters last logged.
	reported struct{ full, nat uint64 }
	// sweeper forgets the conntrack entries of flows the state no longer
	// allows.
	sweeper flowSweeper
	// countersPruned is when the counter map was last pruned; counterWalk
	// receives the rows a prune's background walk listed (counters.go).
	countersPruned time.Time
	counterWalk    chan []svcnatCounterKey
}

var _ dataplane.Backend = (*Backend)(nil)

// New checks the options and probes the kernel for every feature the
// backend needs; the error names the first one missing. It changes nothing
// on the host.
func New(opts Options) (*Backend, error) {
	if opts.BPFFSPath == "" {
		opts.BPFFSPath = DefaultBPFFSPath
	}
	opts.MaxServices = cmp.Or(opts.MaxServices, DefaultMaxServices)
	opts.MaxBackends = cmp.Or(opts.MaxBackends, DefaultMaxBackends)
	opts.MaxAffinity = cmp.Or(opts.MaxAffinity, DefaultMaxAffinity)
	for _, f := range []struct {
		flag     string
		v, least int
	}{
		{flagMaxServices, opts.MaxServices, 1},
		{flagMaxBackends, opts.MaxBackends, 1},
		{"--bpf-map-max-affinity", opts.MaxAffinity, MinLRUEntries},
	} {
		if f.v < f.least || f.v > 1<<28 {
			return nil, fmt.Errorf("create ebpf backend: %s=%d: want %d to %d", f.flag, f.v, f.least, 1<<28)
		}
	}
	if err := probe(len(opts.Interfaces) > 0); err != nil {
		return nil, fmt.Errorf("create ebpf backend: %w", err)
	}
	b := &Backend{opts: opts, log: opts.Logger}
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	b.sweeper.log = b.log
	if opts.Registerer != nil {
		b.entries = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "svcnat_ebpf_map_entries",
			Help: "Entries in svcnat's BPF maps after the last successful sync, by map.",
		}, []string{"map"})
		if err := opts.Registerer.Register(b.entries); err != nil {
			return nil, fmt.Errorf("create ebpf backend: register metrics: %w", err)
		}
		if len(opts.Interfaces) > 0 {
			if err := opts.Registerer.Register(newTCCollector(b)); err != nil {
				return nil, fmt.Errorf("create ebpf backend: register metrics: %w", err)
			}
		}
	}
	return b, nil
}

// Init loads the programs, creates or adopts the pinned maps, and attaches
// the socket hooks to the cgroup, replacing the programs of links pinned by
// an earlier run in place, so translation never stops. What the maps hold is
// kept. Idempotent.
//
// Pinned maps of another layout or size (an upgrade, a changed
// --bpf-map-max-* flag) are not adopted: Init makes new ones (copying what
// the datapath wrote itself where the layout is the same), and when the
// desired state must be refilled, the first Sync fills the new maps before
// the programs are replaced; until then the earlier run's programs and maps
// go on translating.
func (b *Backend) Init(ctx context.Context) error {
	if b.opts.CgroupPath == "" {
		return errors.New("init ebpf backend: no cgroup path to attach the socket hooks to (--cgroup-path)")
	}
	if err := checkBPFFS(b.opts.BPFFSPath); err != nil {
		return fmt.Errorf("init ebpf backend: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(b.opts.BPFFSPath, "links"), 0o700); err != nil {
		return fmt.Errorf("init ebpf backend: create pin directory: %w", err)
	}
	if b.objs == nil {
		spec, err := loadSvcnat()
		if err != nil {
			return fmt.Errorf("init ebpf backend: %w", err)
		}
		for name, size := range b.opts.sizes() {
			spec.Maps[name].MaxEntries = uint32(size)
		}
		pins := newMapPins(b.opts.BPFFSPath)
		repl, err := pins.open(spec)
		if err != nil {
			pins.Close()
			return fmt.Errorf("init ebpf backend: %w", err)
		}
		ms, err := kernelMaps(func(name string) (*ebpf.Map, error) {
			if m := pins.maps[name]; m != nil {
				return m, nil
			}
			return nil, fmt.Errorf("map %s is not pinned by name", name)
		})
		if err != nil {
			pins.Close()
			return fmt.Errorf("init ebpf backend: %w", err)
		}
		objs := &svcnatObjects{}
		if err := spec.LoadAndAssign(objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
			pins.Close()
			return fmt.Errorf("init ebpf backend: load programs: %w", err)
		}
		b.objs, b.pins = objs, pins
		b.rec = &reconciler{maps: ms}
		if err := b.pruneCountersAtInit(); err != nil {
			return fmt.Errorf("init ebpf backend: %w", err)
		}
	}
	if b.destroyer == nil {
		d, err := newSocketDestroyer(b.pins)
		if err != nil {
			b.log.Warn("connected UDP sockets will keep pointing at removed endpoints", "error", err)
		}
		b.destroyer = d
	}
	if len(b.opts.Interfaces) > 0 {
		if err := b.initTC(); err != nil {
			return fmt.Errorf("init ebpf backend: %w", err)
		}
	}
	if b.pins.refill {
		// The programs an earlier run attached keep translating with its
		// maps until the first sync has filled the new ones.
		b.log.Info("pinned maps have another layout or size: the programs are replaced after the first sync", "bpffs", b.opts.BPFFSPath)
		return nil
	}
	return b.attach()
}

// Sync makes the maps hold s, writing only what differs from the last
// successful Sync (or from what the kernel holds, after a failure or at
// start). It fails before writing anything when s does not fit the maps.
func (b *Backend) Sync(ctx context.Context, s *model.State) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.rec == nil {
		return errors.New("sync ebpf backend: Init has not run")
	}
	start := time.Now()
	err := b.rec.sync(s)
	var failed dataplane.PortErrors
	if err != nil && !errors.As(err, &failed) {
		return fmt.Errorf("sync ebpf backend: %w", err)
	}
	if b.pins.refill {
		if err := b.attach(); err != nil {
			return fmt.Errorf("sync ebpf backend: %w", err)
		}
	}
	if b.tc != nil {
		b.sweeper.request(s)
		b.reportTCFailures()
	}
	if b.destroyer != nil {
		b.destroyGone(s)
	}
	b.pruneCountersAfterSync()
	t := b.rec.written
	b.log.Info("synced ebpf maps", "servicePorts", len(s.ServicePorts), "changed", dataplane.Changed(s), "frontends", len(t.services),
		"backends", len(t.backends), "slots", len(t.slots), "duration", time.Since(start))
	if b.entries != nil {
		for _, c := range columns {
			b.entries.WithLabelValues(c.info().name).Set(float64(c.count(t)))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("sync ebpf backend: %w", failed)
	}
	return nil
}

// Dump reads the pinned maps and decodes them into the State they
// program. It needs no Init and works from any process; with nothing
// pinned it returns an empty State. A set a write in progress keeps torn
// (readState) is returned as the datapath reads it and named in a warning.
func (b *Backend) Dump(ctx context.Context) (*model.State, error) {
	ms, closeAll, err := b.pinnedMaps()
	if err != nil {
		return nil, fmt.Errorf("dump ebpf maps: %w", err)
	}
	defer closeAll()
	if ms == nil {
		return &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}, nil
	}
	s, torn, err := readState(ms)
	if err != nil {
		return nil, fmt.Errorf("dump ebpf maps: %w", err)
	}
	for _, ts := range torn {
		b.log.Warn("dump ebpf maps: endpoint set torn by a write in progress, read as the datapath reads it", "set", ts.String())
	}
	return s, nil
}

// Cleanup detaches the socket hooks and tc programs and removes every pin
// under the backend's directory. Removing what is already gone is not an error.
func (b *Backend) Cleanup(ctx context.Context) error {
	errs := []error{b.Close()}
	linkDir := filepath.Join(b.opts.BPFFSPath, "links")
	pins, err := os.ReadDir(linkDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("list pinned links: %w", err))
	}
	for _, p := range pins {
		pin := filepath.Join(linkDir, p.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("load pinned link %s: %w", pin, err))
			continue
		}
		// Unpinning drops the pin's reference; closing ours detaches.
		errs = append(errs, l.Unpin(), l.Close())
	}
	if err := deleteNATTable(); err != nil {
		errs = append(errs, err)
	}
	if err := deleteForwardAccept(); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(b.opts.BPFFSPath); err != nil {
		errs = append(errs, fmt.Errorf("remove pins in %s: %w", b.opts.BPFFSPath, err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clean up ebpf backend: %w", err)
	}
	return nil
}

// Close releases the backend's file descriptors, after the running flow
// sweep; pinned maps and links stay, and translation goes on.
func (b *Backend) Close() error {
	b.checking.Lock()
	defer b.checking.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	var errs []error
	for _, l := range b.links {
		errs = append(errs, l.Close())
	}
	b.links = nil
	b.sweeper.wait()
	if b.objs != nil {
		errs = append(errs, b.objs.Close())
		b.pins.Close()
		b.objs, b.rec, b.pins = nil, nil, nil
	}
	if b.tc != nil {
		b.tcStats.Store(nil)
		errs = append(errs, b.tc.Close())
		b.tc = nil
	}
	if b.destroyer != nil {
		errs = append(errs, b.destroyer.Close())
		b.destroyer = nil
	}
	return errors.Join(errs...)
}
