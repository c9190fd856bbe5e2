//go:build linux

package ebpf

import (
	"net"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// readCounters reads the counters as svcnat dump does: from another
// Backend on the same pins, without Init.
func readCounters(t *testing.T, env *testEnv) map[model.ServicePortName]*dataplane.PortCounters {
	t.Helper()
	r, err := New(Options{BPFFSPath: env.bpffs})
	if err != nil {
		t.Fatal(err)
	}
	c, err := r.Counters(t.Context())
	if err != nil {
		t.Fatalf("read counters: %v", err)
	}
	return c
}

// TestCountersSocketHooks: the socket hooks count one connection per TCP
// connect() and per connected UDP socket, one per unconnected UDP socket
// however many datagrams it sends to the same frontend, each on the
// endpoint it went to; they see no packets. A removed endpoint's row
// leaves the counters at once and the map at the next prune.
func TestCountersSocketHooks(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	b := env.backend(t)
	p := newPod(t, "10.244.1.2/24", "10.244.1.3/24")
	for _, a := range []string{"10.244.1.2:8080", "10.244.1.3:8080"} {
		p.serveTCP(t, a)
		p.serveUDP(t, a)
	}
	web := sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint("10.244.1.2", 8080), endpoint("10.244.1.3", 8080))
	dns := sp("dns", model.IPv4, model.UDP, "10.96.0.53", 53, endpoint("10.244.1.2", 8080))
	idle := sp("idle", model.IPv4, model.TCP, "10.96.0.20", 80, endpoint("10.244.1.3", 8080))
	if err := b.Sync(t.Context(), stateOf(web, dns, idle)); err != nil {
		t.Fatal(err)
	}
	env.enterCgroup(t)

	const conns = 25
	reached := map[string]uint64{}
	for range conns {
		got, err := dialRead(t, "tcp", "10.96.0.10:80")
		if err != nil {
			t.Fatalf("connect to the ClusterIP: %v", err)
		}
		reached[got]++
	}
	for range 3 {
		if got, err := dialRead(t, "udp", "10.96.0.53:53"); err != nil || got != "10.244.1.2:8080" {
			t.Fatalf("connected UDP to the ClusterIP: %q, %v", got, err)
		}
	}
	pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	pc.SetDeadline(time.Now().Add(3 * time.Second))
	for range 4 {
		if _, err := pc.WriteTo([]byte("q"), &net.UDPAddr{IP: net.ParseIP("10.96.0.53"), Port: 53}); err != nil {
			t.Fatal(err)
		}
		if _, _, err := pc.ReadFrom(make([]byte, 100)); err != nil {
			t.Fatalf("answer to an unconnected UDP socket: %v", err)
		}
	}
	pc.Close()

	c := readCounters(t, env)
	webC, dnsC, idleC := c[web.Name], c[dns.Name], c[idle.Name]
	if webC == nil || dnsC == nil || idleC == nil {
		t.Fatalf("counters of web, dns, idle: %v %v %v", webC, dnsC, idleC)
	}
	if webC.Connections != conns {
		t.Errorf("web: %d connections counted, want %d", webC.Connections, conns)
	}
	for ep, n := range reached {
		if webC.Endpoints[ep] != n {
			t.Errorf("web endpoint %s: %d connections counted, %d reached it", ep, webC.Endpoints[ep], n)
		}
	}
	if len(webC.Endpoints) != 2 {
		t.Errorf("web endpoints counted: %v, want both", webC.Endpoints)
	}
	// 3 connected sockets and one unconnected socket sending 4 datagrams.
	if dnsC.Connections != 4 || dnsC.Endpoints["10.244.1.2:8080"] != 4 {
		t.Errorf("dns: %d connections, endpoints %v; want 4, all to 10.244.1.2:8080", dnsC.Connections, dnsC.Endpoints)
	}
	if idleC.Connections != 0 || idleC.Endpoints["10.244.1.3:8080"] != 0 || len(idleC.Endpoints) != 1 {
		t.Errorf("idle: %d connections, endpoints %v; want a zero row for its endpoint", idleC.Connections, idleC.Endpoints)
	}
	if *webC.Packets != 0 || *webC.Bytes != 0 {
		t.Errorf("web: the socket hooks counted %d packets, %d bytes; they see none", *webC.Packets, *webC.Bytes)
	}

	// Drop an endpoint: its row leaves Counters at once, the map at the
	// next prune; the Service port's own row stays.
	web.ClusterEndpoints = web.ClusterEndpoints[:1]
	b.countersPruned = time.Time{}
	if err := b.Sync(t.Context(), stateOf(web, dns, idle)); err != nil {
		t.Fatal(err)
	}
	// The prune's walk runs in the background; the next sync deletes.
	for deadline := time.Now().Add(5 * time.Second); len(b.counterWalk) == 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if err := b.Sync(t.Context(), stateOf(web, dns, idle)); err != nil {
		t.Fatal(err)
	}
	c = readCounters(t, env)
	if got := c[web.Name]; got.Connections != conns || len(got.Endpoints) != 1 || got.Endpoints["10.244.1.2:8080"] != reached["10.244.1.2:8080"] {
		t.Errorf("web after removing 10.244.1.3:8080: %d connections, endpoints %v", got.Connections, got.Endpoints)
	}
	// web, its endpoint, dns, its endpoint; idle's rows were never made.
	if rows, err := counterKeys(b.objs.SvcnatCounters); err != nil || len(rows) != 4 {
		t.Errorf("counter map holds %v after the prune (%v), want 4 rows", rows, err)
	}
}

// TestCountersTC: the tc program counts each flow from outside whose
// conntrack entry it creates, on the Service port and the endpoint, and
// every packet and byte the client sends to the frontend.
func TestCountersTC(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	p := newPod(t, "10.244.1.2/24")
	p.serveTCP(t, "10.244.1.2:8080")
	client := uplinkClient(t)

	np := sp("np", model.IPv4, model.TCP, "10.96.0.11", 30081, model.Endpoint{IP: mustAddr("10.244.1.2"), Port: 8080, Local: true})
	np.Frontends = append(np.Frontends, model.Frontend{Kind: model.NodePort, IP: mustAddr("198.51.100.1"), Port: 30081})
	startNode(t, env, Options{}, np)

	const conns = 10
	for i := range conns {
		if got, err := fetch(t, client, "198.51.100.1:30081"); err != nil || string(got) != "10.244.1.2:8080" {
			t.Fatalf("connection %d to the NodePort: %q, %v", i, got, err)
		}
	}
	c := readCounters(t, env)[np.Name]
	if c == nil {
		t.Fatal("no counters for the NodePort's Service port")
	}
	if c.Connections != conns || c.Endpoints["10.244.1.2:8080"] != conns {
		t.Errorf("%d connections through the NodePort: counted %d, endpoint %v", conns, c.Connections, c.Endpoints)
	}
	// Each connection: SYN, ACK, FIN and ACK at least (delayed ACKs vary);
	// IPv4 and TCP headers are 40 bytes at least.
	if *c.Packets < 4*conns || *c.Packets > 10*conns || *c.Bytes < 40**c.Packets || *c.Bytes > 100**c.Packets {
		t.Errorf("%d connections: %d packets, %d bytes counted, want 4 to 10 packets of 40 to 100 bytes each", conns, *c.Packets, *c.Bytes)
	}
	t.Logf("%d connections through the NodePort: %d packets, %d bytes", conns, *c.Packets, *c.Bytes)
}
