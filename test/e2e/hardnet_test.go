//go:build linux && e2e

package e2e

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/svcnat/svcnat/test/testbed"
)

// TestHardNetwork runs the hard parts of real networks (review of the eBPF
// datapath, 2026-11-30) for every proxy, kube-proxy being the reference,
// on a test bed with an overlay, a second uplink, a router with a
// 1280-byte hop and source validation on the pod interfaces
// (testbed.Options.HardNetwork).
func TestHardNetwork(t *testing.T) {
	forEachProxy(t, func(t *testing.T, b testbed.Binaries, kind testbed.ProxyKind) {
		runSuite(t, b, kind, testbed.Options{PodPorts: testbed.DefaultPodPorts, HardNetwork: true}, hardScenarios)
	})
}

var hardScenarios = []scenario{
	{name: "RemoteEndpointThroughOverlayAndSecondUplink", run: testOverlayAndUplink},
	{name: "PathMTUThrough1280ByteHop", run: testPathMTU},
	{name: "RawSocketPodCannotInject", run: testNoInjection},
	// Last: it leaves the nodes' conntrack tables full of the flood.
	{name: "FloodSparesEstablishedFlows", run: testFlood},
}

// testOverlayAndUplink: NodePort, LoadBalancer IP and externalIP traffic
// from the client to node1, with the only endpoint on node2, reached first
// through the VXLAN overlay, then through the second uplink, neither
// carrying a proxy program. The endpoint must see node1's address on the
// device the packets left through (masquerade decided where the DNAT is).
func testOverlayAndUplink(t *testing.T, e *env) {
	lbIP, extIP := netip.MustParseAddr("192.168.78.31"), netip.MustParseAddr("192.168.78.30")
	s := newService("remote", corev1.ServiceTypeLoadBalancer, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	s.Spec.ExternalIPs = []string{extIP.String()}
	svc := e.service(t, s)
	e.slice(t, tcpSlice("remote", "remote-1", e.ready("node2-a")...))
	e.updateStatus(t, "remote", lbIP)
	node1, node2 := e.c.Nodes[0], e.c.Nodes[1]
	client := e.c.ClientOrigin()
	t.Cleanup(func() {
		if err := node1.RouteVia(node2, "ov0"); err != nil {
			t.Error(err)
		}
	})
	for _, via := range []struct {
		dev  string
		masq netip.Addr
	}{{"ov0", node1.OverlayIP}, {"eth1", node1.Uplink2IP}} {
		if err := node1.RouteVia(node2, via.dev); err != nil {
			t.Fatal(err)
		}
		for _, f := range []struct {
			name string
			addr netip.AddrPort
		}{
			{"NodePort", nodePort(t, svc, node1, 0)},
			{"LoadBalancer IP", netip.AddrPortFrom(lbIP, 80)},
			{"externalIP", netip.AddrPortFrom(extIP, 80)},
		} {
			e.reachesOnly(t, client, "tcp", f.addr, "node2-a")
			seen := map[netip.Addr]int{}
			for _, r := range e.probe(t, client, testbed.ProbeSpec{Proto: "tcp", Addr: f.addr, N: 5}) {
				if !r.OK() {
					t.Errorf("%s %s via %s: %s", f.name, f.addr, via.dev, r.Err)
					continue
				}
				seen[r.ClientIP()]++
				if r.ClientIP() != via.masq {
					t.Errorf("%s %s via %s: the endpoint saw %s, want %s (node1's address on %s)", f.name, f.addr, via.dev, r.Client, via.masq, via.dev)
				}
			}
			t.Logf("%s: %s %s to node2-a through node1's %s: sources the endpoint saw %v", e.kind, f.name, f.addr, via.dev, seen)
		}
	}
}

// testPathMTU: a 1 MiB answer through node1's NodePort to the far client,
// across the router's 1280-byte hop, from a local (node1-a) and from a
// remote (node2-a, through the overlay) endpoint, IPv4 and IPv6, arrives
// whole: the router's "fragmentation needed" or "packet too big" to the
// NodePort address reaches the endpoint translated. The router must have
// sent some of each (or the hop was not in the way).
func testPathMTU(t *testing.T, e *env) {
	const size = 1 << 20
	node1 := e.c.Nodes[0]
	far := e.c.FarClientOrigin()
	counters := []string{"IcmpOutDestUnreachs", "Icmp6OutPktTooBigs"}
	before := netCounters(t, e.c.Router, counters...)
	for _, fam := range []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol} {
		for _, pod := range []string{"node1-a", "node2-a"} {
			name := strings.ToLower("pmtu-" + string(fam) + "-" + pod)
			s := newService(name, corev1.ServiceTypeNodePort, svcPort("", corev1.ProtocolTCP, 80, web))
			s.Spec.IPFamilies = []corev1.IPFamily{fam}
			svc := e.service(t, s)
			slice := testbed.EndpointSlice(ns, name, name+"-1",
				[]discoveryv1.EndpointPort{testbed.SlicePort("", corev1.ProtocolTCP, web)}, e.ready(pod)...)
			nodeIP := node1.IP
			if fam == corev1.IPv6Protocol {
				slice.AddressType = discoveryv1.AddressTypeIPv6
				slice.Endpoints[0].Addresses = []string{e.pod(pod).IP6.String()}
				nodeIP = node1.IP6
			}
			e.slice(t, slice)
			addr := netip.AddrPortFrom(nodeIP, uint16(svc.Spec.Ports[0].NodePort))
			e.reachesOnly(t, far, "http", addr, pod)
			for i := range 2 {
				start := time.Now()
				n, err := fetchBytes(t, far.Netns, addr, size)
				if err != nil || n != size {
					t.Errorf("%d: 1 MiB from %s through NodePort %s across the %d-byte hop: %d of %d bytes (%v)", i, pod, addr, testbed.SmallMTU, n, size, err)
					continue
				}
				t.Logf("%s: 1 MiB from %s through NodePort %s across the %d-byte hop: whole in %v", e.kind, pod, addr, testbed.SmallMTU, time.Since(start).Round(time.Millisecond))
			}
		}
	}
	after := netCounters(t, e.c.Router, counters...)
	t.Logf("%s: the router sent %d ICMP destination unreachable (fragmentation needed) and %d ICMPv6 packet too big",
		e.kind, after[0]-before[0], after[1]-before[1])
	for i, c := range counters {
		if after[i] == before[i] {
			t.Errorf("the router's %s did not grow: the 1280-byte hop was not exercised", c)
		}
	}
}

