//go:build linux

package ebpf

import (
	"encoding/binary"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

const (
	tcxNext  = 0xffffffff // TCX_NEXT (-1)
	tcxDrop  = 2          // TCX_DROP
	tcxRedir = 7          // TCX_REDIRECT
)

// tuple is what the tc programs look at and rewrite.
type tuple struct {
	src, dst     netip.AddrPort
	proto        uint8
	syn          bool
	payloadBytes int
}

func (t tuple) String() string { return fmt.Sprintf("%d %s -> %s", t.proto, t.src, t.dst) }

func checksum(sum uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// packet builds an Ethernet frame for t with correct checksums.
func packet(t tuple) []byte {
	l4 := make([]byte, 8)
	if t.proto == protoTCP {
		l4 = make([]byte, 20)
		l4[12] = 5 << 4
		if t.syn {
			l4[13] = 0x02
		} else {
			l4[13] = 0x10
		}
		binary.BigEndian.PutUint16(l4[14:], 65535)
	}
	l4 = append(l4, make([]byte, t.payloadBytes)...)
	binary.BigEndian.PutUint16(l4[0:], t.src.Port())
	binary.BigEndian.PutUint16(l4[2:], t.dst.Port())
	if t.proto == protoUDP {
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
	}
	var l3 []byte
	eth := []byte{2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0, 0}
	if t.src.Addr().Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		l3 = make([]byte, 20)
		l3[0] = 0x45
		binary.BigEndian.PutUint16(l3[2:], uint16(20+len(l4)))
		l3[8] = 64
		l3[9] = t.proto
		s, d := t.src.Addr().As4(), t.dst.Addr().As4()
		copy(l3[12:], s[:])
		copy(l3[16:], d[:])
		binary.BigEndian.PutUint16(l3[10:], fold(checksum(0, l3)))
	} else {
		binary.BigEndian.PutUint16(eth[12:], 0x86dd)
		l3 = make([]byte, 40)
		l3[0] = 0x60
		binary.BigEndian.PutUint16(l3[4:], uint16(len(l4)))
		l3[6] = t.proto
		l3[7] = 64
		s, d := t.src.Addr().As16(), t.dst.Addr().As16()
		copy(l3[8:], s[:])
		copy(l3[24:], d[:])
	}
	csumOff := 16
	if t.proto == protoUDP {
		csumOff = 6
	}
	binary.BigEndian.PutUint16(l4[csumOff:], fold(pseudoSum(t.src.Addr(), t.dst.Addr(), t.proto, len(l4))+checksumNoFold(l4)))
	return append(append(eth, l3...), l4...)
}

func checksumNoFold(b []byte) uint32 { return checksum(0, b) }

func pseudoSum(src, dst netip.Addr, proto uint8, l4len int) uint32 {
	var sum uint32
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		sum = checksum(sum, s[:])
		sum = checksum(sum, d[:])
	} else {
		s, d := src.As16(), dst.As16()
		sum = checksum(sum, s[:])
		sum = checksum(sum, d[:])
	}
	return sum + uint32(proto) + uint32(l4len)
}

// parsePacket reads the tuple of a frame and fails the test when a
// checksum is wrong.
func parsePacket(t *testing.T, b []byte) tuple {
	t.Helper()
	var out tuple
	var l4 []byte
	switch binary.BigEndian.Uint16(b[12:]) {
	case 0x0800:
		l3 := b[14:34]
		out.proto = l3[9]
		s, _ := netip.AddrFromSlice(l3[12:16])
		d, _ := netip.AddrFromSlice(l3[16:20])
		l4 = b[34:]
		out.src, out.dst = netip.AddrPortFrom(s, 0), netip.AddrPortFrom(d, 0)
	case 0x86dd:
		l3 := b[14:54]
		out.proto = l3[6]
		s, _ := netip.AddrFromSlice(l3[8:24])
		d, _ := netip.AddrFromSlice(l3[24:40])
		l4 = b[54:]
		out.src, out.dst = netip.AddrPortFrom(s, 0), netip.AddrPortFrom(d, 0)
	default:
		t.Fatalf("not IP: %x", b)
	}
	out.src = netip.AddrPortFrom(out.src.Addr(), binary.BigEndian.Uint16(l4[0:]))
	out.dst = netip.AddrPortFrom(out.dst.Addr(), binary.BigEndian.Uint16(l4[2:]))
	if !checksumsOK(b) {
		t.Errorf("%s: checksum wrong", out)
	}
	return out
}

