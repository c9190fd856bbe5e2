//go:build linux && e2e

package e2e

import (
	"net/netip"
	"testing"

	"github.com/svcnat/svcnat/test/testbed"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestTestbed checks the test bed itself, without any proxy: the apiserver
// holds the Nodes, pods reach each other directly across nodes, and the
// client reaches the nodes. The Service scenarios rely on all of it.
func TestTestbed(t *testing.T) {
	b := binaries(t)
	c := startCluster(t, t.Context(), b, testbed.Options{PodPorts: testbed.DefaultPodPorts})
	nodes, err := c.Kube.CoreV1().Nodes().List(t.Context(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes.Items) != len(c.Nodes) {
		t.Fatalf("apiserver has %d nodes, want %d", len(nodes.Items), len(c.Nodes))
	}
	for _, from := range []string{"node1-a", "node2-c"} {
		o := c.Pod(from).Origin()
		for _, to := range []string{"node1-b", "node2-a"} {
			p := c.Pod(to)
			for _, proto := range []string{"tcp", "udp", "http"} {
				port := map[string]uint16{"tcp": tcpA, "udp": udpA, "http": web}[proto]
				rs, err := c.Probe(t.Context(), o, testbed.ProbeSpec{Proto: proto, Addr: netip.AddrPortFrom(p.IP, port)})
				if err != nil {
					t.Fatal(err)
				}
				if r := rs[0]; r.Pod != to || r.ClientIP() != o.IP {
					t.Errorf("%s %s -> %s: got %+v, want an answer from %s seeing %s", proto, from, to, r, to, o.IP)
				}
			}
		}
	}
	// The client on the LAN reaches a node's address (nothing listens: refused).
	rs, err := c.Probe(t.Context(), c.ClientOrigin(), testbed.ProbeSpec{Proto: "tcp", Addr: netip.AddrPortFrom(c.Nodes[1].IP, 9)})
	if err != nil {
		t.Fatal(err)
	}
	if !rs[0].Refused {
		t.Errorf("client -> %s:9: %+v, want connection refused", c.Nodes[1].IP, rs[0])
	}
}
