//go:build linux && e2e

package e2e

import (
	"bufio"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/trace"
	"github.com/svcnat/svcnat/pkg/watch"
	"github.com/svcnat/svcnat/test/testbed"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// scenarios run in order on one test bed per proxy; the disruptive ones
// (agent killed, apiserver stopped, rules removed by hand) come last.
var scenarios = []scenario{
	{name: "ClusterIPSameAndOtherNode", run: testClusterIP},
	{name: "MultiPort", run: testMultiPort},
	{name: "NodePortFromClientToEachNode", run: testNodePort},
	{name: "LoadBalancerIngressAndExternalIPs", run: testLoadBalancer},
	{name: "LoadBalancerSourceRanges", run: testSourceRanges},
	{name: "SpreadAcrossAllEndpoints", run: testSpread},
	{name: "EndpointsAddedRemovedMoved", run: testEndpointChurn},
	{name: "PortChanged", run: testPortChange},
	{name: "TypeChanges", run: testTypeChanges},
	{name: "NoEndpointsRefused", run: testNoEndpoints},
	{name: "SessionAffinityClientIP", run: testAffinity},
	{name: "ExternalTrafficPolicyLocal", run: testExternalLocal},
	{name: "InternalTrafficPolicyLocal", run: testInternalLocal},
	{name: "TerminatingFallback", run: testTerminating},
	{name: "Hairpin", run: testHairpin},
	{name: "UDPEndpointDeleted", run: testUDPStale},
	{name: "ServiceProxyNameIgnored", run: testServiceProxyName},
	{name: "ProxiedLabelsChange", run: testProxiedLabelsChange},
	{name: "WatcherCachesOnlyProxied", run: testWatcherCachesOnlyProxied, skip: onlySvcnat("pkg/watch")},
	{name: "HostileObjectsDoNotBlockOthers", run: testHostileObjects},
	{name: "ForwardPolicyDrop", run: testForwardPolicyDrop, skip: forwardDropSkip},
	{name: "HealthCheckDrainsTerminating", run: testHealthCheckDrains},
	{name: "UDPFlowToTerminatingKept", run: testUDPFlowToTerminatingKept, skip: udpDrainSkip},
	{name: "DumpCheckUDPLocalAndMixedLocality", run: testDumpCheckParity, skip: onlySvcnat("dump --check")},
	{name: "DumpCountersMoveWithConnections", run: testDumpCounters, skip: onlySvcnat("svcnat dump's counters")},
	{name: "AgentKilledWhileStreaming", run: testAgentRestart},
	{name: "APIServerDown30s", run: testAPIServerDown},
	{name: "DumpCheckDetectsDeletedRule", run: testDumpDrift, skip: dumpDriftSkip},
}

// Pod ports of the test bed's echo servers (testbed.DefaultPodPorts).
const (
	tcpA = 8080
	tcpB = 8081
	udpA = 5353
	web  = 80
)

func svcPort(name string, proto corev1.Protocol, port, target int32) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Protocol: proto, Port: port, TargetPort: intstr.FromInt32(target)}
}

func newService(name string, typ corev1.ServiceType, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.ServiceSpec{Type: typ, Ports: ports},
	}
}

// tcpSlice is a slice for a Service with one unnamed TCP port to tcpA.
func tcpSlice(svc, name string, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return testbed.EndpointSlice(ns, svc, name, []discoveryv1.EndpointPort{testbed.SlicePort("", corev1.ProtocolTCP, tcpA)}, eps...)
}

func (e *env) pod(name string) *testbed.Pod { return e.c.Pod(name) }

func (e *env) ready(names ...string) []discoveryv1.Endpoint {
	var eps []discoveryv1.Endpoint
	for _, n := range names {
		eps = append(eps, e.pod(n).Endpoint(testbed.Ready))
	}
	return eps
}