// checksumsOK verifies the IPv4 header and TCP/UDP checksums of a frame
// packet could have built.
func checksumsOK(b []byte) bool {
	var l3, l4 []byte
	var src, dst netip.Addr
	var proto uint8
	if binary.BigEndian.Uint16(b[12:]) == 0x0800 {
		l3, l4 = b[14:34], b[34:]
		if fold(checksum(0, l3)) != 0 {
			return false
		}
		src, _ = netip.AddrFromSlice(l3[12:16])
		dst, _ = netip.AddrFromSlice(l3[16:20])
		proto = l3[9]
	} else {
		l3, l4 = b[14:54], b[54:]
		src, _ = netip.AddrFromSlice(l3[8:24])
		dst, _ = netip.AddrFromSlice(l3[24:40])
		proto = l3[6]
	}
	return fold(pseudoSum(src, dst, proto, len(l4))+checksumNoFold(l4)) == 0
}

func TestPacketChecksums(t *testing.T) {
	for _, in := range []tuple{
		{src: ap("198.51.100.7:40000"), dst: ap("192.0.2.1:30080"), proto: protoTCP, payloadBytes: 3},
		{src: ap("198.51.100.7:40000"), dst: ap("192.0.2.1:30080"), proto: protoUDP, payloadBytes: 4},
		{src: ap("[2001:db8::7]:40000"), dst: ap("[2001:db8::1]:30080"), proto: protoTCP},
	} {
		b := packet(in)
		if !checksumsOK(b) {
			t.Errorf("%s: built with a wrong checksum", in)
		}
		for _, off := range []int{len(b) - 1, 30, 37} { // payload or L4 header; an address byte
			bad := append([]byte(nil), b...)
			bad[off] ^= 0x40
			if checksumsOK(bad) {
				t.Errorf("%s: byte %d changed, checksums still pass", in, off)
			}
		}
	}
}

// skbContext is the start of struct __sk_buff, up to ifindex: what a test
// run may set.
type skbContext struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority, IngressIfindex, Ifindex uint32
}

type tcHarness struct {
	t       *testing.T
	prog    *ebpf.Program
	ifindex int
	mac     net.HardwareAddr
}

// run passes a frame built from in, addressed to the interface's MAC
// address, through the tc program and returns the verdict and the frame
// that comes out.
func (h *tcHarness) run(in tuple) (uint32, []byte) {
	h.t.Helper()
	frame := packet(in)
	copy(frame[0:6], h.mac)
	return h.runFrame(frame)
}

func (h *tcHarness) runFrame(frame []byte) (uint32, []byte) {
	h.t.Helper()
	opts := &ebpf.RunOptions{
		Data:    frame,
		DataOut: make([]byte, 1500),
		Context: skbContext{Ifindex: uint32(h.ifindex), IngressIfindex: uint32(h.ifindex)},
	}
	ret, err := h.prog.Run(opts)
	if err != nil {
		h.t.Fatalf("run %s: %v", h.prog, err)
	}
	return ret, opts.DataOut
}

// flow is a conntrack entry as the tests look at it: the original
// direction's tuple and where the reply comes from and goes to.
type flow struct {
	orig         tuple
	replySrc     netip.AddrPort
	replyDst     netip.AddrPort
	mark         uint32
	svcnatMarked bool
}

// flows lists the conntrack entries of the test's namespace.
func flows(t *testing.T) []flow {
	t.Helper()
	var out []flow
	for _, family := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		list, err := netlink.ConntrackTableList(netlink.ConntrackTable, family)
		if err != nil {
			t.Fatalf("list conntrack: %v", err)
		}
		for _, f := range list {
			ap := func(ip net.IP, port uint16) netip.AddrPort { return netip.AddrPortFrom(addrOf(ip), port) }
			out = append(out, flow{
				orig:         tuple{src: ap(f.Forward.SrcIP, f.Forward.SrcPort), dst: ap(f.Forward.DstIP, f.Forward.DstPort), proto: f.Forward.Protocol},
				replySrc:     ap(f.Reverse.SrcIP, f.Reverse.SrcPort),
				replyDst:     ap(f.Reverse.DstIP, f.Reverse.DstPort),
				mark:         f.Mark,
				svcnatMarked: f.Mark&ctMarkMask == ctMark,
			})
		}
	}
	return out
}

