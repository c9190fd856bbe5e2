//go:build linux

package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
)

// Report is results.json.
type Report struct {
	Machine Machine  `json:"machine"`
	Results []Result `json:"results"`
}

// Machine describes where the numbers come from.
type Machine struct {
	Date      string `json:"date"`
	CPU       string `json:"cpu"`
	Cores     int    `json:"cores"`
	MemoryGiB int    `json:"memoryGiB"`
	Kernel    string `json:"kernel"`
	OS        string `json:"os"`
	Go        string `json:"go"`
	Iptables  string `json:"iptables"`
	KubeProxy string `json:"kubeProxy"`
	Svcnat    string `json:"svcnat"`
	// Conditions says what else ran on the machine (-conditions).
	Conditions string `json:"conditions,omitempty"`
}

func describeMachine(ctx context.Context, b testbed.Binaries) Machine {
	m := Machine{Date: time.Now().UTC().Format(time.RFC3339), Cores: runtime.NumCPU(), Go: runtime.Version()}
	m.CPU = procField("/proc/cpuinfo", "model name", ":")
	var kb int
	fmt.Sscan(strings.TrimSuffix(procField("/proc/meminfo", "MemTotal", ":"), " kB"), &kb)
	m.MemoryGiB = (kb + 1<<19) >> 20
	if k, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(k))
	}
	m.OS = strings.Trim(procField("/etc/os-release", "PRETTY_NAME", "="), `"`)
	m.Iptables = commandLine(ctx, "iptables", "--version")
	// Built from the k8s.io/kubernetes module, kube-proxy does not know its
	// version ("v0.0.0-master"): name the module version it was built from.
	m.KubeProxy = testbed.K8sVersion + " (built from the k8s.io/kubernetes module)"
	if b.Svcnat != "" {
		m.Svcnat = commandLine(ctx, b.Svcnat, "version")
	}
	return m
}

// procField returns the value of the first "key<sep> value" line of a file.
func procField(path, key, sep string) string {
	f, err := os.Open(path)
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), sep)
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func commandLine(ctx context.Context, name string, args ...string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return firstLine(strings.TrimSpace(string(out)))
}

// loadPrevious reads results.json from dir, if there is one.
func (r *Report) loadPrevious(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read previous results: %w", err)
	}
	var prev Report
	if err := json.Unmarshal(b, &prev); err != nil {
		return fmt.Errorf("decode previous results: %w", err)
	}
	r.Results = prev.Results
	if r.Machine.Svcnat == "" { // this run measures no svcnat: keep the version measured before
		r.Machine.Svcnat = prev.Machine.Svcnat
	}
	return nil
}

// renderOnly rewrites results.md and the plots from results.json, keeping
// only profiles that are on disk and are pprof files.
func renderOnly(cfg config) error {
	var r Report
	b, err := os.ReadFile(filepath.Join(cfg.out, "results.json"))
	if err != nil {
		return fmt.Errorf("read results: %w", err)
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("decode results: %w", err)
	}
	r.Machine.Conditions = cmp.Or(cfg.conditions, r.Machine.Conditions)
	for i := range r.Results {
		r.Results[i].Profiles = slices.DeleteFunc(r.Results[i].Profiles, func(p string) bool {
			b, err := os.ReadFile(filepath.Join(cfg.out, p))
			return err != nil || !isProfile(b)
		})
	}
	return r.write(cfg.out, cfg.plots)
}

// add records res, replacing an earlier result for the same proxy and size.
func (r *Report) add(res Result) {
	r.Results = slices.DeleteFunc(r.Results, func(o Result) bool {
		return o.Proxy == res.Proxy && o.Services == res.Services
	})
	r.Results = append(r.Results, res)
	slices.SortFunc(r.Results, func(a, b Result) int {
		if a.Services != b.Services {
			return a.Services - b.Services
		}
		return proxyOrder(a.Proxy) - proxyOrder(b.Proxy)
	})
}

