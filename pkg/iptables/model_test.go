package iptables

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/svcnat/svcnat/pkg/model"
)

// TestTraceFromKubernetesObjects builds the state with model.Build from a
// Service and an EndpointSlice, so that the rules follow the model's
// endpoint choice: with externalTrafficPolicy Local and the only local
// endpoint terminating (but serving), outside traffic falls back to it,
// while internal traffic uses the ready endpoint elsewhere.
func TestTraceFromKubernetesObjects(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "cart"},
		Spec: corev1.ServiceSpec{
			Type:                  corev1.ServiceTypeLoadBalancer,
			ClusterIP:             "10.96.5.5",
			ClusterIPs:            []string{"10.96.5.5"},
			IPFamilies:            []corev1.IPFamily{corev1.IPv4Protocol},
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
			HealthCheckNodePort:   32555,
			Ports: []corev1.ServicePort{{
				Name: "http", Protocol: corev1.ProtocolTCP, Port: 80,
				TargetPort: intstr.FromInt32(8080), NodePort: 31555,
			}},
		},
		Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{
			Ingress: []corev1.LoadBalancerIngress{{IP: "203.0.113.55"}},
		}},
	}
	yes, no := true, false
	here, there := "node1", "node2"
	port, proto, name := int32(8080), corev1.ProtocolTCP, "http"
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "shop", Name: "cart-1", Labels: map[string]string{discoveryv1.LabelServiceName: "cart"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.1.50"}, NodeName: &here,
				Conditions: discoveryv1.EndpointConditions{Ready: &no, Serving: &yes, Terminating: &yes}},
			{Addresses: []string{"10.244.2.50"}, NodeName: &there,
				Conditions: discoveryv1.EndpointConditions{Ready: &yes, Serving: &yes, Terminating: &no}},
		},
	}
	cfg := &model.Config{
		NodeName:      here,
		NodeAddresses: []netip.Addr{netip.MustParseAddr(node)},
		ClusterCIDRs:  []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
	}
	s, errs := model.Build(cfg, []*corev1.Service{svc}, []*discoveryv1.EndpointSlice{slice})
	if len(errs) > 0 {
		t.Fatalf("build: %v", errs)
	}
	tr := newTracer(t, s, model.IPv4, node)
	expectOutcomes(t, tr, pkt(fromOutside, outside, "203.0.113.55", 80, model.TCP), to("10.244.1.50:8080", 1, false))
	expectOutcomes(t, tr, pkt(fromOutside, outside, node, 31555, model.TCP), to("10.244.1.50:8080", 1, false))
	expectOutcomes(t, tr, pkt(fromPod, remote, "10.96.5.5", 80, model.TCP), to("10.244.2.50:8080", 1, false))
	expectOutcomes(t, tr, pkt(fromPod, remote, node, 31555, model.TCP), to("10.244.2.50:8080", 1, false))
	expectOutcomes(t, tr, pkt(fromOutside, outside, node, 32555, model.TCP), untouchedAccepted)
	// And the rules read back as the state they came from.
	got := roundTrip(t, s)
	if d := model.Diff(s, got); len(d) > 0 {
		t.Errorf("round trip of a built state: %v", d)
	}
}
