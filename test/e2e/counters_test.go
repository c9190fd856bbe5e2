//go:build linux && e2e

package e2e

import (
	"encoding/json"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/test/testbed"
)

// testDumpCounters: N new connections through a ClusterIP from a pod on
// node1 (eBPF: the socket hooks) and N through node1's NodePort from the
// external client (eBPF: the tc program) move the connection counters that
// `svcnat dump -o json` on node1 reads from the kernel by exactly N, on the
// endpoints that answered.
func testDumpCounters(t *testing.T, e *env) {
	const n = 15
	svc := e.simpleService(t, "counted", corev1.ServiceTypeNodePort, "node1-a", "node2-a")
	node1 := e.c.Nodes[0]
	name := model.ServicePortName{Namespace: ns, Name: "counted", Family: model.IPv4}
	endpoint := map[string]string{}
	for _, p := range []string{"node1-a", "node2-a"} {
		endpoint[p] = netip.AddrPortFrom(e.pod(p).IP, tcpA).String()
	}
	for _, c := range []struct {
		what string
		from testbed.Origin
		addr netip.AddrPort
	}{
		{"ClusterIP from a pod on node1", e.pod("node1-b").Origin(), clusterIP(t, svc, 80)},
		{"NodePort of node1 from the client", e.c.ClientOrigin(), nodePort(t, svc, node1, 0)},
	} {
		e.reachesOnly(t, c.from, "tcp", c.addr, "node1-a", "node2-a")
		before := e.dumpCounters(t, node1, name)
		seen, err := e.answers(t, c.from, testbed.ProbeSpec{Proto: "tcp", Addr: c.addr, N: n}, "node1-a", "node2-a")
		if err != nil {
			t.Fatal(err)
		}
		after := e.dumpCounters(t, node1, name)
		if d := after.Connections - before.Connections; d != n {
			t.Errorf("%s: %d connections moved the counter by %d (%d -> %d)", c.what, n, d, before.Connections, after.Connections)
		}
		for pod, ep := range endpoint {
			if d := after.Endpoints[ep] - before.Endpoints[ep]; d != uint64(seen[pod]) {
				t.Errorf("%s: %s (%s) answered %d connections, its counter moved by %d", c.what, pod, ep, seen[pod], d)
			}
		}
		t.Logf("%s: %d connections, counters %d -> %d, endpoints %v", c.what, n, before.Connections, after.Connections, after.Endpoints)
	}
}

// dumpCounters runs `svcnat dump -o json` on node and returns the counters
// of Service port name.
func (e *env) dumpCounters(t *testing.T, node *testbed.Node, name model.ServicePortName) dataplane.PortCounters {
	t.Helper()
	out, err := node.Proxy.Dump(t.Context(), "-o", "json")
	if err != nil {
		t.Fatalf("svcnat dump -o json on %s: %v:\n%s", node.Name, err, out)
	}
	var d struct {
		ServicePorts []struct {
			Name     model.ServicePortName   `json:"name"`
			Counters *dataplane.PortCounters `json:"counters"`
		} `json:"servicePorts"`
	}
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("decode svcnat dump -o json on %s: %v:\n%s", node.Name, err, out)
	}
	for _, sp := range d.ServicePorts {
		if sp.Name == name {
			if sp.Counters == nil {
				t.Fatalf("svcnat dump -o json on %s: %s has no counters", node.Name, name)
			}
			return *sp.Counters
		}
	}
	t.Fatalf("svcnat dump -o json on %s: no service port %s", node.Name, name)
	return dataplane.PortCounters{}
}
