//go:build linux && e2e

package e2e

import (
	"bytes"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/svcnat/svcnat/test/testbed"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// Scenarios of UDP socket stickiness, affinity stability and eBPF map
// drift; they run after the others (the last one changes a pinned map by
// hand).
func init() {
	scenarios = append(scenarios,
		scenario{name: "UDPSocketSticksToOneEndpoint", run: testUDPSocketSticks},
		scenario{name: "AffinitySurvivesOtherEndpoints", run: testAffinityStable},
		scenario{name: "DumpCheckDetectsDeletedMapEntry", run: testMapDrift, skip: onlyEBPF},
	)
}

func onlyEBPF(k testbed.ProxyKind) string {
	if k != testbed.SvcnatEBPF {
		return "deletes an entry of svcnat-ebpf's pinned maps by hand"
	}
	return ""
}

// testUDPSocketSticks: all datagrams one unconnected UDP socket sends to a
// Service are answered by one endpoint and appear to come from the Service;
// also when the socket talks to two Services on the same endpoints.
func testUDPSocketSticks(t *testing.T, e *env) {
	pods := []string{"node1-a", "node1-b", "node2-a", "node2-b"}
	ports := []discoveryv1.EndpointPort{testbed.SlicePort("", corev1.ProtocolUDP, udpA)}
	var addrs []netip.AddrPort
	for _, name := range []string{"udpsock-a", "udpsock-b"} {
		svc := e.service(t, newService(name, corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolUDP, 53, udpA)))
		e.slice(t, testbed.EndpointSlice(ns, name, name+"-1", ports, e.ready(pods...)...))
		addrs = append(addrs, clusterIP(t, svc, 53))
	}
	from := e.pod("node1-c").Origin()
	for _, a := range addrs {
		e.reachesOnly(t, from, "udp", a, pods...)
	}
	check := func(rs []testbed.Result, to []netip.AddrPort) {
		t.Helper()
		byAddr := map[netip.AddrPort]map[string]int{}
		for i, r := range rs {
			a := to[i%len(to)]
			if !r.OK() {
				t.Fatalf("datagram %d to %s: %s", i, a, r.Err)
			}
			if r.From != a.String() {
				t.Errorf("answer to datagram %d to %s appears to come from %s", i, a, r.From)
			}
			if byAddr[a] == nil {
				byAddr[a] = map[string]int{}
			}
			byAddr[a][r.Pod]++
		}
		for a, seen := range byAddr {
			if len(seen) != 1 {
				t.Errorf("one socket's datagrams to %s were answered by %v, want one endpoint", a, seen)
			}
		}
		t.Logf("one socket, %d datagrams to %v: answered by %v", len(rs), to, byAddr)
	}
	check(e.probe(t, from, testbed.ProbeSpec{Proto: "udp-socket", Addr: addrs[0], N: 20}), addrs[:1])
	check(e.probe(t, from, testbed.ProbeSpec{Proto: "udp-socket", Addr: addrs[0], More: addrs[1:], N: 20}), addrs)
}

