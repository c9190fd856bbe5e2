//go:build linux

package ebpf

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

const (
	tcOK       = 0 // TC_ACT_OK
	tcShot     = 2 // TC_ACT_SHOT
	tcRedirect = 7 // TC_ACT_REDIRECT
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
	b       *Backend
	ifindex int
}

// run passes a packet built from in through prog and returns the verdict
// and the tuple of the packet that comes out.
func (h *tcHarness) run(prog *ebpf.Program, in tuple) (uint32, tuple) {
	h.t.Helper()
	opts := &ebpf.RunOptions{
		Data:    packet(in),
		DataOut: make([]byte, 1500),
		Context: skbContext{Ifindex: uint32(h.ifindex)},
	}
	ret, err := prog.Run(opts)
	if err != nil {
		h.t.Fatalf("run %s on %s: %v", prog, in, err)
	}
	if ret != tcOK {
		return ret, tuple{}
	}
	return ret, parsePacket(h.t, opts.DataOut)
}

// runRaw passes a packet built from in through prog and returns the
// verdict and the frame that comes out.
func (h *tcHarness) runRaw(prog *ebpf.Program, in tuple) (uint32, []byte) {
	h.t.Helper()
	opts := &ebpf.RunOptions{Data: packet(in), DataOut: make([]byte, 1500), Context: skbContext{Ifindex: uint32(h.ifindex)}}
	ret, err := prog.Run(opts)
	if err != nil {
		h.t.Fatalf("run %s on %s: %v", prog, in, err)
	}
	return ret, opts.DataOut
}

