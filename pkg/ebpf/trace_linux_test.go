//go:build linux

package ebpf

import (
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane/conformance"
	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/iptables"
	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/trace"
)

// traceNode makes the test namespace a node with the conformance cases'
// node addresses on its uplink up0, routes to the pod CIDRs through it, and
// forwarding on.
func traceNode(t *testing.T) {
	t.Helper()
	peerNS := netnstest.NewNamespace(t, "sn-tr")
	netnstest.Run(t, "", "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p", "netns", peerNS)
	netnstest.Run(t, "", "ip", "addr", "add", "192.168.1.10/24", "dev", "up0")
	netnstest.Run(t, "", "ip", "addr", "add", "192.168.2.10/24", "dev", "up0")
	netnstest.Run(t, "", "ip", "-6", "addr", "add", "fd00:1::10/64", "dev", "up0", "nodad")
	netnstest.Run(t, "", "ip", "link", "set", "up0", "up")
	netnstest.Run(t, "", "ip", "route", "add", "10.244.0.0/16", "via", "192.168.1.1", "dev", "up0")
	netnstest.Run(t, "", "ip", "-6", "route", "add", "fd00:244::/32", "via", "fd00:1::1", "dev", "up0")
	for _, k := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		netnstest.Run(t, "", "sysctl", "-q", "-w", k)
	}
}

// traceBackends makes the test namespace a node (traceNode) and returns
// both backends initialised in it, the eBPF one with its tc program on up0;
// both are cleaned up when the test ends.
func traceBackends(t *testing.T) (*Backend, *iptables.Backend) {
	t.Helper()
	env := newTestEnv(t)
	traceNode(t)
	eb, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup, Interfaces: []string{"up0"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := eb.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eb.Cleanup(t.Context()) })
	ib, err := iptables.New(iptables.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := ib.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ib.Cleanup(t.Context()) })
	return eb, ib
}

// clients are the sources a parity trace uses per origin and family.
var clients = map[trace.Origin]map[model.Family][]string{
	trace.FromPod:     {model.IPv4: {"10.244.1.7"}, model.IPv6: {"fd00:244:1::7"}},
	trace.FromNode:    {model.IPv4: {"192.168.1.10"}, model.IPv6: {"fd00:1::10"}},
	trace.FromOutside: {model.IPv4: {"198.51.100.5", "203.0.113.200"}, model.IPv6: {"2001:db8::5"}},
}

// knownDifference says why the backends may answer q differently, by
// design (README "Known limits"), or "" when they must agree.
func knownDifference(q trace.Query, fe model.Frontend, sp *model.ServicePort) string {
	allowed := slices.ContainsFunc(sp.SourceRanges, func(p netip.Prefix) bool { return p.Contains(q.From.Addr()) })
	switch {
	case q.Origin != trace.FromOutside && fe.Kind == model.LoadBalancer && len(sp.SourceRanges) > 0 && !allowed:
		return "eBPF does not check source ranges for sockets on the node"
	case q.Origin == trace.FromOutside && q.Protocol == model.SCTP:
		return "the eBPF tc path does not handle SCTP"
	}
	return ""
}