var allProxies = []testbed.ProxyKind{testbed.SvcnatIptables, testbed.SvcnatEBPF, testbed.KubeProxyIptables, testbed.KubeProxyNftables}

func proxyOrder(p string) int { return slices.Index(allProxies, testbed.ProxyKind(p)) }

// write writes results.json and results.md to dir, and the plots when asked.
func (r *Report) write(dir string, plots bool) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write results.json: %w", err)
	}
	var plotted []string
	if plots {
		if plotted, err = writePlots(r, dir); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "results.md"), r.markdown(plotted), 0o644); err != nil {
		return fmt.Errorf("write results.md: %w", err)
	}
	return nil
}

// sizes returns the measured numbers of Services, ascending.
func (r *Report) sizes() []int {
	var out []int
	for _, res := range r.Results {
		if !slices.Contains(out, res.Services) {
			out = append(out, res.Services)
		}
	}
	slices.Sort(out)
	return out
}

func (r *Report) find(proxy testbed.ProxyKind, services int) *Result {
	for i := range r.Results {
		if r.Results[i].Proxy == string(proxy) && r.Results[i].Services == services {
			return &r.Results[i]
		}
	}
	return nil
}

// measured reports whether the result has the figures of every phase.
func (res *Result) measured() bool {
	return res != nil && !res.Failed && (!res.InitCapped || res.Warm)
}

func (r *Report) markdown(plots []string) []byte {
	var b bytes.Buffer
	m := r.Machine
	fmt.Fprintf(&b, "# svcnat benchmark: svcnat against upstream kube-proxy\n\n")
	fmt.Fprintf(&b, "Generated by `make bench` (test/bench, its own Go module; see test/bench/main.go); raw figures in results.json.\n\n")
	fmt.Fprintf(&b, "| machine | |\n|---|---|\n")
	for _, kv := range [][2]string{
		{"date (UTC)", m.Date}, {"CPU", fmt.Sprintf("%s, %d cores", m.CPU, m.Cores)},
		{"memory", fmt.Sprintf("%d GiB", m.MemoryGiB)}, {"kernel", m.Kernel}, {"OS", m.OS},
		{"Go", m.Go}, {"iptables", m.Iptables}, {"kube-proxy", m.KubeProxy}, {"svcnat", m.Svcnat},
		{"conditions", cmp.Or(m.Conditions, "not stated")},
	} {
		fmt.Fprintf(&b, "| %s | %s |\n", kv[0], mdEscape(kv[1]))
	}
	if len(r.Results) > 0 {
		dates := make([]string, 0, len(r.Results))
		for _, res := range r.Results {
			dates = append(dates, res.Date)
		}
		slices.Sort(dates)
		fmt.Fprintf(&b, "\nMeasured between %s and %s (UTC; rows from more than one run when the benchmark was run with -merge).\n", dates[0], dates[len(dates)-1])
	}
	b.WriteString(method)
	for _, n := range r.sizes() {
		fmt.Fprintf(&b, "\n## %d Services x %d endpoints\n\n", n, endpointsPerService)
		b.WriteString("| proxy | initial programming (s) | programming latency p50 / p90 / p99 (ms) | new connection p50 via Service / direct (µs) | connection overhead p50 (mean) | connections/s via Service / direct | RSS at rest (MiB) | CPU at rest (%) | CPU initial (s) | burst: converged (s) / CPU (s) / peak RSS (MiB) | programmed |\n")
		b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|\n")
		var notes []string
		for _, kind := range allProxies {
			res := r.find(kind, n)
			if res == nil {
				continue
			}
			fmt.Fprintf(&b, "| %s | %s |\n", kind, strings.Join(res.cells(), " | "))
			for _, note := range res.Notes {
				notes = append(notes, fmt.Sprintf("- %s (%s): %s", kind, res.Date, note))
			}
			for _, p := range res.Profiles {
				notes = append(notes, fmt.Sprintf("- %s: profile [%s](%s) (`go tool pprof %s`)", kind, p, p, p))
			}
		}
		if len(notes) > 0 {
			fmt.Fprintf(&b, "\n%s\n", strings.Join(notes, "\n"))
		}
		b.WriteString(r.patternTable(n))
	}
	b.WriteString(r.targets())
	if len(plots) > 0 {
		b.WriteString("\n## Plots\n\nx: number of Services; one line per proxy (latency-by-pattern: the largest size, one column of points per pattern).\n\n")
		for _, p := range plots {
			fmt.Fprintf(&b, "![%s](%s)\n", strings.TrimSuffix(p, ".png"), p)
		}
	}
	return b.Bytes()
}