// checkPortUnreachable fails the test unless frame is an ICMP (ICMPv6)
// port unreachable from in's destination to its source, quoting in, with
// valid checksums, and with the MAC addresses of in swapped.
func checkPortUnreachable(t *testing.T, frame []byte, in tuple) {
	t.Helper()
	orig := packet(in)
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

func TestTCPrograms(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	// The node's uplink: a veth whose peer sits in another namespace.
	peerNS := netnstest.NewNamespace(t, "sn-x")
	netnstest.Run(t, "", "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p", "netns", peerNS)
	netnstest.Run(t, "", "ip", "addr", "add", "192.0.2.1/24", "dev", "up0")
	netnstest.Run(t, "", "ip", "-6", "addr", "add", "2001:db8::1/64", "dev", "up0", "nodad")
	netnstest.Run(t, "", "ip", "link", "set", "up0", "up")
	iface, err := net.InterfaceByName("up0")
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup, Interfaces: []string{"up0"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Cleanup(t.Context()) })
	h := &tcHarness{t: t, b: b, ifindex: iface.Index}
	ingress, egress := b.objs.SvcnatTcIngress, b.objs.SvcnatTcEgress

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
	if err := b.Sync(t.Context(), all); err != nil {
		t.Fatal(err)
	}
	client := ap("198.51.100.7:40000")

	t.Run("DNAT to a local endpoint, reply translated on egress", func(t *testing.T) {
		in := tuple{src: client, dst: ap("192.0.2.1:30080"), proto: protoTCP, syn: true, payloadBytes: 3}
		ret, out := h.run(ingress, in)
		if want := (tuple{src: client, dst: ap("10.244.1.2:8080"), proto: protoTCP}); ret != tcOK || out != want {
			t.Fatalf("ingress %s: %d %s, want %s", in, ret, out, want)
		}
		in.syn = false
		if _, again := h.run(ingress, in); again != out {
			t.Errorf("second packet of the flow: %s, want %s", again, out)
		}
		reply := tuple{src: ap("10.244.1.2:8080"), dst: client, proto: protoTCP, payloadBytes: 5}
		ret, back := h.run(egress, reply)
		if want := (tuple{src: ap("192.0.2.1:30080"), dst: client, proto: protoTCP}); ret != tcOK || back != want {
			t.Fatalf("egress %s: %d %s, want %s", reply, ret, back, want)
		}
	})
	t.Run("SNAT to a remote endpoint on egress, reply translated on ingress", func(t *testing.T) {
		in := tuple{src: client, dst: ap("192.0.2.1:30053"), proto: protoUDP, payloadBytes: 7}
		ret, dnat := h.run(ingress, in)
		if want := (tuple{src: client, dst: ap("10.244.2.5:5353"), proto: protoUDP}); ret != tcOK || dnat != want {
			t.Fatalf("ingress %s: %d %s, want %s", in, ret, dnat, want)
		}
		ret, out := h.run(egress, tuple{src: dnat.src, dst: dnat.dst, proto: protoUDP, payloadBytes: 7})
		if ret != tcOK || out.src.Addr() != mustAddr("192.0.2.1") || out.dst != ap("10.244.2.5:5353") {
			t.Fatalf("egress %s: %d %s, want 192.0.2.1:* -> 10.244.2.5:5353", dnat, ret, out)
		}
		reply := tuple{src: out.dst, dst: out.src, proto: protoUDP, payloadBytes: 9}
		ret, unsnat := h.run(ingress, reply)
		if want := (tuple{src: out.dst, dst: client, proto: protoUDP}); ret != tcOK || unsnat != want {
			t.Fatalf("reply %s on ingress: %d %s, want %s", reply, ret, unsnat, want)
		}
		ret, back := h.run(egress, tuple{src: unsnat.src, dst: unsnat.dst, proto: protoUDP, payloadBytes: 9})
		if want := (tuple{src: ap("192.0.2.1:30053"), dst: client, proto: protoUDP}); ret != tcOK || back != want {
			t.Fatalf("reply %s on egress: %d %s, want %s", unsnat, ret, back, want)
		}
	})
	t.Run("source ranges", func(t *testing.T) {
		in := tuple{src: ap("192.0.2.99:40000"), dst: ap("203.0.113.10:443"), proto: protoTCP, syn: true}
		if ret, _ := h.run(ingress, in); ret != tcShot {
			t.Errorf("from outside the source ranges: verdict %d, want drop", ret)
		}
		in.src = client
		if ret, out := h.run(ingress, in); ret != tcOK || out.dst != ap("10.244.1.2:8443") {
			t.Errorf("from inside the source ranges: %d %s", ret, out)
		}
	})
	t.Run("affinity", func(t *testing.T) {
		var first netip.AddrPort
		for i := range 30 {
			in := tuple{src: netip.AddrPortFrom(client.Addr(), uint16(41000+i)), dst: ap("203.0.113.20:80"), proto: protoTCP, syn: true}
			ret, out := h.run(ingress, in)
			if ret != tcOK {
				t.Fatalf("verdict %d", ret)
			}
			if i == 0 {
				first = out.dst
			} else if out.dst != first {
				t.Fatalf("flow %d went to %s, the client's first went to %s", i, out.dst, first)
			}
		}
	})
	t.Run("without affinity flows spread", func(t *testing.T) {
		seen := map[netip.AddrPort]int{}
		for i := range 60 {
			in := tuple{src: netip.AddrPortFrom(client.Addr(), uint16(42000+i)), dst: ap("203.0.113.30:80"), proto: protoTCP, syn: true}
			_, out := h.run(ingress, in)
			seen[out.dst]++
		}
		if len(seen) != 2 {
			t.Errorf("60 flows reached %v", seen)
		}
	})
	t.Run("no endpoints rejects", func(t *testing.T) {
		in := tuple{src: client, dst: ap("192.0.2.1:30099"), proto: protoTCP, syn: true, payloadBytes: 20}
		ret, frame := h.runRaw(ingress, in)
		if ret != tcRedirect {
			t.Fatalf("verdict %d, want redirect (the ICMP error back out)", ret)
		}
		checkPortUnreachable(t, frame, in)
		in6 := tuple{src: ap("[2001:db8::77]:40000"), dst: ap("[2001:db8::1]:30099"), proto: protoUDP, payloadBytes: 20}
		ret, frame = h.runRaw(ingress, in6)
		if ret != tcRedirect {
			t.Fatalf("IPv6: verdict %d, want redirect", ret)
		}
		checkPortUnreachable(t, frame, in6)
	})
	t.Run("Local policy without local endpoints drops", func(t *testing.T) {
		in := tuple{src: client, dst: ap("192.0.2.1:30098"), proto: protoTCP, syn: true}
		if ret, _ := h.run(ingress, in); ret != tcShot {
			t.Errorf("verdict %d, want drop", ret)
		}
	})
	t.Run("IPv6 SNAT", func(t *testing.T) {
		c6 := ap("[2001:db8::77]:40000")
		in := tuple{src: c6, dst: ap("[2001:db8::1]:30080"), proto: protoTCP, syn: true, payloadBytes: 1}
		ret, dnat := h.run(ingress, in)
		if ret != tcOK || dnat.dst != ap("[fd00:244:2::5]:8080") {
			t.Fatalf("ingress %s: %d %s", in, ret, dnat)
		}
		ret, out := h.run(egress, tuple{src: dnat.src, dst: dnat.dst, proto: protoTCP, syn: true, payloadBytes: 1})
		if ret != tcOK || out.src.Addr() != mustAddr("2001:db8::1") || out.dst != dnat.dst {
			t.Fatalf("egress %s: %d %s", dnat, ret, out)
		}
		ret, unsnat := h.run(ingress, tuple{src: out.dst, dst: out.src, proto: protoTCP})
		if ret != tcOK || unsnat != (tuple{src: out.dst, dst: c6, proto: protoTCP}) {
			t.Fatalf("reply on ingress: %d %s", ret, unsnat)
		}
		if ret, back := h.run(egress, unsnat); ret != tcOK || back != (tuple{src: in.dst, dst: c6, proto: protoTCP}) {
			t.Fatalf("reply on egress: %d %s", ret, back)
		}
	})
	t.Run("flows to a removed endpoint are forgotten", func(t *testing.T) {
		in := tuple{src: client, dst: ap("203.0.113.40:53"), proto: protoUDP, payloadBytes: 4}
		if _, out := h.run(ingress, in); out.dst != ap("10.244.1.2:53") {
			t.Fatalf("first packet went to %s", out.dst)
		}
		moving.ClusterEndpoints = []model.Endpoint{local("10.244.1.3", 53)}
		if err := b.Sync(t.Context(), all); err != nil {
			t.Fatal(err)
		}
		if _, out := h.run(ingress, in); out.dst != ap("10.244.1.3:53") {
			t.Fatalf("after the endpoint was replaced, the flow's next packet went to %s", out.dst)
		}
		reply := tuple{src: ap("10.244.1.2:53"), dst: client, proto: protoUDP}
		if _, out := h.run(egress, reply); out.src != reply.src {
			t.Errorf("a late reply from the removed endpoint was still translated, to %s", out.src)
		}
	})
	t.Run("a TCP segment of a connection svcnat did not open passes untouched", func(t *testing.T) {
		// As after a takeover from kube-proxy: the connection's conntrack
		// entry, not svcnat, translates it.
		in := tuple{src: ap("198.51.100.7:45000"), dst: ap("192.0.2.1:30080"), proto: protoTCP, payloadBytes: 3}
		if ret, out := h.run(ingress, in); ret != tcOK || out != (tuple{src: in.src, dst: in.dst, proto: protoTCP}) {
			t.Errorf("mid-stream segment: %d %s, want it untouched", ret, out)
		}
		in.syn = true
		if ret, out := h.run(ingress, in); ret != tcOK || out.dst != ap("10.244.1.2:8080") {
			t.Errorf("SYN after it: %d %s, want DNAT to 10.244.1.2:8080", ret, out)
		}
	})
	t.Run("other traffic passes untouched", func(t *testing.T) {
		in := tuple{src: client, dst: ap("192.0.2.1:22"), proto: protoTCP, syn: true}
		if ret, out := h.run(ingress, in); ret != tcOK || out != (tuple{src: in.src, dst: in.dst, proto: protoTCP}) {
			t.Errorf("%d %s", ret, out)
		}
	})
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
		return n == 2
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