// simpleService creates a ClusterIP-style Service with one TCP port 80 ->
// tcpA and one slice with the given ready pods.
func (e *env) simpleService(t *testing.T, name string, typ corev1.ServiceType, pods ...string) *corev1.Service {
	t.Helper()
	svc := e.service(t, newService(name, typ, svcPort("", corev1.ProtocolTCP, 80, tcpA)))
	e.slice(t, tcpSlice(name, name+"-1", e.ready(pods...)...))
	return svc
}

func testClusterIP(t *testing.T, e *env) {
	svc := e.simpleService(t, "cip", corev1.ServiceTypeClusterIP, "node1-a")
	addr := clusterIP(t, svc, 80)
	for _, from := range []string{"node1-b", "node2-b"} {
		o := e.pod(from).Origin()
		e.reachesOnly(t, o, "tcp", addr, "node1-a")
		r := e.probe(t, o, testbed.ProbeSpec{Proto: "tcp", Addr: addr})[0]
		if r.ClientIP() != o.IP {
			t.Errorf("from %s: server saw %s, want the pod's own address %s (no masquerade inside the cluster)", from, r.Client, o.IP)
		}
	}
	e.traceAgrees(t, e.c.Nodes[0], e.pod("node1-b").Origin(), trace.FromPod, addr, 10)
}

func testMultiPort(t *testing.T, e *env) {
	svc := e.service(t, newService("multi", corev1.ServiceTypeClusterIP,
		svcPort("http", corev1.ProtocolTCP, 80, web),
		svcPort("alt", corev1.ProtocolTCP, 81, tcpB),
		svcPort("dns", corev1.ProtocolUDP, 53, udpA)))
	e.slice(t, testbed.EndpointSlice(ns, "multi", "multi-1", []discoveryv1.EndpointPort{
		testbed.SlicePort("http", corev1.ProtocolTCP, web),
		testbed.SlicePort("alt", corev1.ProtocolTCP, tcpB),
		testbed.SlicePort("dns", corev1.ProtocolUDP, udpA),
	}, e.ready("node1-a", "node2-a")...))
	from := e.pod("node1-c").Origin()
	for _, p := range []struct {
		proto  string
		port   int32
		target int
	}{{"http", 80, web}, {"tcp", 81, tcpB}, {"udp", 53, udpA}} {
		addr := clusterIP(t, svc, p.port)
		e.reachesOnly(t, from, p.proto, addr, "node1-a", "node2-a")
		for _, r := range e.probe(t, from, testbed.ProbeSpec{Proto: p.proto, Addr: addr, N: 5}) {
			if r.Port != p.target {
				t.Errorf("%s %s reached port %d, want %d", p.proto, addr, r.Port, p.target)
			}
		}
	}
}

func testNodePort(t *testing.T, e *env) {
	svc := e.simpleService(t, "np", corev1.ServiceTypeNodePort, "node1-a", "node2-a")
	client := e.c.ClientOrigin()
	for _, n := range e.c.Nodes {
		addr := nodePort(t, svc, n, 0)
		e.reachesOnly(t, client, "tcp", addr, "node1-a", "node2-a")
		for _, r := range e.probe(t, client, testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: 4}) {
			if r.ClientIP() == client.IP {
				t.Errorf("node port %s: server %s saw the client's own address %s; externalTrafficPolicy Cluster must masquerade", addr, r.Pod, r.Client)
			}
		}
	}
	// Pods reach node ports too.
	e.reachesOnly(t, e.pod("node2-c").Origin(), "tcp", nodePort(t, svc, e.c.Nodes[0], 0), "node1-a", "node2-a")
	e.traceAgrees(t, e.c.Nodes[1], client, trace.FromOutside, nodePort(t, svc, e.c.Nodes[1], 0), 10)
}

