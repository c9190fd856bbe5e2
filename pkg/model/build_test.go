package model

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/svcnat/svcnat/internal/memtest"
)

// service returns a ClusterIP Service with one TCP port named http.
func service(ns, name string, clusterIPs ...string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  clusterIPs[0],
			ClusterIPs: clusterIPs,
			Ports:      []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}},
		},
	}
}

// endpoint is an EndpointSlice endpoint for the tests: ready unless told.
type endpoint struct {
	ip, node              string
	notReady, terminating bool
}

// slice returns an IPv4 EndpointSlice of Service ns/svc with port http 8080.
func slice(ns, svc, name string, eps ...endpoint) *discoveryv1.EndpointSlice {
	port, portName, proto := int32(8080), "http", corev1.ProtocolTCP
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Port: &port, Protocol: &proto}},
	}
	for _, e := range eps {
		ready, serving, terminating := !e.notReady, true, e.terminating
		ep := discoveryv1.Endpoint{
			Addresses:  []string{e.ip},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating},
		}
		if e.node != "" {
			ep.NodeName = &e.node
		}
		es.Endpoints = append(es.Endpoints, ep)
	}
	return es
}

func eps(s ...string) []Endpoint {
	var out []Endpoint
	for _, x := range s {
		local := strings.HasSuffix(x, "L")
		out = append(out, Endpoint{IP: netip.MustParseAddr(strings.TrimSuffix(x, "L")), Port: 8080, Local: local})
	}
	return out
}

