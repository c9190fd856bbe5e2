package model

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// Tests for where svcnat follows kube-proxy v1.37.2 (review
// kube-proxy-parity-2026-11-30).

var web4 = ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: IPv4}

// A reused Pod IP: the old Pod terminates (still serving), the new one is
// not ready yet. kube-proxy keeps the non-terminating copy
// (endpointslicecache.go), so the address is not usable (finding 10).
func TestDuplicatePrefersNonTerminating(t *testing.T) {
	svc := service("default", "web", "10.96.0.10")
	old := slice("default", "web", "web-a", endpoint{ip: "10.244.1.5", notReady: true, terminating: true})
	reused := slice("default", "web", "web-b", endpoint{ip: "10.244.1.5", notReady: true})
	for _, order := range [][]*discoveryv1.EndpointSlice{{old, reused}, {reused, old}} {
		s, errs := Build(&Config{}, []*corev1.Service{svc}, order)
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		sp := s.ServicePorts[web4]
		if len(sp.ClusterEndpoints) != 0 || sp.NoEndpoints() != Reject {
			t.Errorf("cluster endpoints %v, want none (the not-ready new Pod wins over the terminating one)", sp.ClusterEndpoints)
		}
	}
}

func nodePortService() *corev1.Service {
	svc := service("default", "web", "10.96.0.10", "fd00::10")
	svc.Spec.Type = corev1.ServiceTypeNodePort
	svc.Spec.Ports[0].NodePort = 30080
	return svc
}

func nodePortIPs(s *State) []string {
	var out []string
	for _, sp := range s.Sorted() {
		for _, f := range sp.Frontends {
			if f.Kind == NodePort {
				out = append(out, f.IP.String())
			}
		}
	}
	return out
}

// --nodeport-addresses is per family, and "primary" means the Node's
// primary addresses (finding 7).
func TestNodePortAddressesPerFamily(t *testing.T) {
	addrs := []netip.Addr{netip.MustParseAddr("192.168.1.2"), netip.MustParseAddr("10.0.0.2"),
		netip.MustParseAddr("2001:db8::2"), netip.MustParseAddr("fd01::2")}
	pp := func(s ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, x := range s {
			out = append(out, netip.MustParsePrefix(x))
		}
		return out
	}
	node := &corev1.Node{Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
		{Type: corev1.NodeHostName, Address: "node1"},
		{Type: corev1.NodeExternalIP, Address: "192.168.1.2"},
		{Type: corev1.NodeInternalIP, Address: "10.0.0.2"},
		{Type: corev1.NodeInternalIP, Address: "10.0.0.3"},
		{Type: corev1.NodeExternalIP, Address: "2001:db8::2"},
	}}}
	tests := []struct {
		name    string
		cfg     Config
		want    []string
		primary []string
	}{
		{"none listed", Config{}, []string{"10.0.0.2", "192.168.1.2", "2001:db8::2", "fd01::2"}, nil},
		{"IPv4 listed keeps every IPv6", Config{NodePortAddresses: pp("192.168.0.0/16")}, []string{"192.168.1.2", "2001:db8::2", "fd01::2"}, nil},
		{"both listed", Config{NodePortAddresses: pp("10.0.0.0/8", "fd01::/16")}, []string{"10.0.0.2", "fd01::2"}, nil},
		{"primary", Config{NodePortPrimary: true}, []string{"10.0.0.2", "2001:db8::2"}, []string{"10.0.0.2", "2001:db8::2"}},
		{"primary and a CIDR", Config{NodePortPrimary: true, NodePortAddresses: pp("fd01::/16")}, []string{"10.0.0.2", "2001:db8::2", "fd01::2"}, []string{"10.0.0.2", "2001:db8::2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.NodeAddresses = addrs
			if cfg.NodePortPrimary {
				cfg.PrimaryAddresses = PrimaryAddresses(node)
				var got []string
				for _, a := range cfg.PrimaryAddresses {
					got = append(got, a.String())
				}
				if !slices.Equal(got, tt.primary) {
					t.Errorf("primary addresses %v, want %v", got, tt.primary)
				}
			}
			s, errs := Build(&cfg, []*corev1.Service{nodePortService()}, nil)
			if len(errs) > 0 {
				t.Fatal(errs)
			}
			if got := nodePortIPs(s); !slices.Equal(got, tt.want) {
				t.Errorf("NodePorts on %v, want %v", got, tt.want)
			}
		})
	}
}

