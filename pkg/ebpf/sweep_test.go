//go:build linux

package ebpf

import (
	"maps"
	"net"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/svcnat/svcnat/pkg/model"
)

// conntrackFlow is svcnat's conntrack entry of a TCP flow from client to
// frontend, translated to endpoint.
func conntrackFlow(client, frontend, endpoint string) *netlink.ConntrackFlow {
	c, fe, ep := ap(client), ap(frontend), ap(endpoint)
	f := &netlink.ConntrackFlow{Mark: ctMark}
	f.Forward = netlink.IPTuple{SrcIP: net.IP(c.Addr().AsSlice()), SrcPort: c.Port(),
		DstIP: net.IP(fe.Addr().AsSlice()), DstPort: fe.Port(), Protocol: protoTCP}
	f.Reverse = netlink.IPTuple{SrcIP: net.IP(ep.Addr().AsSlice()), SrcPort: ep.Port(),
		DstIP: net.IP(c.Addr().AsSlice()), DstPort: c.Port(), Protocol: protoTCP}
	return f
}

// TestSweepJudgesWhatChanged: after the first, full sweep, a sweep judges
// the flows to the frontends the ServicePorts a change names have or had,
// each against its owner in the new state, and keeps every other flow.
func TestSweepJudgesWhatChanged(t *testing.T) {
	a := sp("a", model.IPv4, model.TCP, "10.96.0.1", 80, endpoint("10.244.0.1", 8080))
	b := sp("b", model.IPv4, model.TCP, "10.96.0.2", 80, endpoint("10.244.0.2", 8080))
	b.Frontends = append(b.Frontends, model.Frontend{Kind: model.LoadBalancer, IP: mustAddr("192.0.2.10"), Port: 80})
	c := sp("c", model.IPv4, model.TCP, "10.96.0.3", 80, endpoint("10.244.0.3", 8080))
	s := stateOf(a, b, c)
	var w flowSweeper
	full := w.filter(s)
	// A flow the agent left behind while it was down: the first sweep
	// judges every flow.
	if !full.full || !full.MatchConntrackFlow(conntrackFlow("192.0.2.99:4000", "10.96.0.1:80", "10.244.9.9:8080")) {
		t.Error("the first sweep keeps a flow to an endpoint that is gone")
	}

	// c is removed; the LoadBalancer IP moves from b to d.
	b2 := sp("b", model.IPv4, model.TCP, "10.96.0.2", 80, endpoint("10.244.0.2", 8080))
	d := sp("d", model.IPv4, model.TCP, "10.96.0.4", 80, endpoint("10.244.0.4", 8080))
	d.Frontends = append(d.Frontends, model.Frontend{Kind: model.LoadBalancer, IP: mustAddr("192.0.2.10"), Port: 80})
	s = stateOf(a, b2, d)
	s.Change = &model.Change{Updated: []model.ServicePortName{b2.Name, d.Name}, Removed: []model.ServicePortName{c.Name}}
	f := w.filter(s)
	if f.full {
		t.Fatal("a change's sweep judges every flow")
	}
	for _, tc := range []struct {
		what, frontend, endpoint string
		deleted                  bool
	}{
		{"a flow to a removed ServicePort", "10.96.0.3:80", "10.244.0.3:8080", true},
		{"a flow to the moved LoadBalancer IP, to its old owner's endpoint", "192.0.2.10:80", "10.244.0.2:8080", true},
		{"a flow to the moved LoadBalancer IP, to its new owner's endpoint", "192.0.2.10:80", "10.244.0.4:8080", false},
		{"a flow to a changed ServicePort's endpoint that still serves", "10.96.0.2:80", "10.244.0.2:8080", false},
		{"a flow to a changed ServicePort, to an endpoint it does not have", "10.96.0.2:80", "10.244.0.9:8080", true},
		{"a flow to an unchanged ServicePort", "10.96.0.1:80", "10.244.0.1:8080", false},
	} {
		if got := f.MatchConntrackFlow(conntrackFlow("192.0.2.99:4000", tc.frontend, tc.endpoint)); got != tc.deleted {
			t.Errorf("%s: deleted %v, want %v", tc.what, got, tc.deleted)
		}
	}
	if len(f.frontends) != 4 {
		t.Errorf("the sweep judges %d frontends, want the 4 of b, c and d", len(f.frontends))
	}

	// The LoadBalancer IP goes from d; only d changes.
	d2 := sp("d", model.IPv4, model.TCP, "10.96.0.4", 80, endpoint("10.244.0.4", 8080))
	s = stateOf(a, b2, d2)
	s.Change = &model.Change{Updated: []model.ServicePortName{d2.Name}}
	if g := w.filter(s); !g.MatchConntrackFlow(conntrackFlow("192.0.2.99:4000", "192.0.2.10:80", "10.244.0.4:8080")) {
		t.Error("a flow to a LoadBalancer IP no ServicePort has any more is kept")
	}
	if g := w.filter(&model.State{ServicePorts: s.ServicePorts, Change: &model.Change{}}); g != nil {
		t.Error("a sync that changes nothing starts a sweep")
	}
	if g := w.filter(&model.State{ServicePorts: s.ServicePorts}); !g.full {
		t.Error("a sync without a change (after a failure) does not judge every flow")
	}
}

