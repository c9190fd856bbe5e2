//go:build linux

package ebpf

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func sp(name string, fam model.Family, proto model.Protocol, frontend string, port uint16, eps ...model.Endpoint) *model.ServicePort {
	return &model.ServicePort{
		Name:             model.ServicePortName{Namespace: "default", Name: name, Family: fam},
		Protocol:         proto,
		Frontends:        []model.Frontend{{Kind: model.ClusterIP, IP: mustAddr(frontend), Port: port}},
		ClusterEndpoints: eps,
	}
}

func endpoint(ip string, port uint16) model.Endpoint {
	return model.Endpoint{IP: mustAddr(ip), Port: port}
}

func stateOf(sps ...*model.ServicePort) *model.State {
	s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for _, p := range sps {
		s.ServicePorts[p.Name] = p
	}
	return s
}

// dialRead connects to addr, checks that the peer address the socket
// reports is addr (getpeername), and returns what the server sent.
func dialRead(t *testing.T, network, addr string) (string, error) {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 3*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if got := c.RemoteAddr().String(); got != addr {
		t.Errorf("getpeername of a connection to %s: %s", addr, got)
	}
	if network == "udp" || network == "udp6" {
		if _, err := c.Write([]byte("hello")); err != nil {
			return "", err
		}
		buf := make([]byte, 100)
		n, err := c.Read(buf)
		return string(buf[:n]), err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

func TestSocketHooks(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	b := env.backend(t)
	p := newPod(t, "10.244.1.2/24", "10.244.1.3/24", "fd00:244:1::2/64")
	for _, a := range []string{"10.244.1.2:8080", "10.244.1.3:8080", "[fd00:244:1::2]:8080"} {
		p.serveTCP(t, a)
		p.serveUDP(t, a)
	}
	web := sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint("10.244.1.2", 8080), endpoint("10.244.1.3", 8080))
	dns := sp("dns", model.IPv4, model.UDP, "10.96.0.53", 53, endpoint("10.244.1.2", 8080))
	web6 := sp("web", model.IPv6, model.TCP, "fd00:96::10", 80, endpoint("fd00:244:1::2", 8080))
	empty := sp("empty", model.IPv4, model.TCP, "10.96.0.20", 80)
	emptyUDP := sp("empty-udp", model.IPv4, model.UDP, "10.96.0.20", 53)
	sticky := sp("sticky", model.IPv4, model.TCP, "10.96.0.30", 80, endpoint("10.244.1.2", 8080), endpoint("10.244.1.3", 8080))
	sticky.AffinityTimeout = time.Hour
	local := sp("local", model.IPv4, model.TCP, "10.96.0.40", 80, endpoint("10.244.1.2", 8080))
	local.InternalTrafficLocal = true
	s := stateOf(web, dns, web6, empty, emptyUDP, sticky, local)
	if err := b.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	env.enterCgroup(t)

	t.Run("ClusterIP TCP reaches every endpoint", func(t *testing.T) {
		seen := map[string]int{}
		for range 60 {
			got, err := dialRead(t, "tcp", "10.96.0.10:80")
			if err != nil {
				t.Fatalf("connect to the ClusterIP: %v", err)
			}
			seen[got]++
		}
		if len(seen) != 2 || seen["10.244.1.2:8080"] < 10 || seen["10.244.1.3:8080"] < 10 {
			t.Errorf("60 connections reached %v, want both endpoints about evenly", seen)
		}
	})
	t.Run("ClusterIP IPv6", func(t *testing.T) {
		got, err := dialRead(t, "tcp", "[fd00:96::10]:80")
		if err != nil || got != "[fd00:244:1::2]:8080" {
			t.Fatalf("connect to the IPv6 ClusterIP: got %q, %v", got, err)
		}
	})
	t.Run("connected UDP", func(t *testing.T) {
		got, err := dialRead(t, "udp", "10.96.0.53:53")
		if err != nil || got != "10.244.1.2:8080" {
			t.Fatalf("UDP to the ClusterIP: got %q, %v", got, err)
		}
	})
	t.Run("unconnected UDP reply shows the Service address", func(t *testing.T) {
		pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		pc.SetDeadline(time.Now().Add(3 * time.Second))
		svc := &net.UDPAddr{IP: net.ParseIP("10.96.0.53"), Port: 53}
		if _, err := pc.WriteTo([]byte("q"), svc); err != nil {
			t.Fatalf("send to the ClusterIP: %v", err)
		}
		buf := make([]byte, 100)
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("read the reply: %v", err)
		}
		if from.String() != "10.96.0.53:53" || string(buf[:n]) != "10.244.1.2:8080" {
			t.Errorf("reply %q from %s, want it from 10.96.0.53:53", buf[:n], from)
		}
	})
	t.Run("no endpoints refuses", func(t *testing.T) {
		start := time.Now()
		_, err := net.DialTimeout("tcp", "10.96.0.20:80", 3*time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("connect to a Service without endpoints: %v, want connection refused", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("refusal took %s", d)
		}
		pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		_, err = pc.WriteTo([]byte("q"), &net.UDPAddr{IP: net.ParseIP("10.96.0.20"), Port: 53})
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("send to a UDP Service without endpoints: %v, want connection refused", err)
		}
	})
	t.Run("session affinity", func(t *testing.T) {
		first, err := dialRead(t, "tcp", "10.96.0.30:80")
		if err != nil {
			t.Fatal(err)
		}
		for range 20 {
			got, err := dialRead(t, "tcp", "10.96.0.30:80")
			if err != nil {
				t.Fatal(err)
			}
			if got != first {
				t.Fatalf("with affinity, a connection went to %s after %s", got, first)
			}
		}
	})
	t.Run("internal Local without local endpoint fails fast", func(t *testing.T) {
		_, err := net.DialTimeout("tcp", "10.96.0.40:80", 3*time.Second)
		if !errors.Is(err, syscall.EHOSTUNREACH) {
			t.Fatalf("connect: %v, want no route to host", err)
		}
	})
	t.Run("endpoint change applies to new connections", func(t *testing.T) {
		web.ClusterEndpoints = web.ClusterEndpoints[1:]
		if err := b.Sync(t.Context(), s); err != nil {
			t.Fatal(err)
		}
		for range 20 {
			got, err := dialRead(t, "tcp", "10.96.0.10:80")
			if err != nil || got != "10.244.1.3:8080" {
				t.Fatalf("after removing an endpoint: got %q, %v", got, err)
			}
		}
	})
}

