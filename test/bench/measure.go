//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
)

// Result is everything measured for one proxy at one size. Durations are in
// the unit their name says; a zero value with a note means not measured.
type Result struct {
	Proxy     string `json:"proxy"`
	Services  int    `json:"services"`
	Endpoints int    `json:"endpoints"`

	// InitSeconds: proxy start until every probe Service answered.
	// InitCapped: not reached within CapSeconds.
	InitSeconds float64 `json:"initSeconds"`
	InitCapped  bool    `json:"initCapped,omitempty"`
	// Warm: the cold start was over the cap, and the other figures come
	// from a warm start (see warmStart).
	Warm       bool    `json:"warm,omitempty"`
	CapSeconds float64 `json:"capSeconds"`

	// Network programming latency: EndpointSlice write until the first
	// connection through the Service reaches the new endpoint.
	LatencyP50Ms    float64 `json:"latencyP50Ms"`
	LatencyP90Ms    float64 `json:"latencyP90Ms"`
	LatencyP99Ms    float64 `json:"latencyP99Ms"`
	LatencyChanges  int     `json:"latencyChanges"`
	LatencyTimeouts int     `json:"latencyTimeouts"`
	// Patterns are the programming latencies of the patterns users make
	// (patterns.go), the move above included.
	Patterns []Pattern `json:"patterns,omitempty"`

	// New-connection latency (connect to first byte), interleaved through
	// the Service and directly to the same pod.
	ConnPairs           int     `json:"connPairs"`
	ConnFailed          int     `json:"connFailed"`
	ConnServiceP50Us    float64 `json:"connServiceP50Us"`
	ConnDirectP50Us     float64 `json:"connDirectP50Us"`
	ConnServiceMeanUs   float64 `json:"connServiceMeanUs"`
	ConnDirectMeanUs    float64 `json:"connDirectMeanUs"`
	ConnOverheadPct     float64 `json:"connOverheadPct"` // median service / median direct - 1
	ConnServiceRate     float64 `json:"connServiceRate"` // connections per second, one at a time
	ConnDirectRate      float64 `json:"connDirectRate"`
	ConnOverheadMeanPct float64 `json:"connOverheadMeanPct"`

	// Agent resources (the agent's process plus the children it waited for,
	// such as iptables-restore, for CPU; the agent's own RSS).
	CPUInitSeconds       float64 `json:"cpuInitSeconds"`
	RSSSteadyMB          float64 `json:"rssSteadyMB"`
	CPUIdlePct           float64 `json:"cpuIdlePct"`
	BurstChanges         int     `json:"burstChanges"`
	BurstWriteSeconds    float64 `json:"burstWriteSeconds"`
	BurstConvergeSeconds float64 `json:"burstConvergeSeconds"`
	RSSBurstPeakMB       float64 `json:"rssBurstPeakMB"`
	CPUBurstSeconds      float64 `json:"cpuBurstSeconds"`

	// Programmed size: iptables rules and chains, nftables rules and
	// set/map elements, BPF map entries.
	Rules      int `json:"rules"`
	Chains     int `json:"chains"`
	Elements   int `json:"elements"`
	MapEntries int `json:"mapEntries"`

	// Date is when the measurement ended; Failed marks one that broke off
	// (Notes say why).
	// Profiles are pprof files (relative to the output directory) of an
	// svcnat agent at rest (heap) and during the burst (CPU).
	Profiles []string `json:"profiles,omitempty"`
	Date     string   `json:"date"`
	Failed   bool     `json:"failed,omitempty"`
	Notes    []string `json:"notes,omitempty"`
}

func (r *Result) note(format string, args ...any) {
	r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
}

// params are the knobs of one measurement.
type params struct {
	cap     time.Duration
	changes int
	pairs   int
	burst   int
	idle    time.Duration
	// warm measures proxies whose cold start is over the cap warm.
	warm bool
	// rounds of the new-Service pattern and steps of the rolling update;
	// burstRounds bursts, each changing every probe Service once.
	rounds, burstRounds int
	// defaultMaps leaves svcnat-ebpf's maps at their default sizes.
	defaultMaps bool
}