func testLoadBalancer(t *testing.T, e *env) {
	lbIP := netip.MustParseAddr("192.168.78.10")
	extIP := netip.MustParseAddr("192.168.78.20")
	s := newService("lb", corev1.ServiceTypeLoadBalancer, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	s.Spec.ExternalIPs = []string{extIP.String()}
	e.service(t, s)
	e.slice(t, tcpSlice("lb", "lb-1", e.ready("node1-b", "node2-b")...))
	e.updateStatus(t, "lb", lbIP)
	client := e.c.ClientOrigin()
	e.reachesOnly(t, client, "tcp", netip.AddrPortFrom(lbIP, 80), "node1-b", "node2-b")
	e.reachesOnly(t, client, "tcp", netip.AddrPortFrom(extIP, 80), "node1-b", "node2-b")
}

// updateStatus gives a LoadBalancer Service an ingress IP, as a cloud
// controller would.
func (e *env) updateStatus(t *testing.T, name string, ip netip.Addr) {
	t.Helper()
	e.setIngress(t, name, []corev1.LoadBalancerIngress{{IP: ip.String()}})
}

func testSpread(t *testing.T, e *env) {
	all := []string{"node1-a", "node1-b", "node2-a", "node2-b", "node2-c"}
	svc := e.simpleService(t, "spread", corev1.ServiceTypeClusterIP, all...)
	// reachesOnly requires every endpoint to answer within 60 attempts.
	e.reachesOnly(t, e.pod("node1-c").Origin(), "tcp", clusterIP(t, svc, 80), all...)
}

func testEndpointChurn(t *testing.T, e *env) {
	svc := e.simpleService(t, "churn", corev1.ServiceTypeClusterIP, "node1-a")
	addr := clusterIP(t, svc, 80)
	from := e.pod("node1-c").Origin()
	e.reachesOnly(t, from, "tcp", addr, "node1-a")

	e.setEndpoints(t, "churn-1", e.ready("node1-a", "node2-a")...)
	e.reachesOnly(t, from, "tcp", addr, "node1-a", "node2-a")

	e.setEndpoints(t, "churn-1", e.ready("node2-a")...)
	e.reachesOnly(t, from, "tcp", addr, "node2-a")

	// Move node2-a to a second slice and add node2-b there.
	e.slice(t, tcpSlice("churn", "churn-2", e.ready("node2-a", "node2-b")...))
	e.setEndpoints(t, "churn-1")
	e.reachesOnly(t, from, "tcp", addr, "node2-a", "node2-b")

	e.deleteSlice(t, "churn-2")
	e.unreachable(t, from, "tcp", addr, true)
}

func testPortChange(t *testing.T, e *env) {
	svc := e.simpleService(t, "portchg", corev1.ServiceTypeClusterIP, "node2-a")
	from := e.pod("node1-a").Origin()
	e.reachesOnly(t, from, "tcp", clusterIP(t, svc, 80), "node2-a")
	svc = e.updateService(t, "portchg", func(s *corev1.Service) { s.Spec.Ports[0].Port = 90 })
	e.reachesOnly(t, from, "tcp", clusterIP(t, svc, 90), "node2-a")
	e.unreachable(t, from, "tcp", clusterIP(t, svc, 80), false)
}

func testTypeChanges(t *testing.T, e *env) {
	svc := e.simpleService(t, "types", corev1.ServiceTypeClusterIP, "node1-a")
	pod, client := e.pod("node2-a").Origin(), e.c.ClientOrigin()
	cip := clusterIP(t, svc, 80)
	e.reachesOnly(t, pod, "tcp", cip, "node1-a")

	svc = e.updateService(t, "types", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeNodePort })
	np := nodePort(t, svc, e.c.Nodes[1], 0)
	e.reachesOnly(t, client, "tcp", np, "node1-a")
	e.reachesOnly(t, pod, "tcp", cip, "node1-a")

	e.updateService(t, "types", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeExternalName
		s.Spec.ExternalName = "db.example.org"
		s.Spec.ClusterIP, s.Spec.ClusterIPs = "", nil
		s.Spec.IPFamilies, s.Spec.IPFamilyPolicy = nil, nil
		s.Spec.ExternalTrafficPolicy, s.Spec.InternalTrafficPolicy = "", nil
		s.Spec.Ports[0].NodePort = 0
	})
	e.unreachable(t, client, "tcp", np, false)
	e.unreachable(t, pod, "tcp", cip, false)

	svc = e.updateService(t, "types", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeClusterIP
		s.Spec.ExternalName = ""
	})
	e.reachesOnly(t, pod, "tcp", clusterIP(t, svc, 80), "node1-a")
}

