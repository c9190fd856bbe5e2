//go:build linux && e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/svcnat/svcnat/pkg/trace"
	"github.com/svcnat/svcnat/test/testbed"
)

// svcnatTrace runs `svcnat trace -o json` on node n for a connection from
// `from` to addr.
func (e *env) svcnatTrace(t *testing.T, n *testbed.Node, from testbed.Origin, origin trace.Origin, proto string, addr netip.AddrPort) *trace.Result {
	t.Helper()
	out, err := n.Proxy.Trace(t.Context(), "-o", "json", "--from", from.IP.String(), "--to", addr.String(),
		"--proto", proto, "--origin", string(origin))
	if err != nil {
		t.Fatalf("svcnat trace on %s: %v:\n%s", n.Name, err, out)
	}
	var r trace.Result
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("svcnat trace on %s: %v:\n%s", n.Name, err, out)
	}
	return &r
}

// traceAgrees probes addr from `from` (n times, or once when the traffic
// fails) and requires `svcnat trace` on node n to explain what happened:
// a Service frontend; every pod that answered a forward outcome, and from
// outside, masqueraded exactly when the server saw another source than the
// client's; a refused connection the only outcome reject, one that failed
// otherwise drop; and, with session affinity, the trace pinned to the one
// pod that answered (where the backend can tell: not for pods under eBPF,
// whose affinity is keyed by network namespace). svcnat only.
func (e *env) traceAgrees(t *testing.T, n *testbed.Node, from testbed.Origin, origin trace.Origin, addr netip.AddrPort, count int) {
	t.Helper()
	if !e.kind.IsSvcnat() {
		return
	}
	start := time.Now()
	rs := e.probe(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: count, Timeout: 3 * time.Second})
	r := e.svcnatTrace(t, n, from, origin, "tcp", addr)
	explain := func(format string, args ...any) {
		t.Helper()
		t.Errorf("svcnat trace on %s disagrees with real traffic from %s to %s: %s\n%s", n.Name, from.Name, addr,
			fmt.Sprintf(format, args...), r.Text())
	}
	if r.Frontend == nil {
		explain("no frontend")
		return
	}
	answered := map[string]bool{}
	for _, res := range rs {
		switch {
		case res.OK():
			answered[res.Pod] = true
			ip := e.pod(res.Pod).IP
			i := indexOutcome(r, func(o trace.Outcome) bool { return o.Verdict == trace.Forward && o.Endpoint.Addr() == ip })
			if i < 0 {
				explain("%s (%s) answered; the trace has no forward to it", res.Pod, ip)
				continue
			}
			if masq := res.ClientIP() != from.IP; origin == trace.FromOutside && r.Outcomes[i].Masquerade != masq {
				explain("%s saw the client as %s (masqueraded: %v); the trace says masquerade=%v", res.Pod, res.Client, masq, r.Outcomes[i].Masquerade)
			}
		case res.Refused:
			if len(r.Outcomes) != 1 || r.Outcomes[0].Verdict != trace.Reject {
				explain("refused; the trace does not say reject")
			}
		default:
			if len(r.Outcomes) != 1 || r.Outcomes[0].Verdict != trace.Drop {
				explain("failed (%s); the trace does not say drop", res.Err)
			}
		}
	}
	if r.Policy != nil && r.Policy.AffinityTimeout > 0 && len(answered) == 1 {
		for pod := range answered {
			switch {
			case r.Policy.PinnedTo.Addr() == e.pod(pod).IP:
			case e.kind == testbed.SvcnatEBPF && origin != trace.FromOutside:
				t.Logf("affinity: %s answered every time; the eBPF trace does not look up a pod's affinity entry", pod)
			default:
				explain("session affinity: only %s answered; the trace is pinned to %v", pod, r.Policy.PinnedTo)
			}
		}
	}
	t.Logf("svcnat trace on %s agrees with %d connections from %s to %s (%v):\n%s", n.Name, len(rs), from.Name, addr,
		time.Since(start).Round(time.Millisecond), strings.TrimSpace(r.Text()))
}

func indexOutcome(r *trace.Result, f func(trace.Outcome) bool) int {
	for i, o := range r.Outcomes {
		if f(o) {
			return i
		}
	}
	return -1
}

// testSourceRanges: a LoadBalancer IP answers the client inside its
// loadBalancerSourceRanges and drops it outside; svcnat trace says so.
func testSourceRanges(t *testing.T, e *env) {
	client := e.c.ClientOrigin()
	for _, c := range []struct {
		name, ranges string
		lb           netip.Addr
		allowed      bool
	}{
		{"ranges-in", client.IP.String() + "/32", netip.MustParseAddr("192.168.78.30"), true},
		{"ranges-out", "198.51.100.0/24", netip.MustParseAddr("192.168.78.31"), false},
	} {
		s := newService(c.name, corev1.ServiceTypeLoadBalancer, svcPort("", corev1.ProtocolTCP, 80, tcpA))
		s.Spec.LoadBalancerSourceRanges = []string{c.ranges}
		e.service(t, s)
		e.slice(t, tcpSlice(c.name, c.name+"-1", e.ready("node1-a", "node2-a")...))
		e.updateStatus(t, c.name, c.lb)
		addr := netip.AddrPortFrom(c.lb, 80)
		if c.allowed {
			e.reachesOnly(t, client, "tcp", addr, "node1-a", "node2-a")
			e.traceAgrees(t, e.c.Nodes[0], client, trace.FromOutside, addr, 10)
		} else {
			e.unreachable(t, client, "tcp", addr, false)
			e.traceAgrees(t, e.c.Nodes[0], client, trace.FromOutside, addr, 1)
		}
	}
}