// bench holds what every measurement shares.
type bench struct {
	c      *testbed.Cluster
	w      *workload
	probes []*probeService
	roll   *rollingService
	// backends are the pods probe Services point at; origin is where the
	// probe connections start.
	backends []*testbed.Pod
	prober   *prober
	p        params
	out      string // output directory, for profiles
	// capped records, per proxy, the size at which its cold start went
	// over the cap; larger sizes skip the cold start.
	capped map[testbed.ProxyKind]int
}

// ebpfMapFlags sizes svcnat-ebpf's endpoint maps for services Services of
// endpointsPerService endpoints, as the operator of a cluster that large
// would: room for every endpoint twice (a full sync that renumbers writes
// the new entries before it deletes the old), in steps of 64Ki, when the
// default (--bpf-map-max-backends=262144) has less. With the default, the
// 30,000-Service run leaves about 3,800 Services unprogrammed ("does not fit
// the maps"); -ebpf-default-maps measures that.
func ebpfMapFlags(kind testbed.ProxyKind, services int) []string {
	const step, defaultBackends = 1 << 16, 1 << 18
	need := (2*services*endpointsPerService + step - 1) / step * step
	if kind != testbed.SvcnatEBPF || need <= defaultBackends {
		return nil
	}
	return []string{fmt.Sprintf("--bpf-map-max-backends=%d", need)}
}

