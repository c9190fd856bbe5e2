//go:build linux

package ebpf

import (
	"errors"
	"maps"
	"math"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/trace"
)

// TestRacingReader puts the maps in the state a reader that loaded a
// frontend's count just before a write shrank it meets (review finding
// 18): the count still says 3, but the last slot, or the backend it names,
// is gone. Every path must then choose among the endpoints that remain
// (lb.h falls back to slot 0) instead of refusing the connection: the
// connect hook (real connections from the test cgroup), the tc program
// (prog.Run, and real NodePort connections from a client namespace) and
// both traces. With every slot gone (the set really emptied) they reject.
func TestRacingReader(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	p := newPod(t, "10.244.1.2/24", "10.244.1.3/24", "10.244.1.4/24")
	var eps []model.Endpoint
	for _, a := range []string{"10.244.1.2", "10.244.1.3", "10.244.1.4"} {
		p.serveTCP(t, a+":8080")
		eps = append(eps, model.Endpoint{IP: mustAddr(a), Port: 8080, Local: true})
	}
	client := uplinkClient(t)
	web := sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, eps...)
	web.Frontends = append(web.Frontends, model.Frontend{Kind: model.NodePort, IP: mustAddr("198.51.100.1"), Port: 30080})
	state := stateOf(web)
	b := startNode(t, env, Options{}, web)
	iface, err := net.InterfaceByName("up1")
	if err != nil {
		t.Fatal(err)
	}
	h := &tcHarness{t: t, prog: b.tc.SvcnatTcIngress, ifindex: iface.Index, mac: iface.HardwareAddr}
	traceProg, closeTrace, err := b.loadTraceProgram()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeTrace)

	spec, err := loadSvcnat()
	if err != nil {
		t.Fatal(err)
	}
	pinned := func(name string) *ebpf.Map {
		m, err := ebpf.LoadPinnedMap(filepath.Join(env.bpffs, pinName(name, spec.Maps[name])), nil)
		if err != nil {
			t.Fatalf("open pinned map %s: %v", name, err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	services, slots, backends := pinned(svcnatMapSvcnatServices), pinned(svcnatMapSvcnatSlots), pinned(svcnatMapSvcnatBackends)
	// slotsOf reads the cluster set's slots (the only Service's) and the
	// frontend key of its ClusterIP.
	slotsOf := func() (map[uint16]uint32, svcnatSvcKey) {
		out := map[uint16]uint32{}
		var k svcnatSlotKey
		var bid uint32
		for it := slots.Iterate(); it.Next(&k, &bid); {
			if k.Set == setCluster {
				out[k.Slot] = bid
			}
		}
		var sk, clusterIP svcnatSvcKey
		var sv svcnatSvcValue
		for it := services.Iterate(); it.Next(&sk, &sv); {
			if sk.Addr == addr16(mustAddr("10.96.0.10")) {
				clusterIP = sk
			}
			if sv.ClusterCount != 3 {
				t.Fatalf("frontend %x: count %d, want the 3 the torn state keeps", sk.Addr, sv.ClusterCount)
			}
		}
		return out, clusterIP
	}
	endpointOfID := func(bid uint32) netip.AddrPort {
		var be svcnatBackend
		if err := backends.Lookup(bid, &be); err != nil {
			t.Fatalf("backend %d: %v", bid, err)
		}
		ep, err := decodeBackend(be)
		if err != nil {
			t.Fatal(err)
		}
		return netip.AddrPortFrom(ep.IP, ep.Port)
	}

	srcPort := uint16(40000)
	for _, torn := range []struct {
		name string
		// tear deletes entries a write is deleting; it returns the
		// endpoints that remain reachable (none: the set emptied).
		tear func(slots map[uint16]uint32) map[netip.AddrPort]uint32
	}{
		{"last slot gone", func(s map[uint16]uint32) map[netip.AddrPort]uint32 {
			remain := map[netip.AddrPort]uint32{endpointOfID(s[0]): s[0], endpointOfID(s[1]): s[1]}
			if err := slots.Delete(svcnatSlotKey{Id: idOfSlots(t, slots), Slot: 2, Set: setCluster}); err != nil {
				t.Fatal(err)
			}
			return remain
		}},
		{"backend of the last slot gone", func(s map[uint16]uint32) map[netip.AddrPort]uint32 {
			remain := map[netip.AddrPort]uint32{endpointOfID(s[0]): s[0], endpointOfID(s[1]): s[1]}
			if err := backends.Delete(s[2]); err != nil {
				t.Fatal(err)
			}
			return remain
		}},
		{"every slot gone", func(s map[uint16]uint32) map[netip.AddrPort]uint32 {
			id := idOfSlots(t, slots)
			for slot := range s {
				if err := slots.Delete(svcnatSlotKey{Id: id, Slot: slot, Set: setCluster}); err != nil {
					t.Fatal(err)
				}
			}
			return nil
		}},
	} {
		t.Run(torn.name, func(t *testing.T) {
			// A full sync repairs what the previous case deleted.
			if err := b.Sync(t.Context(), state); err != nil {
				t.Fatal(err)
			}
			s, clusterIP := slotsOf()
			if len(s) != 3 {
				t.Fatalf("slots after the sync: %v, want 3", s)
			}
			remain := torn.tear(s)
			reached := map[netip.AddrPort]bool{} // by the tc program's first packets

			t.Run("tc program", func(t *testing.T) {
				n, failed := 60, 0
				if remain == nil {
					n = 3 // under the reject rate limit's burst
				}
				for range n {
					srcPort++
					in := tuple{src: netip.AddrPortFrom(mustAddr("198.51.100.8"), srcPort), dst: ap("198.51.100.1:30080"), proto: protoTCP, syn: true}
					ret, _ := h.run(in)
					f, ok := flowOf(t, in)
					if remain == nil {
						if ret != tcxRedir || ok {
							t.Fatalf("%s: verdict %d, flow %v; want a reject (redirect of the ICMP error) and no flow", in, ret, ok)
						}
						continue
					}
					if ret != tcxNext || !ok {
						failed++
						continue
					}
					if _, ok := remain[f.replySrc]; !ok {
						t.Fatalf("%s: flow to %s, not an endpoint that remains (%v)", in, f.replySrc, remain)
					}
					reached[f.replySrc] = true
				}
				if failed > 0 {
					t.Errorf("%d of %d first packets to the NodePort made no flow while 2 endpoints remain", failed, n)
				}
			})
			t.Run("NodePort connections", func(t *testing.T) {
				before, err := tcStats(b.tc.Stats)
				if err != nil {
					t.Fatal(err)
				}
				n, failed := 10, 0
				if remain == nil {
					n = 1
				}
				for range n {
					got, err := fetch(t, client, "198.51.100.1:30080")
					if remain == nil {
						if !errors.Is(err, syscall.ECONNREFUSED) {
							t.Fatalf("connection to the NodePort: %v, want connection refused", err)
						}
						continue
					}
					if err != nil {
						t.Logf("connection to the NodePort: %v", err)
						failed++
						continue
					}
					if _, ok := remain[parseAddrPort(string(got))]; !ok {
						t.Fatalf("connection to the NodePort answered by %q, not an endpoint that remains (%v)", got, remain)
					}
				}
				if failed > 0 {
					t.Errorf("%d of %d connections to the NodePort failed while 2 endpoints remain", failed, n)
				}
				after, err := tcStats(b.tc.Stats)
				if err != nil {
					t.Fatal(err)
				}
				if rejected := after[tcTcStatTC_STAT_REJECT] - before[tcTcStatTC_STAT_REJECT]; remain != nil && rejected != 0 {
					t.Errorf("%d SYNs to the NodePort rejected while 2 endpoints remain", rejected)
				}
			})
			t.Run("traces", func(t *testing.T) {
				for slot := range uint32(3) {
					in := traceSkb{Mark: traceMark, Ifindex: uint32(iface.Index), IngressIfindex: uint32(iface.Index), CB: [5]uint32{traceMagic, slot}}
					frame := packet(tuple{src: ap("198.51.100.9:40000"), dst: ap("198.51.100.1:30080"), proto: protoTCP, syn: true})
					copy(frame, iface.HardwareAddr)
					var out traceSkbOut
					if _, err := b.tc.SvcnatTcIngress.Run(&ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256), Context: in, ContextOut: &out}); err != nil {
						t.Fatal(err)
					}
					checkTrace(t, "tc", slot, traceTraceVerdict(out.CB[0]&0xff), out.CB[1], remain)

					var c traceTraceConnect
					c.Key.Addr, c.Key.Port, c.Key.Proto, c.Slot = clusterIP.Addr, clusterIP.Port, clusterIP.Proto, slot
					if _, err := traceProg.Run(&ebpf.RunOptions{Context: c, ContextOut: &c}); err != nil {
						t.Fatal(err)
					}
					checkTrace(t, "connect", slot, c.Verdict, c.BackendId, remain)
				}
			})
			t.Run("svcnat dump and trace", func(t *testing.T) {
				checkDumpTraceTorn(t, b, web.Name, s[0], remain, reached)
			})
			t.Run("connect hook", func(t *testing.T) {
				env.enterCgroup(t)
				if remain == nil {
					if _, err := net.DialTimeout("tcp", "10.96.0.10:80", 3*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
						t.Fatalf("connect to the ClusterIP: %v, want connection refused", err)
					}
					return
				}
				refused := 0
				for range 60 {
					got, err := dialRead(t, "tcp", "10.96.0.10:80")
					if errors.Is(err, syscall.ECONNREFUSED) {
						refused++
						continue
					}
					if _, ok := remain[parseAddrPort(got)]; err != nil || !ok {
						t.Fatalf("connect to the ClusterIP: got %q, %v; want an endpoint that remains (%v)", got, err, remain)
					}
				}
				if refused > 0 {
					t.Errorf("%d of 60 connections to the ClusterIP refused while 2 endpoints remain", refused)
				}
			})
		})
	}
}