// flowOf returns the conntrack entry whose original tuple is in's.
func flowOf(t *testing.T, in tuple) (flow, bool) {
	t.Helper()
	want := tuple{src: in.src, dst: in.dst, proto: in.proto}
	for _, f := range flows(t) {
		if f.orig == want {
			return f, true
		}
	}
	return flow{}, false
}

// checkPortUnreachable fails the test unless frame is an ICMP (ICMPv6)
// port unreachable from in's destination to its source, quoting in, with
// valid checksums, and with the MAC addresses of in swapped.
func checkPortUnreachable(t *testing.T, frame, orig []byte) {
	t.Helper()
	in := parsePacket(t, orig)
	if string(frame[0:6]) != string(orig[6:12]) || string(frame[6:12]) != string(orig[0:6]) {
		t.Errorf("MAC addresses not swapped: %x", frame[:12])
	}
	if in.src.Addr().Is4() {
		ip, icmp := frame[14:34], frame[34:]
		src, _ := netip.AddrFromSlice(ip[12:16])
		dst, _ := netip.AddrFromSlice(ip[16:20])
		switch {
		case binary.BigEndian.Uint16(frame[12:]) != 0x0800 || ip[9] != 1:
			t.Fatalf("not ICMP: %x", frame)
		case fold(checksum(0, ip)) != 0:
			t.Error("IP header checksum wrong")
		case src != in.dst.Addr() || dst != in.src.Addr():
			t.Errorf("ICMP error from %s to %s, want from %s to %s", src, dst, in.dst.Addr(), in.src.Addr())
		case icmp[0] != 3 || icmp[1] != 3:
			t.Errorf("ICMP type %d code %d, want 3/3 (port unreachable)", icmp[0], icmp[1])
		case fold(checksum(0, icmp)) != 0:
			t.Error("ICMP checksum wrong")
		case string(icmp[8:36]) != string(orig[14:42]):
			t.Errorf("quote %x, want %x", icmp[8:36], orig[14:42])
		}
		return
	}
	ip, icmp := frame[14:54], frame[54:]
	src, _ := netip.AddrFromSlice(ip[8:24])
	dst, _ := netip.AddrFromSlice(ip[24:40])
	switch {
	case binary.BigEndian.Uint16(frame[12:]) != 0x86dd || ip[6] != 58:
		t.Fatalf("not ICMPv6: %x", frame)
	case src != in.dst.Addr() || dst != in.src.Addr():
		t.Errorf("ICMPv6 error from %s to %s", src, dst)
	case icmp[0] != 1 || icmp[1] != 4:
		t.Errorf("ICMPv6 type %d code %d, want 1/4 (port unreachable)", icmp[0], icmp[1])
	case fold(pseudoSum(src, dst, 58, len(icmp))+checksumNoFold(icmp)) != 0:
		t.Error("ICMPv6 checksum wrong")
	case string(icmp[8:56]) != string(orig[14:62]):
		t.Errorf("quote %x, want %x", icmp[8:56], orig[14:62])
	}
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// tcNode is a test namespace set up as a node for the tc program: the
// uplink up0 (192.0.2.1, 2001:db8::1) that traffic from outside arrives on,
// and an overlay-like device ov0 (10.99.0.1, fd00:99::1) the routes to the
// remote pod CIDRs (10.244.2.0/24, fd00:244:2::/64) leave through.
func tcNode(t *testing.T) *net.Interface {
	t.Helper()
	peerNS := netnstest.NewNamespace(t, "sn-x")
	netnstest.Run(t, "", "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p", "netns", peerNS)
	netnstest.Run(t, "", "ip", "addr", "add", "192.0.2.1/24", "dev", "up0")
	netnstest.Run(t, "", "ip", "-6", "addr", "add", "2001:db8::1/64", "dev", "up0", "nodad")
	netnstest.Run(t, "", "ip", "link", "set", "up0", "up")
	netnstest.Run(t, "", "ip", "link", "add", "ov0", "type", "veth", "peer", "name", "ov0p", "netns", peerNS)
	netnstest.Run(t, "", "ip", "addr", "add", "10.99.0.1/24", "dev", "ov0")
	netnstest.Run(t, "", "ip", "-6", "addr", "add", "fd00:99::1/64", "dev", "ov0", "nodad")
	netnstest.Run(t, "", "ip", "link", "set", "ov0", "up")
	netnstest.Run(t, "", "ip", "route", "add", "10.244.2.0/24", "via", "10.99.0.2", "dev", "ov0")
	netnstest.Run(t, "", "ip", "-6", "route", "add", "fd00:244:2::/64", "via", "fd00:99::2", "dev", "ov0")
	for _, k := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		netnstest.Run(t, "", "sysctl", "-q", "-w", k)
	}
	iface, err := net.InterfaceByName("up0")
	if err != nil {
		t.Fatal(err)
	}
	return iface
}

