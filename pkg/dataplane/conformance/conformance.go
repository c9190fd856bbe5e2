// Package conformance is the test suite every dataplane.Backend passes: what
// Sync programs, Dump reads back unchanged; Sync is idempotent; partial
// updates, restarts and Cleanup leave exactly what they should.
package conformance

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// Case is one named desired state of the suite.
type Case struct {
	Name  string
	State *model.State
}

// CaseState returns a new copy of the state of the case named name, and
// fails t when there is none.
func CaseState(t testing.TB, name string) *model.State {
	t.Helper()
	for _, c := range Cases() {
		if c.Name == name {
			return c.State
		}
	}
	t.Fatalf("no conformance case %s", name)
	return nil
}

func addr(s string) netip.Addr     { return netip.MustParseAddr(s) }
func prefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func ep(s string, port uint16, local bool) model.Endpoint {
	return model.Endpoint{IP: addr(s), Port: port, Local: local}
}

func fe(kind model.FrontendKind, ip string, port uint16) model.Frontend {
	return model.Frontend{Kind: kind, IP: addr(ip), Port: port}
}

func name(ns, n, port string, f model.Family) model.ServicePortName {
	return model.ServicePortName{Namespace: ns, Name: n, Port: port, Family: f}
}

func state(cidrs []string, sps ...*model.ServicePort) *model.State {
	s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for _, c := range cidrs {
		s.ClusterCIDRs = append(s.ClusterCIDRs, prefix(c))
	}
	for _, sp := range sps {
		// Canonical order, as model.Build produces it.
		slices.SortFunc(sp.Frontends, func(a, b model.Frontend) int {
			return cmp.Or(cmp.Compare(a.Kind, b.Kind), a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
		})
		s.ServicePorts[sp.Name] = sp
	}
	return s
}

// Node addresses and pod CIDRs the cases use. Endpoints in 10.244.1.0/24 and
// fd00:244:1::/64 run on this node (Local), others elsewhere: a backend may
// derive locality per endpoint address, so the cases keep it consistent.
var (
	v4CIDRs   = []string{"10.244.0.0/16"}
	dualCIDRs = []string{"10.244.0.0/16", "fd00:244::/32"}
)

func clusterIPMulti() *model.ServicePort {
	return &model.ServicePort{
		Name:      name("default", "web", "http", model.IPv4),
		Protocol:  model.TCP,
		Frontends: []model.Frontend{fe(model.ClusterIP, "10.96.0.10", 80)},
		ClusterEndpoints: []model.Endpoint{
			ep("10.244.1.5", 8080, true), ep("10.244.2.7", 8080, false), ep("10.244.3.9", 8080, false),
		},
	}
}

func nodePortTwoAddrs() *model.ServicePort {
	return &model.ServicePort{
		Name:     name("default", "np", "", model.IPv4),
		Protocol: model.UDP,
		Frontends: []model.Frontend{
			fe(model.ClusterIP, "10.96.0.53", 53),
			fe(model.NodePort, "192.168.1.10", 30053), fe(model.NodePort, "192.168.2.10", 30053),
		},
		ClusterEndpoints: []model.Endpoint{ep("10.244.2.8", 5353, false), ep("10.244.3.8", 5353, false)},
	}
}

func lbLocal() *model.ServicePort {
	return &model.ServicePort{
		Name:     name("shop", "front", "https", model.IPv4),
		Protocol: model.TCP,
		Frontends: []model.Frontend{
			fe(model.ClusterIP, "10.96.1.1", 443),
			fe(model.LoadBalancer, "203.0.113.7", 443),
			fe(model.NodePort, "192.168.1.10", 31443),
		},
		ClusterEndpoints:     []model.Endpoint{ep("10.244.1.20", 8443, true), ep("10.244.2.20", 8443, false)},
		LocalEndpoints:       []model.Endpoint{ep("10.244.1.20", 8443, true)},
		ExternalTrafficLocal: true,
		SourceRanges:         []netip.Prefix{prefix("198.51.100.0/24"), prefix("203.0.113.0/25")},
		HealthCheckNodePort:  32100,
	}
}

func affinity() *model.ServicePort {
	return &model.ServicePort{
		Name:      name("default", "sticky", "", model.IPv4),
		Protocol:  model.TCP,
		Frontends: []model.Frontend{fe(model.ClusterIP, "10.96.0.77", 8000), fe(model.ExternalIP, "198.51.100.77", 8000)},
		ClusterEndpoints: []model.Endpoint{
			ep("10.244.1.31", 8000, true), ep("10.244.2.31", 8000, false),
		},
		AffinityTimeout: 3 * time.Hour,
	}
}

func noEndpoints() *model.ServicePort {
	return &model.ServicePort{
		Name:     name("default", "empty", "", model.IPv4),
		Protocol: model.TCP,
		Frontends: []model.Frontend{
			fe(model.ClusterIP, "10.96.0.99", 80), fe(model.NodePort, "192.168.1.10", 30099),
		},
	}
}

func ipv6() *model.ServicePort {
	return &model.ServicePort{
		Name:     name("default", "web", "http", model.IPv6),
		Protocol: model.TCP,
		Frontends: []model.Frontend{
			fe(model.ClusterIP, "fd00:96::10", 80), fe(model.NodePort, "fd00:1::10", 30080),
		},
		ClusterEndpoints: []model.Endpoint{ep("fd00:244:1::5", 8080, true), ep("fd00:244:2::7", 8080, false)},
	}
}

func localPolicies() *model.ServicePort {
	return &model.ServicePort{
		Name:     name("kube-system", "dns", "dns-tcp", model.IPv4),
		Protocol: model.TCP,
		Frontends: []model.Frontend{
			fe(model.ClusterIP, "10.96.0.11", 53), fe(model.NodePort, "192.168.1.10", 30054),
		},
		ClusterEndpoints:     []model.Endpoint{ep("10.244.1.40", 53, true), ep("10.244.2.40", 53, false)},
		LocalEndpoints:       []model.Endpoint{ep("10.244.1.40", 53, true)},
		InternalTrafficLocal: true,
		ExternalTrafficLocal: true,
	}
}

func localNoLocalEndpoint() *model.ServicePort {
	return &model.ServicePort{
		Name:     name("kube-system", "metrics", "", model.IPv4),
		Protocol: model.SCTP,
		Frontends: []model.Frontend{
			fe(model.ClusterIP, "10.96.0.12", 9000), fe(model.ExternalIP, "198.51.100.12", 9000),
		},
		ClusterEndpoints:     []model.Endpoint{ep("10.244.2.41", 9000, false)},
		InternalTrafficLocal: true,
		ExternalTrafficLocal: true,
	}
}

// Cases returns the suite's desired states, each new on every call.
func Cases() []Case {
	all := state(dualCIDRs, clusterIPMulti(), nodePortTwoAddrs(), lbLocal(), affinity(),
		noEndpoints(), ipv6(), localPolicies(), localNoLocalEndpoint())
	dual := clusterIPMulti()
	dual6 := ipv6()
	return []Case{
		{"ClusterIPMultiEndpoint", state(v4CIDRs, clusterIPMulti())},
		{"NodePortTwoAddresses", state(nil, nodePortTwoAddrs())},
		{"LoadBalancerSourceRangesLocal", state(v4CIDRs, lbLocal())},
		{"Affinity", state(v4CIDRs, affinity())},
		{"NoEndpoints", state(v4CIDRs, noEndpoints())},
		{"IPv6", state([]string{"fd00:244::/32"}, ipv6())},
		{"DualStack", state(dualCIDRs, dual, dual6)},
		{"LocalPolicies", state(v4CIDRs, localPolicies(), localNoLocalEndpoint())},
		{"ClusterCIDRsOnly", state(dualCIDRs)},
		{"All", all},
	}
}

// Run runs the suite. newBackend returns a backend that is not yet
// initialised; Run calls Init, Sync, Dump and Cleanup on it. Backends that
// newBackend returns within one (sub)test must share one kernel (and, for
// pinned state, one pin directory): the restart case makes two and expects
// the second to adopt what the first programmed. Every case ends with
// Cleanup.
func Run(t *testing.T, newBackend func(t *testing.T) dataplane.Backend) {
	t.Helper()
	for _, c := range Cases() {
		t.Run("SyncDump/"+c.Name, func(t *testing.T) {
			b := start(t, newBackend)
			sync(t, b, c.State)
			expect(t, b, c.State)
			sync(t, b, WithChange(c.State, c.State))
			expect(t, b, c.State)
			sync(t, b, WithChange(c.State, &model.State{}))
			expect(t, b, &model.State{})
		})
	}
	t.Run("PartialUpdates", func(t *testing.T) {
		b := start(t, newBackend)
		steps := partialSteps()
		for i, s := range steps {
			if i > 0 {
				s = WithChange(steps[i-1], s)
			}
			sync(t, b, s)
			if !expect(t, b, s) {
				t.Fatalf("after step %d", i)
			}
		}
	})
	t.Run("Restart", func(t *testing.T) {
		first := start(t, newBackend)
		all := Cases()[len(Cases())-1].State
		sync(t, first, all)
		second := newBackend(t)
		ctx := t.Context()
		if err := second.Init(ctx); err != nil {
			t.Fatalf("init second backend: %v", err)
		}
		expect(t, second, all)
		next := partialSteps()[1]
		sync(t, second, next)
		expect(t, second, next)
	})
	t.Run("Cleanup", func(t *testing.T) {
		b := start(t, newBackend)
		all := Cases()[len(Cases())-1].State
		sync(t, b, all)
		ctx := t.Context()
		for i := range 2 {
			if err := b.Cleanup(ctx); err != nil {
				t.Fatalf("cleanup %d: %v", i+1, err)
			}
			expect(t, b, &model.State{})
		}
	})
}

// partialSteps is a sequence of states that each change a few ServicePorts
// of the previous one: endpoints added and removed, a ServicePort added and
// deleted, policies and affinity toggled.
func partialSteps() []*model.State {
	s0 := state(v4CIDRs, clusterIPMulti(), nodePortTwoAddrs(), affinity(), noEndpoints())

	web := clusterIPMulti()
	web.ClusterEndpoints = append(web.ClusterEndpoints, ep("10.244.4.1", 8080, false))
	empty := noEndpoints()
	empty.ClusterEndpoints = []model.Endpoint{ep("10.244.2.99", 80, false)}
	s1 := state(v4CIDRs, web, nodePortTwoAddrs(), affinity(), empty, lbLocal())

	web2 := clusterIPMulti()
	web2.ClusterEndpoints = web2.ClusterEndpoints[1:]
	sticky := affinity()
	sticky.AffinityTimeout = 0
	lb := lbLocal()
	lb.ExternalTrafficLocal = false
	lb.LocalEndpoints = nil
	lb.HealthCheckNodePort = 0
	lb.SourceRanges = nil
	s2 := state(dualCIDRs, web2, sticky, lb, ipv6())

	s3 := state(nil, ipv6())
	return []*model.State{s0, s1, s2, s3, s0}
}

func start(t *testing.T, newBackend func(t *testing.T) dataplane.Backend) dataplane.Backend {
	t.Helper()
	b := newBackend(t)
	if err := b.Init(t.Context()); err != nil {
		t.Fatalf("init: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Cleanup(context.Background()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return b
}

// WithChange returns next with its Change set to the ServicePorts that
// differ from prev, as the agent hands a state to a backend after prev was
// programmed.
func WithChange(prev, next *model.State) *model.State {
	c := &model.Change{}
	for _, sp := range next.Sorted() {
		if p, ok := prev.ServicePorts[sp.Name]; !ok || !p.Identical(sp) {
			c.Updated = append(c.Updated, sp.Name)
		}
	}
	for _, sp := range prev.Sorted() {
		if _, ok := next.ServicePorts[sp.Name]; !ok {
			c.Removed = append(c.Removed, sp.Name)
		}
	}
	return &model.State{ClusterCIDRs: next.ClusterCIDRs, ServicePorts: next.ServicePorts, Change: c}
}

func sync(t *testing.T, b dataplane.Backend, s *model.State) {
	t.Helper()
	if err := b.Sync(t.Context(), s); err != nil {
		t.Fatalf("sync: %v", err)
	}
}

// expect reports (and fails the test) when Dump differs from want.
func expect(t *testing.T, b dataplane.Backend, want *model.State) bool {
	t.Helper()
	got, err := b.Dump(t.Context())
	if err != nil {
		t.Fatalf("dump: %v", err)
	}
	diff := Diff(want, got)
	for _, d := range diff {
		t.Error(d)
	}
	return len(diff) == 0
}

// Diff lists the differences between two states, empty when they program the
// same dataplane. A nil or empty ServicePorts map and nil or empty
// ClusterCIDRs count as equal.
func Diff(want, got *model.State) []string {
	var out []string
	if !slices.Equal(want.ClusterCIDRs, got.ClusterCIDRs) {
		out = append(out, fmt.Sprintf("clusterCIDRs: want %v, got %v", want.ClusterCIDRs, got.ClusterCIDRs))
	}
	for _, w := range want.Sorted() {
		g, ok := got.ServicePorts[w.Name]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("%s: missing, want %s", w.Name, asJSON(w)))
		case !w.Equal(g):
			out = append(out, fmt.Sprintf("%s:\n  want %s\n  got  %s", w.Name, asJSON(w), asJSON(g)))
		}
	}
	for _, g := range got.Sorted() {
		if _, ok := want.ServicePorts[g.Name]; !ok {
			out = append(out, fmt.Sprintf("%s: unexpected %s", g.Name, asJSON(g)))
		}
	}
	return out
}

func asJSON(sp *model.ServicePort) string {
	b, err := json.Marshal(sp)
	if err != nil {
		return fmt.Sprintf("%+v", *sp)
	}
	return string(b)
}