func TestBuildClusterIP(t *testing.T) {
	svc := service("default", "web", "10.96.0.10")
	es := slice("default", "web", "web-abc", endpoint{ip: "10.244.1.5"}, endpoint{ip: "10.244.1.4", node: "node1"})
	s, errs := Build(&Config{NodeName: "node1"}, []*corev1.Service{svc}, []*discoveryv1.EndpointSlice{es})
	if len(errs) > 0 {
		t.Fatalf("Build: %v", errs)
	}
	want := &ServicePort{
		Name:             ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: IPv4},
		Protocol:         TCP,
		Frontends:        []Frontend{{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.10"), Port: 80}},
		ClusterEndpoints: eps("10.244.1.4L", "10.244.1.5"),
	}
	got := s.ServicePorts[want.Name]
	if got == nil || !got.Equal(want) || len(s.ServicePorts) != 1 {
		t.Errorf("Build: got %v, want %+v", Diff(&State{ServicePorts: map[ServicePortName]*ServicePort{want.Name: want}}, s), want)
	}
}

// TestTrafficPolicies checks which endpoints each kind of traffic reaches and
// what happens without one, through the ServicePort methods backends use.
func TestTrafficPolicies(t *testing.T) {
	local := corev1.ServiceInternalTrafficPolicyLocal
	tests := []struct {
		name      string
		internal  bool // internalTrafficPolicy Local
		external  bool // type NodePort, externalTrafficPolicy Local
		endpoints []endpoint
		// Expected results.
		internalEPs, externalEPs, cluster []Endpoint
		noEndpoints                       NoEndpointsAction
	}{{
		name:        "cluster policies",
		endpoints:   []endpoint{{ip: "10.244.1.1", node: "node1"}, {ip: "10.244.2.1", node: "node2"}},
		internalEPs: eps("10.244.1.1L", "10.244.2.1"),
		cluster:     eps("10.244.1.1L", "10.244.2.1"),
		noEndpoints: Drop, // never applies: the set is not empty
	}, {
		name:        "no endpoints at all rejects",
		noEndpoints: Reject,
	}, {
		name:        "only unready endpoints reject",
		endpoints:   []endpoint{{ip: "10.244.1.1", notReady: true}},
		noEndpoints: Reject,
	}, {
		name:        "internal local with a local endpoint",
		internal:    true,
		endpoints:   []endpoint{{ip: "10.244.1.1", node: "node1"}, {ip: "10.244.2.1", node: "node2"}},
		internalEPs: eps("10.244.1.1L"),
		noEndpoints: Reject, // ClusterEndpoints unused and empty; the set is not empty
	}, {
		name:        "internal local with only remote endpoints drops",
		internal:    true,
		endpoints:   []endpoint{{ip: "10.244.2.1", node: "node2"}},
		cluster:     eps("10.244.2.1"),
		noEndpoints: Drop,
	}, {
		name:        "internal local with a serving terminating local endpoint",
		internal:    true,
		endpoints:   []endpoint{{ip: "10.244.1.1", node: "node1", notReady: true, terminating: true}, {ip: "10.244.2.1", node: "node2"}},
		internalEPs: eps("10.244.1.1L"),
		noEndpoints: Reject,
	}, {
		name:        "internal local with no usable endpoint rejects",
		internal:    true,
		endpoints:   []endpoint{{ip: "10.244.1.1", node: "node1", notReady: true}},
		noEndpoints: Reject,
	}, {
		name:        "external local",
		external:    true,
		endpoints:   []endpoint{{ip: "10.244.1.1", node: "node1"}, {ip: "10.244.2.1", node: "node2"}},
		internalEPs: eps("10.244.1.1L", "10.244.2.1"),
		externalEPs: eps("10.244.1.1L"),
		cluster:     eps("10.244.1.1L", "10.244.2.1"),
		noEndpoints: Drop,
	}, {
		name:        "external local with only remote endpoints drops",
		external:    true,
		endpoints:   []endpoint{{ip: "10.244.2.1", node: "node2"}},
		internalEPs: eps("10.244.2.1"),
		cluster:     eps("10.244.2.1"),
		noEndpoints: Drop,
	}, {
		name:        "both local",
		internal:    true,
		external:    true,
		endpoints:   []endpoint{{ip: "10.244.1.1", node: "node1"}, {ip: "10.244.2.1", node: "node2"}},
		internalEPs: eps("10.244.1.1L"),
		externalEPs: eps("10.244.1.1L"),
		cluster:     eps("10.244.1.1L", "10.244.2.1"),
		noEndpoints: Drop,
	}, {
		name:        "local terminating used only when no local is ready",
		external:    true,
		endpoints:   []endpoint{{ip: "10.244.1.1", node: "node1"}, {ip: "10.244.1.2", node: "node1", notReady: true, terminating: true}},
		internalEPs: eps("10.244.1.1L"),
		externalEPs: eps("10.244.1.1L"),
		cluster:     eps("10.244.1.1L"),
		noEndpoints: Drop,
	}}
	cfg := &Config{NodeName: "node1", NodeAddresses: []netip.Addr{netip.MustParseAddr("192.168.1.2")}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svc := service("default", "web", "10.96.0.10")
			if tt.internal {
				svc.Spec.InternalTrafficPolicy = &local
			}
			if tt.external {
				svc.Spec.Type = corev1.ServiceTypeNodePort
				svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
				svc.Spec.Ports[0].NodePort = 30080
			}
			sps, errs := BuildService(cfg, svc, []*discoveryv1.EndpointSlice{slice("default", "web", "web-1", tt.endpoints...)})
			if len(errs) > 0 || len(sps) != 1 {
				t.Fatalf("BuildService: %d ports, errors %v", len(sps), errs)
			}
			sp := sps[0]
			if got := sp.InternalEndpoints(); !slices.Equal(got, tt.internalEPs) {
				t.Errorf("InternalEndpoints() = %v, want %v", got, tt.internalEPs)
			}
			if tt.external {
				if got := sp.ExternalEndpoints(); !slices.Equal(got, tt.externalEPs) {
					t.Errorf("ExternalEndpoints() = %v, want %v", got, tt.externalEPs)
				}
			}
			if !slices.Equal(sp.ClusterEndpoints, tt.cluster) {
				t.Errorf("ClusterEndpoints = %v, want %v", sp.ClusterEndpoints, tt.cluster)
			}
			if got := sp.NoEndpoints(); got != tt.noEndpoints {
				t.Errorf("NoEndpoints() = %s, want %s", got, tt.noEndpoints)
			}
			if sp.InternalTrafficLocal != tt.internal || sp.ExternalTrafficLocal != tt.external {
				t.Errorf("InternalTrafficLocal, ExternalTrafficLocal = %t, %t, want %t, %t",
					sp.InternalTrafficLocal, sp.ExternalTrafficLocal, tt.internal, tt.external)
			}
			if !tt.internal && !tt.external && sp.LocalEndpoints != nil {
				t.Errorf("LocalEndpoints = %v without a Local policy", sp.LocalEndpoints)
			}
		})
	}
}