// TestTCPrograms runs frames through the tc ingress program (prog.Run) and
// checks the conntrack entries it creates: their NAT (where the kernel
// will send the flow, and the address it masquerades with), their mark,
// and what the program drops, rejects or leaves alone.
func TestTCPrograms(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	iface := tcNode(t)
	b, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup, Interfaces: []string{"up0"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Cleanup(t.Context()) })
	h := &tcHarness{t: t, prog: b.tc.SvcnatTcIngress, ifindex: iface.Index, mac: iface.HardwareAddr}

	local := func(ip string, port uint16) model.Endpoint {
		return model.Endpoint{IP: mustAddr(ip), Port: port, Local: true}
	}
	withFrontend := func(p *model.ServicePort, kind model.FrontendKind, addrPort string) *model.ServicePort {
		a := ap(addrPort)
		p.Frontends = append(p.Frontends, model.Frontend{Kind: kind, IP: a.Addr(), Port: a.Port()})
		return p
	}
	npLocal := withFrontend(sp("np-local", model.IPv4, model.TCP, "10.96.0.1", 80, local("10.244.1.2", 8080)), model.NodePort, "192.0.2.1:30080")
	npLocal.ExternalTrafficLocal = true
	npLocal.LocalEndpoints = npLocal.ClusterEndpoints
	npRemote := withFrontend(sp("np-remote", model.IPv4, model.UDP, "10.96.0.2", 53, endpoint("10.244.2.5", 5353)), model.NodePort, "192.0.2.1:30053")
	lbRanges := withFrontend(sp("lb-ranges", model.IPv4, model.TCP, "10.96.0.3", 443, local("10.244.1.2", 8443)), model.LoadBalancer, "203.0.113.10:443")
	lbRanges.SourceRanges = []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}
	sticky := withFrontend(sp("sticky", model.IPv4, model.TCP, "10.96.0.4", 80,
		local("10.244.1.2", 8080), local("10.244.1.3", 8080), local("10.244.1.4", 8080)), model.ExternalIP, "203.0.113.20:80")
	sticky.AffinityTimeout = time.Hour
	spread := withFrontend(sp("spread", model.IPv4, model.TCP, "10.96.0.5", 80,
		local("10.244.1.2", 8080), local("10.244.1.3", 8080)), model.ExternalIP, "203.0.113.30:80")
	empty := withFrontend(sp("empty", model.IPv4, model.TCP, "10.96.0.6", 80), model.NodePort, "192.0.2.1:30099")
	empty6 := withFrontend(sp("empty", model.IPv6, model.UDP, "fd00:96::6", 80), model.NodePort, "[2001:db8::1]:30099")
	noLocal := withFrontend(sp("no-local", model.IPv4, model.TCP, "10.96.0.7", 80, endpoint("10.244.2.5", 8080)), model.NodePort, "192.0.2.1:30098")
	noLocal.ExternalTrafficLocal = true
	v6 := withFrontend(sp("v6", model.IPv6, model.TCP, "fd00:96::1", 80, endpoint("fd00:244:2::5", 8080)), model.NodePort, "[2001:db8::1]:30080")
	moving := withFrontend(sp("moving", model.IPv4, model.UDP, "10.96.0.8", 53, local("10.244.1.2", 53)), model.ExternalIP, "203.0.113.40:53")
	all := stateOf(npLocal, npRemote, lbRanges, sticky, spread, empty, empty6, noLocal, v6, moving)
	all.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}
	if err := b.Sync(t.Context(), all); err != nil {
		t.Fatal(err)
	}
	client := ap("198.51.100.7:40000")
	// newFlow runs in and requires a conntrack entry for it, marked as
	// svcnat's, whose reply comes from replySrc to replyDst ("" for any
	// address, port 0 for any port).
	newFlow := func(t *testing.T, in tuple, replySrc, replyDst string) flow {
		t.Helper()
		if ret, _ := h.run(in); ret != tcxNext {
			t.Fatalf("%s: verdict %d, want TCX_NEXT", in, ret)
		}
		f, ok := flowOf(t, in)
		if !ok {
			t.Fatalf("%s: no conntrack entry", in)
		}
		if !f.svcnatMarked {
			t.Errorf("%s: conntrack mark %#x, not svcnat's", in, f.mark)
		}
		if f.replySrc != ap(replySrc) {
			t.Errorf("%s: reply from %s, want %s (the endpoint)", in, f.replySrc, replySrc)
		}
		want := ap(replyDst)
		if f.replyDst.Addr() != want.Addr() || (want.Port() != 0 && f.replyDst.Port() != want.Port()) {
			t.Errorf("%s: reply to %s, want %s", in, f.replyDst, replyDst)
		}
		return f
	}

	t.Run("DNAT to a local endpoint, client address kept", func(t *testing.T) {
		in := tuple{src: client, dst: ap("192.0.2.1:30080"), proto: protoTCP, syn: true, payloadBytes: 3}
		newFlow(t, in, "10.244.1.2:8080", client.String())
		in.syn = false
		before := len(flows(t))
		if ret, _ := h.run(in); ret != tcxNext || len(flows(t)) != before {
			t.Errorf("next packet of the flow: verdict %d, %d entries (was %d)", ret, len(flows(t)), before)
		}
	})
	t.Run("a remote endpoint is masqueraded with the egress device's address", func(t *testing.T) {
		in := tuple{src: client, dst: ap("192.0.2.1:30053"), proto: protoUDP, payloadBytes: 7}
		newFlow(t, in, "10.244.2.5:5353", "10.99.0.1:0")
	})
	t.Run("IPv6 remote endpoint masqueraded", func(t *testing.T) {
		c6 := ap("[2001:db8::77]:40000")
		in := tuple{src: c6, dst: ap("[2001:db8::1]:30080"), proto: protoTCP, syn: true, payloadBytes: 1}
		newFlow(t, in, "[fd00:244:2::5]:8080", "[fd00:99::1]:0")
	})
	t.Run("source ranges", func(t *testing.T) {
		in := tuple{src: ap("192.0.2.99:40000"), dst: ap("203.0.113.10:443"), proto: protoTCP, syn: true}
		if ret, _ := h.run(in); ret != tcxDrop {
			t.Errorf("from outside the source ranges: verdict %d, want drop", ret)
		}
		if _, ok := flowOf(t, in); ok {
			t.Error("a dropped packet left a conntrack entry")
		}
		in.src = client
		newFlow(t, in, "10.244.1.2:8443", client.String())
	})
	t.Run("affinity", func(t *testing.T) {
		var first netip.AddrPort
		for i := range 30 {
			in := tuple{src: netip.AddrPortFrom(client.Addr(), uint16(41000+i)), dst: ap("203.0.113.20:80"), proto: protoTCP, syn: true}
			h.run(in)
			f, ok := flowOf(t, in)
			if !ok {
				t.Fatalf("flow %d: no conntrack entry", i)
			}
			if i == 0 {
				first = f.replySrc
			} else if f.replySrc != first {
				t.Fatalf("flow %d went to %s, the client's first went to %s", i, f.replySrc, first)
			}
		}
	})
	t.Run("without affinity flows spread", func(t *testing.T) {
		seen := map[netip.AddrPort]int{}
		for i := range 60 {
			in := tuple{src: netip.AddrPortFrom(client.Addr(), uint16(42000+i)), dst: ap("203.0.113.30:80"), proto: protoTCP, syn: true}
			h.run(in)
			f, _ := flowOf(t, in)
			seen[f.replySrc]++
		}
		if len(seen) != 2 {
			t.Errorf("60 flows reached %v", seen)
		}
	})
	t.Run("no endpoints rejects, rate limited", func(t *testing.T) {
		in := tuple{src: client, dst: ap("192.0.2.1:30099"), proto: protoTCP, syn: true, payloadBytes: 20}
		frame := packet(in)
		copy(frame, h.mac)
		ret, out := h.runFrame(frame)
		if ret != tcxRedir {
			t.Fatalf("verdict %d, want redirect (the ICMP error back out)", ret)
		}
		checkPortUnreachable(t, out, frame)
		in6 := tuple{src: ap("[2001:db8::77]:40000"), dst: ap("[2001:db8::1]:30099"), proto: protoUDP, payloadBytes: 20}
		frame = packet(in6)
		copy(frame, h.mac)
		ret, out = h.runFrame(frame)
		if ret != tcxRedir {
			t.Fatalf("IPv6: verdict %d, want redirect", ret)
		}
		checkPortUnreachable(t, out, frame)
		// A flood of rejects: the burst goes out, the rest is dropped.
		sent := 0
		for range 500 {
			if ret, _ := h.run(in); ret == tcxRedir {
				sent++
			}
		}
		if sent < 10 || sent > 100 {
			t.Errorf("%d of 500 back-to-back rejects sent, want about the burst (%d)", sent, 50)
		}
	})
	t.Run("Local policy without local endpoints drops", func(t *testing.T) {
		// A pod of another node (in the cluster CIDRs) is an external
		// client of this node's NodePort too: no short-circuit to the
		// cluster set, which only this node's own sockets get.
		for _, src := range []netip.AddrPort{client, ap("10.244.2.9:40000")} {
			in := tuple{src: src, dst: ap("192.0.2.1:30098"), proto: protoTCP, syn: true}
			if ret, _ := h.run(in); ret != tcxDrop {
				t.Errorf("from %s: verdict %d, want drop", src, ret)
			}
		}
	})
	t.Run("a TCP packet other than a SYN starts no flow", func(t *testing.T) {
		in := tuple{src: ap("198.51.100.8:40001"), dst: ap("192.0.2.1:30080"), proto: protoTCP}
		if ret, _ := h.run(in); ret != tcxNext {
			t.Errorf("verdict %d, want TCX_NEXT", ret)
		}
		if _, ok := flowOf(t, in); ok {
			t.Error("an ACK without a flow made a conntrack entry")
		}
	})
	t.Run("IPv4-mapped addresses on the wire are dropped", func(t *testing.T) {
		in := tuple{src: ap("[::ffff:198.51.100.7]:40000"), dst: ap("[::ffff:203.0.113.10]:443"), proto: protoTCP, syn: true}
		frame := packet6(in)
		copy(frame, h.mac)
		if ret, _ := h.runFrame(frame); ret != tcxDrop {
			t.Errorf("verdict %d, want drop", ret)
		}
	})
	t.Run("IPv6 first fragment starts the flow, later ones pass", func(t *testing.T) {
		in := tuple{src: ap("[2001:db8::78]:40000"), dst: ap("[2001:db8::1]:30080"), proto: protoTCP, syn: true}
		first := withFragmentHeader(packet(in), 0, true)
		copy(first, h.mac)
		if ret, _ := h.runFrame(first); ret != tcxNext {
			t.Fatalf("first fragment: verdict %d", ret)
		}
		if f, ok := flowOf(t, in); !ok || f.replySrc != ap("[fd00:244:2::5]:8080") {
			t.Errorf("first fragment: conntrack entry %+v (%v)", f, ok)
		}
		later := tuple{src: ap("[2001:db8::79]:40000"), dst: in.dst, proto: protoTCP, syn: true}
		frag := withFragmentHeader(packet(later), 1480, false)
		copy(frag, h.mac)
		if ret, _ := h.runFrame(frag); ret != tcxNext {
			t.Errorf("later fragment: verdict %d", ret)
		}
		if _, ok := flowOf(t, later); ok {
			t.Error("a later fragment (its bytes are no ports) made a conntrack entry")
		}
	})
	t.Run("other traffic passes untouched", func(t *testing.T) {
		in := tuple{src: client, dst: ap("192.0.2.1:22"), proto: protoTCP, syn: true}
		frame := packet(in)
		copy(frame, h.mac)
		ret, out := h.runFrame(frame)
		if ret != tcxNext || string(out[:len(frame)]) != string(frame) {
			t.Errorf("verdict %d, frame changed: %v", ret, string(out[:len(frame)]) != string(frame))
		}
		if _, ok := flowOf(t, in); ok {
			t.Error("traffic to no frontend made a conntrack entry")
		}
	})
	t.Run("flows the state no longer allows are forgotten at the next sync", func(t *testing.T) {
		moved := tuple{src: client, dst: ap("203.0.113.40:53"), proto: protoUDP, payloadBytes: 4}
		newFlow(t, moved, "10.244.1.2:53", client.String())
		narrowed := tuple{src: ap("198.51.100.9:40000"), dst: ap("203.0.113.10:443"), proto: protoTCP, syn: true}
		newFlow(t, narrowed, "10.244.1.2:8443", "198.51.100.9:40000")
		kept := tuple{src: ap("198.51.100.10:40000"), dst: ap("203.0.113.10:443"), proto: protoTCP, syn: true}
		newFlow(t, kept, "10.244.1.2:8443", "198.51.100.10:40000")
		// The externalIP moves to another Service whose endpoint also backs
		// the old one elsewhere; the source ranges shrink.
		moving.Frontends = moving.Frontends[:1]
		taker := withFrontend(sp("taker", model.IPv4, model.UDP, "10.96.0.9", 53, local("10.244.1.9", 53)), model.ExternalIP, "203.0.113.40:53")
		lbRanges.SourceRanges = []netip.Prefix{netip.MustParsePrefix("198.51.100.10/32")}
		next := stateOf(npLocal, npRemote, lbRanges, sticky, spread, empty, empty6, noLocal, v6, moving, taker)
		next.ClusterCIDRs = all.ClusterCIDRs
		if err := b.Sync(t.Context(), next); err != nil {
			t.Fatal(err)
		}
		b.sweeper.wait()
		if _, ok := flowOf(t, moved); ok {
			t.Error("a flow to an externalIP given to another Service still goes to the old Service's endpoint")
		}
		if _, ok := flowOf(t, narrowed); ok {
			t.Error("a flow from a client the source ranges no longer allow is still translated")
		}
		if _, ok := flowOf(t, kept); !ok {
			t.Error("a flow the state still allows was forgotten")
		}
		newFlow(t, moved, "10.244.1.9:53", client.String())

		// An endpoint that terminates but still serves drains: new flows
		// avoid it, its flows go on (kube-proxy keeps their conntrack
		// entries); once it stops serving they are forgotten.
		drainFlow := tuple{src: ap("198.51.100.12:40000"), dst: ap("203.0.113.30:80"), proto: protoTCP, syn: true}
		h.run(drainFlow)
		df, ok := flowOf(t, drainFlow)
		if !ok {
			t.Fatal("no flow to drain")
		}
		all := slices.Clone(spread.ClusterEndpoints)
		isDraining := func(e model.Endpoint) bool { return netip.AddrPortFrom(e.IP, e.Port) == df.replySrc }
		spread.ClusterEndpoints = slices.DeleteFunc(slices.Clone(all), isDraining)
		spread.ServingEndpoints = all
		if err := b.Sync(t.Context(), next); err != nil {
			t.Fatal(err)
		}
		b.sweeper.wait()
		if _, ok := flowOf(t, drainFlow); !ok {
			t.Errorf("a flow to %s, terminating but still serving, was forgotten", df.replySrc)
		}
		spread.ServingEndpoints = nil
		if err := b.Sync(t.Context(), next); err != nil {
			t.Fatal(err)
		}
		b.sweeper.wait()
		if _, ok := flowOf(t, drainFlow); ok {
			t.Errorf("a flow to %s, no longer serving, is still translated", df.replySrc)
		}
		spread.ClusterEndpoints = all

		// An endpoint removed while the agent was down: a new agent's
		// first sync forgets its flows.
		spreadFlow := tuple{src: ap("198.51.100.11:40000"), dst: ap("203.0.113.30:80"), proto: protoTCP, syn: true}
		h.run(spreadFlow)
		f, _ := flowOf(t, spreadFlow)
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		spread.ClusterEndpoints = slices.DeleteFunc(spread.ClusterEndpoints, func(e model.Endpoint) bool { return netip.AddrPortFrom(e.IP, e.Port) == f.replySrc })
		b2, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup, Interfaces: []string{"up0"}})
		if err != nil {
			t.Fatal(err)
		}
		if err := b2.Init(t.Context()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b2.Close() })
		if err := b2.Sync(t.Context(), next); err != nil {
			t.Fatal(err)
		}
		b2.sweeper.wait()
		if _, ok := flowOf(t, spreadFlow); ok {
			t.Errorf("after a restart, a flow to %s (removed while the agent was down) is still translated", f.replySrc)
		}

		// A change (after the first sync's full sweep) judges the flows
		// to the frontends of the ServicePorts it names, and only those.
		h.prog = b2.tc.SvcnatTcIngress
		toTaker := tuple{src: ap("198.51.100.14:41000"), dst: ap("203.0.113.40:53"), proto: protoUDP, payloadBytes: 4}
		newFlow(t, toTaker, "10.244.1.9:53", "198.51.100.14:41000")
		without := &model.State{ServicePorts: maps.Clone(next.ServicePorts), ClusterCIDRs: next.ClusterCIDRs,
			Change: &model.Change{Removed: []model.ServicePortName{taker.Name}}}
		delete(without.ServicePorts, taker.Name)
		if err := b2.Sync(t.Context(), without); err != nil {
			t.Fatal(err)
		}
		b2.sweeper.wait()
		if _, ok := flowOf(t, toTaker); ok {
			t.Error("a flow to a removed ServicePort's externalIP is still translated after a change naming it")
		}
		if _, ok := flowOf(t, kept); !ok {
			t.Error("a flow to a ServicePort the change does not name was forgotten")
		}
	})
}