func testNoEndpoints(t *testing.T, e *env) {
	svc := e.service(t, newService("empty", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA)))
	e.slice(t, tcpSlice("empty", "empty-1"))
	from := e.pod("node1-a").Origin()
	addr := clusterIP(t, svc, 80)
	// unreachable gives each attempt 3 s and requires ECONNREFUSED.
	e.unreachable(t, from, "tcp", addr, true)
	start := time.Now()
	r := e.probe(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: addr, Timeout: 3 * time.Second})[0]
	if !r.Refused {
		t.Fatalf("connect to %s with no endpoints: %q after %v, want connection refused within 3s", addr, r.Err, time.Since(start))
	}
	t.Logf("connect to %s refused after %v", addr, time.Since(start).Round(time.Millisecond))
	e.traceAgrees(t, e.c.Nodes[0], from, trace.FromPod, addr, 1)
}

func testAffinity(t *testing.T, e *env) {
	s := newService("sticky", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	timeout := int32(60)
	s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: &timeout}}
	svc := e.service(t, s)
	pods := []string{"node1-a", "node1-b", "node2-a", "node2-b"}
	e.slice(t, tcpSlice("sticky", "sticky-1", e.ready(pods...)...))
	addr := clusterIP(t, svc, 80)
	for _, from := range []string{"node1-c", "node2-c"} {
		o := e.pod(from).Origin()
		e.reachesOnlyOne(t, o, addr, pods)
		e.traceAgrees(t, e.pod(from).Node, o, trace.FromPod, addr, 10)
	}
}

// reachesOnlyOne waits for the Service to answer, then requires 30
// connections from one client to land on a single endpoint.
func (e *env) reachesOnlyOne(t *testing.T, from testbed.Origin, addr netip.AddrPort, pods []string) {
	t.Helper()
	s := testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: 1}
	eventually(t, fmt.Sprintf("tcp %s from %s", addr, from.Name), programmed, func() error {
		_, err := e.answers(t, from, s, pods...)
		return err
	})
	s.N = 30
	seen, err := e.answers(t, from, s, pods...)
	if err != nil {
		t.Fatal(err)
	}
	if len(seen) != 1 {
		t.Fatalf("session affinity: %s from %s reached %v, want one endpoint", addr, from.Name, seen)
	}
}

