//go:build linux

// Command conformance runs upstream Kubernetes' own e2e tests (e2e.test,
// built from k8s.io/kubernetes/test/e2e at the test bed's version) against
// the test bed's cluster mode, once per proxy: svcnat deployed from deploy/
// as a DaemonSet (iptables and eBPF backends) and upstream kube-proxy as the
// reference (a process per node). It writes a Markdown table, test × proxy,
// with pass, fail or skip and the reason.
//
//	conformance -svcnat bin/svcnat -echoserver bin/echoserver -out docs/conformance.md
package main

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
)

// A suite is what one run covers: ginkgo's focus, and the tests it leaves
// out because they cannot run on this test bed, each with the reason.
type suite struct {
	target  string // the make target that runs it
	focus   string
	skips   []skip
	nodes   int           // the cluster's nodes (each in a zone of its own)
	timeout time.Duration // time limit of one proxy's run
}

type skip struct{ pattern, reason string }

var suites = map[string]suite{
	// The CI subset.
	"conformance": {target: "conformance", focus: `\[sig-network\] Services .*\[Conformance\]`, nodes: 2, timeout: 30 * time.Minute},
	// Every upstream test of the proxies' behaviour.
	"full": {
		target: "conformance-full",
		focus: `\[sig-network\] (Services|Conntrack|Networking Granular Checks: Services|Traffic Distribution) ` +
			`|\[sig-network\] (API Server|DNS) .*\[Conformance\]`,
		skips: []skip{
			{`\[sig-network\] DNS `, "needs upstream's jessie-dnsutils image (no registry here) and a full cluster DNS (pod, SRV and PTR records, " +
				"forwarding); the test bed's DNS answers only Services' A records"},
			{`should not be vulnerable to the invalid conntrack state bug`, "needs upstream's regression-issue-74839 image (no registry here; " +
				"the test bed builds agnhost but not this one yet)"},
			{`\[Feature:SCTPConnectivity\]`, "this machine's kernel has no SCTP (CONFIG_IP_SCTP is not set): the test's SCTP servers exit at start"},
		},
		// Three zones: the Traffic Distribution tests need them.
		nodes: 3, timeout: 100 * time.Minute,
	},
}

