//go:build linux && e2e

package e2e

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/svcnat/svcnat/test/testbed"
)

// forwardDropSkip: kube-proxy's nftables mode has no KUBE-FORWARD
// equivalent, so a FORWARD policy of DROP stops its forwarded traffic too;
// so does svcnat's eBPF backend for now (a known limit in the README: the
// packets it translates at tc ingress are forwarded through netfilter, and
// it installs no FORWARD accept). The iptables backend and kube-proxy's
// iptables mode pass.
func forwardDropSkip(k testbed.ProxyKind) string {
	switch k {
	case testbed.KubeProxyNftables:
		return "kube-proxy's nftables mode accepts nothing in FORWARD (no KUBE-FORWARD); a FORWARD policy of DROP blocks it as well"
	}
	return ""
}

// testForwardPolicyDrop makes node1 a node with FORWARD policy DROP (what
// Docker sets) and sends NodePort, LoadBalancer and externalIP traffic from
// the client through node1 to endpoints on node2 only: it must flow, as
// under kube-proxy's iptables mode (KUBE-FORWARD accepts traffic marked for
// masquerading and established flows).
func testForwardPolicyDrop(t *testing.T, e *env) {
	n := e.c.Nodes[0]
	if out, err := runIn(n.Netns, "iptables", "-P", "FORWARD", "DROP"); err != nil {
		t.Fatalf("set FORWARD policy DROP on %s: %v: %s", n.Name, err, out)
	}
	t.Cleanup(func() {
		if out, err := runIn(n.Netns, "iptables", "-P", "FORWARD", "ACCEPT"); err != nil {
			t.Errorf("restore FORWARD policy on %s: %v: %s", n.Name, err, out)
		}
	})
	client := e.c.ClientOrigin()
	np := e.simpleService(t, "fwd-np", corev1.ServiceTypeNodePort, "node2-a")
	e.reachesOnly(t, client, "tcp", nodePort(t, np, n, 0), "node2-a")

	lbIP, extIP := netip.MustParseAddr("192.168.78.30"), netip.MustParseAddr("192.168.78.31")
	s := newService("fwd-lb", corev1.ServiceTypeLoadBalancer, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	s.Spec.ExternalIPs = []string{extIP.String()}
	e.service(t, s)
	e.slice(t, tcpSlice("fwd-lb", "fwd-lb-1", e.ready("node2-b")...))
	e.updateStatus(t, "fwd-lb", lbIP)
	e.reachesOnly(t, client, "tcp", netip.AddrPortFrom(lbIP, 80), "node2-b")
	e.reachesOnly(t, client, "tcp", netip.AddrPortFrom(extIP, 80), "node2-b")
}
