//go:build linux && e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/svcnat/svcnat/test/testbed"
)

// testHostileObjects creates objects the apiserver accepts but that are
// odd, among valid ones, and checks that every valid Service (including one
// created after them) carries traffic, and that an externalIP on another
// Service's ClusterIP and port does not take that ClusterIP's traffic.
// kube-proxy lets the externalIP win (CVE-2020-8554); its outcome is
// logged, not required.
func testHostileObjects(t *testing.T, e *env) {
	from := e.pod("node1-c").Origin()

	// A port name of the longest valid length (63) and a multi-port
	// Service using every protocol.
	long := strings.Repeat("p", 63)
	longSvc := e.service(t, newService("hostile-long-port-name", corev1.ServiceTypeClusterIP,
		svcPort(long, corev1.ProtocolTCP, 80, tcpA),
		svcPort("udp", corev1.ProtocolUDP, 53, udpA),
		svcPort("sctp", corev1.ProtocolSCTP, 9999, tcpA)))
	e.slice(t, testbed.EndpointSlice(ns, longSvc.Name, "long-1", []discoveryv1.EndpointPort{
		testbed.SlicePort(long, corev1.ProtocolTCP, tcpA),
		testbed.SlicePort("udp", corev1.ProtocolUDP, udpA),
		testbed.SlicePort("sctp", corev1.ProtocolSCTP, tcpA),
	}, e.ready("node1-a", "node2-a")...))

	// The victim's ClusterIP and port claimed by the thief's externalIP.
	victim := e.simpleService(t, "hostile-victim", corev1.ServiceTypeClusterIP, "node1-b")
	thief := newService("hostile-thief", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	thief.Spec.ExternalIPs = []string{victim.Spec.ClusterIP}
	e.service(t, thief)
	e.slice(t, tcpSlice("hostile-thief", "hostile-thief-1", e.ready("node2-b")...))

	// Odd but accepted EndpointSlices and Services.
	fqdn := testbed.EndpointSlice(ns, victim.Name, "hostile-fqdn", []discoveryv1.EndpointPort{testbed.SlicePort("", corev1.ProtocolTCP, tcpA)},
		discoveryv1.Endpoint{Addresses: []string{"evil.example.com"}})
	fqdn.AddressType = discoveryv1.AddressTypeFQDN
	e.slice(t, fqdn)
	unlabelled := tcpSlice(victim.Name, "hostile-unlabelled", e.ready("node2-c")...)
	delete(unlabelled.Labels, discoveryv1.LabelServiceName)
	e.slice(t, unlabelled)
	e.slice(t, testbed.EndpointSlice(ns, victim.Name, "hostile-wrong-port", []discoveryv1.EndpointPort{testbed.SlicePort("nope", corev1.ProtocolTCP, tcpB)}, e.ready("node2-c")...))
	dup := e.ready("node1-b", "node1-b")
	e.slice(t, tcpSlice(victim.Name, "hostile-dup", dup...))
	lb := newService("hostile-lb", corev1.ServiceTypeLoadBalancer, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	lb.Spec.LoadBalancerSourceRanges = []string{"0.0.0.0/0"}
	lb.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	lb.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: new(int32(86400))}}
	e.service(t, lb)
	e.setIngress(t, "hostile-lb", []corev1.LoadBalancerIngress{
		{Hostname: "lb.example.com"},
		{IP: "192.168.78.50", IPMode: new(corev1.LoadBalancerIPModeProxy)},
	})
	e.service(t, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "hostile-externalname"},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"},
	})
	high := e.service(t, newService("hostile-high-ports", corev1.ServiceTypeNodePort, svcPort("", corev1.ProtocolTCP, 65535, tcpA)))
	e.slice(t, tcpSlice(high.Name, "hostile-high-1", e.ready("node2-a")...))

	// A Service created after all of them must work too.
	after := e.simpleService(t, "hostile-after", corev1.ServiceTypeClusterIP, "node2-c")
	e.reachesOnly(t, from, "tcp", clusterIP(t, after, 80), "node2-c")
	e.reachesOnly(t, from, "tcp", clusterIP(t, longSvc, 80), "node1-a", "node2-a")
	e.reachesOnly(t, from, "udp", clusterIP(t, longSvc, 53), "node1-a", "node2-a")
	e.reachesOnly(t, from, "tcp", clusterIP(t, high, 65535), "node2-a")
	e.reachesOnly(t, e.c.ClientOrigin(), "tcp", nodePort(t, high, e.c.Nodes[0], 0), "node2-a")

	victimAddr := clusterIP(t, victim, 80)
	if !e.kind.IsSvcnat() {
		seen, err := e.answers(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: victimAddr, N: 40}, "node1-b", "node2-b")
		t.Logf("%s: the victim's ClusterIP %s answered by %v (err %v); the thief's externalIP may take it (CVE-2020-8554)", e.kind, victimAddr, seen, err)
		return
	}
	e.reachesOnly(t, from, "tcp", victimAddr, "node1-b")
	for _, n := range e.c.Nodes {
		out, err := n.Proxy.Dump(t.Context(), "--check")
		if err != nil {
			t.Fatalf("svcnat dump --check on %s: %v\n%s", n.Name, err, out)
		}
		if want := fmt.Sprintf("ExternalIP %s/TCP is also the ClusterIP of service port %s/hostile-victim", victimAddr, ns); !strings.Contains(out, want) {
			t.Errorf("dump --check on %s does not report the conflict (%q):\n%s", n.Name, want, out)
		}
	}
}

// setIngress sets a LoadBalancer Service's status.loadBalancer.ingress.
func (e *env) setIngress(t *testing.T, name string, ingress []corev1.LoadBalancerIngress) {
	t.Helper()
	svc, err := e.c.Kube.CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get service %s: %v", name, err)
	}
	svc.Status.LoadBalancer.Ingress = ingress
	if _, err := e.c.Kube.CoreV1().Services(ns).UpdateStatus(t.Context(), svc, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("set load balancer status of %s: %v", name, err)
	}
}