// packet6 builds an IPv6 frame for t even when its addresses are
// IPv4-mapped (packet would build IPv4).
func packet6(t tuple) []byte {
	v4 := tuple{src: netip.AddrPortFrom(mustAddr("2001:db8::1"), t.src.Port()), dst: netip.AddrPortFrom(mustAddr("2001:db8::2"), t.dst.Port()), proto: t.proto, syn: t.syn}
	frame := packet(v4)
	s, d := t.src.Addr().As16(), t.dst.Addr().As16()
	copy(frame[14+8:], s[:])
	copy(frame[14+24:], d[:])
	return frame
}

// withFragmentHeader inserts an IPv6 fragment header (offset in bytes, a
// multiple of 8) after the IPv6 header of frame.
func withFragmentHeader(frame []byte, offset int, more bool) []byte {
	ip := frame[14:54]
	frag := make([]byte, 8)
	frag[0] = ip[6] // next header
	off := uint16(offset)
	if more {
		off |= 1
	}
	binary.BigEndian.PutUint16(frag[2:], off)
	binary.BigEndian.PutUint32(frag[4:], 0x1234)
	ip[6] = 44
	binary.BigEndian.PutUint16(ip[4:], binary.BigEndian.Uint16(ip[4:])+8)
	out := append([]byte(nil), frame[:54]...)
	out = append(out, frag...)
	return append(out, frame[54:]...)
}