// measure runs one proxy against the loaded apiserver and removes it again.
func (b *bench) measure(ctx context.Context, kind testbed.ProxyKind, services int) (res Result, err error) {
	res = Result{Proxy: string(kind), Services: services, Endpoints: endpointsPerService, CapSeconds: b.p.cap.Seconds()}
	log := b.c.Log.With("proxy", kind, "services", services)
	b.c.SvcnatFlags = ebpfMapFlags(kind, services+len(b.probes))
	if b.p.defaultMaps && b.c.SvcnatFlags != nil {
		res.note("default map sizes (-ebpf-default-maps), too small for the load: %s not passed", strings.Join(b.c.SvcnatFlags, " "))
		b.c.SvcnatFlags = nil
	}
	defer func() {
		if serr := b.c.StopProxies(); serr != nil {
			err = errors.Join(err, fmt.Errorf("stop %s: %w", kind, serr))
		}
	}()

	// 1. Initial programming time; when that is over the cap, the rest is
	// measured warm (see warmStart).
	if at := b.capped[kind]; at > 0 && at <= services {
		res.InitCapped, res.InitSeconds = true, b.p.cap.Seconds()
		res.note("cold start not attempted: it took more than the %v cap at %d Services already", b.p.cap, at)
	} else {
		start := time.Now()
		if err := b.c.LaunchProxies(ctx, kind); err != nil {
			return res, err
		}
		reached, err := b.waitProbes(ctx, start.Add(b.p.cap))
		if err != nil {
			return res, err
		}
		if !reached {
			res.InitCapped, res.InitSeconds = true, b.p.cap.Seconds()
			b.capped[kind] = services
			log.Warn("initial programming cap reached", "cap", b.p.cap)
			if err := b.c.StopProxies(); err != nil {
				return res, fmt.Errorf("stop %s: %w", kind, err)
			}
		} else {
			res.InitSeconds = time.Since(start).Seconds()
			if res.CPUInitSeconds, err = b.c.Nodes[0].Proxy.CPUSeconds(); err != nil {
				return res, err
			}
			log.Info("programmed", "seconds", res.InitSeconds, "cpu", res.CPUInitSeconds)
		}
	}
	if res.InitCapped {
		if !b.p.warm {
			res.note("not programmed within the %v cap; nothing else measured", b.p.cap)
			return res, nil
		}
		if err := b.warmStart(ctx, kind, &res); err != nil {
			return res, err
		}
	}
	proxy := b.c.Nodes[0].Proxy

	// 2. Network programming latency: one change at a time, then the
	// patterns users make.
	var move timings
	for i := range b.p.changes {
		p := b.probes[i%len(b.probes)]
		d, err := b.reprogram(ctx, p, b.other(p), b.p.cap, &move)
		if err != nil {
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			move.timeouts++
			log.Warn("change not seen", "probe", p.name, "err", err)
			// Later changes must start from a known endpoint: wait once more.
			if err := b.settle(ctx, p); err != nil {
				return res, err
			}
			continue
		}
		move.add(d)
		time.Sleep(time.Second) // changes arrive one at a time, not as a burst
	}
	mp := move.pattern(patMove)
	res.LatencyChanges, res.LatencyTimeouts = mp.Samples+mp.Timeouts, mp.Timeouts
	res.LatencyP50Ms, res.LatencyP90Ms, res.LatencyP99Ms = mp.P50Ms, mp.P90Ms, mp.P99Ms
	if res.LatencyTimeouts > 0 {
		res.note("%d of %d changes not seen within %v (left out of the percentiles)", res.LatencyTimeouts, res.LatencyChanges, b.p.cap)
	}
	log.Info("programming latency", "p50ms", res.LatencyP50Ms, "p90ms", res.LatencyP90Ms, "p99ms", res.LatencyP99Ms)
	res.Patterns = append(res.Patterns, mp)
	newSvc, err := b.newServices(ctx, fmt.Sprintf("%s-%d", kind, services))
	res.Patterns = append(res.Patterns, newSvc)
	if err != nil {
		return res, fmt.Errorf("new services: %w", err)
	}
	burst, err := b.bursts(ctx)
	res.Patterns = append(res.Patterns, burst)
	if err != nil {
		return res, fmt.Errorf("bursts: %w", err)
	}
	added, gone, err := b.rolling(ctx)
	res.Patterns = append(res.Patterns, added, gone)
	if err != nil {
		return res, fmt.Errorf("rolling update: %w", err)
	}
	for _, p := range res.Patterns {
		if p.Timeouts > 0 && p.Name != patMove {
			res.note("%s: %d of %d changes not seen within %v (left out of the percentiles)", p.Name, p.Timeouts, p.Timeouts+p.Samples, b.p.cap)
		}
		log.Info("pattern", "name", p.Name, "p50ms", p.P50Ms, "p99ms", p.P99Ms, "maxms", p.MaxMs, "samples", p.Samples)
	}

	// 3. Steady state: memory and idle CPU.
	cpu0, err := proxy.CPUSeconds()
	if err != nil {
		return res, err
	}
	t0 := time.Now()
	if err := sleep(ctx, b.p.idle); err != nil {
		return res, err
	}
	cpu1, err := proxy.CPUSeconds()
	if err != nil {
		return res, err
	}
	res.CPUIdlePct = 100 * (cpu1 - cpu0) / time.Since(t0).Seconds()
	if res.RSSSteadyMB, err = rssMB(proxy.PID()); err != nil {
		return res, err
	}
	if path, err := profile(ctx, proxy, b.out, fmt.Sprintf("%s-%d-heap.pprof", kind, services), "heap", 0); err != nil {
		res.note("no heap profile: %v", err)
	} else if path != "" {
		res.Profiles = append(res.Profiles, path)
	}

	// 4. New-connection latency, through the Service and direct.
	p := b.probes[0]
	direct := netip.AddrPortFrom(p.pod.IP, servicePort).String()
	ab, err := b.prober.do(ctx, proberRequest{Op: "ab", Addr: p.addr(), Direct: direct, Want: p.pod.Name, Pairs: b.p.pairs, Timeout: 5 * time.Minute})
	if err != nil {
		return res, fmt.Errorf("connection latency: %w", err)
	}
	res.ConnPairs, res.ConnFailed = b.p.pairs, ab.Failed
	if len(ab.Service) == 0 || len(ab.Direct) == 0 {
		return res, fmt.Errorf("connection latency: no successful connections (%d failed)", ab.Failed)
	}
	svc, dir := micros(ab.Service), micros(ab.Direct)
	res.ConnServiceP50Us, res.ConnDirectP50Us = percentile(svc, 50), percentile(dir, 50)
	res.ConnServiceMeanUs, res.ConnDirectMeanUs = mean(svc), mean(dir)
	res.ConnOverheadPct = 100 * (res.ConnServiceP50Us/res.ConnDirectP50Us - 1)
	res.ConnOverheadMeanPct = 100 * (res.ConnServiceMeanUs/res.ConnDirectMeanUs - 1)
	res.ConnServiceRate, res.ConnDirectRate = 1e6/res.ConnServiceMeanUs, 1e6/res.ConnDirectMeanUs
	if ab.Failed > 0 {
		res.note("%d of %d connections failed or reached another pod", ab.Failed, 2*b.p.pairs)
	}
	log.Info("connection latency", "serviceP50us", res.ConnServiceP50Us, "directP50us", res.ConnDirectP50Us, "overheadPct", res.ConnOverheadPct)

	// 5. Programmed size.
	if err := b.size(ctx, kind, &res); err != nil {
		return res, err
	}

	// 6. A burst of changes: resources until the agent has caught up, which
	// a probe change written after the burst shows.
	if err := b.burstPhase(ctx, proxy, &res); err != nil {
		return res, err
	}
	log.Info("burst", "changes", res.BurstChanges, "convergeS", res.BurstConvergeSeconds, "cpuS", res.CPUBurstSeconds, "peakMB", res.RSSBurstPeakMB)
	return res, nil
}

