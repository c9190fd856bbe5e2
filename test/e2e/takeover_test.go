//go:build linux && e2e

package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestTakeover switches node1 from upstream kube-proxy to svcnat
// (`svcnat run --take-over-from=kube-proxy`) and back (kube-proxy starts,
// then `svcnat cleanup`) while clients hold long-lived connections and open
// new ones through a ClusterIP (from a pod on node1) and a NodePort of node1
// (from the external client). Every new connection must succeed and every
// established one must survive, in both directions. Each svcnat backend in
// SVCNAT_E2E_PROXIES runs, paired with one kube-proxy mode so that both
// modes are covered: iptables with iptables, eBPF with nftables.
func TestTakeover(t *testing.T) {
	kinds, err := testbed.ParseProxyKinds(cmpOr(os.Getenv("SVCNAT_E2E_PROXIES"), string(testbed.SvcnatIptables)))
	if err != nil {
		t.Fatal(err)
	}
	b := binaries(t)
	pairs := map[testbed.ProxyKind]testbed.ProxyKind{
		testbed.SvcnatIptables: testbed.KubeProxyIptables,
		testbed.SvcnatEBPF:     testbed.KubeProxyNftables,
	}
	for _, kind := range kinds {
		kubeProxy, ok := pairs[kind]
		if !ok {
			continue
		}
		t.Run(string(kind)+"/"+string(kubeProxy), func(t *testing.T) {
			if b.Svcnat == "" {
				if b.Svcnat, err = testbed.BuildSvcnat(t.TempDir()); err != nil {
					t.Skipf("svcnat binary missing: %v", err)
				}
			}
			testTakeover(t, b, kind, kubeProxy)
		})
	}
}