// testAffinityStable: a client with ClientIP affinity stays on its endpoint
// while another endpoint leaves and one that sorts before all joins.
func testAffinityStable(t *testing.T, e *env) {
	pods := []string{"node1-a", "node1-b", "node2-a", "node2-b"}
	slices.SortFunc(pods, func(a, b string) int { return e.pod(a).IP.Compare(e.pod(b).IP) })
	lowest, initial := pods[0], pods[1:]
	s := newService("stable", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	timeout := int32(600)
	s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: &timeout}}
	svc := e.service(t, s)
	e.slice(t, tcpSlice("stable", "stable-1", e.ready(initial...)...))
	control := e.simpleService(t, "stable-control", corev1.ServiceTypeClusterIP, "node1-a")
	addr := clusterIP(t, svc, 80)
	// Four clients (affinity is per client), each pinned to one endpoint.
	origins := []testbed.Origin{e.pod("node1-c").Origin(), e.pod("node2-c").Origin(), e.c.Nodes[0].Origin(), e.c.Nodes[1].Origin()}
	pinned := map[string]string{}
	next := []string{lowest}
	for _, from := range origins {
		e.reachesOnlyOne(t, from, addr, initial)
		pinned[from.Name] = e.probe(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: addr})[0].Pod
		if !slices.Contains(next, pinned[from.Name]) {
			next = append(next, pinned[from.Name])
		}
	}
	// One endpoint no client is pinned to leaves (if there is one), and
	// one that sorts before all joins.
	removed := false
	for _, p := range initial {
		if !slices.Contains(next, p) && !removed {
			removed = true
			continue
		}
		if !slices.Contains(next, p) {
			next = append(next, p)
		}
	}
	e.setEndpoints(t, "stable-1", e.ready(next...)...)
	// The control Service changes after; once it shows, so has the other.
	e.setEndpoints(t, "stable-control-1", e.ready("node2-a")...)
	e.reachesOnly(t, e.pod("node2-c").Origin(), "tcp", clusterIP(t, control, 80), "node2-a")
	for _, from := range origins {
		seen, err := e.answers(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: 30}, next...)
		if err != nil {
			t.Fatal(err)
		}
		if len(seen) != 1 || seen[pinned[from.Name]] != 30 {
			t.Errorf("from %s, after endpoints %v became %v, 30 connections reached %v, want all on %s", from.Name, initial, next, seen, pinned[from.Name])
		}
	}
	t.Logf("clients pinned to %v kept their endpoints while endpoints %v became %v", pinned, initial, next)
}

// testMapDrift: a frontend entry deleted by hand from node2's pinned
// svcnat_services map is reported by svcnat dump --check, naming the
// Service, and the agent writes it again within one --sync-period (30 s).
func testMapDrift(t *testing.T, e *env) {
	svc := e.simpleService(t, "mapdrift", corev1.ServiceTypeClusterIP, "node1-a", "node2-a")
	addr := clusterIP(t, svc, 80)
	n := e.c.Nodes[1]
	from := e.pod("node2-c").Origin()
	e.reachesOnly(t, from, "tcp", addr, "node1-a", "node2-a")
	e.checkDump(t)
	deleteFrontend(t, n.Proxy.PinDir, addr)
	deleted := time.Now()
	out, err := n.Proxy.Dump(t.Context(), "--check")
	if err == nil || !strings.Contains(out+err.Error(), "mapdrift") {
		t.Fatalf("svcnat dump --check after the frontend of %s was deleted: %v, want a failure naming mapdrift:\n%s", addr, err, out)
	}
	t.Logf("svcnat dump --check after deleting the frontend: %v\n%s", err, out)
	eventually(t, "agent rewrites the deleted frontend", 60*time.Second, func() error {
		if out, err := n.Proxy.Dump(t.Context(), "--check"); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		_, err := e.answers(t, from, testbed.ProbeSpec{Proto: "tcp", Addr: addr, N: 5}, "node1-a", "node2-a")
		return err
	})
	took := time.Since(deleted)
	t.Logf("agent repaired the frontend after %v", took.Round(time.Millisecond))
	if took > 40*time.Second {
		t.Errorf("repair took %v, more than one sync period (30 s) and a probe", took)
	}
}

// deleteFrontend deletes the entry for addr (TCP) from the svcnat_services
// map pinned in pinDir, as an operator or a stray tool might.
func deleteFrontend(t *testing.T, pinDir string, addr netip.AddrPort) {
	t.Helper()
	pins, _ := filepath.Glob(filepath.Join(pinDir, "svcnat_services*"))
	if len(pins) != 1 {
		t.Fatalf("pinned svcnat_services maps in %s: %v, want one", pinDir, pins)
	}
	m, err := ebpf.LoadPinnedMap(pins[0], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	a16, port := addr.Addr().As16(), addr.Port()
	var k, v, found []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		// struct svc_key: 16-byte address, port in network order, protocol.
		if bytes.Equal(k[:16], a16[:]) && k[16] == byte(port>>8) && k[17] == byte(port) && k[18] == 6 {
			found = slices.Clone(k)
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	if found == nil {
		t.Fatalf("no entry for %s in %s", addr, pins[0])
	}
	if err := m.Delete(found); err != nil {
		t.Fatalf("delete %s from %s: %v", addr, pins[0], err)
	}
}