// TestInvalidObjects checks that each invalid object yields an error naming
// it and the field, and that the valid Service next to it is still built.
func TestInvalidObjects(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*corev1.Service, *discoveryv1.EndpointSlice)
		wantErr string
		ports   int // ServicePorts of bad/svc still built
	}{
		{"bad cluster IP", func(s *corev1.Service, _ *discoveryv1.EndpointSlice) { s.Spec.ClusterIPs = []string{"10.96.0.300"} },
			"service bad/svc: spec.clusterIPs[0]", 0},
		{"port 0", func(s *corev1.Service, _ *discoveryv1.EndpointSlice) { s.Spec.Ports[0].Port = 0 },
			"service bad/svc: spec.ports[0].port 0", 0},
		{"port too big", func(s *corev1.Service, _ *discoveryv1.EndpointSlice) { s.Spec.Ports[0].Port = 65536 },
			"service bad/svc: spec.ports[0].port 65536", 0},
		{"unknown protocol", func(s *corev1.Service, _ *discoveryv1.EndpointSlice) { s.Spec.Ports[0].Protocol = "ICMP" },
			`service bad/svc: spec.ports[0].protocol: unknown protocol "ICMP"`, 0},
		{"bad external IP", func(s *corev1.Service, _ *discoveryv1.EndpointSlice) { s.Spec.ExternalIPs = []string{"x"} },
			"service bad/svc: spec.externalIPs[0]", 1},
		{"bad source range", func(s *corev1.Service, _ *discoveryv1.EndpointSlice) {
			s.Spec.Type = corev1.ServiceTypeLoadBalancer
			s.Spec.LoadBalancerSourceRanges = []string{"10.0.0.0/40"}
		}, "service bad/svc: spec.loadBalancerSourceRanges[0]", 1},
		{"slice without label", func(_ *corev1.Service, es *discoveryv1.EndpointSlice) { es.Labels = nil },
			"endpointslice bad/svc-1: no kubernetes.io/service-name label", 1},
		{"bad endpoint address", func(_ *corev1.Service, es *discoveryv1.EndpointSlice) { es.Endpoints[0].Addresses[0] = "10.1" },
			"endpointslice bad/svc-1: endpoints[0].addresses[0]", 1},
		{"bad endpoint port", func(_ *corev1.Service, es *discoveryv1.EndpointSlice) { es.Ports[0].Port = nil },
			"endpointslice bad/svc-1: ports[0].port nil", 1},
		{"unknown address type", func(_ *corev1.Service, es *discoveryv1.EndpointSlice) { es.AddressType = "IPv5" },
			`endpointslice bad/svc-1: addressType "IPv5"`, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad, badSlice := service("bad", "svc", "10.96.0.1"), slice("bad", "svc", "svc-1", endpoint{ip: "10.244.1.1"})
			tt.mutate(bad, badSlice)
			good, goodSlice := service("good", "svc", "10.96.0.2"), slice("good", "svc", "svc-1", endpoint{ip: "10.244.2.1"})
			s, errs := Build(&Config{}, []*corev1.Service{bad, good}, []*discoveryv1.EndpointSlice{badSlice, goodSlice})
			if len(errs) != 1 || !strings.HasPrefix(errs[0].Error(), tt.wantErr) {
				t.Errorf("errors %q, want one starting with %q", errs, tt.wantErr)
			}
			n := 0
			for name := range s.ServicePorts {
				if name.Namespace == "bad" {
					n++
				}
			}
			if n != tt.ports {
				t.Errorf("%d ServicePorts of bad/svc built, want %d", n, tt.ports)
			}
			g := s.ServicePorts[ServicePortName{Namespace: "good", Name: "svc", Port: "http", Family: IPv4}]
			if g == nil || !slices.Equal(g.ClusterEndpoints, eps("10.244.2.1")) {
				t.Errorf("good/svc not built right: %+v", g)
			}
		})
	}
}

