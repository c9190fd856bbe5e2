//go:build linux && e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/svcnat/svcnat/test/testbed"
)

// Scenarios of the network a proxy shares with others (review of the eBPF
// datapath, 2026-11-30): they run for every proxy, kube-proxy being the
// reference, before the disruptive ones.
func init() {
	at := slices.IndexFunc(scenarios, func(s scenario) bool { return s.name == "AgentKilledWhileStreaming" })
	scenarios = slices.Insert(scenarios, at,
		scenario{name: "TCXProgramAfterTheProxySeesTraffic", run: testTCXNeighbour},
		scenario{name: "FragmentedUDPThroughNodePort", run: testFragmentedUDP},
	)
}

// inNetns runs fn on a thread in the network namespace named name, and
// puts the thread back where it was. The thread must not die with the
// goroutine: the test bed starts its processes with Pdeathsig, which the
// kernel sends when the thread that forked them exits.
func inNetns(t *testing.T, name string, fn func()) {
	t.Helper()
	done := make(chan error)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer orig.Close()
		h, err := netns.GetFromName(name)
		if err == nil {
			defer h.Close()
			err = netns.Set(h)
		}
		if err == nil {
			fn()
		}
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		} // else the thread stays locked and ends with the goroutine
		done <- err
	}()
	if err := <-done; err != nil {
		t.Fatalf("enter network namespace %s: %v", name, err)
	}
}

// testTCXNeighbour attaches a counting TCX program after whatever the
// proxy attached to node1's uplink and checks it sees the packets of
// NodePort connections: an eBPF proxy must let traffic go on (TCX_NEXT).
func testTCXNeighbour(t *testing.T, e *env) {
	svc := e.simpleService(t, "tcx", corev1.ServiceTypeNodePort, "node1-a", "node2-a")
	node := e.c.Nodes[0]
	addr := nodePort(t, svc, node, 0)
	e.reachesOnly(t, e.c.ClientOrigin(), "tcp", addr, "node1-a", "node2-a")

	counter, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer counter.Close()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.LoadMapPtr(asm.R1, counter.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, -1).WithSymbol("out"), // TCX_NEXT
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	var l link.Link
	inNetns(t, node.Netns, func() {
		iface, ierr := net.InterfaceByName("eth0")
		if ierr != nil {
			err = ierr
			return
		}
		l, err = link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: prog, Attach: ebpf.AttachTCXIngress, Anchor: link.Tail()})
	})
	if err != nil {
		t.Fatalf("attach the counting program to %s eth0: %v", node.Name, err)
	}
	defer l.Close()
	const conns = 10
	for _, r := range e.probe(t, e.c.ClientOrigin(), testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: conns}) {
		if !r.OK() {
			t.Errorf("NodePort %s with the counting program attached: %+v", addr, r)
		}
	}
	var seen uint64
	if err := counter.Lookup(uint32(0), &seen); err != nil {
		t.Fatal(err)
	}
	// Each connection is at least 4 packets in (SYN, ACK, FIN, ACK).
	t.Logf("%s: the program after the proxy's on %s eth0 saw %d packets of %d NodePort connections", e.kind, node.Name, seen, conns)
	if seen < 4*conns {
		t.Errorf("the program after the proxy's saw %d packets of %d connections, want at least %d", seen, conns, 4*conns)
	}
}

// testFragmentedUDP sends 3,000-byte UDP datagrams (fragmented on the
// 1500-byte LAN) from the client to a NodePort and requires each to be
// answered by an endpoint.
func testFragmentedUDP(t *testing.T, e *env) {
	s := newService("frag", corev1.ServiceTypeNodePort, svcPort("", corev1.ProtocolUDP, 53, udpA))
	svc := e.service(t, s)
	e.slice(t, testbed.EndpointSlice(ns, "frag", "frag-1",
		[]discoveryv1.EndpointPort{testbed.SlicePort("", corev1.ProtocolUDP, udpA)}, e.ready("node1-a", "node2-a")...))
	addr := nodePort(t, svc, e.c.Nodes[0], 0)
	e.reachesOnly(t, e.c.ClientOrigin(), "udp", addr, "node1-a", "node2-a")
	const n = 20
	answered := 0
	var lastErr error
	inNetns(t, e.c.Client, func() {
		query := make([]byte, 3000)
		for i := range n {
			c, err := net.Dial("udp", addr.String())
			if err != nil {
				lastErr = err
				continue
			}
			for range 3 {
				copy(query, fmt.Sprintf("query %d", i))
				c.Write(query)
				c.SetReadDeadline(time.Now().Add(time.Second))
				buf := make([]byte, 2048)
				k, err := c.Read(buf)
				var r testbed.Result
				if err == nil && json.Unmarshal(buf[:k], &r) == nil && r.Pod != "" {
					answered++
					break
				}
				lastErr = err
			}
			c.Close()
		}
	})
	t.Logf("%s: %d of %d 3000-byte datagrams to %s answered", e.kind, answered, n, addr)
	if answered != n {
		t.Errorf("%d of %d 3000-byte datagrams to NodePort %s answered (last error %v)", answered, n, addr, lastErr)
	}
}