const method = `
How each figure is measured (one proxy at a time on one node namespace, all on
the same apiserver; filler endpoints are addresses no namespace holds; probe
Services point at real echo servers in pod namespaces):

- **initial programming**: proxy process start until a connection from a pod
  through every probe Service reaches its pod (attempts every 5 ms); "> cap"
  means it had not happened when the cap ran out, and nothing else was measured.
- **programming latency**: EndpointSlice update (the probe Service moves to
  the other pod) until the first new connection through the Service that
  reaches the new pod starts, one change at a time, 1 s apart; nearest-rank
  percentiles. A connection is translated as it starts (eBPF at connect(),
  iptables and nftables at its SYN) and gives up after 200 ms, before any
  SYN is sent again, so the change was programmed by then; its own time
  (1.2 ms at the median right after a change at 10,000 Services) is not
  counted.
- **programming latency by pattern** (each from the write until the first
  new connection through the Service that shows it starts; attempts start
  every 2 ms, 5 ms per Service in a burst, and overlap, so one that hangs on
  a SYN the proxy does not yet translate does not delay the next):
  - *move*: the figure above;
  - *new Service, then its EndpointSlice*: a Service is created, then at once
    its slice with one real pod; timed from the slice's creation until the
    first connection through the ClusterIP that succeeds starts; then both
    are deleted; rounds 1 s apart;
  - *burst*: every probe Service moves to its other pod, one write 10 ms after
    the other (or right after the previous write returned, when that took
    longer); each change timed from its own write;
  - *rolling update*: a Service with two ready pods out of four, replaced one
    at a time as a Deployment does: the new pod becomes ready in one write, and
    right after it the old one becomes terminating (not ready, serving) in a
    second; "new pod reached" is timed from the first write until the first
    connection that reaches the new pod starts, "old pod gone" from the second
    until the first connection started after the last one the old pod
    answered (and then 300 ms without it); steps 1 s apart; four attempts
    start together each tick, as the new pod is one of three endpoints.
- **the floor**: an informer of the bench's own, on the same apiserver as
  the proxy's, records when each probe write reaches it; the time from the
  write is what the apiserver and the watch take before any proxy can act.
- **new connection**: connect() until the server's first line, closed with a
  reset, alternating through the Service and directly to the same pod (A B A B);
  overhead = median via Service / median direct - 1. In kube-proxy's iptables
  mode the direct connection also walks the nat table, so its absolute times
  matter as much as the ratio.
- **RSS / CPU**: /proc of the agent process; CPU includes the children it
  waited for (iptables-restore); RSS does not. "at rest" is after the latency
  phase, over an idle window.
- **burst**: that many filler EndpointSlices updated by parallel writers, then one
  probe change; "converged" is from the first write until the probe change is
  live, CPU and peak RSS over the same span.
- **programmed**: iptables rules and chains (iptables-save, both back ends) in
  the node namespace; nftables rules and set/map elements (nft -j list ruleset);
  entries of the eBPF agent's pinned hash maps.
`