// TestSweepPendingMerges: a sweep requested while another one waits does
// both one's work, the later state deciding.
func TestSweepPendingMerges(t *testing.T) {
	a := sp("a", model.IPv4, model.TCP, "10.96.0.1", 80, endpoint("10.244.0.1", 8080))
	b := sp("b", model.IPv4, model.TCP, "10.96.0.2", 80, endpoint("10.244.0.2", 8080))
	var w flowSweeper
	full := w.filter(stateOf(a, b))
	a2 := sp("a", model.IPv4, model.TCP, "10.96.0.1", 80, endpoint("10.244.0.5", 8080))
	s := stateOf(a2, b)
	s.Change = &model.Change{Updated: []model.ServicePortName{a.Name}}
	first := w.filter(s)
	s = stateOf(a2)
	s.Change = &model.Change{Removed: []model.ServicePortName{b.Name}}
	second := w.filter(s)

	merged := (&staleFlows{frontends: maps.Clone(first.frontends)}).then(second)
	deleted := func(f *staleFlows, frontend, endpoint string) bool {
		return f.MatchConntrackFlow(conntrackFlow("192.0.2.99:4000", frontend, endpoint))
	}
	if !deleted(merged, "10.96.0.1:80", "10.244.0.1:8080") || !deleted(merged, "10.96.0.2:80", "10.244.0.2:8080") {
		t.Error("two waiting sweeps merged lose one's work")
	}
	if deleted(merged, "10.96.0.1:80", "10.244.0.5:8080") {
		t.Error("two waiting sweeps merged delete a flow the state allows")
	}
	mergedFull := full.then(first).then(second)
	if !mergedFull.full || !deleted(mergedFull, "10.96.0.2:80", "10.244.0.2:8080") || deleted(mergedFull, "10.96.0.1:80", "10.244.0.5:8080") {
		t.Error("a change merged into a waiting full sweep is not judged by the latest state")
	}
}

// TestSweepRequestCostFollowsChange: the work a change's sweep request
// does on the Sync path is the same at 10 and at 10,000 ServicePorts.
func TestSweepRequestCostFollowsChange(t *testing.T) {
	allocs := func(n int) float64 {
		w, s := sweeperBeforeOneChange(n)
		return testing.AllocsPerRun(20, func() { w.filter(s) })
	}
	if small, large := allocs(10), allocs(10000); large > small {
		t.Errorf("a change's sweep request allocates %v times at 10,000 ServicePorts, %v at 10", large, small)
	}
}

// BenchmarkSweepRequest10k is what the flow sweeper does on the Sync path
// for a change of one Service at 10,000 Services x 10 endpoints: build
// the filter the background sweep judges flows with.
func BenchmarkSweepRequest10k(b *testing.B) {
	w, s := sweeperBeforeOneChange(10000)
	b.ReportAllocs()
	for b.Loop() {
		w.filter(s)
	}
}

// sweeperBeforeOneChange returns a flow sweeper that has judged a state of
// n ServicePorts, and that state carrying a change of one of them.
func sweeperBeforeOneChange(n int) (*flowSweeper, *model.State) {
	s := benchState(n)
	w := new(flowSweeper)
	w.filter(s)
	var name model.ServicePortName
	for name = range s.ServicePorts {
		break
	}
	s.Change = &model.Change{Updated: []model.ServicePortName{name}}
	return w, s
}