// TestBuildServiceForeignSlices checks that BuildService uses only the
// Service's own slices, whatever it is given.
func TestBuildServiceForeignSlices(t *testing.T) {
	svc := service("default", "web", "10.96.0.10")
	sps, errs := BuildService(nil, svc, []*discoveryv1.EndpointSlice{
		slice("default", "web", "web-1", endpoint{ip: "10.244.0.1"}),
		slice("other", "web", "web-2", endpoint{ip: "10.244.0.2"}),
		slice("default", "api", "api-1", endpoint{ip: "10.244.0.3"}),
		nil,
	})
	if len(errs) > 0 || len(sps) != 1 || !slices.Equal(sps[0].ClusterEndpoints, eps("10.244.0.1")) {
		t.Errorf("BuildService = %v, %v; want one port with endpoint 10.244.0.1", sps, errs)
	}
}

// TestBuildDuplicateService checks that two Services with one name build
// once, with an error, whichever comes first in the input.
func TestBuildDuplicateService(t *testing.T) {
	a, b := service("default", "web", "10.96.0.10"), service("default", "web", "10.96.0.11")
	s1, errs1 := Build(nil, []*corev1.Service{a, b}, nil)
	s2, errs2 := Build(nil, []*corev1.Service{b, a}, nil)
	if len(errs1) != 1 || len(errs2) != 1 || !strings.Contains(errs1[0].Error(), "default/web") {
		t.Errorf("errors %v and %v, want one naming default/web each", errs1, errs2)
	}
	if len(s1.ServicePorts) != 1 || len(s2.ServicePorts) != 1 {
		t.Errorf("ServicePorts %v and %v, want one each", s1.Sorted(), s2.Sorted())
	}
}

// manyServices returns n Services with m endpoints each (one slice per
// Service, half of the endpoints local to node1), in random order.
func manyServices(n, m int, rng *rand.Rand) ([]*corev1.Service, []*discoveryv1.EndpointSlice) {
	svcs := make([]*corev1.Service, 0, n)
	ess := make([]*discoveryv1.EndpointSlice, 0, n)
	for i := range n {
		name := fmt.Sprintf("svc-%05d", i)
		svc := service(fmt.Sprintf("ns-%d", i%50), name, fmt.Sprintf("10.96.%d.%d", i/256, i%256))
		svc.Spec.Type = corev1.ServiceTypeNodePort
		svc.Spec.Ports[0].NodePort = int32(30000 + i%2768)
		var list []endpoint
		for j := range m {
			node := "node2"
			if j%2 == 0 {
				node = "node1"
			}
			list = append(list, endpoint{ip: fmt.Sprintf("10.%d.%d.%d", 100+j, i/256, i%256), node: node})
		}
		svcs = append(svcs, svc)
		ess = append(ess, slice(svc.Namespace, name, name+"-abcde", list...))
	}
	rng.Shuffle(len(svcs), func(i, j int) { svcs[i], svcs[j] = svcs[j], svcs[i] })
	rng.Shuffle(len(ess), func(i, j int) { ess[i], ess[j] = ess[j], ess[i] })
	return svcs, ess
}

// TestBuildOrderIndependent checks that the input order does not change the
// State, down to its JSON bytes.
func TestBuildOrderIndependent(t *testing.T) {
	cfg := &Config{NodeName: "node1", NodeAddresses: []netip.Addr{netip.MustParseAddr("192.168.1.2")}}
	rng := rand.New(rand.NewPCG(1, 2))
	svcs, ess := manyServices(300, 5, rng)
	s1, errs := Build(cfg, svcs, ess)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	rng.Shuffle(len(svcs), func(i, j int) { svcs[i], svcs[j] = svcs[j], svcs[i] })
	slices.Reverse(ess)
	s2, _ := Build(cfg, svcs, ess)
	j1, _ := json.Marshal(s1)
	j2, _ := json.Marshal(s2)
	if string(j1) != string(j2) || len(s1.ServicePorts) != 300 {
		t.Errorf("Build depends on input order (%d ServicePorts): %v", len(s1.ServicePorts), Diff(s1, s2))
	}
}

