//go:build linux

package conntrack

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

func udpPort(name, frontend string, endpoints ...string) *model.ServicePort {
	fe := netip.MustParseAddrPort(frontend)
	sp := &model.ServicePort{
		Name:      model.ServicePortName{Namespace: "ns", Name: name, Family: model.IPv4},
		Protocol:  model.UDP,
		Frontends: []model.Frontend{{Kind: model.ClusterIP, IP: fe.Addr(), Port: fe.Port()}},
	}
	for _, e := range endpoints {
		ap := netip.MustParseAddrPort(e)
		sp.ClusterEndpoints = append(sp.ClusterEndpoints, model.Endpoint{IP: ap.Addr(), Port: ap.Port()})
	}
	sp.ServingEndpoints = sp.ClusterEndpoints
	return sp
}

func state(sps ...*model.ServicePort) *model.State {
	s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for _, sp := range sps {
		s.ServicePorts[sp.Name] = sp
	}
	return s
}

// udpFlows returns "original destination -> reply source" of every UDP
// conntrack entry.
func udpFlows(t *testing.T) []string {
	t.Helper()
	flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	if err != nil {
		t.Fatalf("list conntrack: %v", err)
	}
	var out []string
	for _, f := range flows {
		if f.Forward.Protocol == unix.IPPROTO_UDP {
			out = append(out, net.JoinHostPort(f.Forward.DstIP.String(), itoa(f.Forward.DstPort))+
				" -> "+net.JoinHostPort(f.Reverse.SrcIP.String(), itoa(f.Reverse.SrcPort)))
		}
	}
	slices.Sort(out)
	return out
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

func send(t *testing.T, to string) {
	t.Helper()
	c, err := net.Dial("udp4", to)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatalf("send to %s: %v", to, err)
	}
}

// podNetwork routes 10.244.0.0/24 and 10.96.0.0/16 out of a veth.
func podNetwork(t *testing.T) {
	run := func(args ...string) { netnstest.Run(t, "", args[0], args[1:]...) }
	// Packets leave through a veth towards "pods" whose MACs are fixed, so
	// they are sent for real and conntrack confirms their entries; the peer
	// end drops them (not its MAC), so no ICMP error comes back.
	run("ip", "link", "add", "ctv0", "type", "veth", "peer", "name", "ctv1")
	run("ip", "link", "set", "ctv0", "up")
	run("ip", "link", "set", "ctv1", "up")
	run("ip", "addr", "add", "10.244.0.1/24", "dev", "ctv0")
	for i, ip := range []string{"10.244.0.5", "10.244.0.6", "10.244.0.7"} {
		run("ip", "neigh", "add", ip, "lladdr", fmt.Sprintf("02:00:00:00:00:%02x", 5+i), "dev", "ctv0", "nud", "permanent")
	}
	run("ip", "neigh", "add", "10.244.0.254", "lladdr", "02:00:00:00:00:fe", "dev", "ctv0", "nud", "permanent")
	run("ip", "route", "add", "10.96.0.0/16", "via", "10.244.0.254")
}

func TestCleanDeletesStaleUDPEntries(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	run := func(args ...string) { netnstest.Run(t, "", args[0], args[1:]...) }
	podNetwork(t)
	// Two Services DNATed to endpoints; a third with no rule yet, as when it
	// had no endpoints.
	run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-d", "10.96.0.10", "--dport", "53", "-j", "DNAT", "--to-destination", "10.244.0.5:53")
	run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-d", "10.96.0.20", "--dport", "53", "-j", "DNAT", "--to-destination", "10.244.0.6:53")
	send(t, "10.96.0.10:53")
	send(t, "10.96.0.20:53")
	send(t, "10.96.0.30:53")
	send(t, "10.244.0.7:99") // not to a Service: never touched
	before := []string{
		"10.244.0.7:99 -> 10.244.0.7:99",
		"10.96.0.10:53 -> 10.244.0.5:53",
		"10.96.0.20:53 -> 10.244.0.6:53",
		"10.96.0.30:53 -> 10.96.0.30:53",
	}
	if got := udpFlows(t); !slices.Equal(got, before) {
		t.Fatalf("conntrack before clean: %q, want %q", got, before)
	}

	c := NewCleaner(slog.New(slog.NewTextHandler(io.Discard, nil)))
	// The state those flows were made under: nothing is stale.
	if err := c.Clean(state(udpPort("a", "10.96.0.10:53", "10.244.0.5:53"), udpPort("b", "10.96.0.20:53", "10.244.0.6:53"))); err != nil {
		t.Fatal(err)
	}
	if got := udpFlows(t); !slices.Equal(got, before) {
		t.Fatalf("conntrack after a clean with nothing stale: %q, want %q", got, before)
	}

	// a lost 10.244.0.5, b is unchanged, c got its first endpoint.
	if err := c.Clean(state(
		udpPort("a", "10.96.0.10:53", "10.244.0.6:53"),
		udpPort("b", "10.96.0.20:53", "10.244.0.6:53"),
		udpPort("c", "10.96.0.30:53", "10.244.0.7:53"),
	)); err != nil {
		t.Fatal(err)
	}
	want := []string{"10.244.0.7:99 -> 10.244.0.7:99", "10.96.0.20:53 -> 10.244.0.6:53"}
	if got := udpFlows(t); !slices.Equal(got, want) {
		t.Errorf("conntrack after clean: %q, want %q", got, want)
	}
}