// comparableOutcomes is what both backends must agree on: every
// outcome's verdict, endpoint and probability, and masquerading for
// traffic from outside to endpoints on this node. Sockets on the node
// connect straight to the endpoint under eBPF: nothing is masqueraded,
// the source is the node's or the pod's own. And the tc program
// masquerades every flow from outside to another node, so that the reply
// comes back through this one (bpf/README.md), where iptables may not (no
// cluster CIDRs): remote reports those (and requires eBPF to masquerade
// them).
func comparableOutcomes(r *trace.Result, local map[netip.AddrPort]bool) (s string, remote []trace.Outcome) {
	var parts []string
	for _, o := range r.Outcomes {
		p := fmt.Sprintf("%s %v p=%.4f", o.Verdict, o.Endpoint, math.Round(o.Probability*1e4)/1e4)
		switch {
		case r.Query.Origin != trace.FromOutside:
		case local[o.Endpoint] || !o.Endpoint.IsValid():
			if o.Masquerade {
				p += " masq"
			}
		default:
			remote = append(remote, o)
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, "; "), remote
}

// TestTraceParity traces every frontend of every conformance case from a
// pod, the node and outside (inside and outside source ranges) with both
// backends programmed from the same state in one namespace, and requires
// the same answer: the iptables trace walks the rules iptables-save
// returns, the eBPF trace runs the loaded programs.
func TestTraceParity(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	eb, ib := traceBackends(t)

	compared, known := 0, 0
	for _, c := range conformance.Cases() {
		t.Run(c.Name, func(t *testing.T) {
			if err := eb.Sync(t.Context(), c.State); err != nil {
				t.Fatal(err)
			}
			if err := ib.Sync(t.Context(), c.State); err != nil {
				t.Fatal(err)
			}
			for _, sp := range c.State.Sorted() {
				for _, fe := range sp.Frontends {
					for _, origin := range []trace.Origin{trace.FromPod, trace.FromNode, trace.FromOutside} {
						for _, from := range clients[origin][sp.Name.Family] {
							q := trace.Query{From: netip.AddrPortFrom(netip.MustParseAddr(from), 0),
								To: netip.AddrPortFrom(fe.IP, fe.Port), Protocol: sp.Protocol, Origin: origin}
							ri, err := ib.Trace(t.Context(), q)
							if err != nil {
								t.Fatalf("iptables trace %+v: %v", q, err)
							}
							re, err := eb.Trace(t.Context(), q)
							if err != nil {
								t.Fatalf("ebpf trace %+v: %v", q, err)
							}
							for _, r := range []*trace.Result{ri, re} {
								if r.Service == nil || *r.Service != sp.Name || *r.Frontend != fe {
									t.Errorf("%s trace %s -> %s from %s: frontend %v of %v, want %v of %s", r.Backend, from, q.To, origin, r.Frontend, r.Service, fe, sp.Name)
								}
								if len(r.Outcomes) == 0 {
									t.Errorf("%s trace %s -> %s from %s: no outcome", r.Backend, from, q.To, origin)
								}
							}
							local := map[netip.AddrPort]bool{}
							for _, ep := range slices.Concat(sp.ClusterEndpoints, sp.LocalEndpoints) {
								local[netip.AddrPortFrom(ep.IP, ep.Port)] = ep.Local
							}
							gi, remoteI := comparableOutcomes(ri, local)
							ge, remoteE := comparableOutcomes(re, local)
							for i, o := range remoteE {
								if !o.Masquerade {
									t.Errorf("ebpf %s -> %s from outside to %s on another node: not masqueraded", from, q.To, o.Endpoint)
								}
								if !remoteI[i].Masquerade {
									known++
									t.Logf("%s %s -> %s: iptables does not masquerade to %s, the eBPF tc path does (every flow to another node)", sp.Protocol, from, q.To, o.Endpoint)
								}
							}
							if why := knownDifference(q, fe, sp); why != "" {
								known++
								t.Logf("%s %s -> %s from %s: not compared (%s): iptables %s | ebpf %s", sp.Protocol, from, q.To, origin, why, gi, ge)
								continue
							}
							compared++
							if gi != ge {
								t.Errorf("%s %s -> %s from %s (%s):\n iptables %s\n ebpf     %s\niptables:\n%s\nebpf:\n%s",
									sp.Protocol, from, q.To, origin, fe.Kind, gi, ge, ri.Text(), re.Text())
							}
						}
					}
				}
			}
		})
	}
	t.Logf("%d traces compared, %d known differences", compared, known)
	if compared < 130 { // every trace of the cases but the known differences
		t.Errorf("only %d traces compared", compared)
	}
}

// TestTraceLiveState: a trace writes nothing (no conntrack entry, no
// affinity entry, no counter), while the same packet without the trace
// mark does (the control that shows the check can fail); a client's
// affinity entry pins the trace's answer to its endpoint with both
// backends; and an existing flow is reported with its conntrack entry.
func TestTraceLiveState(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	eb, ib := traceBackends(t)
	s := conformance.CaseState(t, "Affinity")
	if err := eb.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	if err := ib.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}

	kernelState := func() string {
		n := 0
		var k svcnatAffinityKey
		var v svcnatAffinityValue
		for it := eb.pins.maps[svcnatMapSvcnatAffinity].Iterate(); it.Next(&k, &v); {
			n++
		}
		stats, err := tcStats(eb.tc.Stats)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("%d conntrack entries, %d affinity entries, tc counters %v", len(flows(t)), n, stats)
	}
	client := netip.MustParseAddr("198.51.100.5")
	external := trace.Query{From: netip.AddrPortFrom(client, 0), To: ap("198.51.100.77:8000"), Protocol: model.TCP, Origin: trace.FromOutside}
	before := kernelState()
	for _, q := range []trace.Query{
		external,
		{From: external.From, To: ap("10.96.0.77:8000"), Protocol: model.TCP, Origin: trace.FromNode},
		{From: external.From, To: ap("10.96.0.77:8000"), Protocol: model.TCP, Origin: trace.FromPod},
	} {
		if _, err := eb.Trace(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	if after := kernelState(); after != before {
		t.Errorf("a trace changed the kernel: before %s, after %s", before, after)
	}

	// Control: the same kind of packet without the trace mark creates a
	// flow and an affinity entry.
	iface, err := net.InterfaceByName("up0")
	if err != nil {
		t.Fatal(err)
	}
	h := &tcHarness{t: t, prog: eb.tc.SvcnatTcIngress, ifindex: iface.Index, mac: iface.HardwareAddr}
	live := tuple{src: netip.AddrPortFrom(client, 40001), dst: external.To, proto: protoTCP, syn: true}
	h.run(live)
	if kernelState() == before {
		t.Fatalf("control: a live packet changed nothing either (%s): the check above proves nothing", before)
	}
	f, ok := flowOf(t, live)
	if !ok {
		t.Fatal("control: no conntrack entry for the live packet")
	}

	// The live packet pinned the client: a new connection goes to the
	// same endpoint.
	r, err := eb.Trace(t.Context(), external)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Outcomes) != 1 || !r.Outcomes[0].Pinned || r.Outcomes[0].Endpoint != f.replySrc || r.Policy.PinnedTo != f.replySrc {
		t.Errorf("ebpf trace after the live packet to %s: want pinned to it\n%s", f.replySrc, r.Text())
	}
	// The live packet's own tuple: the flow exists.
	q := external
	q.From = live.src
	if r, err = eb.Trace(t.Context(), q); err != nil {
		t.Fatal(err)
	}
	if len(r.Outcomes) != 1 || r.Outcomes[0].Verdict != trace.Existing || len(r.Flows) != 1 ||
		!strings.HasPrefix(r.Flows[0].Reply, f.replySrc.String()) {
		t.Errorf("ebpf trace of the live flow: want it existing with its conntrack entry (reply from %s)\n%s", f.replySrc, r.Text())
	}

	// iptables: put the client in one endpoint's affinity list (xt_recent
	// accepts "+ADDR"); the trace follows that list's check rule.
	lists, err := filepath.Glob("/proc/net/xt_recent/SVCNAT-*")
	if err != nil || len(lists) != 2 {
		t.Fatalf("affinity lists %v (%v), want one per endpoint", lists, err)
	}
	for _, list := range lists {
		if err := os.WriteFile(list, []byte("/\n"), 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(lists[1], []byte("+"+client.String()+"\n"), 0); err != nil {
		t.Fatal(err)
	}
	r, err = ib.Trace(t.Context(), external)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Outcomes) != 1 || !r.Outcomes[0].Pinned || r.Policy.PinnedTo != r.Outcomes[0].Endpoint {
		t.Fatalf("iptables trace with the client in %s: want one pinned endpoint\n%s", lists[1], r.Text())
	}
	check := fmt.Sprintf("--rcheck --seconds 10800 --reap --name %s ", filepath.Base(lists[1]))
	if !slices.ContainsFunc(r.Steps, func(s string) bool {
		return strings.Contains(s, check) && strings.HasSuffix(s, "--to-destination "+r.Outcomes[0].Endpoint.String())
	}) {
		t.Errorf("iptables trace: pinned to %s, but no step is the check rule of list %s to it\n%s", r.Outcomes[0].Endpoint, lists[1], r.Text())
	}
}
