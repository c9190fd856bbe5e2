package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/svcnat/svcnat/pkg/agent"
	"github.com/svcnat/svcnat/pkg/conntrack"
	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/nodeaddr"
	"github.com/svcnat/svcnat/pkg/watch"
)

// nodeFlags say which node svcnat serves and how the cluster is laid out;
// `run` and `dump --check` share them, so both build the same model.
type nodeFlags struct {
	kubeconfig        string
	nodeName          string
	clusterCIDRs      []string
	nodePortAddresses []string
}

func (f *nodeFlags) register(fs *pflag.FlagSet) {
	host, _ := os.Hostname()
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file; empty means in-cluster configuration")
	fs.StringVar(&f.nodeName, "node-name", strings.ToLower(host), "this node's name (endpoints with this nodeName are local)")
	fs.StringSliceVar(&f.clusterCIDRs, "cluster-cidr", nil, "pod CIDRs, comma-separated; traffic to ClusterIPs from outside them is masqueraded")
	fs.StringSliceVar(&f.nodePortAddresses, "nodeport-addresses", nil, "CIDRs whose node addresses NodePorts open on, comma-separated, or \"primary\" for the Node's primary addresses (as kube-proxy); a family with no CIDR listed opens on all its addresses")
}

// config returns the model configuration these flags describe, without the
// node's addresses and zone.
func (f *nodeFlags) config() (*model.Config, error) {
	cidrs, err := parsePrefixes("cluster-cidr", f.clusterCIDRs)
	if err != nil {
		return nil, err
	}
	var primary bool
	var prefixes []string
	for _, s := range f.nodePortAddresses {
		if strings.TrimSpace(s) == "primary" {
			primary = true
		} else {
			prefixes = append(prefixes, s)
		}
	}
	np, err := parsePrefixes("nodeport-addresses", prefixes)
	if err != nil {
		return nil, err
	}
	if f.nodeName == "" {
		return nil, errors.New("no --node-name and no hostname")
	}
	return &model.Config{NodeName: f.nodeName, ClusterCIDRs: cidrs, NodePortAddresses: np, NodePortPrimary: primary}, nil
}

func parsePrefixes(flag string, in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range in {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("--%s: %w", flag, err)
		}
		out = append(out, p)
	}
	return out, nil
}

type runFlags struct {
	node               nodeFlags
	backend            backendFlags
	minSyncPeriod      time.Duration
	minSyncPeriodSet   bool // given on the command line or in the config file
	syncPeriod         time.Duration
	metricsBindAddress string
	healthzBindAddress string
	profiling          bool
	endpointCounters   bool
	takeOverFrom       string
}

func newRunCommand() *cobra.Command {
	f := &runFlags{}
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the node agent: program this node's Services until SIGTERM",
		Long: "Run the node agent. On SIGTERM or SIGINT it stops without removing what it " +
			"programmed, so traffic keeps flowing until the next start adopts it.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			f.minSyncPeriodSet = cmd.Flags().Changed("min-sync-period")
			return run(ctx, f, slog.Default())
		},
	}
	fs := cmd.Flags()
	f.node.register(fs)
	f.backend.register(fs, backendIptables)
	fs.DurationVar(&f.minSyncPeriod, "min-sync-period", 0, "least time between two syncs, after the two a quiet spell allows back to back; changes within it are programmed together (default 250ms with the iptables backend, whose every sync runs iptables-restore of the changed chains; 10ms with ebpf, whose map writes take microseconds)")
	fs.DurationVar(&f.syncPeriod, "sync-period", 30*time.Second, "interval of periodic reconciles, and of the comparison, beside the sync loop, of svcnat's chains (iptables) or maps (ebpf) in the kernel with what svcnat wrote, to repair outside changes")
	fs.StringVar(&f.metricsBindAddress, "metrics-bind-address", "127.0.0.1:10249", "address of the /metrics endpoint; empty disables it")
	fs.BoolVar(&f.profiling, "profiling", false, "also serve net/http/pprof under /debug/pprof/ on the metrics address (as kube-proxy's --profiling)")
	fs.BoolVar(&f.endpointCounters, "metrics-endpoint-counters", false, "also export the datapath's connection counters per endpoint on /metrics (svcnat_endpoint_connections_total: one series per Service port and endpoint)")
	fs.StringVar(&f.takeOverFrom, "take-over-from", "", "kube-proxy: once svcnat's dataplane is programmed and reads back as programmed, remove kube-proxy's iptables chains and nftables tables (and again every --sync-period if they reappear); conntrack entries stay, so established connections keep working")
	fs.StringVar(&f.healthzBindAddress, "healthz-bind-address", "0.0.0.0:10256", "address of the /healthz and /livez endpoints; empty disables them")
	return cmd
}