// netCounters reads SNMP counters of a namespace (nstat's names).
func netCounters(t *testing.T, netns string, names ...string) []int {
	t.Helper()
	out, err := runIn(netns, "nstat", "-asz")
	if err != nil {
		t.Fatalf("nstat in %s: %v: %s", netns, err, out)
	}
	got := make([]int, len(names))
	for i, name := range names {
		found := false
		for l := range strings.Lines(out) {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == name {
				if got[i], err = strconv.Atoi(f[1]); err != nil {
					t.Fatalf("nstat %s in %s: %v", name, netns, err)
				}
				found = true
			}
		}
		if !found {
			t.Fatalf("no counter %s in %s:\n%s", name, netns, out)
		}
	}
	return got
}

// fetchBytes asks the echo server behind addr, from netns, for n bytes
// over HTTP/1.0 and returns how many body bytes arrived.
func fetchBytes(t *testing.T, netns string, addr netip.AddrPort, n int) (int, error) {
	t.Helper()
	var got []byte
	var err error
	inNetns(t, netns, func() {
		var c net.Conn
		if c, err = net.DialTimeout("tcp", addr.String(), 3*time.Second); err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err = fmt.Fprintf(c, "GET /?bytes=%d HTTP/1.0\r\n\r\n", n); err != nil {
			return
		}
		got, err = io.ReadAll(c)
	})
	_, body, ok := bytes.Cut(got, []byte("\r\n\r\n"))
	if !ok && err == nil {
		err = fmt.Errorf("no HTTP header in %d bytes", len(got))
	}
	return len(body), err
}