// patternTable is the programming latency of every pattern at n Services,
// p50 / p99 / max per proxy, and the floor under it where measured.
func (r *Report) patternTable(n int) string {
	latency := r.perPattern(n, "Programming latency by pattern, p50 / p99 / max (ms)", func(p *Pattern) string {
		cell := fmt.Sprintf("%s / %s / %s", ms(p.P50Ms), ms(p.P99Ms), ms(p.MaxMs))
		if p.Timeouts > 0 {
			cell += fmt.Sprintf(" (%d not seen)", p.Timeouts)
		}
		return cell
	})
	floor := r.perPattern(n, "The floor: when an informer of the bench's own, beside the proxy's, received the same writes, p50 / p99 (ms)", func(p *Pattern) string {
		if p.WatchP50Ms == 0 {
			return ""
		}
		return fmt.Sprintf("%s / %s", ms(p.WatchP50Ms), ms(p.WatchP99Ms))
	})
	return latency + floor
}

// perPattern is a table of one cell per proxy and pattern at n Services,
// "" when no cell has a value.
func (r *Report) perPattern(n int, title string, cell func(*Pattern) string) string {
	var rows []string
	for _, kind := range allProxies {
		res := r.find(kind, n)
		if res == nil || len(res.Patterns) == 0 {
			continue
		}
		cells, some := []string{string(kind)}, false
		for _, pat := range patterns {
			c := ""
			if p := res.patternOf(pat.name); p != nil {
				c = cell(p)
			}
			some = some || c != ""
			cells = append(cells, cmp.Or(c, "n/a"))
		}
		if some {
			rows = append(rows, "| "+strings.Join(cells, " | ")+" |\n")
		}
	}
	if len(rows) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("\n" + title + ":\n\n| proxy |")
	for _, pat := range patterns {
		b.WriteString(" " + pat.label + " |")
	}
	b.WriteString("\n|---|" + strings.Repeat("---|", len(patterns)) + "\n")
	for _, row := range rows {
		b.WriteString(row)
	}
	return b.String()
}

func (res *Result) cells() []string {
	const na = "n/a"
	out := make([]string, 10)
	for i := range out {
		out[i] = na
	}
	switch {
	case res.InitCapped && res.Warm:
		out[0] = fmt.Sprintf("> %.0f (cap); the rest warm", res.CapSeconds)
	case res.InitCapped:
		out[0] = fmt.Sprintf("> %.0f (cap)", res.CapSeconds)
	case res.InitSeconds > 0:
		out[0] = fmt.Sprintf("%.1f", res.InitSeconds)
	}
	if !res.measured() {
		if res.Failed {
			out[1] = "failed (see notes)"
		}
		return out
	}
	if res.LatencyChanges > 0 && res.LatencyP50Ms > 0 {
		out[1] = fmt.Sprintf("%s / %s / %s", ms(res.LatencyP50Ms), ms(res.LatencyP90Ms), ms(res.LatencyP99Ms))
	}
	if res.ConnDirectP50Us > 0 {
		out[2] = fmt.Sprintf("%.0f / %.0f", res.ConnServiceP50Us, res.ConnDirectP50Us)
		out[3] = fmt.Sprintf("%+.1f %% (%+.1f %%)", res.ConnOverheadPct, res.ConnOverheadMeanPct)
		out[4] = fmt.Sprintf("%.0f / %.0f", res.ConnServiceRate, res.ConnDirectRate)
	}
	if res.RSSSteadyMB > 0 {
		out[5] = fmt.Sprintf("%.0f", res.RSSSteadyMB)
		out[6] = fmt.Sprintf("%.1f", res.CPUIdlePct)
		out[7] = fmt.Sprintf("%.1f", res.CPUInitSeconds)
		if res.Warm {
			out[7] = "n/a (warm)"
		}
	}
	if res.BurstChanges > 0 {
		out[8] = fmt.Sprintf("%d changes: %.1f / %.2f / %.0f", res.BurstChanges, res.BurstConvergeSeconds, res.CPUBurstSeconds, res.RSSBurstPeakMB)
	}
	switch testbed.ProxyKind(res.Proxy) {
	case testbed.KubeProxyNftables:
		out[9] = fmt.Sprintf("%d rules, %d chains, %d set/map elements", res.Rules, res.Chains, res.Elements)
	case testbed.SvcnatEBPF:
		out[9] = fmt.Sprintf("%d map entries, %d iptables rules", res.MapEntries, res.Rules)
	default:
		out[9] = fmt.Sprintf("%d rules, %d chains", res.Rules, res.Chains)
		if res.Elements > 0 {
			out[9] += fmt.Sprintf(", %d ipset entries", res.Elements)
		}
	}
	return out
}