// TestCleanKeepsServingFlows: a flow to an endpoint that still serves is
// kept when the endpoint leaves the chosen set (it terminates while another
// is ready, or topology no longer picks it), and Clean reads the table only
// after a change that can have made entries stale (kube-proxy
// conntrack/cleanup.go, proxier.go ConntrackCleanupRequired).
func TestCleanKeepsServingFlows(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	run := func(args ...string) { netnstest.Run(t, "", args[0], args[1:]...) }
	podNetwork(t)
	run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-d", "10.96.0.10", "--dport", "53", "-j", "DNAT", "--to-destination", "10.244.0.5:53")
	send(t, "10.96.0.10:53")
	c := NewCleaner(slog.New(slog.NewTextHandler(io.Discard, nil)))
	both := udpPort("a", "10.96.0.10:53", "10.244.0.5:53", "10.244.0.6:53")
	if err := c.Clean(state(both)); err != nil {
		t.Fatal(err)
	}
	// 10.244.0.5 terminates: no longer chosen, still serving.
	draining := udpPort("a", "10.96.0.10:53", "10.244.0.6:53")
	draining.ServingEndpoints = both.ServingEndpoints
	if err := c.Clean(state(draining)); err != nil {
		t.Fatal(err)
	}
	kept := []string{"10.96.0.10:53 -> 10.244.0.5:53"}
	if got := udpFlows(t); !slices.Equal(got, kept) {
		t.Fatalf("after the endpoint started terminating: %q, want the flow kept %q", got, kept)
	}

	// A new Service without endpoints; then an entry that looks stale (not
	// translated) appears while nothing changes: an unchanged state does
	// not make Clean read the table.
	other := udpPort("b", "10.96.0.30:53")
	if err := c.Clean(state(draining, other)); err != nil {
		t.Fatal(err)
	}
	send(t, "10.96.0.30:53")
	for range 3 {
		if err := c.Clean(state(draining, other)); err != nil {
			t.Fatal(err)
		}
	}
	withOther := []string{"10.96.0.10:53 -> 10.244.0.5:53", "10.96.0.30:53 -> 10.96.0.30:53"}
	if got := udpFlows(t); !slices.Equal(got, withOther) {
		t.Fatalf("after syncs that changed nothing: %q, want %q", got, withOther)
	}

	// 10.244.0.5 leaves the Service: its flow goes, the rest stays.
	if err := c.Clean(state(udpPort("a", "10.96.0.10:53", "10.244.0.6:53"), other)); err != nil {
		t.Fatal(err)
	}
	if got, want := udpFlows(t), withOther[1:]; !slices.Equal(got, want) {
		t.Errorf("after the endpoint left: %q, want %q", got, want)
	}
}