// testNoInjection: a pod with raw-socket rights (node1-b) forges datagrams
// with the endpoint's address and the translated tuple of the client's UDP
// flow through node1's NodePort (read from node1's conntrack). With source
// validation on node1-b's interface off, they reach the client (the forgery
// is right); with it on, as the test bed has it, none does, and the flow
// still works: the proxy's datapath must not bypass the node's source
// validation.
func testNoInjection(t *testing.T, e *env) {
	svc := e.service(t, newService("inject", corev1.ServiceTypeNodePort, svcPort("", corev1.ProtocolUDP, 53, udpA)))
	e.slice(t, testbed.EndpointSlice(ns, "inject", "inject-1",
		[]discoveryv1.EndpointPort{testbed.SlicePort("", corev1.ProtocolUDP, udpA)}, e.ready("node1-a")...))
	node1 := e.c.Nodes[0]
	addr := nodePort(t, svc, node1, 0)
	client := e.c.ClientOrigin()
	e.reachesOnly(t, client, "udp", addr, "node1-a")
	var flow *net.UDPConn
	var err error
	inNetns(t, client.Netns, func() { flow, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr)) })
	if err != nil {
		t.Fatal(err)
	}
	defer flow.Close()
	// ask sends a query and returns the datagrams that arrive within
	// wait: the answer, and any forgery.
	ask := func(query string, wait time.Duration, during func()) []string {
		if _, err := flow.Write([]byte(query)); err != nil {
			t.Fatal(err)
		}
		if during != nil {
			during()
		}
		var got []string
		buf := make([]byte, 2048)
		flow.SetReadDeadline(time.Now().Add(wait))
		for {
			n, err := flow.Read(buf)
			if err != nil {
				return got
			}
			got = append(got, string(buf[:n]))
		}
	}
	if got := ask("query", time.Second, nil); len(got) == 0 {
		t.Fatalf("no answer on the client's flow to %s", addr)
	}
	local := netip.MustParseAddrPort(flow.LocalAddr().String())
	reply := replyTuple(t, node1.Netns, client.IP, local.Port())
	t.Logf("%s: the client's flow %s -> %s is, seen from node1-a, %s -> %s", e.kind, local, addr, reply[0], reply[1])
	forge := func() {
		inNetns(t, e.pod("node1-b").Netns, func() {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
			if err != nil {
				t.Errorf("raw socket in node1-b: %v", err)
				return
			}
			defer unix.Close(fd)
			pkt := ipv4Packet(unix.IPPROTO_UDP, reply[0], reply[1], []byte("INJECTED"))
			for range 5 {
				if err := unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: reply[1].Addr().As4()}); err != nil {
					t.Errorf("send the forged datagram from node1-b: %v", err)
				}
			}
		})
	}
	injected := func(got []string) int {
		n := 0
		for _, g := range got {
			if g == "INJECTED" {
				n++
			}
		}
		return n
	}
	sysctl := func(v string) {
		if out, err := runIn(node1.Netns, "sysctl", "-q", "-w", "net.ipv4.conf.p-b.rp_filter="+v); err != nil {
			t.Fatalf("rp_filter=%s on node1's p-b: %v: %s", v, err, out)
		}
	}
	sysctl("0")
	open := injected(ask("query", time.Second, forge))
	sysctl("1")
	validated := ask("query", 2*time.Second, forge)
	t.Logf("%s: forged datagrams from node1-b that reached the client: %d of 5 without source validation, %d of 5 with it; %d answers to the real query",
		e.kind, open, injected(validated), len(validated)-injected(validated))
	if open == 0 {
		t.Errorf("without source validation no forged datagram reached the client: the forgery is wrong, the scenario proves nothing")
	}
	if n := injected(validated); n > 0 {
		t.Errorf("%d forged datagrams from node1-b reached the client's flow through the source validation", n)
	}
	if len(validated)-injected(validated) == 0 {
		t.Errorf("the client's flow got no answer after the forgery")
	}
}