// With a source range holding a node address, the LoadBalancer VIPs are
// allowed as sources too (kube-proxy iptables.go "allowFromNode", finding 6).
func TestSourceRangesAllowNode(t *testing.T) {
	svc := service("default", "web", "10.96.0.10")
	svc.Spec.Type = corev1.ServiceTypeLoadBalancer
	svc.Spec.Ports[0].NodePort = 30080
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "203.0.113.7"}}
	for _, tt := range []struct {
		ranges []string
		want   []string
	}{
		{[]string{"192.168.0.0/16"}, []string{"192.168.0.0/16", "203.0.113.7/32"}},
		{[]string{"172.16.0.0/12"}, []string{"172.16.0.0/12"}},
		{[]string{"0.0.0.0/0"}, nil},
	} {
		svc.Spec.LoadBalancerSourceRanges = tt.ranges
		s, errs := Build(&Config{NodeAddresses: []netip.Addr{netip.MustParseAddr("192.168.1.2")}}, []*corev1.Service{svc}, nil)
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		var got []string
		for _, p := range s.ServicePorts[web4].SourceRanges {
			got = append(got, p.String())
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("ranges %v: source ranges %v, want %v", tt.ranges, got, tt.want)
		}
	}
}

// The health check counts only ready local endpoints (finding 1), and
// conntrack keeps every serving endpoint (finding 2), whatever topology,
// traffic policy and the terminating fallback choose.
func TestAgentOnlySets(t *testing.T) {
	svc := service("default", "web", "10.96.0.10")
	svc.Spec.Type = corev1.ServiceTypeLoadBalancer
	svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	svc.Spec.HealthCheckNodePort = 32000
	svc.Spec.Ports[0].NodePort = 30080
	svc.Spec.Ports[0].Protocol = corev1.ProtocolUDP
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "203.0.113.7"}}
	es := slice("default", "web", "web-a",
		endpoint{ip: "10.244.1.1", node: "node1", notReady: true, terminating: true}, // local, draining
		endpoint{ip: "10.244.2.1", node: "node2"},                                    // remote, ready
		endpoint{ip: "10.244.2.2", node: "node2", notReady: true, terminating: true}, // remote, draining
		endpoint{ip: "10.244.2.3", node: "node2", notReady: true},                    // serving false below
	)
	udp := corev1.ProtocolUDP
	es.Ports[0].Protocol = &udp
	f := false
	es.Endpoints[3].Conditions.Serving = &f
	s, errs := Build(&Config{NodeName: "node1"}, []*corev1.Service{svc}, []*discoveryv1.EndpointSlice{es})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	sp := s.ServicePorts[web4]
	if !slices.Equal(sp.LocalEndpoints, eps("10.244.1.1L")) {
		t.Errorf("local endpoints %v: want the terminating fallback", sp.LocalEndpoints)
	}
	if len(sp.LocalReadyEndpoints) != 0 {
		t.Errorf("local ready endpoints %v, want none (only a terminating one is local)", sp.LocalReadyEndpoints)
	}
	if want := eps("10.244.1.1L", "10.244.2.1", "10.244.2.2"); !slices.Equal(sp.ServingEndpoints, want) {
		t.Errorf("serving endpoints %v, want %v", sp.ServingEndpoints, want)
	}
	es.Endpoints[0].Conditions = discoveryv1.EndpointConditions{}
	s, _ = Build(&Config{NodeName: "node1"}, []*corev1.Service{svc}, []*discoveryv1.EndpointSlice{es})
	if got := s.ServicePorts[web4].LocalReadyEndpoints; !slices.Equal(got, eps("10.244.1.1L")) {
		t.Errorf("local ready endpoints %v, want the ready local one", got)
	}
}

func TestInvalidErrorIsTyped(t *testing.T) {
	svc := service("bad", "svc", "10.96.0.1")
	svc.Spec.Ports[0].Port = 0
	es := slice("bad", "svc", "svc-1", endpoint{ip: "10.1"})
	_, errs := Build(&Config{}, []*corev1.Service{svc}, []*discoveryv1.EndpointSlice{es})
	var kinds []string
	for _, err := range errs {
		var ie *InvalidError
		if !errors.As(err, &ie) {
			t.Fatalf("error %v is not an InvalidError", err)
		}
		kinds = append(kinds, ie.Kind+" "+ie.Namespace+"/"+ie.Name)
	}
	if want := []string{"EndpointSlice bad/svc-1", "Service bad/svc"}; !slices.Equal(kinds, want) {
		t.Errorf("kinds %v, want %v", kinds, want)
	}
}