func run(ctx context.Context, f *runFlags, log *slog.Logger) error {
	cfg, err := f.node.config()
	if err != nil {
		return err
	}
	memoryPolicy := setMemoryPolicy()
	client, err := watch.Client(f.node.kubeconfig, "svcnat/"+version)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	backend, backendName, err := f.backend.forRun(reg, log.With("backend", f.backend.name))
	if err != nil {
		return fmt.Errorf("create %s backend: %w", f.backend.name, err)
	}
	defer func() {
		if err := closeBackend(backend); err != nil {
			log.Error("close backend", "err", err)
		}
	}()
	dp, err := withTakeover(backend, f.takeOverFrom, f.syncPeriod, log)
	if err != nil {
		return err
	}
	if err := backend.Init(ctx); err != nil {
		return fmt.Errorf("init %s backend: %w", backendName, err)
	}
	if r, ok := backend.(dataplane.CounterReader); ok {
		reg.MustRegister(agent.NewCounterCollector(r, f.endpointCounters, log))
	}
	var families []model.Family
	if fb, ok := backend.(interface{ Families() []model.Family }); ok {
		families = fb.Families()
	}

	w, err := watch.New(client, cfg.NodeName, 0, log)
	if err != nil {
		return err
	}
	var addrs *nodeaddr.Watcher
	a := agent.New(dp, w, agent.Options{
		NodeName:          cfg.NodeName,
		NodePortAddresses: cfg.NodePortAddresses,
		NodePortPrimary:   cfg.NodePortPrimary,
		ClusterCIDRs:      cfg.ClusterCIDRs,
		NodeAddresses:     func() []netip.Addr { return addrs.Current() },
		MinSyncInterval:   minSyncPeriod(f.minSyncPeriod, f.minSyncPeriodSet, backendName),
		SyncPeriod:        f.syncPeriod,
		BackendName:       backendName,
		IPFamilies:        families,
		Conntrack:         conntrack.NewCleaner(log),
		Metrics:           agent.NewMetrics(reg),
		Logger:            log,
	})
	if addrs, err = nodeaddr.Watch(ctx, log, a.AllChanged); err != nil {
		return err
	}

	metrics := http.NewServeMux()
	metrics.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	if f.profiling {
		metrics.HandleFunc("/debug/pprof/", pprof.Index)
		metrics.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		metrics.HandleFunc("/debug/pprof/profile", pprof.Profile)
		metrics.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		metrics.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	servers, err := serve(log, map[string]http.Handler{
		f.metricsBindAddress: metrics,
		f.healthzBindAddress: a.Health().Handler(),
	})
	if err != nil {
		return err
	}
	defer func() {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		for _, s := range servers {
			_ = s.Shutdown(shutdownCtx)
		}
	}()

	log.Info("svcnat starting", "version", version, "node", cfg.NodeName, "backend", backendName,
		"clusterCIDRs", cfg.ClusterCIDRs, "nodePortAddresses", cfg.NodePortAddresses)
	w.Start(ctx, a)
	if memoryPolicy {
		go releaseMemory(ctx, time.Second, func() time.Time { return a.Health().Status().LastUpdated }, log)
	}
	if err := a.Run(ctx); err != nil {
		return err
	}
	log.Info("svcnat stopping; programmed rules stay in place")
	return nil
}

// defaultGCPercent is the garbage collector's target when the GOGC
// environment variable does not set one: the heap may grow by half its live
// size between collections, where Go's default of 100 lets it double. At
// rest svcnat allocates little, so collecting more often costs little CPU
// and keeps the resident memory nearer the live heap.
const defaultGCPercent = 50

// setMemoryPolicy applies defaultGCPercent unless GOGC is set, and says
// whether it did: releaseMemory runs only then. (GOMEMLIMIT, when set,
// limits the memory as Go's runtime always does.)
func setMemoryPolicy() bool {
	if _, set := os.LookupEnv("GOGC"); set {
		return false
	}
	debug.SetGCPercent(defaultGCPercent)
	return true
}

// releaseMemory collects the heap and returns the memory it holds free to
// the operating system: once after the first sync (the peak of listing
// every object and programming them all at once), and after that whenever
// the heap beyond the live one, garbage not yet collected and free memory
// not yet returned, is more than a quarter of the live heap (what a burst
// of changes left). It acts only when no sync ran in the last interval, so
// that a burst reuses its memory instead, and checks every interval until
// ctx ends. Left to itself, Go's runtime keeps heap memory up to a tenth
// above its next collection's goal (with GOGC=50, up to two thirds of the
// live heap again, garbage or free) and returns the rest gradually.
// Counting the free heap alone, a run at rest held 17 MiB free and its
// garbage, unreturned: 139 MiB of RSS where three runs before held 115.
func releaseMemory(ctx context.Context, interval time.Duration, lastSync func() time.Time, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	first := true
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if last := lastSync(); last.IsZero() || time.Since(last) < interval {
			continue
		}
		live, beyond := heapLiveBeyond()
		if !first && beyond <= live/4 {
			continue
		}
		first = false
		debug.FreeOSMemory()
		log.Info("memory returned to the operating system", "heapLiveMiB", live>>20, "heapBeyondLiveMiB", beyond>>20)
	}
}

