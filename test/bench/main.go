//go:build linux

// Command bench measures svcnat's backends and upstream kube-proxy side by
// side on the test bed (package testbed): a real etcd and kube-apiserver in
// a node namespace, pods running the echo server, and one proxy at a time on
// the node, all on the same loaded apiserver.
//
//	cd test/bench && go run . -sizes 1000,5000,10000 -out ../../docs/bench
//	cd test/bench && go run . -short -out /tmp/bench
//
// For each number of Services (each with one TCP port and an EndpointSlice of
// 10 endpoints) and each proxy it measures the initial programming time, the
// network programming latency, new-connection latency through a Service
// against a direct connection, the agent's memory and CPU at rest and during
// a burst of changes, and the size of what it programmed. It writes
// results.json, results.md and (without -short) PNG plots to -out.
//
// It needs root and the binaries the test bed needs (see testbed.LocateBinaries:
// SVCNAT_BIN and SVCNAT_ECHOSERVER_BIN, or it builds them). Everything it makes
// is removed on exit, on failure and on SIGINT/SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/svcnat/svcnat/test/testbed"
)

// config is the benchmark's command line.
type config struct {
	sizes   []int
	proxies []testbed.ProxyKind
	out     string
	cap     time.Duration
	changes int
	pairs   int
	burst   int
	idle    time.Duration
	workers int
	probes  int
	rounds  int
	bursts  int
	plots   bool
	merge   bool
	warm    bool
	render  bool
	// defaultMaps runs svcnat-ebpf with its default map sizes (see
	// ebpfMapFlags).
	defaultMaps bool
	// conditions says what else ran on the machine, for the report.
	conditions string
}

// shortConfig is the CI variant: small, one proxy, no plots.
func shortConfig(out string) config {
	return config{
		sizes: []int{100}, proxies: []testbed.ProxyKind{testbed.SvcnatIptables}, out: out,
		cap: 2 * time.Minute, changes: 20, pairs: 300, burst: 100, idle: 3 * time.Second,
		workers: 32, probes: 4, rounds: 3, bursts: 1,
	}
}