// replyTuple reads from conntrack in netns the reply direction (source,
// destination) of the UDP flow from client:port.
func replyTuple(t *testing.T, netns string, client netip.Addr, port uint16) [2]netip.AddrPort {
	t.Helper()
	out, err := runIn(netns, "conntrack", "-L", "-p", "udp", "-s", client.String(), "--sport", strconv.Itoa(int(port)))
	if err != nil {
		t.Fatalf("conntrack -L in %s: %v: %s", netns, err, out)
	}
	for l := range strings.Lines(out) {
		if !strings.HasPrefix(l, "udp") {
			continue
		}
		v := map[string][]string{}
		for _, f := range strings.Fields(l) {
			if k, val, ok := strings.Cut(f, "="); ok {
				v[k] = append(v[k], val)
			}
		}
		if len(v["src"]) < 2 || len(v["sport"]) < 2 {
			break
		}
		src, err1 := netip.ParseAddrPort(v["src"][1] + ":" + v["sport"][1])
		dst, err2 := netip.ParseAddrPort(v["dst"][1] + ":" + v["dport"][1])
		if err1 == nil && err2 == nil {
			return [2]netip.AddrPort{src, dst}
		}
	}
	t.Fatalf("no conntrack entry for udp from %s:%d in %s:\n%s", client, port, netns, out)
	return [2]netip.AddrPort{}
}

// The flood: 200,000 new flows, paced at up to 10,000 a second, within
// 60 s, as the issue asks. Each spoofed SYN is carried through the whole
// path (veth, the node's NAT, the endpoint's answer) in the softirq of the
// CPU that sent it, so one sender reached only 3,800-6,200/s on the 2-core
// machine; floodSenders raw sockets share the flood, one per CPU.
const (
	floodFlows = 200000
	floodRate  = 10000
	floodLimit = 60 * time.Second
)

var floodSenders = min(runtime.NumCPU(), 4)

