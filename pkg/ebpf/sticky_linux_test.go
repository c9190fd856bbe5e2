//go:build linux

package ebpf

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// askUDP sends one datagram from pc to addr and returns the answer (the
// endpoint that served it) and the address the answer appears to come from.
func askUDP(t *testing.T, pc net.PacketConn, addr string) (string, string) {
	t.Helper()
	to, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	pc.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := pc.WriteTo([]byte("q"), to); err != nil {
		t.Fatalf("send to %s: %v", addr, err)
	}
	buf := make([]byte, 100)
	n, from, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatalf("answer from %s: %v", addr, err)
	}
	return string(buf[:n]), from.String()
}

// TestUnconnectedUDPSticks: all datagrams of one unconnected UDP socket to
// one Service go to one endpoint until that endpoint leaves the Service;
// replies show the frontend the socket sent to, also when two Services
// share the endpoints.
func TestUnconnectedUDPSticks(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	b := env.backend(t)
	p := newPod(t, "10.244.1.2/24", "10.244.1.3/24", "10.244.1.4/24")
	var eps []model.Endpoint
	for _, ip := range []string{"10.244.1.2", "10.244.1.3", "10.244.1.4"} {
		p.serveUDP(t, ip+":8080")
		eps = append(eps, endpoint(ip, 8080))
	}
	a := sp("a", model.IPv4, model.UDP, "10.96.0.30", 443, eps...)
	bsvc := sp("b", model.IPv4, model.UDP, "10.96.0.31", 443, eps...)
	if err := b.Sync(t.Context(), stateOf(a, bsvc)); err != nil {
		t.Fatal(err)
	}
	env.enterCgroup(t)
	pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()

	// sticks sends n datagrams to addr and returns the one endpoint that
	// answered them all.
	sticks := func(addr string, n int) string {
		t.Helper()
		seen := map[string]int{}
		for range n {
			got, from := askUDP(t, pc, addr)
			if from != addr {
				t.Errorf("answer to a datagram to %s appears to come from %s", addr, from)
			}
			seen[got]++
		}
		if len(seen) != 1 {
			t.Fatalf("%d datagrams from one socket to %s were answered by %v, want one endpoint", n, addr, seen)
		}
		for ep := range seen {
			return ep
		}
		return ""
	}
	first := sticks("10.96.0.30:443", 20)
	other := sticks("10.96.0.31:443", 20)
	if other == first {
		t.Errorf("both Services' datagrams from one socket went to %s: replies are ambiguous", first)
	}
	if again := sticks("10.96.0.30:443", 5); again != first {
		t.Errorf("after sending to another Service, %s answered instead of %s", again, first)
	}

	// Another endpoint joins and one leaves: the socket keeps its endpoint.
	var rest []model.Endpoint
	for _, e := range eps {
		if e.IP.String()+":8080" == first {
			rest = append([]model.Endpoint{e}, rest...)
		}
	}
	for _, e := range eps {
		if e.IP.String()+":8080" != first && len(rest) < 2 {
			rest = append(rest, e)
		}
	}
	p2 := newPod(t, "10.244.2.1/24")
	p2.serveUDP(t, "10.244.2.1:8080")
	a.ClusterEndpoints = append([]model.Endpoint{endpoint("10.244.2.1", 8080)}, rest...)
	if err := b.Sync(t.Context(), stateOf(a, bsvc)); err != nil {
		t.Fatal(err)
	}
	if got := sticks("10.96.0.30:443", 10); got != first {
		t.Errorf("after other endpoints changed, %s answered instead of %s", got, first)
	}

	// Its endpoint terminates but still serves: the socket keeps it (as
	// kube-proxy keeps the conntrack entry), and new sockets avoid it.
	var without []model.Endpoint
	for _, e := range a.ClusterEndpoints {
		if e.IP.String()+":8080" != first {
			without = append(without, e)
		}
	}
	a.ServingEndpoints = a.ClusterEndpoints
	a.ClusterEndpoints = without
	if err := b.Sync(t.Context(), stateOf(a, bsvc)); err != nil {
		t.Fatal(err)
	}
	if got := sticks("10.96.0.30:443", 10); got != first {
		t.Errorf("while %s terminates, still serving, %s answered", first, got)
	}

	// It stops serving: the socket moves to another one and sticks there.
	a.ServingEndpoints = without
	if err := b.Sync(t.Context(), stateOf(a, bsvc)); err != nil {
		t.Fatal(err)
	}
	if got := sticks("10.96.0.30:443", 10); got == first {
		t.Errorf("datagrams still go to %s, which left the Service", first)
	}
}