func testExternalLocal(t *testing.T, e *env) {
	s := newService("etplocal", corev1.ServiceTypeLoadBalancer, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	svc := e.service(t, s)
	e.slice(t, tcpSlice("etplocal", "etplocal-1", e.ready("node1-a", "node1-b")...))
	if svc.Spec.HealthCheckNodePort == 0 {
		t.Fatal("apiserver allocated no healthCheckNodePort")
	}
	client := e.c.ClientOrigin()
	n1, n2 := e.c.Nodes[0], e.c.Nodes[1]
	np1 := nodePort(t, svc, n1, 0)
	e.reachesOnly(t, client, "tcp", np1, "node1-a", "node1-b")
	for _, r := range e.probe(t, client, testbed.ProbeSpec{Proto: "tcp", Addr: np1, N: 4}) {
		if r.ClientIP() != client.IP {
			t.Errorf("externalTrafficPolicy Local: server %s saw %s, want the client's own address %s", r.Pod, r.Client, client.IP)
		}
	}
	// node2 has no local endpoint: external traffic to it goes nowhere.
	e.unreachable(t, client, "tcp", nodePort(t, svc, n2, 0), false)
	e.traceAgrees(t, n1, client, trace.FromOutside, np1, 10)
	e.traceAgrees(t, n2, client, trace.FromOutside, nodePort(t, svc, n2, 0), 1)

	hc := func(n *testbed.Node, want int) {
		addr := netip.AddrPortFrom(n.IP, uint16(svc.Spec.HealthCheckNodePort))
		eventually(t, fmt.Sprintf("health check %s answers %d", addr, want), programmed, func() error {
			r := e.probe(t, client, testbed.ProbeSpec{Proto: "http", Addr: addr})[0]
			if r.Status != want {
				return fmt.Errorf("got status %d (%s)", r.Status, r.Err)
			}
			return nil
		})
	}
	hc(n1, 200)
	hc(n2, 503)

	// Pods on node2 still reach the Service through node2's node port: the
	// Local policy short-circuits cluster traffic to all endpoints.
	e.reachesOnly(t, e.pod("node2-c").Origin(), "tcp", clusterIP(t, svc, 80), "node1-a", "node1-b")
}

func testInternalLocal(t *testing.T, e *env) {
	s := newService("itplocal", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	local := corev1.ServiceInternalTrafficPolicyLocal
	s.Spec.InternalTrafficPolicy = &local
	svc := e.service(t, s)
	e.slice(t, tcpSlice("itplocal", "itplocal-1", e.ready("node1-a", "node2-a", "node2-b")...))
	addr := clusterIP(t, svc, 80)
	e.reachesOnly(t, e.pod("node1-c").Origin(), "tcp", addr, "node1-a")
	e.reachesOnly(t, e.pod("node2-c").Origin(), "tcp", addr, "node2-a", "node2-b")
}

func testTerminating(t *testing.T, e *env) {
	svc := e.service(t, newService("term", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA)))
	e.slice(t, tcpSlice("term", "term-1",
		e.pod("node1-a").Endpoint(testbed.ServingTerminating),
		e.pod("node2-a").Endpoint(testbed.ServingTerminating),
		e.pod("node2-b").Endpoint(testbed.Terminating)))
	addr := clusterIP(t, svc, 80)
	from := e.pod("node1-c").Origin()
	// No ready endpoint: the serving terminating ones take the traffic.
	e.reachesOnly(t, from, "tcp", addr, "node1-a", "node2-a")
	// A ready endpoint appears: terminating ones get no new connections.
	e.setEndpoints(t, "term-1",
		e.pod("node1-a").Endpoint(testbed.ServingTerminating),
		e.pod("node2-a").Endpoint(testbed.ServingTerminating),
		e.pod("node2-b").Endpoint(testbed.Terminating),
		e.pod("node2-c").Endpoint(testbed.Ready))
	e.reachesOnly(t, from, "tcp", addr, "node2-c")
}

func testHairpin(t *testing.T, e *env) {
	svc := e.simpleService(t, "hairpin", corev1.ServiceTypeClusterIP, "node1-a")
	addr := clusterIP(t, svc, 80)
	self := e.pod("node1-a").Origin()
	e.reachesOnly(t, self, "tcp", addr, "node1-a")
	r := e.probe(t, self, testbed.ProbeSpec{Proto: "tcp", Addr: addr})[0]
	if e.kind == testbed.SvcnatEBPF {
		// Connect-time translation turns the connection into a local one
		// inside the pod: no packet crosses the node, nothing to masquerade.
		t.Logf("hairpin with connect-time translation: node1-a saw %s", r.Client)
		return
	}
	if r.ClientIP() == self.IP {
		t.Errorf("hairpin: node1-a saw its own address %s as the source; the node must masquerade it, or the reply would bypass the reverse NAT", r.Client)
	}
}

func testUDPStale(t *testing.T, e *env) {
	svc := e.service(t, newService("udp", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolUDP, 53, udpA)))
	ports := []discoveryv1.EndpointPort{testbed.SlicePort("", corev1.ProtocolUDP, udpA)}
	e.slice(t, testbed.EndpointSlice(ns, "udp", "udp-1", ports, e.ready("node1-a")...))
	addr := clusterIP(t, svc, 53)
	from := e.pod("node2-c").Origin()
	// A fixed source port keeps the client on one conntrack entry, like a
	// resolver reusing its socket.
	s := testbed.ProbeSpec{Proto: "udp", Addr: addr, SourcePort: 40053, Timeout: time.Second}
	eventually(t, "udp reaches node1-a", programmed, func() error {
		_, err := e.answers(t, from, s, "node1-a")
		return err
	})
	e.setEndpoints(t, "udp-1", e.ready("node2-a")...)
	// node1-a still runs and would answer through a stale entry.
	start := time.Now()
	eventually(t, "udp moves to node2-a on the same source port", 15*time.Second, func() error {
		_, err := e.answers(t, from, s, "node2-a")
		return err
	})
	t.Logf("udp client moved to the new endpoint after %v", time.Since(start).Round(time.Millisecond))
}