func main() {
	var (
		proxies, suiteName, out, e2eBin, ginkgo, svcnat, echo string
		procs, jobs                                           int
		check                                                 bool
		jsonOut, from                                         string
	)
	flag.StringVar(&proxies, "proxies", "svcnat-iptables,svcnat-ebpf,kube-proxy-iptables,kube-proxy-nftables", "proxies to run the tests against")
	flag.StringVar(&suiteName, "suite", "conformance", "the tests: conformance ([sig-network] Services [Conformance]) or full (every upstream test of the proxies)")
	flag.StringVar(&out, "out", "docs/conformance.md", "the Markdown report")
	flag.StringVar(&e2eBin, "e2e", filepath.Join(testbed.DefaultK8sDir(), "e2e.test"), "upstream's e2e.test")
	flag.StringVar(&ginkgo, "ginkgo", filepath.Join(testbed.DefaultK8sDir(), "ginkgo"), "the ginkgo CLI (runs e2e.test in parallel processes)")
	flag.StringVar(&svcnat, "svcnat", "bin/svcnat", "the svcnat binary (for its image)")
	flag.StringVar(&echo, "echoserver", "bin/echoserver", "the test bed's echo server")
	flag.IntVar(&procs, "procs", 1, "ginkgo's parallel processes per proxy ([Serial] tests run alone at the end)")
	flag.IntVar(&jobs, "jobs", 1, "proxies tested at the same time, each on a cluster of its own")
	flag.BoolVar(&check, "check", false, "exit 1 when a test failed with some proxy")
	flag.StringVar(&from, "from", "", "write the report from the JSON results (-json) of earlier runs in this directory, one PROXY.json per proxy, instead of running")
	flag.StringVar(&jsonOut, "json", "", "write the results as JSON here instead of the report (how -jobs runs each proxy in a process of its own)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	s, ok := suites[suiteName]
	if !ok {
		log.Error("conformance", "err", fmt.Sprintf("unknown -suite %q: conformance or full", suiteName))
		os.Exit(2)
	}
	if jsonOut != "" {
		if err := runJSON(log, proxies, s, jsonOut, e2eBin, ginkgo, svcnat, echo, procs); err != nil {
			log.Error("conformance", "err", err)
			os.Exit(1)
		}
		return
	}
	failed, err := run(log, proxies, suiteName, s, from, out, e2eBin, ginkgo, svcnat, echo, procs, jobs)
	if err != nil {
		log.Error("conformance", "err", err)
		os.Exit(1)
	}
	if check && len(failed) > 0 {
		log.Error("conformance: tests failed", "failed", failed, "report", out)
		os.Exit(1)
	}
}

// proxyRun is the outcome with one proxy: test name to result.
type proxyRun struct {
	Results map[string]result
	Took    time.Duration
}

// run runs the suite once per proxy and writes the report. It returns the
// tests that failed ("proxy: test"). With jobs > 1 every proxy runs in a
// child process of its own (-json), at most jobs at a time, as the test bed
// makes one cluster per process.
func run(log *slog.Logger, proxies, suiteName string, s suite, from, out, e2eBin, ginkgo, svcnat, echo string, procs, jobs int) ([]string, error) {
	kinds, err := testbed.ParseProxyKinds(proxies)
	if err != nil {
		return nil, err
	}
	var runs map[testbed.ProxyKind]proxyRun
	switch {
	case from != "":
		runs, err = readRuns(from, kinds, s)
	case jobs <= 1:
		runs, err = runProxies(log, kinds, s, e2eBin, ginkgo, svcnat, echo, procs)
	default:
		runs, err = runChildren(log, kinds, jobs, suiteName, e2eBin, ginkgo, svcnat, echo, procs)
	}
	if err != nil {
		return nil, err
	}
	table := map[string]map[testbed.ProxyKind]result{}
	var failed []string
	for kind, pr := range runs {
		for name, r := range pr.Results {
			if table[name] == nil {
				table[name] = map[testbed.ProxyKind]result{}
			}
			table[name][kind] = r
			if r.Status == "failed" {
				failed = append(failed, string(kind)+": "+name)
			}
		}
	}
	slices.Sort(failed)
	return failed, os.WriteFile(out, []byte(report(kinds, table, runs, s, procs)), 0o644)
}

// runJSON runs the suite with the given proxies in this process and writes
// the outcomes as JSON (the child's side of -jobs).
func runJSON(log *slog.Logger, proxies string, s suite, out, e2eBin, ginkgo, svcnat, echo string, procs int) error {
	kinds, err := testbed.ParseProxyKinds(proxies)
	if err != nil {
		return err
	}
	runs, err := runProxies(log, kinds, s, e2eBin, ginkgo, svcnat, echo, procs)
	if err != nil {
		return err
	}
	b, err := json.Marshal(runs)
	if err != nil {
		return err
	}
	return os.WriteFile(out, b, 0o644)
}

// readRuns reads the results that -json wrote, dir/PROXY.json, marking the
// tests the suite leaves out.
func readRuns(dir string, kinds []testbed.ProxyKind, s suite) (map[testbed.ProxyKind]proxyRun, error) {
	runs := map[testbed.ProxyKind]proxyRun{}
	for _, kind := range kinds {
		r, err := readRun(filepath.Join(dir, string(kind)+".json"), kind)
		if err != nil {
			return nil, err
		}
		s.markSkips(r.Results)
		runs[kind] = r
	}
	return runs, nil
}

// readRun reads one proxy's results from a file -json wrote.
func readRun(file string, kind testbed.ProxyKind) (proxyRun, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return proxyRun{}, fmt.Errorf("read the results of %s: %w", kind, err)
	}
	var got map[testbed.ProxyKind]proxyRun
	if err := json.Unmarshal(b, &got); err != nil {
		return proxyRun{}, fmt.Errorf("read the results of %s: %w", kind, err)
	}
	r, ok := got[kind]
	if !ok {
		return proxyRun{}, fmt.Errorf("read the results of %s: %s holds none", kind, file)
	}
	return r, nil
}