// waitProbes waits until a connection through every probe Service reaches
// its pod. It reports false when the deadline passed first, and fails as
// soon as the proxy exits.
func (b *bench) waitProbes(ctx context.Context, deadline time.Time) (bool, error) {
	proxy := b.c.Nodes[0].Proxy
	for _, p := range b.probes {
		for {
			left := time.Until(deadline)
			if left <= 0 {
				return false, nil
			}
			resp, err := b.prober.do(ctx, proberRequest{Op: "watch", Targets: []watchTarget{{Addr: p.addr(), Want: p.pod.Name}}, Timeout: min(left, 5*time.Second), Interval: 5 * time.Millisecond})
			if err == nil {
				break
			}
			switch {
			case ctx.Err() != nil:
				return false, ctx.Err()
			case !proxy.Running():
				return false, fmt.Errorf("%s exited during initial programming; log:\n%s", proxy.Kind, proxy.Tail(20))
			case resp.Attempts == 0:
				return false, fmt.Errorf("initial programming, probe %s: %w", p.name, err)
			}
		}
	}
	return true, nil
}

// warmBatch is how many hidden Services warmStart shows a proxy at once.
const warmBatch = 250

// warmStart starts a proxy whose cold start is too slow to wait for, the
// way Services reach a proxy in a running cluster: the filler Services are
// hidden from it (service.kubernetes.io/service-proxy-name, which every
// proxy here honours) while it starts, then unhidden warmBatch at a time
// while it runs, each batch once a probe change written after the previous
// one is live. (Unhiding all at once would make its next sync as large as a
// cold start.)
func (b *bench) warmStart(ctx context.Context, kind testbed.ProxyKind, res *Result) error {
	began := time.Now()
	n := b.w.fillers()
	if err := b.w.hide(ctx, true, 0, n); err != nil {
		return err
	}
	if err := b.c.LaunchProxies(ctx, kind); err != nil {
		return err
	}
	reached, err := b.waitProbes(ctx, time.Now().Add(b.p.cap))
	if err == nil && !reached {
		err = fmt.Errorf("probe Services not reachable within %v with the fillers hidden", b.p.cap)
	}
	if err != nil {
		return fmt.Errorf("warm start: %w", err)
	}
	unhide := time.Now()
	for from := 0; from < n; from += warmBatch {
		if err := b.w.hide(ctx, false, from, min(from+warmBatch, n)); err != nil {
			return err
		}
		if _, err := b.reprogram(ctx, b.probes[0], b.other(b.probes[0]), b.p.cap, &timings{}); err != nil {
			return fmt.Errorf("warm start: catch up with %d unhidden Services: %w", min(from+warmBatch, n), err)
		}
	}
	res.Warm = true
	res.note("cold start over the cap, so the other figures are from a warm start: started with the filler Services hidden, which were then unhidden %d at a time while it ran, each batch once the previous one was programmed; %.0f s from the first unhide until all were programmed (%.0f s for the whole warm start)",
		warmBatch, time.Since(unhide).Seconds(), time.Since(began).Seconds())
	return nil
}