func testTakeover(t *testing.T, b testbed.Binaries, kind, kubeProxy testbed.ProxyKind) {
	began := time.Now()
	ctx := t.Context()
	c := startCluster(t, ctx, b, testbed.Options{PodPorts: testbed.DefaultPodPorts})
	if _, err := c.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace %s: %v", ns, err)
	}
	if err := c.StartProxies(ctx, kubeProxy); err != nil {
		t.Fatalf("start %s: %v", kubeProxy, err)
	}
	e := &env{c: c, kind: kubeProxy}
	node := c.Nodes[0]
	svc := e.simpleService(t, "takeover", corev1.ServiceTypeNodePort, "node1-a", "node2-a")
	paths := []trafficPath{
		{"ClusterIP", e.pod("node1-b").Origin(), clusterIP(t, svc, 80)},
		{"NodePort", c.ClientOrigin(), nodePort(t, svc, node, 0)},
	}
	// No traffic before kube-proxy has programmed the Service. A SYN to a
	// ClusterIP no proxy translates yet leaves node1 untranslated and is
	// lost beyond it, and its conntrack entry (no DNAT, SYN_SENT: 120 s)
	// outlives it: when the pod's source ports come round to that port
	// again, 14-40 s later in this test, that connection is not translated
	// by any proxy (the nat table sees only a connection's first packet).
	// Seen in CI and in 2 of 6 runs, always the pod's first port.
	if err := waitFor(ctx, 20*time.Second, func() error {
		if !strings.Contains(kubeProxyRules(node), paths[0].addr.Addr().String()) {
			return fmt.Errorf("%s has not programmed %s on %s", kubeProxy, paths[0].addr, node.Name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, p := range paths {
		e.reachesOnly(t, p.from, "tcp", p.addr, "node1-a", "node2-a")
	}
	defer func() {
		if t.Failed() {
			t.Logf("proxy log on %s (last lines):\n%s", node.Name, node.Proxy.Tail(30))
		}
	}()

	// kube-proxy -> svcnat: kube-proxy's pod is deleted (SIGTERM, its rules
	// stay), svcnat starts and takes over.
	forward := e.switchUnderLoad(t, paths, func() error {
		if err := c.ReplaceProxy(ctx, node, kind, "--take-over-from=kube-proxy", "--sync-period=4s"); err != nil {
			return err
		}
		return waitFor(ctx, 20*time.Second, func() error {
			if left := kubeProxyRules(node); left != "" {
				return fmt.Errorf("kube-proxy's rules still there:\n%s", left)
			}
			return nil
		})
	})
	t.Logf("%s -> %s: %s", kubeProxy, kind, forward)
	sv := node.Proxy

	// A kube-proxy that was still running puts its rules back: svcnat
	// removes them again within a --sync-period (4 s here).
	if out, err := runIn(node.Netns, "sh", "-c", `printf '*nat\n:KUBE-SERVICES - [0:0]\n-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\nCOMMIT\n' | iptables-restore --noflush`); err != nil {
		t.Fatalf("put a kube-proxy rule back: %v: %s", err, out)
	}
	reappeared := time.Now()
	if err := waitFor(ctx, 15*time.Second, func() error {
		if left := kubeProxyRules(node); left != "" {
			return fmt.Errorf("kube-proxy's rules put back are still there:\n%s", left)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("kube-proxy's rules put back were removed again after %v", time.Since(reappeared).Round(100*time.Millisecond))
	eventually(t, "svcnat dump --check on "+node.Name, 15*time.Second, func() error {
		if out, err := sv.Dump(ctx, "--check"); err != nil {
			return fmt.Errorf("%v:\n%s", err, out)
		}
		return nil
	})

	// svcnat -> kube-proxy: svcnat stops (its rules stay), kube-proxy starts
	// and programs the Service, then svcnat cleanup removes svcnat's.
	reverse := e.switchUnderLoad(t, paths, func() error {
		if err := c.ReplaceProxy(ctx, node, kubeProxy); err != nil {
			return err
		}
		if err := waitFor(ctx, 20*time.Second, func() error {
			if !strings.Contains(kubeProxyRules(node), paths[0].addr.Addr().String()) {
				return fmt.Errorf("kube-proxy has not programmed %s", paths[0].addr)
			}
			return nil
		}); err != nil {
			return err
		}
		args := []string{"cleanup"}
		if sv.PinDir != "" {
			args = append(args, "--bpffs-path="+sv.PinDir)
		}
		if out, err := sv.Svcnat(ctx, args...); err != nil {
			return fmt.Errorf("svcnat cleanup: %v: %s", err, out)
		}
		if out, _ := runIn(node.Netns, "iptables-save"); strings.Contains(out, "SVCNAT") {
			return fmt.Errorf("svcnat's rules left after svcnat cleanup:\n%s", out)
		}
		return nil
	})
	t.Logf("%s -> %s: %s", kind, kubeProxy, reverse)
	t.Logf("takeover scenario for %s took %v", kind, time.Since(began).Round(time.Millisecond))
}

// trafficPath is where a client reaches the Service from.
type trafficPath struct {
	name string
	from testbed.Origin
	addr netip.AddrPort
}

// switchCounts are the connections seen while a node switched proxies.
type switchCounts struct {
	newOK, newFailed         int
	streams, streamsBroken   int
	linesEchoed              int
	switchTook, windowLasted time.Duration
	failures                 []string
}

func (s switchCounts) String() string {
	return fmt.Sprintf("new connections %d ok, %d failed; established %d, %d broken (%d lines echoed); switch took %v in a window of %v",
		s.newOK, s.newFailed, s.streams, s.streamsBroken, s.linesEchoed, s.switchTook.Round(time.Millisecond), s.windowLasted.Round(time.Millisecond))
}

// streamsPerPath long-lived connections are held per path for streamFor;
// the switch must end well inside it.
const (
	streamsPerPath = 2
	streamFor      = 20 * time.Second
)

// switchUnderLoad opens streams on every path, keeps opening new
// connections on every path while doSwitch runs and until the streams end,
// and fails the test on any failed new connection or broken stream.
func (e *env) switchUnderLoad(t *testing.T, paths []trafficPath, doSwitch func() error) switchCounts {
	t.Helper()
	ctx := t.Context()
	start := time.Now()
	var streams []*testbed.Stream
	for _, p := range paths {
		for range streamsPerPath {
			s, err := e.c.StartStream(ctx, p.from, p.addr, streamFor, 100*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			if !s.First.OK() {
				t.Fatalf("%s stream to %s did not connect: %s", p.name, p.addr, s.First.Err)
			}
			streams = append(streams, s)
		}
	}
	var mu sync.Mutex
	var counts switchCounts
	probeCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, p := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for probeCtx.Err() == nil {
				rs, err := e.c.Probe(probeCtx, p.from, testbed.ProbeSpec{Proto: "tcp", Addr: p.addr, N: 5, Timeout: 2 * time.Second})
				if probeCtx.Err() != nil {
					return // cut short by the end of the window, not a failure
				}
				mu.Lock()
				if err != nil {
					counts.failures = append(counts.failures, err.Error())
				}
				for _, r := range rs {
					if r.OK() {
						counts.newOK++
					} else {
						counts.newFailed++
						counts.failures = append(counts.failures, fmt.Sprintf("new %s connection to %s at %v: %s", p.name, p.addr, time.Since(start).Round(time.Millisecond), r.Err))
					}
				}
				mu.Unlock()
				// About 40 new connections a second per path: busy, but
				// without reusing source ports within seconds.
				select {
				case <-probeCtx.Done():
				case <-time.After(100 * time.Millisecond):
				}
			}
		}()
	}
	time.Sleep(time.Second)
	switched := time.Now()
	switchErr := doSwitch()
	counts.switchTook = time.Since(switched)
	for i, s := range streams {
		r, err := s.Wait()
		counts.streams++
		counts.linesEchoed += r.Sent
		if err != nil || r.Err != "" {
			p := paths[i/streamsPerPath]
			counts.streamsBroken++
			counts.failures = append(counts.failures, fmt.Sprintf("established %s connection %d to %s broke after %d lines: %s %v", p.name, i, p.addr, r.Sent, r.Err, err))
		}
	}
	stop()
	wg.Wait()
	counts.windowLasted = time.Since(start)
	if switchErr != nil {
		t.Fatalf("switch proxies: %v", switchErr)
	}
	if counts.switchTook > streamFor-3*time.Second {
		t.Errorf("the switch took %v, too long for the %v streams to cover it", counts.switchTook, streamFor)
	}
	if counts.newOK == 0 {
		t.Errorf("no new connection was made during the switch")
	}
	for _, f := range counts.failures {
		t.Error(f)
	}
	return counts
}

// kubeProxyRules returns kube-proxy's iptables rules and nftables tables
// on the node, one per line, or "" when there are none. KUBE-FIREWALL is
// the kubelet's (kube-proxy writes a duplicate of it and leaves it on
// cleanup, as svcnat's takeover does).
func kubeProxyRules(n *testbed.Node) string {
	var out []string
	for _, cmd := range [][]string{{"iptables-save"}, {"ip6tables-save"}} {
		text, _ := runIn(n.Netns, cmd...)
		for _, l := range strings.Split(text, "\n") {
			if strings.Contains(l, "KUBE-") && !strings.Contains(l, "KUBE-FIREWALL") {
				out = append(out, l)
			}
		}
	}
	for _, fam := range []string{"ip", "ip6"} {
		if text, err := runIn(n.Netns, "nft", "list", "table", fam, "kube-proxy"); err == nil {
			out = append(out, text)
		}
	}
	return strings.Join(out, "\n")
}

// waitFor retries f every 250ms until it returns nil, limit passes or ctx
// ends, and returns its last error.
func waitFor(ctx context.Context, limit time.Duration, f func() error) error {
	deadline := time.Now().Add(limit)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(250 * time.Millisecond)
	}
}
