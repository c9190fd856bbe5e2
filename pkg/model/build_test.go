package model

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestBuildClusterIP(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  "10.96.0.10",
			ClusterIPs: []string{"10.96.0.10"},
			Ports:      []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}},
		},
	}
	name, port, proto := "http", int32(8080), corev1.ProtocolTCP
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: "web-abc", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.1.5"}},
			{Addresses: []string{"10.244.1.4"}},
		},
	}
	s, errs := Build(&Config{NodeName: "node1"}, []*corev1.Service{svc}, []*discoveryv1.EndpointSlice{es})
	if len(errs) > 0 {
		t.Fatalf("Build: %v", errs)
	}
	want := &ServicePort{
		Name:      ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: IPv4},
		Protocol:  TCP,
		Frontends: []Frontend{{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.10"), Port: 80}},
		ClusterEndpoints: []Endpoint{
			{IP: netip.MustParseAddr("10.244.1.4"), Port: 8080},
			{IP: netip.MustParseAddr("10.244.1.5"), Port: 8080},
		},
	}
	got := s.ServicePorts[want.Name]
	if got == nil || !got.Equal(want) || len(s.ServicePorts) != 1 {
		t.Errorf("Build: got %+v, want %+v", s.Sorted(), want)
	}
}