// other returns the backend pod the probe Service does not point at.
func (b *bench) other(p *probeService) *testbed.Pod {
	if p.pod == b.backends[0] {
		return b.backends[1]
	}
	return b.backends[0]
}

// reprogram points a probe Service at pod and returns how long until the
// first connection through the Service that reached it started; it adds
// the watch's delivery of the write to t.
func (b *bench) reprogram(ctx context.Context, p *probeService, pod *testbed.Pod, limit time.Duration, t *timings) (time.Duration, error) {
	var wr write
	res, err := b.during(ctx, limit, minInterval, []watchTarget{{Addr: p.addr(), Want: pod.Name}}, func() (err error) {
		wr, err = b.w.point(ctx, p, pod)
		return err
	})
	if err != nil {
		return 0, err
	}
	t.delivered(b.w.delivered, wr)
	return seen(res[0], wr.at)
}

func (b *bench) burstPhase(ctx context.Context, proxy *testbed.Proxy, res *Result) error {
	pid := proxy.PID()
	cpu0, err := proxy.CPUSeconds()
	if err != nil {
		return err
	}
	// A CPU profile of the burst, when the agent serves one.
	type saved struct {
		path string
		err  error
	}
	cpuProfile := make(chan saved, 1)
	go func() {
		path, err := profile(ctx, proxy, b.out, fmt.Sprintf("%s-%d-burst-cpu.pprof", proxy.Kind, res.Services), "profile", 10)
		cpuProfile <- saved{path, err}
	}()
	peak := 0.0
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			if m, err := rssMB(pid); err == nil {
				peak = max(peak, m)
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	start := time.Now()
	wrote, err := b.w.burst(ctx, b.p.burst)
	if err == nil {
		_, err = b.reprogram(ctx, b.probes[0], b.other(b.probes[0]), b.p.cap, &timings{})
	}
	converged := time.Since(start)
	close(stop)
	<-sampled
	if p := <-cpuProfile; p.err != nil {
		res.note("no CPU profile of the burst: %v", p.err)
	} else if p.path != "" {
		res.Profiles = append(res.Profiles, p.path)
	}
	if err != nil {
		return fmt.Errorf("burst: %w", err)
	}
	cpu1, err := proxy.CPUSeconds()
	if err != nil {
		return err
	}
	res.BurstChanges = b.p.burst
	res.BurstWriteSeconds = wrote.Seconds()
	res.BurstConvergeSeconds = converged.Seconds()
	res.CPUBurstSeconds = cpu1 - cpu0
	res.RSSBurstPeakMB = peak
	return nil
}

// size counts what the proxy programmed in the node namespace.
func (b *bench) size(ctx context.Context, kind testbed.ProxyKind, res *Result) error {
	n := b.c.Nodes[0]
	switch kind {
	case testbed.KubeProxyNftables:
		out, err := nsOutput(ctx, n.Netns, "nft", "-j", "list", "ruleset")
		if err != nil {
			return err
		}
		res.Rules, res.Chains, res.Elements, err = countNft(out)
		return err
	case testbed.SvcnatEBPF:
		entries, err := countPinned(ctx, n.Proxy.PinDir)
		if err != nil {
			return err
		}
		res.MapEntries = entries
		// Rules the agent may also have installed (none expected).
		fallthrough
	default:
		for _, save := range []string{"iptables-nft-save", "iptables-legacy-save"} {
			out, err := nsOutput(ctx, n.Netns, save)
			if err != nil {
				return err
			}
			r, c := countIptables(out)
			res.Rules += r
			res.Chains += c
		}
		if kind == testbed.SvcnatIptables {
			out, err := nsOutput(ctx, n.Netns, "ipset", "list", "-t")
			if err == nil {
				res.Elements = countIpsetEntries(out)
			}
		}
		return nil
	}
}

func nsOutput(ctx context.Context, netns string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	full := append([]string{"netns", "exec", netns}, args...)
	out, err := exec.CommandContext(ctx, "ip", full...).Output()
	if err != nil {
		return "", fmt.Errorf("%s in %s: %w", strings.Join(args, " "), netns, err)
	}
	return string(out), nil
}

// countIptables counts rules (-A lines) and chains of an iptables-save dump.
func countIptables(save string) (rules, chains int) {
	for line := range strings.SplitSeq(save, "\n") {
		switch {
		case strings.HasPrefix(line, "-A "):
			rules++
		case strings.HasPrefix(line, ":"):
			chains++
		}
	}
	return rules, chains
}

// countIpsetEntries sums "Number of entries" over `ipset list -t`.
func countIpsetEntries(out string) int {
	total := 0
	for line := range strings.SplitSeq(out, "\n") {
		if v, ok := strings.CutPrefix(line, "Number of entries: "); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			total += n
		}
	}
	return total
}

