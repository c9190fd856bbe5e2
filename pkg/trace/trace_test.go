package trace

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane/conformance"
	"github.com/svcnat/svcnat/pkg/model"
)

func caseState(t *testing.T, name string) *model.State { return conformance.CaseState(t, name) }

func query(from, to string, proto model.Protocol, o Origin) Query {
	f, err := netip.ParseAddrPort(from)
	if err != nil {
		f = netip.AddrPortFrom(netip.MustParseAddr(from), 0)
	}
	return Query{From: f, To: netip.MustParseAddrPort(to), Protocol: proto, Origin: o}
}

func TestDescribe(t *testing.T) {
	s := caseState(t, "LoadBalancerSourceRangesLocal")
	for _, c := range []struct {
		q          Query
		kind       model.FrontendKind
		set        string
		allowed    string // "", "true", "false"
		reasonHint string
	}{
		{q: query("198.51.100.5", "203.0.113.7:443", model.TCP, FromOutside), kind: model.LoadBalancer, set: "local", allowed: "true"},
		{q: query("203.0.113.200", "203.0.113.7:443", model.TCP, FromOutside), kind: model.LoadBalancer, set: "local", allowed: "false"},
		// Pods in the cluster CIDRs are short-circuited to every endpoint.
		{q: query("10.244.2.3", "192.168.1.10:31443", model.TCP, FromPod), kind: model.NodePort, set: "cluster"},
		{q: query("10.244.2.3", "10.96.1.1:443", model.TCP, FromPod), kind: model.ClusterIP, set: "cluster"},
		{q: query("10.244.2.3", "10.96.1.1:444", model.TCP, FromPod), reasonHint: "10.96.1.1 has ClusterIP 443/TCP (shop/front:https)"},
		{q: query("10.244.2.3", "10.96.1.1:443", model.UDP, FromPod), reasonHint: "no Service frontend is 10.96.1.1:443/UDP"},
	} {
		r := &Result{Query: c.q}
		Describe(r, s)
		if c.kind == "" {
			if r.Frontend != nil || !strings.Contains(r.Reason, c.reasonHint) {
				t.Errorf("%+v: frontend %v, reason %q; want none, reason with %q", c.q, r.Frontend, r.Reason, c.reasonHint)
			}
			continue
		}
		if r.Frontend == nil || r.Frontend.Kind != c.kind || r.Service.Name != "front" || r.Policy.EndpointSet != c.set {
			t.Errorf("%+v: frontend %v of %v, policy %+v; want %s, %s endpoints", c.q, r.Frontend, r.Service, r.Policy, c.kind, c.set)
			continue
		}
		got := ""
		if r.Policy.SourceAllowed != nil {
			got = map[bool]string{true: "true", false: "false"}[*r.Policy.SourceAllowed]
		}
		if got != c.allowed {
			t.Errorf("%+v: source allowed %q, want %q", c.q, got, c.allowed)
		}
	}
}

func TestFinish(t *testing.T) {
	ep := netip.MustParseAddrPort("10.244.1.5:80")
	r := &Result{Frontend: &model.Frontend{}, Outcomes: []Outcome{
		{Probability: 0.25, Verdict: Forward, Endpoint: ep, Slot: 2},
		{Probability: 0.5, Verdict: Forward, Endpoint: netip.MustParseAddrPort("10.244.2.5:80"), Slot: 1},
		{Probability: 0.25, Verdict: Forward, Endpoint: ep, Slot: 0},
	}}
	Finish(r)
	if len(r.Outcomes) != 2 || r.Outcomes[0].Endpoint != ep || r.Outcomes[0].Probability != 0.5 || r.Outcomes[0].Slot != -1 {
		t.Errorf("merged outcomes %v: want %s with 0.5 (two slots) first", r.Outcomes, ep)
	}
	r = &Result{Frontend: &model.Frontend{}, Policy: &Policy{EndpointSet: "local"}, Outcomes: []Outcome{{Probability: 1, Verdict: Drop}}}
	Finish(r)
	if !strings.Contains(r.Reason, "Local") {
		t.Errorf("drop with a local set: reason %q, want the Local policy named", r.Reason)
	}
}

func TestValidate(t *testing.T) {
	for _, c := range []struct {
		q    Query
		want string
	}{
		{query("10.0.0.1", "10.96.0.1:80", model.TCP, FromPod), ""},
		{query("10.0.0.1", "[fd00::1]:80", model.TCP, FromPod), "different address families"},
		{query("10.0.0.1", "10.96.0.1:0", model.TCP, FromPod), "needs a port"},
		{query("10.0.0.1", "10.96.0.1:80", "ICMP", FromPod), `protocol "ICMP"`},
		{query("10.0.0.1", "10.96.0.1:80", model.TCP, "moon"), `origin "moon"`},
		{query("::ffff:10.0.0.1", "[::ffff:10.96.0.1]:80", model.TCP, FromPod), "IPv4-mapped"},
	} {
		err := c.q.Validate()
		if (c.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%+v: %v, want %q", c.q, err, c.want)
		}
	}
}
