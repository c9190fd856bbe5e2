//go:build linux && e2e

package e2e

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/svcnat/svcnat/test/testbed"
)

// Scenarios from the kube-proxy parity review (2026-11-30); kube-proxy's
// iptables mode is the reference for the traffic ones.

// testHealthCheckDrains: an ETP Local LoadBalancer whose only local
// endpoint starts terminating (still serving): the node's health check
// turns 503 so load balancers drain it, while traffic that still arrives
// reaches the terminating endpoint (KEP-1669).
func testHealthCheckDrains(t *testing.T, e *env) {
	s := newService("drain", corev1.ServiceTypeLoadBalancer, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	svc := e.service(t, s)
	e.slice(t, tcpSlice("drain", "drain-1", e.ready("node1-a")...))
	n1 := e.c.Nodes[0]
	client := e.c.ClientOrigin()
	hc := func(want int) {
		addr := netip.AddrPortFrom(n1.IP, uint16(svc.Spec.HealthCheckNodePort))
		eventually(t, fmt.Sprintf("health check %s answers %d", addr, want), programmed, func() error {
			if r := e.probe(t, client, testbed.ProbeSpec{Proto: "http", Addr: addr})[0]; r.Status != want {
				return fmt.Errorf("got status %d (%s)", r.Status, r.Err)
			}
			return nil
		})
	}
	hc(200)
	e.setEndpoints(t, "drain-1", e.pod("node1-a").Endpoint(testbed.ServingTerminating))
	hc(503)
	e.reachesOnly(t, client, "tcp", nodePort(t, svc, n1, 0), "node1-a")
}

// udpDrainSkip: the scenario's "flow" is a 5-tuple that a new probe
// process reuses (conntrack keys flows so). The eBPF backend translates
// sockets, and a new socket is a new flow even from the same port; one
// socket keeps its terminating endpoint (pkg/ebpf TestUnconnectedUDPSticks,
// connected sockets are not destroyed while it serves).
func udpDrainSkip(k testbed.ProxyKind) string {
	if k == testbed.SvcnatEBPF {
		return "the eBPF backend translates per socket: a new socket from the same port is a new flow (one socket keeps a terminating endpoint: pkg/ebpf TestUnconnectedUDPSticks)"
	}
	return ""
}

// testUDPFlowToTerminatingKept: a UDP client on one socket keeps its
// endpoint while that endpoint terminates (still serving) and another is
// ready; it moves only once the endpoint leaves the Service.
func testUDPFlowToTerminatingKept(t *testing.T, e *env) {
	svc := e.service(t, newService("udpdrain", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolUDP, 53, udpA)))
	ports := []discoveryv1.EndpointPort{testbed.SlicePort("", corev1.ProtocolUDP, udpA)}
	e.slice(t, testbed.EndpointSlice(ns, "udpdrain", "udpdrain-1", ports, e.ready("node1-a")...))
	from := e.pod("node2-c").Origin()
	s := testbed.ProbeSpec{Proto: "udp", Addr: clusterIP(t, svc, 53), SourcePort: 40054, Timeout: time.Second}
	eventually(t, "udp reaches node1-a", programmed, func() error {
		_, err := e.answers(t, from, s, "node1-a")
		return err
	})
	// node1-a drains, node2-a takes new flows: the client's flow stays.
	e.setEndpoints(t, "udpdrain-1", e.pod("node1-a").Endpoint(testbed.ServingTerminating), e.pod("node2-a").Endpoint(testbed.Ready))
	fresh := testbed.ProbeSpec{Proto: "udp", Addr: s.Addr, Timeout: time.Second}
	eventually(t, "new udp flows go to node2-a", programmed, func() error {
		_, err := e.answers(t, from, fresh, "node2-a")
		return err
	})
	for i := range 5 {
		if _, err := e.answers(t, from, s, "node1-a"); err != nil {
			t.Fatalf("datagram %d on the draining flow: %v (the flow to a serving endpoint was cut)", i, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	e.setEndpoints(t, "udpdrain-1", e.ready("node2-a")...)
	eventually(t, "udp moves to node2-a once node1-a left", 15*time.Second, func() error {
		_, err := e.answers(t, from, s, "node2-a")
		return err
	})
}

// testDumpCheckParity: objects that made `svcnat dump --check` fail on a
// node in sync: a UDP LoadBalancer with externalTrafficPolicy Local (its
// health check rule is TCP), and an address that is node1's for one
// Service and node2's for another (slices that disagree, as during a Pod
// IP reuse).
func testDumpCheckParity(t *testing.T, e *env) {
	s := newService("udplb", corev1.ServiceTypeLoadBalancer, svcPort("dns", corev1.ProtocolUDP, 53, udpA))
	s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	e.service(t, s)
	ports := []discoveryv1.EndpointPort{testbed.SlicePort("dns", corev1.ProtocolUDP, udpA)}
	e.slice(t, testbed.EndpointSlice(ns, "udplb", "udplb-1", ports, e.ready("node1-a")...))
	e.updateStatus(t, "udplb", netip.MustParseAddr("192.168.78.40"))
	e.simpleService(t, "mixa", corev1.ServiceTypeClusterIP, "node1-a")
	elsewhere := e.pod("node1-a").Endpoint(testbed.Ready)
	node2 := e.c.Nodes[1].Name
	elsewhere.NodeName = &node2
	e.service(t, newService("mixb", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA)))
	e.slice(t, tcpSlice("mixb", "mixb-1", elsewhere))
	e.checkDump(t)
}