// runChildren runs every proxy in a child process, at most jobs at a time.
func runChildren(log *slog.Logger, kinds []testbed.ProxyKind, jobs int, suiteName, e2eBin, ginkgo, svcnat, echo string, procs int) (map[testbed.ProxyKind]proxyRun, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "conformance-jobs-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	var (
		mu   sync.Mutex
		runs = map[testbed.ProxyKind]proxyRun{}
		errs []error
		wg   sync.WaitGroup
		sem  = make(chan struct{}, jobs)
	)
	for _, kind := range kinds {
		sem <- struct{}{} // in the order given
		wg.Go(func() {
			defer func() { <-sem }()
			file := filepath.Join(dir, string(kind)+".json")
			cmd := exec.Command(self, "-suite="+suiteName, "-proxies="+string(kind), fmt.Sprintf("-procs=%d", procs),
				"-e2e="+e2eBin, "-ginkgo="+ginkgo, "-svcnat="+svcnat, "-echoserver="+echo, "-json="+file)
			cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
			// A child cleans up its test bed on SIGTERM, also when this process dies.
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
			log.Info("starting", "proxy", kind)
			err := cmd.Run()
			var r proxyRun
			if err == nil {
				r, err = readRun(file, kind)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("run with %s: %w", kind, err))
				return
			}
			runs[kind] = r
		})
	}
	wg.Wait()
	return runs, errors.Join(errs...)
}

// runProxies runs the suite once per proxy in this process, one after the
// other.
func runProxies(log *slog.Logger, kinds []testbed.ProxyKind, s suite, e2eBin, ginkgo, svcnat, echo string, procs int) (map[testbed.ProxyKind]proxyRun, error) {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	b := testbed.Binaries{K8sDir: testbed.DefaultK8sDir(), EchoServer: echo, Svcnat: svcnat}
	var err error
	if b.Etcd, err = exec.LookPath("etcd"); err != nil {
		return nil, fmt.Errorf("find etcd: %w", err)
	}
	for _, f := range []string{e2eBin, ginkgo, filepath.Join(b.K8sDir, "agnhost"), svcnat, echo} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("find %s (scripts/k8s-bins.sh e2e builds e2e.test, ginkgo and agnhost; make build echoserver the rest): %w", f, err)
		}
	}
	work, err := os.MkdirTemp("", "conformance-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	// Logs outlive the run, for reading failures.
	logs, err := os.MkdirTemp("", "conformance-logs-")
	if err != nil {
		return nil, err
	}
	images, err := testbed.BuildImages(work)
	if err != nil {
		return nil, err
	}
	agnhost, err := testbed.BuildAgnhostImage(work, filepath.Join(b.K8sDir, "agnhost"))
	if err != nil {
		return nil, err
	}
	svcnatImage, err := testbed.BuildSvcnatImage(work, svcnat, testbed.SvcnatImage)
	if err != nil {
		return nil, err
	}
	images = append(images, agnhost, svcnatImage)
	runs := map[testbed.ProxyKind]proxyRun{}
	for _, kind := range kinds {
		began := time.Now()
		rs, err := runProxy(ctx, log, b, images, kind, s, e2eBin, ginkgo, procs, work, logs)
		if err != nil {
			return nil, fmt.Errorf("run with %s: %w", kind, err)
		}
		runs[kind] = proxyRun{Results: rs, Took: time.Since(began)}
		log.Info("done", "proxy", kind, "tests", len(rs), "took", runs[kind].Took.Round(time.Second))
	}
	return runs, nil
}

// result is one test's outcome with one proxy.
type result struct {
	Status  string // passed, failed, skipped
	Message string
}

