package model

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

func TestResolveConflicts(t *testing.T) {
	node := netip.MustParseAddr("192.0.2.1")
	cfg := &Config{NodeName: "n1", NodeAddresses: []netip.Addr{node}}

	// victim owns 10.96.0.10:80 as its ClusterIP; thief lists it as an
	// externalIP (CVE-2020-8554), and also a node address with victim's
	// NodePort; lb's LoadBalancer IP is also claimed by thief.
	victim := service("a", "victim", "10.96.0.10")
	victim.Spec.Type = corev1.ServiceTypeNodePort
	victim.Spec.Ports[0].NodePort = 30080
	lb := service("z", "lb", "10.96.0.30")
	lb.Spec.Type = corev1.ServiceTypeLoadBalancer
	lb.Spec.Ports[0].NodePort = 30081
	lb.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	lb.Spec.LoadBalancerSourceRanges = []string{"198.51.100.0/24"}
	lb.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "203.0.113.7"}}
	thief := service("b", "thief", "10.96.0.20")
	thief.Spec.ExternalIPs = []string{"10.96.0.10", "203.0.113.7", "198.51.100.9"}
	thief.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	// A second port of thief on victim's NodePort, at a node address.
	thief.Spec.ExternalIPs = append(thief.Spec.ExternalIPs, node.String())
	thief.Spec.Ports = append(thief.Spec.Ports, corev1.ServicePort{Name: "np", Port: 30080, Protocol: corev1.ProtocolTCP})
	// Same address and port, other protocol: no conflict.
	udp := service("c", "udp", "10.96.0.40")
	udp.Spec.ExternalIPs = []string{"10.96.0.10"}
	udp.Spec.Ports[0].Protocol = corev1.ProtocolUDP
	// A Service listing its own ClusterIP as an externalIP loses nothing.
	self := service("d", "self", "10.96.0.50")
	self.Spec.ExternalIPs = []string{"10.96.0.50"}

	svcs := []*corev1.Service{victim, lb, thief, udp, self}
	ess := []*discoveryv1.EndpointSlice{slice("b", "thief", "t", endpoint{ip: "10.244.0.9", node: "n1"})}
	st, errs := Build(cfg, svcs, ess)

	var got []string
	for _, err := range errs {
		var ce *ConflictError
		if !errors.As(err, &ce) {
			t.Fatalf("unexpected error %v", err)
		}
		got = append(got, ce.Loser.String()+" "+ce.Lost.String()+" -> "+ce.Winner.String()+" "+string(ce.Won))
	}
	want := []string{
		"b/thief:http ExternalIP 10.96.0.10:80 -> a/victim:http ClusterIP",
		"b/thief:http ExternalIP 203.0.113.7:80 -> z/lb:http LoadBalancer",
		"b/thief:np ExternalIP 192.0.2.1:30080 -> a/victim:http NodePort",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("conflicts:\n got %q\nwant %q", got, want)
	}

	name := func(ns, svc, port string) ServicePortName {
		return ServicePortName{Namespace: ns, Name: svc, Port: port, Family: IPv4}
	}
	fes := func(n ServicePortName) []string {
		var out []string
		for _, f := range st.ServicePorts[n].Frontends {
			out = append(out, f.String())
		}
		return out
	}
	if g, w := fes(name("a", "victim", "http")), []string{"ClusterIP 10.96.0.10:80", "NodePort 192.0.2.1:30080"}; !slices.Equal(g, w) {
		t.Errorf("victim frontends %q, want %q", g, w)
	}
	if g, w := fes(name("b", "thief", "http")), []string{"ClusterIP 10.96.0.20:80", "ExternalIP 192.0.2.1:80", "ExternalIP 198.51.100.9:80"}; !slices.Equal(g, w) {
		t.Errorf("thief frontends %q, want %q", g, w)
	}
	if g, w := fes(name("z", "lb", "http")), []string{"ClusterIP 10.96.0.30:80", "LoadBalancer 203.0.113.7:80", "NodePort 192.0.2.1:30081"}; !slices.Equal(g, w) {
		t.Errorf("lb frontends %q, want %q", g, w)
	}
	if g, w := fes(name("c", "udp", "http")), []string{"ClusterIP 10.96.0.40:80", "ExternalIP 10.96.0.10:80"}; !slices.Equal(g, w) {
		t.Errorf("udp frontends %q, want %q", g, w)
	}
	if g, w := fes(name("d", "self", "http")), []string{"ClusterIP 10.96.0.50:80"}; !slices.Equal(g, w) {
		t.Errorf("self frontends %q, want %q", g, w)
	}
	// thief:np lost its only external frontend: no Local policy is left in
	// effect, so nothing but its ClusterIP remains (see prune).
	np := st.ServicePorts[name("b", "thief", "np")]
	if np.ExternalTrafficLocal || np.LocalEndpoints != nil || len(np.ClusterEndpoints) != 0 {
		t.Errorf("thief:np not pruned: %+v", np)
	}
	if sr := st.ServicePorts[name("z", "lb", "http")].SourceRanges; len(sr) != 1 {
		t.Errorf("lb source ranges %v", sr)
	}

	// The outcome does not depend on the input order.
	rng := rand.New(rand.NewPCG(3, 4))
	for range 10 {
		rev := append([]*corev1.Service(nil), svcs...)
		rng.Shuffle(len(rev), func(i, j int) { rev[i], rev[j] = rev[j], rev[i] })
		st2, errs2 := Build(cfg, rev, ess)
		if d := Diff(st, st2); len(d) != 0 || len(errs2) != len(errs) {
			t.Fatalf("order changed the result: %v, %d errors", d, len(errs2))
		}
	}
}