// TestInterfacesChange: a restart with fewer interfaces detaches the tc
// programs from the ones left out.
func TestInterfacesChange(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	for _, name := range []string{"ifa", "ifb"} {
		netnstest.Run(t, "", "ip", "link", "add", name, "type", "veth", "peer", "name", name+"p")
	}
	start := func(ifaces ...string) *Backend {
		b, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup, Interfaces: ifaces})
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Init(t.Context()); err != nil {
			t.Fatal(err)
		}
		return b
	}
	attached := func(name string) bool {
		iface, err := net.InterfaceByName(name)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, dir := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: iface.Index, Attach: dir})
			if err != nil {
				t.Fatalf("query tc programs on %s: %v", name, err)
			}
			n += len(res.Programs)
		}
		return n == 1
	}
	first := start("ifa", "ifb")
	if !attached("ifa") || !attached("ifb") {
		t.Fatal("tc programs not attached to both interfaces")
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	second := start("ifa")
	t.Cleanup(func() { second.Cleanup(t.Context()) })
	if !attached("ifa") {
		t.Error("restart detached the tc programs from ifa")
	}
	if attached("ifb") {
		t.Error("restart left the tc programs on ifb, no longer configured")
	}
	if err := second.Cleanup(t.Context()); err != nil {
		t.Fatal(err)
	}
	if attached("ifa") {
		t.Error("cleanup left the tc programs on ifa")
	}
}