// TestRestartAndCleanup: a backend closed without cleanup leaves translation
// running; a new one adopts the pinned maps and links; Dump works from a
// backend that never ran Init; Cleanup removes the hooks.
func TestRestartAndCleanup(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	p := newPod(t, "10.244.1.2/24")
	p.serveTCP(t, "10.244.1.2:8080")
	s := stateOf(sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint("10.244.1.2", 8080)))

	first, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup})
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := first.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	env.enterCgroup(t)
	if got, err := dialRead(t, "tcp", "10.96.0.10:80"); err != nil || got != "10.244.1.2:8080" {
		t.Fatalf("with the agent gone: got %q, %v", got, err)
	}

	reader, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup})
	if err != nil {
		t.Fatal(err)
	}
	dumped, err := reader.Dump(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	statesEqual(t, s, dumped)
	raw, err := reader.Raw(t.Context())
	if err != nil || len(raw) == 0 {
		t.Fatalf("raw: %q, %v", raw, err)
	}
	t.Logf("raw maps:\n%s", raw)

	second := env.backend(t)
	if got, err := dialRead(t, "tcp", "10.96.0.10:80"); err != nil || got != "10.244.1.2:8080" {
		t.Fatalf("after the restarted agent's Init: got %q, %v", got, err)
	}
	if err := second.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	if err := second.Cleanup(t.Context()); err != nil {
		t.Fatal(err)
	}
	// Without the hook the ClusterIP is an unrouted address.
	if _, err := net.DialTimeout("tcp", "10.96.0.10:80", time.Second); err == nil {
		t.Fatal("the ClusterIP still answers after Cleanup")
	}
	dumped, err = reader.Dump(t.Context())
	if err != nil || len(dumped.ServicePorts) != 0 {
		t.Fatalf("dump after cleanup: %v, %v", dumped, err)
	}
	if err := second.Cleanup(t.Context()); err != nil {
		t.Fatalf("second cleanup: %v", err)
	}
}