// heapLiveBeyond returns the live heap at the last collection and the heap
// memory held beyond it: objects not collected yet (live or not), less the
// live ones, and memory held free, not yet returned to the operating
// system. (Not the unused room of spans in use, which a collection does
// not return: counting it, a fragmented heap would be collected every
// interval.)
func heapLiveBeyond() (live, beyond uint64) {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/free:bytes"}}
	metrics.Read(s)
	live = s[0].Value.Uint64()
	objects, free := s[1].Value.Uint64(), s[2].Value.Uint64()
	return live, objects - min(objects, live) + free
}

// minSyncPeriod is --min-sync-period when given, else the default of the
// backend in use. A sync of the iptables backend runs iptables-restore with
// the changed chains only, about 150 ms at 10,000 Services (nf_tables), so
// changes wait up to 250 ms to be written together: a change that follows a
// sync (a new Service, then its EndpointSlice; a rolling update) is
// programmed in about the window plus one sync, and a long burst costs at
// most four syncs a second. (kube-proxy's 1 s protects a restore of every
// rule, which svcnat does not do.) The eBPF backend writes a change to its
// maps in microseconds, so changes that follow each other wait only 10 ms.
func minSyncPeriod(given time.Duration, set bool, backend string) time.Duration {
	switch {
	case set:
		return given
	case backend == backendEBPF:
		return 10 * time.Millisecond
	default:
		return 250 * time.Millisecond
	}
}

// serve listens on every non-empty address and serves its handler. A port
// that cannot be bound is an error at start, not a silent gap.
func serve(log *slog.Logger, handlers map[string]http.Handler) ([]*http.Server, error) {
	var servers []*http.Server
	for addr, h := range handlers {
		if addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, s := range servers {
				_ = s.Close()
			}
			return nil, fmt.Errorf("listen on %s: %w", addr, err)
		}
		s := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		servers = append(servers, s)
		go func() {
			if err := s.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server", "address", addr, "err", err)
			}
		}()
	}
	return servers, nil
}
