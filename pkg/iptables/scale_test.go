package iptables

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	"github.com/svcnat/svcnat/pkg/model"
)

// bigState returns n Services with one TCP port each and eps endpoints each:
// ClusterIPs scattered over 10.96.0.0/12 as an allocator would, every tenth
// Service also a NodePort on two node addresses, one endpoint in ten local.
func bigState(n, eps int) *model.State {
	s := &model.State{
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		ServicePorts: make(map[model.ServicePortName]*model.ServicePort, n),
	}
	for i := range n {
		sp := &model.ServicePort{
			Name:      model.ServicePortName{Namespace: fmt.Sprintf("ns%d", i%50), Name: fmt.Sprintf("svc%d", i), Port: "http", Family: model.IPv4},
			Protocol:  model.TCP,
			Frontends: []model.Frontend{{Kind: model.ClusterIP, IP: clusterIP(i), Port: 80}},
		}
		if i%10 == 0 {
			port := uint16(30000 + i/10)
			sp.Frontends = append(sp.Frontends,
				model.Frontend{Kind: model.NodePort, IP: netip.MustParseAddr(node), Port: port},
				model.Frontend{Kind: model.NodePort, IP: netip.MustParseAddr(node2), Port: port})
		}
		for j := range eps {
			k := i*eps + j
			ip := netip.AddrFrom4([4]byte{10, 244, byte(k >> 8 % 256), byte(k)})
			sp.ClusterEndpoints = append(sp.ClusterEndpoints, model.Endpoint{IP: ip, Port: 8080, Local: ip.As4()[2] == 1})
		}
		s.ServicePorts[sp.Name] = sp
	}
	return s
}

// clusterIP scatters i over 10.96.0.0/12: multiplying by an odd number is
// a bijection modulo 2^20.
func clusterIP(i int) netip.Addr {
	v := uint32(i+1) * 2654435761 % (1 << 20)
	return netip.AddrFrom4([4]byte{10, byte(96 + v>>16), byte(v >> 8), byte(v)})
}

// TestDispatchCost measures how many rules a new connection walks to find
// its Service among 10,000, against kube-proxy's linear KUBE-SERVICES.
func TestDispatchCost(t *testing.T) {
	const n = 10000
	s := bigState(n, 10)
	tr := newTracer(t, s, model.IPv4, node, node2)
	maxMiss, sumMiss, maxHit, sumHit, probes := 0, 0, 0, 0, 0
	for i := 0; i < n; i += 97 {
		probes++
		// A miss walks the whole path of the address; a hit stops at
		// its frontend and then walks the endpoint chain.
		tr.trace(pkt(fromPod, "10.244.9.9", clusterIP(i).String(), 81, model.TCP))
		maxMiss, sumMiss = max(maxMiss, tr.evaluated), sumMiss+tr.evaluated
		out := tr.trace(pkt(fromPod, "10.244.9.9", clusterIP(i).String(), 80, model.TCP))
		if len(out) != 10 {
			t.Fatalf("service %d: %d outcomes, want 10 endpoints: %v", i, len(out), out)
		}
		maxHit, sumHit = max(maxHit, tr.evaluated), sumHit+tr.evaluated
	}
	npMax := 0
	for i := 0; i < n; i += 10 * 7 {
		out := tr.trace(pkt(fromOutside, outside, node, uint16(30000+i/10), model.TCP))
		if len(out) != 10 {
			t.Fatalf("node port of service %d: %d outcomes, want 10: %v", i, len(out), out)
		}
		npMax = max(npMax, tr.evaluated)
	}
	rs := Render(s, model.IPv4, DefaultMasqueradeBit)
	t.Logf("%d Services x 10 endpoints: %d nat chains, %d nat rules, %d filter chains", n,
		len(rs.Tables[tableNAT]), rs.Rules(tableNAT), len(rs.Tables[tableFilter]))
	t.Logf("rules evaluated per new connection (all tables, all random branches): miss max %d avg %d; ClusterIP hit max %d avg %d; NodePort hit max %d",
		maxMiss, sumMiss/probes, maxHit, sumHit/probes, npMax)
	// kube-proxy walks one KUBE-SERVICES rule per Service port for a miss.
	if maxMiss > 200 {
		t.Errorf("a miss walks %d rules; the dispatch tree should keep it near 16+16+leaf", maxMiss)
	}
}

func BenchmarkRender10k(b *testing.B) {
	s := bigState(10000, 10)
	b.ReportAllocs()
	for b.Loop() {
		Render(s, model.IPv4, DefaultMasqueradeBit)
	}
}

func BenchmarkParse10k(b *testing.B) {
	text := Render(bigState(10000, 10), model.IPv4, DefaultMasqueradeBit).Text()
	b.ReportAllocs()
	for b.Loop() {
		rs, err := ParseSave(model.IPv4, text)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := StateOf(rs); err != nil {
			b.Fatal(err)
		}
	}
}

// apply updates p to s's part of family with the default options and
// records the result as written, as a Sync does; it returns what the
// update rendered and found gone.
func (p *programmed) apply(s *model.State, family model.Family) (*Ruleset, map[tableChain]bool) {
	out, gone := p.update(s, family, renderOptions{masqBit: DefaultMasqueradeBit}, true)
	p.record(sumsOf(out), gone)
	return out, gone
}

// BenchmarkRenderOneChange10k renders 10,000 Services after one changed,
// with what a Backend keeps between syncs and the Change the agent hands
// over.
func BenchmarkRenderOneChange10k(b *testing.B) {
	s := bigState(10000, 10)
	p := newProgrammed()
	p.apply(s, model.IPv4)
	name := model.ServicePortName{Namespace: "ns7", Name: "svc1007", Port: "http", Family: model.IPv4}
	s.Change = &model.Change{Updated: []model.ServicePortName{name}}
	b.ReportAllocs()
	for b.Loop() {
		sp := s.ServicePorts[name].Clone()
		sp.ClusterEndpoints[0].Port++
		s.ServicePorts[name] = sp
		p.apply(s, model.IPv4)
	}
}

// BenchmarkRetainedHeap10k reports the live heap a family's backend keeps
// between syncs after its first sync of 10,000 Services x 10 endpoints,
// per Service (the State itself, which the agent owns, not counted).
func BenchmarkRetainedHeap10k(b *testing.B) {
	const n = 10000
	s := bigState(n, 10)
	var heap uint64
	for b.Loop() {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		p := newProgrammed()
		p.apply(s, model.IPv4)
		runtime.GC()
		runtime.ReadMemStats(&after)
		runtime.KeepAlive(p)
		heap = after.HeapAlloc - before.HeapAlloc
	}
	b.ReportMetric(float64(heap)/n, "heapB/service")
}