// TestCapacity: with real maps too small for the state, the ServicePorts
// that fit (in name order) are programmed and the others fail alone, named
// in dataplane.PortErrors with the map and the flag, holding nothing.
func TestCapacity(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	b, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup, MaxServices: 4, MaxBackends: 8})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Cleanup(t.Context()) })
	small := stateOf(sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint("10.244.1.2", 8080)))
	if err := b.Sync(t.Context(), small); err != nil {
		t.Fatal(err)
	}
	big := stateOf(sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint("10.244.1.2", 8080)))
	for i := range 5 {
		p := sp("svc"+string(rune('a'+i)), model.IPv4, model.TCP, "10.96.1."+string(rune('1'+i)), 80, endpoint("10.244.1.3", 8080))
		big.ServicePorts[p.Name] = p
	}
	err = b.Sync(t.Context(), big)
	var failed dataplane.PortErrors
	if !errors.As(err, &failed) {
		t.Fatalf("sync of 6 frontends into a map of 4: %v, want PortErrors", err)
	}
	fits := stateOf()
	for name, p := range big.ServicePorts {
		if name.Name == "svcd" || name.Name == "svce" {
			if e := failed[name]; e == nil || !strings.Contains(e.Error(), "svcnat_services") || !strings.Contains(e.Error(), "--bpf-map-max-services") {
				t.Errorf("%s: error %v, want one naming svcnat_services and --bpf-map-max-services", name, e)
			}
			continue
		}
		fits.ServicePorts[name] = p
	}
	if len(failed) != 2 {
		t.Errorf("failed: %v, want svcd and svce", failed)
	}
	got, err := b.Dump(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	statesEqual(t, fits, got)
}

// TestUDPSocketsToRemovedEndpoints: a connected UDP socket whose endpoint
// is removed is destroyed at the sync, so its client sees an error at once
// and a new socket reaches a live endpoint.
func TestUDPSocketsToRemovedEndpoints(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	b := env.backend(t)
	if b.destroyer == nil {
		t.Fatal("the kernel here has bpf_sock_destroy, yet the UDP socket iterator did not load")
	}
	p := newPod(t, "10.244.1.2/24", "10.244.1.3/24")
	p.serveUDP(t, "10.244.1.2:53")
	p.serveUDP(t, "10.244.1.3:53")
	dns := sp("dns", model.IPv4, model.UDP, "10.96.0.53", 53, endpoint("10.244.1.2", 53))
	s := stateOf(dns)
	if err := b.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	env.enterCgroup(t)
	c, err := net.Dial("udp", "10.96.0.53:53")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 100)
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("q")); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "10.244.1.2:53" {
		t.Fatalf("first query: %q, %v", buf[:n], err)
	}

	dns.ClusterEndpoints = []model.Endpoint{endpoint("10.244.1.3", 53)}
	if err := b.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	start := time.Now()
	_, err = c.Write([]byte("q"))
	if err == nil {
		_, err = c.Read(buf)
	}
	// A destroyed UDP socket is disconnected with ECONNABORTED pending:
	// a send fails with "destination address required", a receive with
	// "connection aborted".
	if !errors.Is(err, syscall.ECONNABORTED) && !errors.Is(err, syscall.EDESTADDRREQ) {
		t.Fatalf("query on the socket to the removed endpoint: %v, want it destroyed", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("the error took %s", d)
	}
	if got, err := dialRead(t, "udp", "10.96.0.53:53"); err != nil || got != "10.244.1.3:53" {
		t.Fatalf("a new socket: %q, %v", got, err)
	}
}

// TestCgroupChange: a restart with another --cgroup-path moves the hooks
// there instead of updating the links pinned for the old cgroup.
func TestCgroupChange(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	p := newPod(t, "10.244.1.2/24")
	p.serveTCP(t, "10.244.1.2:8080")
	s := stateOf(sp("web", model.IPv4, model.TCP, "10.96.0.10", 80, endpoint("10.244.1.2", 8080)))
	first := env.backend(t)
	if err := first.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	other := env.cgroup + "-other"
	if err := os.Mkdir(other, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(other) })
	second, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: other})
	if err != nil {
		t.Fatal(err)
	}
	if err := second.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { second.Cleanup(t.Context()) })

	env.enterCgroup(t)
	if _, err := net.DialTimeout("tcp", "10.96.0.10:80", time.Second); err == nil {
		t.Error("the old cgroup still has the hooks")
	}
	moveSelf := func(dir string) {
		if err := os.WriteFile(dir+"/cgroup.procs", []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			t.Fatal(err)
		}
	}
	moveSelf(other)
	defer moveSelf(env.cgroup)
	if got, err := dialRead(t, "tcp", "10.96.0.10:80"); err != nil || got != "10.244.1.2:8080" {
		t.Fatalf("in the new cgroup: %q, %v", got, err)
	}
}
