//go:build linux && e2e

// Package e2e runs svcnat (and upstream kube-proxy, as the reference) on the
// test bed of package testbed: a real etcd and kube-apiserver, node and pod
// network namespaces, real packets. SVCNAT_E2E_PROXIES selects the proxies
// (comma-separated; default svcnat-iptables). Needs root; see TESTBED.md.
package e2e

import (
	"context"

	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ns is the Kubernetes namespace the scenarios' objects live in. The test
// bed has no namespace controller, so objects are deleted one by one.
const ns = "e2e"

// binaries locates (or builds) what the test bed runs, except svcnat, or
// skips the test with the reason.
func binaries(t *testing.T) testbed.Binaries {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: builds network namespaces, cgroups and a control plane")
	}
	b, err := testbed.LocateBinaries(t.TempDir(), false)
	if err != nil {
		t.Skipf("binaries missing: %v", err)
	}
	return b
}

func startCluster(t *testing.T, ctx context.Context, b testbed.Binaries, o testbed.Options) *testbed.Cluster {
	t.Helper()
	o.Binaries = b
	o.HandleSignals = true
	o.Logger = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	c, err := testbed.Start(ctx, o)
	if err != nil {
		t.Fatalf("start test bed: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("remove test bed: %v", err)
		}
	})
	return c
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func TestServices(t *testing.T) {
	forEachProxy(t, func(t *testing.T, b testbed.Binaries, kind testbed.ProxyKind) {
		runSuite(t, b, kind, testbed.Options{PodPorts: testbed.DefaultPodPorts}, scenarios)
	})
}

// forEachProxy runs suite in a subtest named after each proxy of
// SVCNAT_E2E_PROXIES.
func forEachProxy(t *testing.T, suite func(*testing.T, testbed.Binaries, testbed.ProxyKind)) {
	kinds, err := testbed.ParseProxyKinds(cmpOr(os.Getenv("SVCNAT_E2E_PROXIES"), string(testbed.SvcnatIptables)))
	if err != nil {
		t.Fatal(err)
	}
	b := binaries(t)
	var svcnatErr error
	for _, k := range kinds {
		if k.IsSvcnat() && b.Svcnat == "" && svcnatErr == nil {
			b.Svcnat, svcnatErr = testbed.BuildSvcnat(t.TempDir())
		}
	}
	for _, kind := range kinds {
		t.Run(string(kind), func(t *testing.T) {
			if kind.IsSvcnat() && svcnatErr != nil {
				t.Skipf("svcnat binary missing: %v", svcnatErr)
			}
			suite(t, b, kind)
		})
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// runSuite runs scenarios on one test bed made with o, with kind on every
// node.
func runSuite(t *testing.T, b testbed.Binaries, kind testbed.ProxyKind, o testbed.Options, scenarios []scenario) {
	ctx := t.Context()
	began := time.Now()
	c := startCluster(t, ctx, b, o)
	t.Logf("test bed up in %v", time.Since(began).Round(time.Millisecond))
	if _, err := c.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace %s: %v", ns, err)
	}
	if err := c.StartProxies(ctx, kind); err != nil {
		t.Fatalf("start proxies: %v", err)
	}
	t.Logf("%s healthy on every node after %v", kind, time.Since(began).Round(time.Millisecond))
	e := &env{c: c, kind: kind}
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			if sc.skip != nil {
				if why := sc.skip(kind); why != "" {
					t.Skip(why)
				}
			}
			start := time.Now()
			// Deferred: a failure ends the subtest through runtime.Goexit.
			defer func() {
				t.Logf("%s took %v", sc.name, time.Since(start).Round(time.Millisecond))
				if t.Failed() {
					for _, n := range c.Nodes {
						t.Logf("%s log on %s (last lines):\n%s", kind, n.Name, n.Proxy.Tail(25))
					}
				}
			}()
			sc.run(t, e)
			if !t.Failed() {
				e.checkDump(t)
			}
		})
	}
}