func TestResolveConflictsSameKindLowerNameWins(t *testing.T) {
	a := service("ns", "a", "10.96.0.1")
	a.Spec.ExternalIPs = []string{"198.51.100.1"}
	b := service("ns", "b", "10.96.0.2")
	b.Spec.ExternalIPs = []string{"198.51.100.1"}
	// Two Services with one ClusterIP (the apiserver never allocates this;
	// a hostile or broken object store might): the later name loses its
	// only frontend, so its ServicePort is gone.
	c := service("ns", "c", "10.96.0.1")
	st, errs := Build(nil, []*corev1.Service{c, b, a}, nil)
	if len(errs) != 2 {
		t.Fatalf("errors %v", errs)
	}
	if _, ok := st.ServicePorts[ServicePortName{Namespace: "ns", Name: "c", Port: "http", Family: IPv4}]; ok {
		t.Errorf("ns/c kept without a frontend")
	}
	bfe := st.ServicePorts[ServicePortName{Namespace: "ns", Name: "b", Port: "http", Family: IPv4}].Frontends
	if len(bfe) != 1 || bfe[0].Kind != ClusterIP {
		t.Errorf("ns/b frontends %v, want its ClusterIP only", bfe)
	}
}

// Conflicts, fed one change at a time in any order, ends where
// ResolveConflicts on the final state ends, and names every ServicePort
// whose resolved form changed.
func TestConflictsIncremental(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	kinds := []FrontendKind{ClusterIP, NodePort, LoadBalancer, ExternalIP}
	random := func(i int) *ServicePort {
		sp := &ServicePort{
			Name:             ServicePortName{Namespace: "ns", Name: string(rune('a' + i)), Family: IPv4},
			Protocol:         []Protocol{TCP, UDP}[rng.IntN(2)],
			ClusterEndpoints: []Endpoint{{IP: netip.MustParseAddr("10.244.0.1"), Port: 80}},
		}
		for range 1 + rng.IntN(3) {
			ip := netip.AddrFrom4([4]byte{10, 96, 0, byte(rng.IntN(4))})
			sp.Frontends = append(sp.Frontends, Frontend{Kind: kinds[rng.IntN(4)], IP: ip, Port: 80})
		}
		slices.SortFunc(sp.Frontends, Frontend.Compare)
		sp.Frontends = slices.Compact(sp.Frontends)
		return sp
	}
	c := NewConflicts()
	current := map[ServicePortName]*ServicePort{}
	resolved := map[ServicePortName]*ServicePort{}
	for step := range 500 {
		i := rng.IntN(8)
		name := ServicePortName{Namespace: "ns", Name: string(rune('a' + i)), Family: IPv4}
		var sp *ServicePort
		if rng.IntN(4) > 0 {
			sp = random(i)
			current[name] = sp
		} else {
			delete(current, name)
		}
		for _, n := range c.Set(name, sp) {
			if r := c.Resolved(n); r != nil {
				resolved[n] = r
			} else {
				delete(resolved, n)
			}
		}
		want := &State{ServicePorts: maps.Clone(current)}
		wantErrs := ResolveConflicts(want)
		if d := Diff(want, &State{ServicePorts: resolved}); len(d) != 0 {
			t.Fatalf("step %d: incremental result differs from ResolveConflicts: %v", step, d)
		}
		if got := c.Errors(); fmt.Sprint(got) != fmt.Sprint(wantErrs) {
			t.Fatalf("step %d: errors %v, want %v", step, got, wantErrs)
		}
	}
}