func ms(v float64) string {
	if v < 10 {
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.0f", v)
}

func mdEscape(s string) string { return strings.ReplaceAll(s, "|", `\|`) }

// targetSize is where the issue states its targets.
const targetSize = 10000

// targets says, for each target of the project, whether it was met at
// targetSize (or the largest size measured, said so), plainly.
func (r *Report) targets() string {
	sizes := r.sizes()
	if len(sizes) == 0 {
		return ""
	}
	n := sizes[len(sizes)-1]
	if slices.Contains(sizes, targetSize) {
		n = targetSize
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n## Targets at %d Services\n\n", n)
	if n != targetSize {
		fmt.Fprintf(&b, "The targets are stated at %d Services, which this run did not measure; these lines compare at %d.\n\n", targetSize, n)
	}
	get := func(k testbed.ProxyKind) *Result { return r.find(k, n) }
	line := func(what string, ok bool, detail string) {
		verdict := "MISSED"
		if ok {
			verdict = "met"
		}
		fmt.Fprintf(&b, "- %s: **%s** (%s)\n", what, verdict, detail)
	}
	unknown := func(what, why string) { fmt.Fprintf(&b, "- %s: **not measured** (%s)\n", what, why) }
	why := func(ks ...testbed.ProxyKind) string {
		var parts []string
		for _, k := range ks {
			res := get(k)
			switch {
			case res == nil:
				parts = append(parts, fmt.Sprintf("%s not run", k))
			case res.Failed:
				parts = append(parts, fmt.Sprintf("%s failed", k))
			case res.InitCapped && !res.Warm:
				parts = append(parts, fmt.Sprintf("%s not programmed within %.0f s", k, res.CapSeconds))
			}
		}
		return strings.Join(parts, "; ")
	}

	kpi := get(testbed.KubeProxyIptables)
	for _, t := range []struct {
		k      testbed.ProxyKind
		factor float64
	}{{testbed.SvcnatEBPF, 50}, {testbed.SvcnatIptables, 10}} {
		what := fmt.Sprintf("programming latency p50 of %s at most 1/%.0f of kube-proxy-iptables'", t.k, t.factor)
		s := get(t.k)
		if !s.measured() || !kpi.measured() {
			unknown(what, why(t.k, testbed.KubeProxyIptables))
			continue
		}
		line(what, s.LatencyP50Ms*t.factor <= kpi.LatencyP50Ms,
			fmt.Sprintf("%s ms against %s ms: 1/%.1f", ms(s.LatencyP50Ms), ms(kpi.LatencyP50Ms), kpi.LatencyP50Ms/s.LatencyP50Ms))
	}
	for _, t := range []struct {
		k   testbed.ProxyKind
		pct float64
	}{{testbed.SvcnatEBPF, 5}, {testbed.SvcnatIptables, 10}} {
		what := fmt.Sprintf("new-connection overhead of %s under %.0f %%", t.k, t.pct)
		s := get(t.k)
		if !s.measured() {
			unknown(what, why(t.k))
			continue
		}
		detail := fmt.Sprintf("%+.1f %% at the median, %+.1f %% on the mean", s.ConnOverheadPct, s.ConnOverheadMeanPct)
		if kpi.measured() {
			detail += fmt.Sprintf("; kube-proxy-iptables %+.1f %%, %.0f µs against svcnat's %.0f µs via the Service", kpi.ConnOverheadPct, kpi.ConnServiceP50Us, s.ConnServiceP50Us)
		}
		line(what, s.ConnOverheadPct < t.pct, detail)
	}
	for _, s := range []testbed.ProxyKind{testbed.SvcnatIptables, testbed.SvcnatEBPF} {
		for _, k := range []testbed.ProxyKind{testbed.KubeProxyIptables, testbed.KubeProxyNftables} {
			what := fmt.Sprintf("memory of %s at most half of %s's", s, k)
			sr, kr := get(s), get(k)
			if !sr.measured() || !kr.measured() {
				unknown(what, why(s, k))
			} else {
				line(what, 2*sr.RSSSteadyMB <= kr.RSSSteadyMB, fmt.Sprintf("%.0f MiB against %.0f MiB at rest; burst peaks %.0f and %.0f MiB", sr.RSSSteadyMB, kr.RSSSteadyMB, sr.RSSBurstPeakMB, kr.RSSBurstPeakMB))
			}
			what = fmt.Sprintf("initial programming of %s at most half of %s's", s, k)
			switch {
			case sr == nil || sr.Failed || kr == nil || kr.Failed:
				unknown(what, why(s, k))
			case sr.InitCapped:
				line(what, false, fmt.Sprintf("%s not programmed within %.0f s", s, sr.CapSeconds))
			case kr.InitCapped:
				line(what, 2*sr.InitSeconds <= kr.CapSeconds, fmt.Sprintf("%.1f s against more than %.0f s (cap)", sr.InitSeconds, kr.CapSeconds))
			default:
				line(what, 2*sr.InitSeconds <= kr.InitSeconds, fmt.Sprintf("%.1f s against %.1f s", sr.InitSeconds, kr.InitSeconds))
			}
		}
	}
	// Issue 8's absolute targets for the eBPF backend.
	if e := get(testbed.SvcnatEBPF); !e.measured() {
		unknown("svcnat-ebpf: programming latency p50 at most 45 ms, initial programming at most 2 s", why(testbed.SvcnatEBPF))
	} else {
		line("programming latency p50 of svcnat-ebpf (changes 1 s apart) at most 45 ms", e.LatencyP50Ms <= 45, ms(e.LatencyP50Ms)+" ms")
		line("initial programming of svcnat-ebpf at most 2 s", !e.InitCapped && e.InitSeconds <= 2, fmt.Sprintf("%.1f s", e.InitSeconds))
	}
	// Issue 11's targets, pattern by pattern.
	for _, t := range []struct {
		k          testbed.ProxyKind
		pct, limit float64
	}{{testbed.SvcnatEBPF, 50, 10}, {testbed.SvcnatEBPF, 99, 50}, {testbed.SvcnatIptables, 90, 1000}} {
		res := get(t.k)
		for _, pat := range patterns {
			what := fmt.Sprintf("programming latency p%.0f of %s at most %s ms, %s", t.pct, t.k, ms(t.limit), pat.label)
			p := res.patternOf(pat.name)
			if p == nil {
				unknown(what, cmp.Or(why(t.k), "pattern not measured"))
				continue
			}
			v := map[float64]float64{50: p.P50Ms, 90: p.P90Ms, 99: p.P99Ms}[t.pct]
			how := fmt.Sprintf("%s ms over %d changes", ms(v), p.Samples+p.Timeouts)
			if p.WatchP50Ms > 0 {
				how += fmt.Sprintf("; the bench's informer received the writes after %s ms p50, %s ms p99", ms(p.WatchP50Ms), ms(p.WatchP99Ms))
			}
			line(what, v <= t.limit && p.Timeouts == 0, how)
		}
	}
	if !slices.ContainsFunc(r.Results, func(res Result) bool { return len(res.Profiles) > 0 }) {
		b.WriteString("\nNo profile (pprof) is in docs/bench: the svcnat agent measured did not serve /debug/pprof on its metrics address.\n")
	} else {
		b.WriteString("\nProfiles of the svcnat agents (heap at rest, CPU during the burst) are linked under each table.\n")
	}
	return b.String()
}