func testServiceProxyName(t *testing.T, e *env) {
	other := newService("other-proxy", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	other.Labels = map[string]string{watch.LabelServiceProxyName: "someone-else"}
	ignored := e.service(t, other)
	e.slice(t, tcpSlice("other-proxy", "other-proxy-1", e.ready("node1-a")...))
	control := e.simpleService(t, "mine", corev1.ServiceTypeClusterIP, "node1-a")
	from := e.pod("node2-a").Origin()
	// Once the control Service works, the ignored one must not.
	e.reachesOnly(t, from, "tcp", clusterIP(t, control, 80), "node1-a")
	r := e.probe(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: clusterIP(t, ignored, 80), Timeout: 2 * time.Second})[0]
	if r.OK() {
		t.Fatalf("service labelled service-proxy-name=someone-else was programmed: answered by %s", r.Pod)
	}
}

func testAgentRestart(t *testing.T, e *env) {
	svc := e.simpleService(t, "restart", corev1.ServiceTypeClusterIP, "node2-a", "node2-b")
	addr := clusterIP(t, svc, 80)
	from := e.pod("node1-b").Origin()
	e.reachesOnly(t, from, "tcp", addr, "node2-a", "node2-b")

	stream, err := e.c.StartStream(t.Context(), from, addr, 12*time.Second, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if !stream.First.OK() {
		t.Fatalf("stream did not connect: %s", stream.First.Err)
	}
	time.Sleep(time.Second)
	p := e.c.Nodes[0].Proxy
	p.Kill()
	// With the agent dead, rules stay and new connections work.
	if _, err := e.answers(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: 5}, "node2-a", "node2-b"); err != nil {
		t.Errorf("new connection while the agent is down: %v", err)
	}
	if err := p.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	// And while it starts up and after.
	if _, err := e.answers(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: 10}, "node2-a", "node2-b"); err != nil {
		t.Errorf("new connection after the agent restarted: %v", err)
	}
	r, err := stream.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if r.Err != "" || r.Sent < 50 {
		t.Fatalf("stream through the restart: %d lines echoed, error %q", r.Sent, r.Err)
	}
	t.Logf("stream echoed %d lines across the restart", r.Sent)
}