// TestAffinitySurvivesOtherEndpoints: ClientIP affinity to an endpoint
// holds while other endpoints are removed and added (each change shifts
// the slots).
func TestAffinitySurvivesOtherEndpoints(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	b := env.backend(t)
	var addrs []string
	var eps []model.Endpoint
	for i := range 10 {
		ip := fmt.Sprintf("10.244.1.%d", 2+i)
		addrs = append(addrs, ip+"/24")
		eps = append(eps, endpoint(ip, 8080))
	}
	p := newPod(t, append(addrs, "10.244.1.1/24")...)
	for _, e := range append(eps, endpoint("10.244.1.1", 8080)) {
		p.serveTCP(t, e.IP.String()+":8080")
	}
	web := sp("web", model.IPv4, model.TCP, "10.96.0.30", 80, eps...)
	web.AffinityTimeout = time.Hour
	if err := b.Sync(t.Context(), stateOf(web)); err != nil {
		t.Fatal(err)
	}
	env.enterCgroup(t)
	pinned, err := dialRead(t, "tcp", "10.96.0.30:80")
	if err != nil {
		t.Fatal(err)
	}
	check := func(what string) {
		t.Helper()
		for range 10 {
			got, err := dialRead(t, "tcp", "10.96.0.30:80")
			if err != nil {
				t.Fatal(err)
			}
			if got != pinned {
				t.Fatalf("after %s, a connection went to %s, not to %s its client has affinity to", what, got, pinned)
			}
		}
	}
	// Remove the first endpoint that is not the pinned one, then add one
	// that sorts before all.
	for i, e := range web.ClusterEndpoints {
		if e.IP.String()+":8080" != pinned {
			web.ClusterEndpoints = append(web.ClusterEndpoints[:i:i], web.ClusterEndpoints[i+1:]...)
			break
		}
	}
	if err := b.Sync(t.Context(), stateOf(web)); err != nil {
		t.Fatal(err)
	}
	check("another endpoint was removed")
	web.ClusterEndpoints = append([]model.Endpoint{endpoint("10.244.1.1", 8080)}, web.ClusterEndpoints...)
	if err := b.Sync(t.Context(), stateOf(web)); err != nil {
		t.Fatal(err)
	}
	check("an endpoint was added before it")
}

// TestReverseTranslationValidated: a datagram from the endpoint after its
// Service is gone shows the endpoint's own address, not the frontend the
// socket once sent to.
func TestReverseTranslationValidated(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	b := env.backend(t)
	p := newPod(t, "10.244.1.2/24")
	var server net.PacketConn
	var err error
	inNamespace(t, p.ns, func() { server, err = net.ListenPacket("udp4", "10.244.1.2:8080") })
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	dns := sp("dns", model.IPv4, model.UDP, "10.96.0.53", 53, endpoint("10.244.1.2", 8080))
	if err := b.Sync(t.Context(), stateOf(dns)); err != nil {
		t.Fatal(err)
	}
	env.enterCgroup(t)
	client, err := net.ListenPacket("udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	client.SetDeadline(time.Now().Add(3 * time.Second))
	server.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := client.WriteTo([]byte("q"), &net.UDPAddr{IP: net.ParseIP("10.96.0.53"), Port: 53}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	_, peer, err := server.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	answer := func(want string) {
		t.Helper()
		if _, err := server.WriteTo([]byte("a"), peer); err != nil {
			t.Fatal(err)
		}
		_, from, err := client.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		if from.String() != want {
			t.Errorf("answer appears to come from %s, want %s", from, want)
		}
	}
	answer("10.96.0.53:53")
	if err := b.Sync(t.Context(), stateOf()); err != nil {
		t.Fatal(err)
	}
	answer("10.244.1.2:8080")
}