// TestBuildThousandsOfEndpoints builds one Service with 5,000 endpoints in
// 50 slices, every tenth of them also in a second slice, unready there.
func TestBuildThousandsOfEndpoints(t *testing.T) {
	svc := service("default", "big", "10.96.0.10")
	var ess []*discoveryv1.EndpointSlice
	var want []Endpoint
	for s := range 50 {
		var list []endpoint
		for j := range 100 {
			ip := fmt.Sprintf("10.244.%d.%d", s, j)
			list = append(list, endpoint{ip: ip, node: fmt.Sprintf("node%d", j%3)})
			want = append(want, Endpoint{IP: netip.MustParseAddr(ip), Port: 8080, Local: j%3 == 1})
		}
		ess = append(ess, slice("default", "big", fmt.Sprintf("big-%02d", s), list...))
		var dups []endpoint
		for j := 0; j < 100; j += 10 {
			dups = append(dups, endpoint{ip: fmt.Sprintf("10.244.%d.%d", s, j), notReady: true, terminating: true})
		}
		ess = append(ess, slice("default", "big", fmt.Sprintf("big-%02d-dup", s), dups...))
	}
	slices.SortFunc(want, Endpoint.Compare)
	sps, errs := BuildService(&Config{NodeName: "node1"}, svc, ess)
	if len(errs) > 0 || len(sps) != 1 {
		t.Fatalf("BuildService: %d ports, %v", len(sps), errs)
	}
	if got := sps[0].ClusterEndpoints; !slices.Equal(got, want) {
		t.Errorf("ClusterEndpoints: %d endpoints, want %d; diff %v", len(got), len(want),
			diffEndpoints("endpoint", want, got))
	}
}

// BenchmarkBuild10k builds 10,000 ClusterIP Services of 10 endpoints (as
// make bench has them), and reports the live heap of the State per Service.
func BenchmarkBuild10k(b *testing.B) {
	cfg := &Config{NodeName: "node1", NodeAddresses: []netip.Addr{netip.MustParseAddr("192.168.1.2")}}
	svcs, ess := manyServices(10000, 10, rand.New(rand.NewPCG(1, 2)))
	for _, svc := range svcs {
		// manyServices' NodePorts collide beyond 2,768 Services.
		svc.Spec.Type, svc.Spec.Ports[0].NodePort = corev1.ServiceTypeClusterIP, 0
	}
	b.ReportAllocs()
	var heap uint64
	for b.Loop() {
		heap = memtest.LiveHeap(func() any {
			s, errs := Build(cfg, svcs, ess)
			if len(errs) > 0 || len(s.ServicePorts) != 10000 {
				b.Fatalf("Build: %d ServicePorts, %v", len(s.ServicePorts), errs)
			}
			return s
		})
	}
	b.ReportMetric(float64(heap)/float64(len(svcs)), "heapB/service")
}

// BenchmarkBuildServiceLarge measures one dual-stack NodePort Service with
// 5,000 endpoints per family in 50 slices each: the cost of a rebuild when
// one big Service changes.
func BenchmarkBuildServiceLarge(b *testing.B) {
	cfg := &Config{NodeName: "node1", NodeAddresses: []netip.Addr{netip.MustParseAddr("192.168.1.2"), netip.MustParseAddr("2001:db8::2")}}
	svc := service("default", "big", "10.96.0.10", "fd00::10")
	svc.Spec.Type = corev1.ServiceTypeNodePort
	svc.Spec.Ports[0].NodePort = 30080
	var ess []*discoveryv1.EndpointSlice
	for s := range 50 {
		var v4, v6 []endpoint
		for j := range 100 {
			v4 = append(v4, endpoint{ip: fmt.Sprintf("10.244.%d.%d", s, j), node: fmt.Sprintf("node%d", j%3)})
			v6 = append(v6, endpoint{ip: fmt.Sprintf("fd00:244:%x::%x", s, j), node: fmt.Sprintf("node%d", j%3)})
		}
		ess = append(ess, slice("default", "big", fmt.Sprintf("big-v4-%02d", s), v4...))
		es6 := slice("default", "big", fmt.Sprintf("big-v6-%02d", s), v6...)
		es6.AddressType = discoveryv1.AddressTypeIPv6
		ess = append(ess, es6)
	}
	b.ReportAllocs()
	for b.Loop() {
		sps, errs := BuildService(cfg, svc, ess)
		if len(errs) > 0 || len(sps) != 2 || len(sps[0].ClusterEndpoints) != 5000 || len(sps[1].ClusterEndpoints) != 5000 {
			b.Fatalf("BuildService: %d ports, %v", len(sps), errs)
		}
	}
}