// runProxy brings up the cluster, starts the proxy and runs e2e.test.
func runProxy(ctx context.Context, log *slog.Logger, b testbed.Binaries, images []string, kind testbed.ProxyKind,
	s suite, e2eBin, ginkgo string, procs int, work, logs string) (map[string]result, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	c, err := testbed.Start(ctx, testbed.Options{Nodes: s.nodes, Kubelets: true, Images: images, Binaries: b, Logger: log})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if kind.IsSvcnat() {
		if _, err := c.DeploySvcnat(ctx, kind); err != nil {
			return nil, err
		}
		for {
			pending, err := c.DaemonSetPending(ctx, 1)
			if err != nil {
				return nil, err
			}
			if pending == "" {
				break
			}
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("wait for svcnat's DaemonSet: %s", pending)
			case <-time.After(time.Second):
			}
		}
	} else if err := c.StartProxies(ctx, kind); err != nil {
		return nil, err
	}
	var skips []string
	for _, sk := range s.skips {
		skips = append(skips, sk.pattern)
	}
	junit := filepath.Join(work, string(kind)+".xml")
	// ginkgo's own flags, then e2e.test's after "--".
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", c.Nodes[0].Netns, ginkgo,
		fmt.Sprintf("--procs=%d", procs), "--focus="+s.focus, "--skip="+strings.Join(skips, "|"),
		"--junit-report="+junit, "--no-color", "--timeout="+s.timeout.String(), e2eBin, "--",
		// Only ginkgo's first process counts the nodes itself: without
		// --num-nodes the others skip "Requires at least 2 nodes (not -1)".
		"--kubeconfig="+c.Kubeconfig, "--provider=local", fmt.Sprintf("--num-nodes=%d", s.nodes), "--kubectl-path="+filepath.Join(b.K8sDir, "kubectl"),
		"--dump-logs-on-failure=false", "--report-dir="+filepath.Join(work, string(kind)))
	// ginkgo writes its report with --junit-report relative to where it runs.
	cmd.Dir = work
	logFile, err := os.Create(filepath.Join(logs, string(kind)+".log"))
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Dies with this process, like the test bed's own processes.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	log.Info("running e2e.test", "proxy", kind, "log", logFile.Name(), "cluster", c.Dir)
	// ginkgo exits non-zero when a test fails; the report says which.
	runErr := cmd.Run()
	rs, err := readJUnit(junit, regexp.MustCompile(s.focus))
	if err != nil {
		return nil, fmt.Errorf("e2e.test (%v): %w", runErr, err)
	}
	s.markSkips(rs)
	return rs, nil
}

// markSkips marks the results of the tests the suite leaves out as skipped,
// with the reason.
func (s suite) markSkips(rs map[string]result) {
	for name := range rs {
		for _, sk := range s.skips {
			if regexp.MustCompile(sk.pattern).MatchString(name) {
				rs[name] = result{Status: "skipped", Message: "not run here: " + sk.reason}
			}
		}
	}
}

type junitSuites struct {
	Suites []struct {
		Cases []struct {
			Name    string `xml:"name,attr"`
			Status  string `xml:"status,attr"`
			Failure *struct {
				Message string `xml:"message,attr"`
			} `xml:"failure"`
			Skipped *struct {
				Message string `xml:"message,attr"`
			} `xml:"skipped"`
		} `xml:"testcase"`
	} `xml:"testsuite"`
}

// readJUnit reads ginkgo's JUnit report: the tests matching focus.
func readJUnit(file string, focus *regexp.Regexp) (map[string]result, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("read the JUnit report: %w", err)
	}
	var s junitSuites
	if err := xml.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("parse the JUnit report %s: %w", file, err)
	}
	out := map[string]result{}
	for _, suite := range s.Suites {
		for _, tc := range suite.Cases {
			name := strings.TrimPrefix(tc.Name, "[It] ")
			if !focus.MatchString(name) {
				continue
			}
			r := result{Status: tc.Status}
			switch {
			case tc.Failure != nil:
				r.Status, r.Message = "failed", tc.Failure.Message
			case tc.Skipped != nil:
				r.Status, r.Message = "skipped", tc.Skipped.Message
			}
			out[name] = r
		}
	}
	return out, nil
}