func TestFilterMatchesOnlyStaleUDP(t *testing.T) {
	f := staleFilter{netip.MustParseAddrPort("10.96.0.10:53"): {netip.MustParseAddrPort("10.244.0.6:53"): {}}}
	flow := func(proto uint8, dst string, dport uint16, rsrc string, rport uint16) *netlink.ConntrackFlow {
		fl := &netlink.ConntrackFlow{}
		fl.Forward.Protocol = proto
		fl.Forward.DstIP, fl.Forward.DstPort = net.ParseIP(dst), dport
		fl.Reverse.SrcIP, fl.Reverse.SrcPort = net.ParseIP(rsrc), rport
		return fl
	}
	for _, tc := range []struct {
		name string
		flow *netlink.ConntrackFlow
		want bool
	}{
		{"to a removed endpoint", flow(unix.IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.5", 53), true},
		{"to a current endpoint", flow(unix.IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.6", 53), false},
		{"current endpoint, other port", flow(unix.IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.6", 54), true},
		{"untranslated", flow(unix.IPPROTO_UDP, "10.96.0.10", 53, "10.96.0.10", 53), true},
		{"TCP", flow(unix.IPPROTO_TCP, "10.96.0.10", 53, "10.244.0.5", 53), false},
		{"other port", flow(unix.IPPROTO_UDP, "10.96.0.10", 54, "10.244.0.5", 53), false},
	} {
		if got := f.MatchConntrackFlow(tc.flow); got != tc.want {
			t.Errorf("%s: match = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// recordingCleaner is a Cleaner whose deletions are recorded instead of
// sent to the kernel: the frontends each Clean asked to clean.
func recordingCleaner() (*Cleaner, *[]string) {
	var asked []string
	c := NewCleaner(slog.New(slog.NewTextHandler(io.Discard, nil)))
	c.deleteFlows = func(_ model.Family, f staleFilter) (uint, error) {
		for fe := range f {
			asked = append(asked, fe.String())
		}
		slices.Sort(asked)
		return 0, nil
	}
	return c, &asked
}

// TestCleanLooksOnlyAtTheChange: with s.Change set, Clean looks at the
// ServicePorts it names and at nothing else, whatever the others hold; a
// full state (no Change) compares every ServicePort again.
func TestCleanLooksOnlyAtTheChange(t *testing.T) {
	c, asked := recordingCleaner()
	a := udpPort("a", "10.96.0.10:53", "10.244.0.5:53", "10.244.0.6:53")
	b := udpPort("b", "10.96.0.20:53", "10.244.0.5:53")
	tcp := udpPort("t", "10.96.0.30:53")
	tcp.Protocol = model.TCP
	if err := c.Clean(state(a, b, tcp)); err != nil {
		t.Fatal(err)
	}
	if want := []string{"10.96.0.10:53", "10.96.0.20:53"}; !slices.Equal(*asked, want) {
		t.Fatalf("first clean: %v, want every UDP frontend %v", *asked, want)
	}
	step := func(what string, s *model.State, want ...string) {
		t.Helper()
		*asked = nil
		if err := c.Clean(s); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(*asked, want) {
			t.Errorf("%s: cleaned %v, want %v", what, *asked, want)
		}
	}
	// a loses an endpoint, but only b is named: a is not looked at.
	aLost := udpPort("a", "10.96.0.10:53", "10.244.0.6:53")
	bGained := udpPort("b", "10.96.0.20:53", "10.244.0.5:53", "10.244.0.7:53")
	s := state(aLost, bGained, tcp)
	s.Change = &model.Change{Updated: []model.ServicePortName{b.Name}}
	step("change naming b, which only gained", s)
	s.Change = &model.Change{}
	step("change naming nothing", s)
	// Named, a's loss is seen against what the first Clean saw.
	s.Change = &model.Change{Updated: []model.ServicePortName{a.Name}}
	step("change naming a", s, "10.96.0.10:53")
	// b moves to a new frontend and a goes; the new frontend is cleaned.
	bMoved := udpPort("b", "10.96.0.21:53", "10.244.0.5:53")
	s = state(bMoved, tcp)
	s.Change = &model.Change{Updated: []model.ServicePortName{b.Name}, Removed: []model.ServicePortName{a.Name}}
	step("b moved, a removed", s, "10.96.0.21:53")
	// A full state compares everything with the last Clean: a comes back.
	step("full state", state(a, bMoved, tcp), "10.96.0.10:53")
	// After an error everything is reconciled again.
	c.deleteFlows = func(model.Family, staleFilter) (uint, error) { return 0, errors.New("injected") }
	s = state(aLost, bMoved, tcp)
	s.Change = &model.Change{Updated: []model.ServicePortName{a.Name}}
	if err := c.Clean(s); err == nil {
		t.Fatal("Clean returned nil after a failed delete")
	}
	c2, asked2 := recordingCleaner()
	c.deleteFlows, asked = c2.deleteFlows, asked2
	s.Change = &model.Change{}
	step("after an error", s, "10.96.0.10:53", "10.96.0.21:53")
}

// oneChangeAmong has c clean n UDP ServicePorts of one endpoint each, and
// returns a function that changes the endpoint of one of them and cleans
// again, with a Change naming it.
func oneChangeAmong(tb testing.TB, c *Cleaner, n int) func() {
	s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for i := range n {
		sp := udpPort(fmt.Sprintf("svc%d", i), fmt.Sprintf("10.96.%d.%d:53", i>>8, i&255), "10.244.0.5:53")
		s.ServicePorts[sp.Name] = sp
	}
	if err := c.Clean(s); err != nil {
		tb.Fatal(err)
	}
	name := model.ServicePortName{Namespace: "ns", Name: "svc7", Family: model.IPv4}
	s.Change = &model.Change{Updated: []model.ServicePortName{name}}
	i := 0
	return func() {
		i++
		s.ServicePorts[name] = udpPort("svc7", "10.96.0.7:53", fmt.Sprintf("10.244.1.%d:53", i%2))
		if err := c.Clean(s); err != nil {
			tb.Fatal(err)
		}
	}
}

// TestCleanCostFollowsTheChange: a Clean whose Change names one ServicePort
// of 10,000 UDP ones allocates as little as one of 10 (it does not walk the
// state).
func TestCleanCostFollowsTheChange(t *testing.T) {
	allocs := func(n int) float64 {
		c, _ := recordingCleaner()
		return testing.AllocsPerRun(20, oneChangeAmong(t, c, n))
	}
	small, large := allocs(10), allocs(10000)
	if large > small+5 {
		t.Errorf("one change among 10,000 UDP ServicePorts: %.0f allocations, among 10: %.0f; want the cost of the change only", large, small)
	}
}

// BenchmarkClean10k is Clean's cost when one of 10,000 UDP ServicePorts
// changes endpoints (no conntrack table is read: deletions are discarded).
func BenchmarkClean10k(b *testing.B) {
	c := NewCleaner(slog.New(slog.NewTextHandler(io.Discard, nil)))
	c.deleteFlows = func(model.Family, staleFilter) (uint, error) { return 0, nil }
	change := oneChangeAmong(b, c, 10000)
	b.ReportAllocs()
	for b.Loop() {
		change()
	}
}