func testAPIServerDown(t *testing.T, e *env) {
	svc := e.simpleService(t, "apidown", corev1.ServiceTypeClusterIP, "node1-a")
	addr := clusterIP(t, svc, 80)
	from := e.pod("node2-b").Origin()
	e.reachesOnly(t, from, "tcp", addr, "node1-a")

	e.c.StopAPIServer()
	apiDown := time.Now()
	restarted := false
	defer func() {
		if !restarted {
			_ = e.c.StartAPIServer(t.Context())
		}
	}()
	for time.Since(apiDown) < 30*time.Second {
		if _, err := e.answers(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: 2}, "node1-a"); err != nil {
			t.Errorf("%v after the apiserver stopped: %v", time.Since(apiDown).Round(time.Second), err)
		}
		for _, n := range e.c.Nodes {
			if !n.Proxy.Running() {
				t.Fatalf("%s on %s exited while the apiserver was down:\n%s", e.kind, n.Name, n.Proxy.Tail(20))
			}
		}
		time.Sleep(3 * time.Second)
	}
	if err := e.c.StartAPIServer(t.Context()); err != nil {
		t.Fatal(err)
	}
	restarted = true
	// Changes made once it is back are applied. Watches reconnect with
	// client-go's back-off (up to 30 s between attempts, so about a
	// minute after a 30 s outage), so allow more than for an ordinary
	// change.
	back := time.Now()
	e.setEndpoints(t, "apidown-1", e.ready("node2-a")...)
	after := e.simpleService(t, "apiback", corev1.ServiceTypeClusterIP, "node1-c")
	// Every node's proxy, not just one: each watch has its own back-off.
	for _, o := range []testbed.Origin{from, e.pod("node1-b").Origin()} {
		e.reachesOnlyWithin(t, 3*programmed, o, "tcp", addr, "node2-a")
		e.reachesOnlyWithin(t, 3*programmed, o, "tcp", clusterIP(t, after, 80), "node1-c")
	}
	t.Logf("changes made after the apiserver returned were applied within %v", time.Since(back).Round(time.Millisecond))
}

func dumpDriftSkip(k testbed.ProxyKind) string {
	if why := onlySvcnat("svcnat dump --check")(k); why != "" {
		return why
	}
	if k != testbed.SvcnatIptables {
		return "removes an iptables chain by hand; the eBPF backend has no chains"
	}
	return ""
}

func testDumpDrift(t *testing.T, e *env) {
	e.simpleService(t, "drift", corev1.ServiceTypeClusterIP, "node1-a", "node2-a")
	n := e.c.Nodes[1]
	e.checkDump(t)
	save, chain := e.findChain(t, n, "drift")
	// Flush one of svcnat's chains inside node2's namespace only.
	if out, err := runIn(n.Netns, strings.Replace(save, "-save", "", 1), "-t", "nat", "-F", chain); err != nil {
		t.Fatalf("flush %s on %s: %v: %s", chain, n.Name, err, out)
	}
	t.Run("CheckFails", func(t *testing.T) {
		out, err := n.Proxy.Dump(t.Context(), "--check")
		if err == nil {
			t.Fatalf("svcnat dump --check passed after chain %s was flushed:\n%s", chain, out)
		}
		t.Logf("svcnat dump --check after flushing %s: %v\n%s", chain, err, out)
	})
	// The periodic full reconcile (--sync-period, 30 s) must notice and
	// restore the chain, so later checks see a clean node.
	t.Run("AgentRepairs", func(t *testing.T) {
		start := time.Now()
		eventually(t, "agent restores the flushed chain", 90*time.Second, func() error {
			if out, err := n.Proxy.Dump(t.Context(), "--check"); err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
		t.Logf("agent restored the chain after %v", time.Since(start).Round(time.Millisecond))
	})
}

// findChain returns the iptables-save variant holding svcnat's rules on n
// and a nat chain of svcnat's that DNATs for the named Service.
func (e *env) findChain(t *testing.T, n *testbed.Node, svc string) (string, string) {
	t.Helper()
	for _, save := range []string{"iptables-save", "iptables-legacy-save"} {
		out, err := runIn(n.Netns, save, "-t", "nat")
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(strings.NewReader(out))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) > 2 && f[0] == "-A" && strings.HasPrefix(f[1], "SVCNAT") &&
				strings.Contains(sc.Text(), ns+"/"+svc) && strings.Contains(sc.Text(), "DNAT") {
				return save, f[1]
			}
		}
	}
	t.Fatalf("no SVCNAT nat chain with a DNAT rule for %s/%s on %s", ns, svc, n.Name)
	return "", ""
}