// countNft counts rules, chains and set/map elements of `nft -j list ruleset`.
func countNft(out string) (rules, chains, elements int, err error) {
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return 0, 0, 0, fmt.Errorf("decode nft ruleset: %w", err)
	}
	for _, obj := range doc.Nftables {
		switch {
		case obj["rule"] != nil:
			rules++
		case obj["chain"] != nil:
			chains++
		case obj["set"] != nil || obj["map"] != nil:
			raw := obj["set"]
			if raw == nil {
				raw = obj["map"]
			}
			var s struct {
				Elem []json.RawMessage `json:"elem"`
			}
			if err := json.Unmarshal(raw, &s); err != nil {
				return 0, 0, 0, fmt.Errorf("decode nft set: %w", err)
			}
			elements += len(s.Elem)
		}
	}
	return rules, chains, elements, nil
}

// countPinned sums the entries of the hash-type maps pinned under dir
// (bpftool reads them; array maps have a fixed size and are not counted).
func countPinned(ctx context.Context, dir string) (int, error) {
	total := 0
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		show, err := exec.CommandContext(ctx, "bpftool", "-j", "map", "show", "pinned", path).Output()
		if err != nil {
			return nil // a pinned program or link, not a map
		}
		var info struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(show, &info) != nil || !strings.Contains(info.Type, "hash") {
			return nil
		}
		dump, err := exec.CommandContext(ctx, "bpftool", "-j", "map", "dump", "pinned", path).Output()
		if err != nil {
			return fmt.Errorf("dump map %s: %w", path, err)
		}
		var entries []json.RawMessage
		if err := json.Unmarshal(dump, &entries); err != nil {
			return fmt.Errorf("decode dump of map %s: %w", path, err)
		}
		total += len(entries)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("count pinned map entries under %s: %w", dir, err)
	}
	return total, nil
}

// rssMB returns the resident set size of pid in MiB.
func rssMB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				return 0, fmt.Errorf("read memory of pid %d: %w", pid, err)
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("read memory of pid %d: no VmRSS", pid)
}

func micros(ns []int64) []float64 {
	out := make([]float64, len(ns))
	for i, v := range ns {
		out[i] = float64(v) / 1000
	}
	return out
}

// percentile returns the p-th percentile (nearest rank) of v.
func percentile(v []float64, p float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(i, 0)]
}

func mean(v []float64) float64 {
	t := 0.0
	for _, x := range v {
		t += x
	}
	return t / float64(len(v))
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