func report(kinds []testbed.ProxyKind, results map[string]map[testbed.ProxyKind]result, runs map[testbed.ProxyKind]proxyRun, s suite, procs int) string {
	var sb strings.Builder
	sb.WriteString("# Upstream Services e2e tests against svcnat and kube-proxy\n\n")
	fmt.Fprintf(&sb, "Generated by `make %s` (test/conformance): upstream's `e2e.test` of Kubernetes %s, "+
		"run with %d ginkgo process(es) from the first node against the test bed's cluster mode (%d nodes, each containerd and kubelet "+
		"in a network namespace, each node a zone of its own), once per proxy. svcnat runs as deployed by `kubectl apply -f deploy/`; "+
		"kube-proxy as a process per node.\n\n", s.target, testbed.K8sVersion, procs, s.nodes)
	fmt.Fprintf(&sb, "Focus `%s`.", s.focus)
	for _, sk := range s.skips {
		fmt.Fprintf(&sb, " Not run here: `%s` (%s).", sk.pattern, sk.reason)
	}
	sb.WriteString("\n\n| proxy | passed | failed | skipped |\n|---|---|---|---|\n")
	for _, k := range kinds {
		count := map[string]int{}
		for _, byKind := range results {
			if r, ok := byKind[k]; ok {
				count[r.Status]++
			}
		}
		fmt.Fprintf(&sb, "| %s | %d | %d | %d |\n", k, count["passed"], count["failed"], count["skipped"])
	}
	sb.WriteString("\n")
	sb.WriteString("| test |")
	for _, k := range kinds {
		fmt.Fprintf(&sb, " %s |", k)
	}
	sb.WriteString("\n|---|")
	for range kinds {
		sb.WriteString("---|")
	}
	sb.WriteString("\n")
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range results {
			if !yield(n) {
				return
			}
		}
	})
	var notes []string
	noteOf := map[string]int{} // test and message: the note's number, shared by the proxies with that message
	var differences []string
	for _, n := range names {
		fmt.Fprintf(&sb, "| %s |", strings.ReplaceAll(n, "|", `\|`))
		for _, k := range kinds {
			r, ok := results[n][k]
			switch {
			case !ok:
				sb.WriteString(" – |")
			case r.Status == "passed":
				sb.WriteString(" pass |")
			default:
				msg := firstLine(r.Message)
				i, seen := noteOf[n+"\x00"+msg]
				if !seen {
					notes = append(notes, fmt.Sprintf("%d. %s: %s", len(notes)+1, n, msg))
					i = len(notes)
					noteOf[n+"\x00"+msg] = i
				}
				fmt.Fprintf(&sb, " %s [%d] |", map[string]string{"failed": "fail", "skipped": "skip"}[r.Status], i)
			}
		}
		sb.WriteString("\n")
		if d := difference(n, results[n]); d != "" {
			differences = append(differences, d)
		}
	}
	sb.WriteString("\nRun time per proxy (cluster start, proxy start, tests):")
	for _, k := range kinds {
		fmt.Fprintf(&sb, " %s %v;", k, runs[k].Took.Round(time.Second))
	}
	sb.WriteString("\n")
	if len(differences) > 0 {
		sb.WriteString("\n## Where svcnat differs from kube-proxy\n\n" + strings.Join(differences, "\n") + "\n")
	}
	if len(notes) > 0 {
		sb.WriteString("\n## Failures and skips\n\n" + strings.Join(notes, "\n") + "\n")
	}
	return sb.String()
}

// explained says why a test that passes with kube-proxy fails with svcnat,
// for the tests where it does: the first key contained in the test's name.
var explained = map[string]string{}

// difference is a list item for a test that passes with some kube-proxy mode
// but fails with some svcnat backend, with its explanation; "" for the others.
func difference(name string, byKind map[testbed.ProxyKind]result) string {
	var kubeProxyPasses bool
	var svcnatFails []string
	for k, r := range byKind {
		switch {
		case !k.IsSvcnat() && r.Status == "passed":
			kubeProxyPasses = true
		case k.IsSvcnat() && r.Status == "failed":
			svcnatFails = append(svcnatFails, string(k))
		}
	}
	if !kubeProxyPasses || len(svcnatFails) == 0 {
		return ""
	}
	slices.Sort(svcnatFails)
	why := "not explained yet"
	for key, text := range explained {
		if strings.Contains(name, key) {
			why = text
		}
	}
	return fmt.Sprintf("- %s (%s): %s", name, strings.Join(svcnatFails, ", "), why)
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return strings.ReplaceAll(s, "|", `\|`)
}
