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
	"encoding/xml"
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
	"syscall"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
)

func main() {
	var (
		proxies, focus, skip, out, e2eBin, svcnat, echo string
		timeout                                         time.Duration
	)
	flag.StringVar(&proxies, "proxies", "svcnat-iptables,svcnat-ebpf,kube-proxy-iptables,kube-proxy-nftables", "proxies to run the tests against")
	flag.StringVar(&focus, "focus", `\[sig-network\] Services .*\[Conformance\]`, "the tests to run (ginkgo focus)")
	flag.StringVar(&skip, "skip", `\[Disruptive\]|\[Serial\]`, "tests to leave out (ginkgo skip)")
	flag.StringVar(&out, "out", "docs/conformance.md", "the Markdown report")
	flag.StringVar(&e2eBin, "e2e", filepath.Join(testbed.DefaultK8sDir(), "e2e.test"), "upstream's e2e.test")
	flag.StringVar(&svcnat, "svcnat", "bin/svcnat", "the svcnat binary (for its image)")
	flag.StringVar(&echo, "echoserver", "bin/echoserver", "the test bed's echo server")
	flag.DurationVar(&timeout, "timeout", 40*time.Minute, "time limit of one proxy's run")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(log, proxies, focus, skip, out, e2eBin, svcnat, echo, timeout); err != nil {
		log.Error("conformance", "err", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger, proxies, focus, skip, out, e2eBin, svcnat, echo string, timeout time.Duration) error {
	kinds, err := testbed.ParseProxyKinds(proxies)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	b := testbed.Binaries{K8sDir: testbed.DefaultK8sDir(), EchoServer: echo, Svcnat: svcnat}
	if b.Etcd, err = exec.LookPath("etcd"); err != nil {
		return fmt.Errorf("find etcd: %w", err)
	}
	for _, f := range []string{e2eBin, filepath.Join(b.K8sDir, "agnhost"), svcnat, echo} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("find %s (scripts/k8s-bins.sh builds e2e.test and agnhost; make build echoserver the rest): %w", f, err)
		}
	}
	work, err := os.MkdirTemp("", "conformance-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	images, err := testbed.BuildImages(work)
	if err != nil {
		return err
	}
	agnhost, err := testbed.BuildAgnhostImage(work, filepath.Join(b.K8sDir, "agnhost"))
	if err != nil {
		return err
	}
	svcnatImage, err := testbed.BuildSvcnatImage(work, svcnat, testbed.SvcnatImage)
	if err != nil {
		return err
	}
	images = append(images, agnhost, svcnatImage)
	results := map[string]map[testbed.ProxyKind]result{}
	durations := map[testbed.ProxyKind]time.Duration{}
	for _, kind := range kinds {
		began := time.Now()
		rs, err := runProxy(ctx, log, b, images, kind, e2eBin, focus, skip, work, timeout)
		if err != nil {
			return fmt.Errorf("run with %s: %w", kind, err)
		}
		durations[kind] = time.Since(began)
		for name, r := range rs {
			if results[name] == nil {
				results[name] = map[testbed.ProxyKind]result{}
			}
			results[name][kind] = r
		}
		log.Info("done", "proxy", kind, "tests", len(rs), "took", durations[kind].Round(time.Second))
	}
	return os.WriteFile(out, []byte(report(kinds, results, durations, focus, skip)), 0o644)
}

// result is one test's outcome with one proxy.
type result struct {
	status  string // passed, failed, skipped
	message string
}

// runProxy brings up the cluster, starts the proxy and runs e2e.test.
func runProxy(ctx context.Context, log *slog.Logger, b testbed.Binaries, images []string, kind testbed.ProxyKind,
	e2eBin, focus, skip, work string, timeout time.Duration) (map[string]result, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := testbed.Start(ctx, testbed.Options{Kubelets: true, Images: images, Binaries: b, Logger: log})
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
	junit := filepath.Join(work, string(kind)+".xml")
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", c.Nodes[0].Netns, e2eBin,
		"--kubeconfig="+c.Kubeconfig, "--provider=local", "--kubectl-path="+filepath.Join(b.K8sDir, "kubectl"),
		"--ginkgo.focus="+focus, "--ginkgo.skip="+skip, "--ginkgo.junit-report="+junit,
		"--ginkgo.no-color", "--ginkgo.timeout="+timeout.String(), "--dump-logs-on-failure=false",
		"--report-dir="+filepath.Join(work, string(kind)))
	logFile, err := os.Create(filepath.Join(os.TempDir(), "conformance-"+string(kind)+".log"))
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Dies with this process, like the test bed's own processes.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	log.Info("running e2e.test", "proxy", kind, "log", logFile.Name())
	// e2e.test exits non-zero when a test fails; the report says which.
	runErr := cmd.Run()
	rs, err := readJUnit(junit, regexp.MustCompile(focus))
	if err != nil {
		return nil, fmt.Errorf("e2e.test (%v): %w", runErr, err)
	}
	return rs, nil
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
			r := result{status: tc.Status}
			switch {
			case tc.Failure != nil:
				r.status, r.message = "failed", tc.Failure.Message
			case tc.Skipped != nil:
				r.status, r.message = "skipped", tc.Skipped.Message
			}
			out[name] = r
		}
	}
	return out, nil
}

func report(kinds []testbed.ProxyKind, results map[string]map[testbed.ProxyKind]result, durations map[testbed.ProxyKind]time.Duration, focus, skip string) string {
	var sb strings.Builder
	sb.WriteString("# Upstream Services e2e tests against svcnat and kube-proxy\n\n")
	sb.WriteString("Generated by `make conformance` (test/conformance): upstream's `e2e.test` of Kubernetes " + testbed.K8sVersion +
		", run from the first node against the test bed's cluster mode (two nodes, each containerd and kubelet in a network namespace), " +
		"once per proxy. svcnat runs as deployed by `kubectl apply -f deploy/`; kube-proxy as a process per node.\n\n")
	fmt.Fprintf(&sb, "Focus `%s`, skip `%s`.\n\n", focus, skip)
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
	for _, n := range names {
		fmt.Fprintf(&sb, "| %s |", strings.ReplaceAll(n, "|", `\|`))
		for _, k := range kinds {
			r, ok := results[n][k]
			switch {
			case !ok:
				sb.WriteString(" – |")
			case r.status == "passed":
				sb.WriteString(" pass |")
			default:
				notes = append(notes, fmt.Sprintf("%d. %s, %s: %s", len(notes)+1, n, k, firstLine(r.message)))
				fmt.Fprintf(&sb, " %s [%d] |", strings.TrimSuffix(r.status, "ed"), len(notes))
			}
		}
		sb.WriteString("\n")
	}
	sb.WriteString("\nRun time per proxy (cluster start, proxy start, tests):")
	for _, k := range kinds {
		fmt.Fprintf(&sb, " %s %v;", k, durations[k].Round(time.Second))
	}
	sb.WriteString("\n")
	if len(notes) > 0 {
		sb.WriteString("\n## Failures and skips\n\n" + strings.Join(notes, "\n") + "\n")
	}
	return sb.String()
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