// testFlood: 20 established TCP flows from the client through node1's
// NodePort survive floodFlows new flows (SYNs from spoofed sources in
// 100.64.0.0/10, raw, from the client) to the same NodePort.
func testFlood(t *testing.T, e *env) {
	svc := e.simpleService(t, "flood", corev1.ServiceTypeNodePort, "node1-a", "node2-a")
	node1 := e.c.Nodes[0]
	addr := nodePort(t, svc, node1, 0)
	client := e.c.ClientOrigin()
	e.reachesOnly(t, client, "tcp", addr, "node1-a", "node2-a")
	var established []net.Conn
	t.Cleanup(func() {
		for _, c := range established {
			c.Close()
		}
	})
	inNetns(t, client.Netns, func() {
		for range 20 {
			c, err := net.DialTimeout("tcp", addr.String(), 3*time.Second)
			if err != nil {
				t.Errorf("established flow: %v", err)
				return
			}
			established = append(established, c)
		}
	})
	if t.Failed() {
		return
	}
	// The echo server greets with a line, then echoes lines.
	echo := func(c net.Conn, msg string, greeting bool) error {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, msg+"\n"); err != nil {
			return err
		}
		want := 1
		if greeting {
			want = 2
		}
		var got []byte
		buf := make([]byte, 512)
		for bytes.Count(got, []byte("\n")) < want {
			n, err := c.Read(buf)
			if err != nil {
				return fmt.Errorf("after %q: %w", got, err)
			}
			got = append(got, buf[:n]...)
		}
		if !bytes.HasSuffix(got, []byte(msg+"\n")) {
			return fmt.Errorf("got %q, want it to end with the echo of %q", got, msg)
		}
		return nil
	}
	for i, c := range established {
		if err := echo(c, "before", true); err != nil {
			t.Fatalf("established flow %d before the flood: %v", i, err)
		}
	}
	// The raw sockets are made in the client's namespace, which is where
	// their packets are sent from, whichever thread writes them.
	fds := make([]int, floodSenders)
	inNetns(t, client.Netns, func() {
		for k := range fds {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
			if err != nil {
				t.Errorf("raw socket: %v", err)
				return
			}
			fds[k] = fd
			t.Cleanup(func() { unix.Close(fd) })
		}
	})
	if t.Failed() {
		return
	}
	dst := &unix.SockaddrInet4{Addr: addr.Addr().As4()}
	counts := make([]int, len(fds))
	var wg sync.WaitGroup
	start := time.Now()
	for k, fd := range fds {
		// Sender k sends SYNs k, k+senders, ..., each paced to its share of
		// floodRate so that the veths' backlogs drop nothing.
		wg.Go(func() {
			for i := k; i < floodFlows && time.Since(start) < floodLimit; i += len(fds) {
				if n := i / len(fds); n%100 == 0 {
					time.Sleep(time.Until(start.Add(time.Duration(i) * time.Second / floodRate)))
				}
				src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{100, byte(64 + i>>16), byte(i >> 8), byte(i)}), uint16(10000+i%50000))
				if err := unix.Sendto(fd, ipv4Packet(unix.IPPROTO_TCP, src, addr, nil), 0, dst); err != nil {
					t.Errorf("send SYN %d: %v", i, err)
					return
				}
				counts[k]++
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	sent := 0
	for _, n := range counts {
		sent += n
	}
	time.Sleep(200 * time.Millisecond)
	broken := 0
	for i, c := range established {
		if err := echo(c, "after", false); err != nil {
			broken++
			t.Errorf("established flow %d after the flood: %v", i, err)
		}
	}
	count, _ := runIn(node1.Netns, "conntrack", "-C")
	r := e.probe(t, client, testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: 5, Timeout: 2 * time.Second})
	fresh := 0
	for _, x := range r {
		if x.OK() {
			fresh++
		}
	}
	t.Logf("%s: flood of %d new flows in %v (%.0f/s) to NodePort %s; node1 conntrack entries after: %s; established flows broken: %d of %d; new connections after the flood answered: %d of %d",
		e.kind, sent, elapsed.Round(time.Millisecond), float64(sent)/elapsed.Seconds(), addr, strings.TrimSpace(count), broken, len(established), fresh, len(r))
	if sent < floodFlows {
		t.Errorf("the flood sent %d of %d SYNs in %v", sent, floodFlows, elapsed)
	}
}

// ipv4Packet builds an IPv4 packet from src to dst: a TCP SYN
// (IPPROTO_TCP) or a UDP datagram carrying payload (IPPROTO_UDP), with
// valid checksums.
func ipv4Packet(proto byte, src, dst netip.AddrPort, payload []byte) []byte {
	var l4 []byte
	var sum int
	if proto == unix.IPPROTO_TCP {
		l4, sum = make([]byte, 20), 16
		binary.BigEndian.PutUint32(l4[4:], 1) // sequence number
		l4[12], l4[13] = 5<<4, 0x02           // 20-byte header; SYN
		binary.BigEndian.PutUint16(l4[14:], 64240)
	} else {
		l4, sum = make([]byte, 8+len(payload)), 6
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		copy(l4[8:], payload)
	}
	binary.BigEndian.PutUint16(l4[0:], src.Port())
	binary.BigEndian.PutUint16(l4[2:], dst.Port())
	s, d := src.Addr().As4(), dst.Addr().As4()
	ip := make([]byte, 20, 20+len(l4))
	ip[0], ip[8], ip[9] = 0x45, 64, proto
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	pseudo := append(append(append([]byte{}, ip[12:20]...), 0, proto), byte(len(l4)>>8), byte(len(l4)))
	c := checksum(append(pseudo, l4...))
	if c == 0 && proto == unix.IPPROTO_UDP {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(l4[sum:], c)
	binary.BigEndian.PutUint16(ip[10:], checksum(ip))
	return append(ip, l4...)
}

// checksum is the Internet checksum (RFC 1071) of b.
func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}