func main() {
	if os.Getenv(roleEnv) == "prober" {
		if err := runProber(); err != nil {
			fmt.Fprintln(os.Stderr, "prober:", err)
			os.Exit(1)
		}
		return
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if cfg.render {
		if err := renderOnly(cfg); err != nil {
			log.Error("render report", "err", err)
			os.Exit(1)
		}
		return
	}
	if _, err := run(context.Background(), cfg, log); err != nil {
		log.Error("benchmark failed", "err", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (config, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	short := fs.Bool("short", false, "CI variant: 100 Services, svcnat-iptables only, no plots, a few minutes")
	sizes := fs.String("sizes", "1000,5000,10000", "comma-separated numbers of Services, measured in increasing order on one apiserver")
	proxies := fs.String("proxies", "svcnat-iptables,svcnat-ebpf,kube-proxy-iptables,kube-proxy-nftables", "comma-separated proxies to measure, one at a time")
	out := fs.String("out", "docs/bench", "directory for results.json, results.md and the plots")
	capD := fs.Duration("cap", 10*time.Minute, "limit on initial programming (and on any single change)")
	changes := fs.Int("changes", 25, "EndpointSlice changes timed for the programming latency, one at a time")
	rounds := fs.Int("rounds", 10, "new Services timed (Service, then its EndpointSlice), and steps of the rolling update")
	bursts := fs.Int("bursts", 3, "bursts timed, each changing every probe Service 10 ms apart")
	probes := fs.Int("probes", 10, "probe Services (a burst changes each of them once)")
	pairs := fs.Int("pairs", 2000, "pairs of new connections (Service, direct) for the connection latency")
	burst := fs.Int("burst", 1000, "EndpointSlice changes in the burst")
	idle := fs.Duration("idle", 10*time.Second, "window for idle CPU")
	workers := fs.Int("workers", 32, "parallel apiserver writers")
	merge := fs.Bool("merge", false, "keep results of other proxies and sizes already in -out/results.json")
	noPlots := fs.Bool("no-plots", false, "skip the PNG plots")
	render := fs.Bool("render", false, "only rewrite results.md and the plots from -out/results.json")
	conditions := fs.String("conditions", "", "what else ran on the machine during the run, written into the report")
	defaultMaps := fs.Bool("ebpf-default-maps", false, "run svcnat-ebpf with its default map sizes even where the load needs larger ones, to measure it over capacity")
	warm := fs.Bool("warm", true, "when a proxy's cold start is over -cap, measure the rest warm (Services added while it runs); larger sizes then skip its cold start")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	if *short {
		cfg := shortConfig(*out)
		cfg.merge, cfg.conditions = *merge, *conditions
		return cfg, nil
	}
	cfg := config{out: *out, cap: *capD, changes: *changes, pairs: *pairs, burst: *burst, idle: *idle,
		workers: *workers, probes: *probes, rounds: *rounds, bursts: *bursts, plots: !*noPlots, merge: *merge, warm: *warm, render: *render, conditions: *conditions,
		defaultMaps: *defaultMaps}
	for f := range strings.SplitSeq(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 60000 {
			return config{}, fmt.Errorf("parse -sizes: %q is not a number of Services in [1, 60000]", f)
		}
		cfg.sizes = append(cfg.sizes, n)
	}
	slices.Sort(cfg.sizes)
	cfg.sizes = slices.Compact(cfg.sizes)
	var err error
	if cfg.proxies, err = testbed.ParseProxyKinds(*proxies); err != nil {
		return config{}, err
	}
	if len(cfg.proxies) == 0 {
		return config{}, errors.New("no proxies given")
	}
	if cfg.changes < 1 || cfg.changes > 1000 || cfg.pairs < 10 || cfg.pairs > maxPairs || cfg.burst < 1 || cfg.workers < 1 || cfg.workers > 256 {
		return config{}, errors.New("-changes in [1,1000], -pairs in [10,20000], -burst >= 1 and -workers in [1,256] please")
	}
	if cfg.rounds < 1 || cfg.rounds > 1000 || cfg.bursts < 1 || cfg.bursts > 100 || cfg.probes < 2 || cfg.probes > maxTargets {
		return config{}, fmt.Errorf("-rounds in [1,1000], -bursts in [1,100] and -probes in [2,%d] please", maxTargets)
	}
	return cfg, nil
}

// run starts the test bed, loads it size by size, measures every proxy at
// every size, writes the report after each measurement and returns it.
func run(ctx context.Context, cfg config, log *slog.Logger) (*Report, error) {
	withSvcnat := slices.ContainsFunc(cfg.proxies, testbed.ProxyKind.IsSvcnat)
	buildDir, err := os.MkdirTemp("", "svcnat-bench-bin-")
	if err != nil {
		return nil, fmt.Errorf("make build directory: %w", err)
	}
	defer os.RemoveAll(buildDir)
	bins, err := testbed.LocateBinaries(buildDir, withSvcnat)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.out, 0o755); err != nil {
		return nil, fmt.Errorf("make output directory: %w", err)
	}
	rep := &Report{Machine: describeMachine(ctx, bins)}
	rep.Machine.Conditions = cfg.conditions
	if cfg.merge {
		if err := rep.loadPrevious(cfg.out); err != nil {
			return nil, err
		}
	}

	c, err := testbed.Start(ctx, testbed.Options{
		Nodes: 1, PodsPerNode: 1 + 4, // one client pod; probe Services use two backends, the rolling update four
		PodPorts: testbed.PodPorts{TCP: []int{servicePort}},
		Binaries: bins, HandleSignals: true, Logger: log,
	})
	if err != nil {
		return nil, err
	}
	defer c.Close()

	rc := rest.CopyConfig(c.RESTConfig)
	rc.QPS, rc.Burst, rc.Timeout = 5000, 10000, time.Minute
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("make apiserver client: %w", err)
	}
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNamespace}}, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create namespace %s: %w", benchNamespace, err)
	}
	delivered, err := watchDeliveries(ctx, kube)
	if err != nil {
		return nil, err
	}
	pods := c.Nodes[0].Pods
	b := &bench{
		c: c, w: &workload{kube: kube, workers: cfg.workers, delivered: delivered},
		backends: pods[1:3],
		p: params{cap: cfg.cap, changes: cfg.changes, pairs: cfg.pairs, burst: cfg.burst, idle: cfg.idle, warm: cfg.warm,
			rounds: cfg.rounds, burstRounds: cfg.bursts, defaultMaps: cfg.defaultMaps},
		capped: map[testbed.ProxyKind]int{},
		out:    cfg.out,
	}
	// A cold start already over the cap (in the results merged with) is not
	// tried again at that size or above.
	for _, res := range rep.Results {
		k := testbed.ProxyKind(res.Proxy)
		if res.InitCapped && res.CapSeconds >= cfg.cap.Seconds() && (b.capped[k] == 0 || res.Services < b.capped[k]) {
			b.capped[k] = res.Services
		}
	}
	for i := range cfg.probes {
		p, err := b.w.createProbe(ctx, fmt.Sprintf("probe-%d", i), b.backends[i%2])
		if err != nil {
			return nil, err
		}
		b.probes = append(b.probes, p)
	}
	if b.roll, err = b.w.createRolling(ctx, "rolling", pods[1:5], 2); err != nil {
		return nil, err
	}
	if b.prober, err = startProber(pods[0].Origin()); err != nil {
		return nil, err
	}
	defer b.prober.stop()

	for _, n := range cfg.sizes {
		began := time.Now()
		if err := b.w.grow(ctx, n); err != nil {
			return rep, fmt.Errorf("load %d services: %w", n, err)
		}
		took := time.Since(began)
		log.Info("loaded", "services", n, "seconds", took.Seconds())
		for _, kind := range cfg.proxies {
			res, err := b.measure(ctx, kind, n)
			res.Date = time.Now().UTC().Format(time.RFC3339)
			if err != nil {
				if ctx.Err() != nil {
					return rep, err
				}
				log.Error("measurement failed", "proxy", kind, "services", n, "err", err)
				res.Failed = true
				res.note("measurement failed: %v", firstLine(err.Error()))
			}
			rep.add(res)
			if err := rep.write(cfg.out, cfg.plots && kind == cfg.proxies[len(cfg.proxies)-1]); err != nil {
				return rep, err
			}
		}
	}
	return rep, nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}