// TestCloneIsDeep checks that changing a clone's slices leaves the original
// alone, which the backends' caches of what they wrote rely on.
func TestCloneIsDeep(t *testing.T) {
	orig := &ServicePort{
		Name:             ServicePortName{Namespace: "ns", Name: "svc", Family: IPv4},
		Frontends:        []Frontend{{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.1"), Port: 80}},
		ClusterEndpoints: []Endpoint{{IP: netip.MustParseAddr("10.244.0.5"), Port: 8080}},
		LocalEndpoints:   []Endpoint{{IP: netip.MustParseAddr("10.244.0.5"), Port: 8080, Local: true}},
		SourceRanges:     []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")},
	}
	c := orig.Clone()
	if !c.Equal(orig) {
		t.Fatalf("clone differs from original: %+v", c)
	}
	c.Frontends[0].Port = 81
	c.ClusterEndpoints[0].Port = 1
	c.LocalEndpoints[0].Port = 1
	c.SourceRanges[0] = netip.MustParsePrefix("198.51.100.0/24")
	if orig.Frontends[0].Port != 80 || orig.ClusterEndpoints[0].Port != 8080 || orig.LocalEndpoints[0].Port != 8080 ||
		orig.SourceRanges[0] != netip.MustParsePrefix("192.0.2.0/24") {
		t.Fatalf("changing the clone changed the original: %+v", orig)
	}
}

// TestEndpointListsCompact checks how a ServicePort holds its endpoints,
// since it lives as long as its Service (BenchmarkBuild10k reports the
// heap): each list in an array of its length, and the serving endpoints
// in the cluster endpoints' array when they are the same.
func TestEndpointListsCompact(t *testing.T) {
	var list []endpoint
	for j := range 10 {
		list = append(list, endpoint{ip: fmt.Sprintf("10.244.0.%d", j+1), node: "node1"})
	}
	for _, c := range []struct {
		name   string
		shared bool
		change func([]endpoint) []endpoint
	}{
		{"all ready", true, func(l []endpoint) []endpoint { return l }},
		{"one not ready", false, func(l []endpoint) []endpoint {
			l = slices.Clone(l)
			l[3].notReady = true
			return l
		}},
	} {
		sps, errs := BuildService(&Config{NodeName: "node1"}, service("default", "web", "10.96.0.10"),
			[]*discoveryv1.EndpointSlice{slice("default", "web", "web-1", c.change(list)...)})
		if len(errs) > 0 || len(sps) != 1 {
			t.Fatalf("%s: BuildService: %d ports, %v", c.name, len(sps), errs)
		}
		sp := sps[0]
		for what, l := range map[string][]Endpoint{"cluster": sp.ClusterEndpoints, "serving": sp.ServingEndpoints} {
			if len(l) == 0 || cap(l) != len(l) {
				t.Errorf("%s: %s endpoints: length %d, capacity %d; want equal, not 0", c.name, what, len(l), cap(l))
			}
		}
		if shared := &sp.ServingEndpoints[0] == &sp.ClusterEndpoints[0]; shared != c.shared {
			t.Errorf("%s: serving endpoints share the cluster endpoints' array: %v, want %v", c.name, shared, c.shared)
		}
	}
}