// env is what scenarios work with.
type env struct {
	c    *testbed.Cluster
	kind testbed.ProxyKind
}

type scenario struct {
	name string
	run  func(t *testing.T, e *env)
	// skip returns why the scenario does not apply to a proxy, or "".
	skip func(testbed.ProxyKind) string
}

func onlySvcnat(what string) func(testbed.ProxyKind) string {
	return func(k testbed.ProxyKind) string {
		if !k.IsSvcnat() {
			return what + " is svcnat's own tool; upstream kube-proxy has no equivalent"
		}
		return ""
	}
}

// checkDump runs `svcnat dump --check` on every node (svcnat only).
func (e *env) checkDump(t *testing.T) {
	t.Helper()
	if !e.kind.IsSvcnat() {
		return
	}
	for _, n := range e.c.Nodes {
		// The agent may still be applying the scenario's last change.
		eventually(t, fmt.Sprintf("svcnat dump --check on %s", n.Name), 15*time.Second, func() error {
			out, err := n.Proxy.Dump(t.Context(), "--check")
			if err != nil {
				return fmt.Errorf("%v:\n%s", err, out)
			}
			return nil
		})
	}
}

// eventually retries f every 250ms until it returns nil or limit passes.
func eventually(t *testing.T, what string, limit time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) || t.Context().Err() != nil {
			t.Fatalf("%s: still failing after %v: %v", what, limit, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// programmed is how long a proxy may take to apply a change.
const programmed = 30 * time.Second

// service creates a Service in ns and deletes it when the test ends.
func (e *env) service(t *testing.T, svc *corev1.Service) *corev1.Service {
	t.Helper()
	svc.Namespace = ns
	got, err := e.c.Kube.CoreV1().Services(ns).Create(t.Context(), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service %s: %v", svc.Name, err)
	}
	t.Cleanup(func() {
		_ = e.c.Kube.CoreV1().Services(ns).Delete(context.Background(), svc.Name, metav1.DeleteOptions{})
	})
	return got
}

// updateService applies mutate to the current Service and updates it.
func (e *env) updateService(t *testing.T, name string, mutate func(*corev1.Service)) *corev1.Service {
	t.Helper()
	svc, err := e.c.Kube.CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get service %s: %v", name, err)
	}
	mutate(svc)
	got, err := e.c.Kube.CoreV1().Services(ns).Update(t.Context(), svc, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("update service %s: %v", name, err)
	}
	return got
}

// slice creates an EndpointSlice and deletes it when the test ends.
func (e *env) slice(t *testing.T, s *discoveryv1.EndpointSlice) {
	t.Helper()
	if _, err := e.c.Kube.DiscoveryV1().EndpointSlices(ns).Create(t.Context(), s, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create endpointslice %s: %v", s.Name, err)
	}
	t.Cleanup(func() {
		_ = e.c.Kube.DiscoveryV1().EndpointSlices(ns).Delete(context.Background(), s.Name, metav1.DeleteOptions{})
	})
}

// setEndpoints replaces the endpoints of an existing EndpointSlice.
func (e *env) setEndpoints(t *testing.T, name string, eps ...discoveryv1.Endpoint) {
	t.Helper()
	e.updateSlice(t, name, func(s *discoveryv1.EndpointSlice) { s.Endpoints = eps })
}

// updateSlice applies mutate to the current EndpointSlice and updates it.
func (e *env) updateSlice(t *testing.T, name string, mutate func(*discoveryv1.EndpointSlice)) {
	t.Helper()
	s, err := e.c.Kube.DiscoveryV1().EndpointSlices(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get endpointslice %s: %v", name, err)
	}
	mutate(s)
	if _, err := e.c.Kube.DiscoveryV1().EndpointSlices(ns).Update(t.Context(), s, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update endpointslice %s: %v", name, err)
	}
}

func (e *env) deleteSlice(t *testing.T, name string) {
	t.Helper()
	if err := e.c.Kube.DiscoveryV1().EndpointSlices(ns).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete endpointslice %s: %v", name, err)
	}
}