// uplinkClient makes a client namespace on the uplink up1 of the test
// namespace (the node, 198.51.100.1/24; the client 198.51.100.7), routed
// through the node, and returns its name.
func uplinkClient(t *testing.T) string {
	t.Helper()
	client := netnstest.NewNamespace(t, "sn-c")
	netnstest.Run(t, "", "ip", "link", "add", "up1", "type", "veth", "peer", "name", "cl1", "netns", client)
	netnstest.Run(t, "", "ip", "addr", "add", "198.51.100.1/24", "dev", "up1")
	netnstest.Run(t, "", "ip", "link", "set", "up1", "up")
	netnstest.Run(t, client, "ip", "addr", "add", "198.51.100.7/24", "dev", "cl1")
	netnstest.Run(t, client, "ip", "link", "set", "cl1", "up")
	netnstest.Run(t, client, "ip", "route", "add", "default", "via", "198.51.100.1")
	netnstest.Run(t, "", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
	return client
}

// parseAddrPort is s as an address and port, or the zero value.
func parseAddrPort(s string) netip.AddrPort {
	a, _ := netip.ParseAddrPort(s)
	return a
}

// idOfSlots returns the ServicePort id of the slots in m (one Service).
func idOfSlots(t *testing.T, m *ebpf.Map) uint32 {
	t.Helper()
	var k svcnatSlotKey
	var bid uint32
	if !m.Iterate().Next(&k, &bid) {
		t.Fatal("no slot")
	}
	return k.Id
}

// checkTrace fails unless a trace of slot forwarded to a remaining
// endpoint's backend id, or rejected when none remains.
func checkTrace(t *testing.T, path string, slot uint32, v traceTraceVerdict, bid uint32, remain map[netip.AddrPort]uint32) {
	t.Helper()
	if remain == nil {
		if v != traceTraceVerdictTRACE_REJECT {
			t.Errorf("%s trace of slot %d: verdict %d, want reject (the set emptied)", path, slot, v)
		}
		return
	}
	if v != traceTraceVerdictTRACE_FORWARD {
		t.Errorf("%s trace of slot %d: verdict %d, want forward (2 endpoints remain)", path, slot, v)
		return
	}
	for _, id := range remain {
		if id == bid {
			return
		}
	}
	t.Errorf("%s trace of slot %d: backend %d, not one that remains (%v)", path, slot, bid, remain)
}

// checkDumpTraceTorn fails unless `svcnat dump` and `svcnat trace` (from
// outside through the NodePort, and from the node to the ClusterIP) read
// the torn maps as the datapath does: dump lists the endpoints that remain
// (those the tc program reached), and the traces forward to them, slot 0's
// endpoint with the missing slot's share too, saying so; with every slot
// gone, the traces reject.
func checkDumpTraceTorn(t *testing.T, b *Backend, name model.ServicePortName, slot0 uint32, remain map[netip.AddrPort]uint32, reached map[netip.AddrPort]bool) {
	t.Helper()
	s, err := b.Dump(t.Context())
	if err != nil {
		t.Fatalf("dump of the torn maps: %v", err)
	}
	dumped := map[netip.AddrPort]bool{}
	for _, ep := range s.ServicePorts[name].ClusterEndpoints {
		dumped[netip.AddrPortFrom(ep.IP, ep.Port)] = true
	}
	if !maps.Equal(dumped, reached) || len(dumped) != len(remain) {
		t.Errorf("dump of the torn maps lists endpoints %v; the datapath reached %v of %v", dumped, reached, remain)
	}
	want := map[netip.AddrPort]float64{}
	for ep, id := range remain {
		want[ep] = 1.0 / 3
		if id == slot0 {
			want[ep] = 2.0 / 3 // its slot's and the missing one's
		}
	}
	for _, q := range []trace.Query{
		{From: ap("198.51.100.9:0"), To: ap("198.51.100.1:30080"), Protocol: model.TCP, Origin: trace.FromOutside, Interface: "up1"},
		{From: ap("198.51.100.1:0"), To: ap("10.96.0.10:80"), Protocol: model.TCP, Origin: trace.FromNode},
	} {
		r, err := b.Trace(t.Context(), q)
		if err != nil {
			t.Fatalf("trace %s of the torn maps: %v", q.Origin, err)
		}
		if remain == nil {
			if len(r.Outcomes) != 1 || r.Outcomes[0].Verdict != trace.Reject {
				t.Errorf("trace %s with every slot gone: want reject\n%s", q.Origin, r.Text())
			}
			continue
		}
		got := map[netip.AddrPort]float64{}
		for _, o := range r.Outcomes {
			if o.Verdict != trace.Forward {
				t.Errorf("trace %s: outcome %s, want forward (2 endpoints remain)\n%s", q.Origin, o, r.Text())
			}
			got[o.Endpoint] += o.Probability
		}
		if !maps.EqualFunc(got, want, func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }) {
			t.Errorf("trace %s: outcomes %v, want %v (slot 2 falls back to slot 0)\n%s", q.Origin, got, want, r.Text())
		}
		if !slices.ContainsFunc(r.Steps, func(s string) bool {
			return strings.HasPrefix(s, "slot 2: missing") && strings.Contains(s, "slot 0 taken instead")
		}) {
			t.Errorf("trace %s: no step says slot 2 took slot 0's endpoint\n%s", q.Origin, r.Text())
		}
		if q.Origin == trace.FromOutside {
			t.Logf("trace %s of the torn maps:\n%s", q.Origin, r.Text())
		}
	}
}