func (e *env) probe(t *testing.T, from testbed.Origin, s testbed.ProbeSpec) []testbed.Result {
	t.Helper()
	rs, err := e.c.Probe(t.Context(), from, s)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// answers probes n times and returns the set of pods that answered, or an
// error naming the first failure or an answer from outside want.
func (e *env) answers(t *testing.T, from testbed.Origin, s testbed.ProbeSpec, want ...string) (map[string]int, error) {
	t.Helper()
	rs, err := e.c.Probe(t.Context(), from, s)
	if err != nil {
		return nil, err
	}
	seen := map[string]int{}
	for _, r := range rs {
		if !r.OK() {
			return seen, fmt.Errorf("%s %s from %s: %s", s.Proto, s.Addr, from.Name, r.Err)
		}
		if len(want) > 0 && !contains(want, r.Pod) {
			return seen, fmt.Errorf("%s %s from %s: answered by %s, want one of %v", s.Proto, s.Addr, from.Name, r.Pod, want)
		}
		seen[r.Pod]++
	}
	return seen, nil
}

// reachesOnly waits until a batch of 40 attempts from an origin is answered
// only by pods in want, and by every one of them.
func (e *env) reachesOnly(t *testing.T, from testbed.Origin, proto string, addr netip.AddrPort, want ...string) {
	t.Helper()
	e.reachesOnlyWithin(t, programmed, from, proto, addr, want...)
}

func (e *env) reachesOnlyWithin(t *testing.T, limit time.Duration, from testbed.Origin, proto string, addr netip.AddrPort, want ...string) {
	t.Helper()
	s := testbed.ProbeSpec{Proto: proto, Addr: addr, N: 40, Timeout: 2 * time.Second}
	eventually(t, fmt.Sprintf("%s %s from %s answered by all of and only %v", proto, addr, from.Name, want), limit, func() error {
		seen, err := e.answers(t, from, s, want...)
		if err != nil {
			return err
		}
		for _, w := range want {
			if seen[w] == 0 {
				return fmt.Errorf("%s never answered in %d attempts (seen %v)", w, s.N, seen)
			}
		}
		return nil
	})
}

// unreachable waits until attempts fail; refused requires "connection
// refused" (an ICMP reject) rather than any failure.
func (e *env) unreachable(t *testing.T, from testbed.Origin, proto string, addr netip.AddrPort, refused bool) {
	t.Helper()
	s := testbed.ProbeSpec{Proto: proto, Addr: addr, N: 1, Timeout: 3 * time.Second}
	eventually(t, fmt.Sprintf("%s %s from %s unreachable (refused=%v)", proto, addr, from.Name, refused), programmed, func() error {
		r := e.probe(t, from, s)[0]
		switch {
		case r.OK():
			return fmt.Errorf("answered by %s", r.Pod)
		case refused && !r.Refused:
			return fmt.Errorf("failed without being refused: %s", r.Err)
		}
		return nil
	})
}

func contains(v []string, s string) bool {
	for _, x := range v {
		if x == s {
			return true
		}
	}
	return false
}

func clusterIP(t *testing.T, svc *corev1.Service, port int32) netip.AddrPort {
	t.Helper()
	a, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil {
		t.Fatalf("service %s has no cluster IP: %v", svc.Name, err)
	}
	return netip.AddrPortFrom(a, uint16(port))
}

func nodePort(t *testing.T, svc *corev1.Service, n *testbed.Node, i int) netip.AddrPort {
	t.Helper()
	np := svc.Spec.Ports[i].NodePort
	if np == 0 {
		t.Fatalf("service %s port %d has no node port", svc.Name, i)
	}
	return netip.AddrPortFrom(n.IP, uint16(np))
}

// runIn runs a command inside a network namespace of the test bed.
func runIn(netns string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", netns}, args...)...).CombinedOutput()
	return string(out), err
}
