//go:build linux

package ebpf

import (
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// TestExternalTraffic sends real connections from a client namespace to a
// NodePort of the test namespace (the node), whose uplink runs the tc
// programs: one Service has its endpoint in a pod on the node (DNAT only),
// the other on a remote host on the uplink's subnet (DNAT and SNAT, the flow
// hairpins out of the interface it came in on).
func TestExternalTraffic(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	p := newPod(t, "10.244.1.2/24")
	p.serveTCP(t, "10.244.1.2:8080")
	p.servePeer(t, "10.244.1.2:9090")

	// The uplink: a bridge-less LAN of two namespaces on veths, a client
	// and a remote host, both routed through the node.
	lan := func(host, peer, nodeAddr, peerAddr string) string {
		ns := netnstest.NewNamespace(t, "sn-c")
		netnstest.Run(t, "", "ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns)
		netnstest.Run(t, "", "ip", "addr", "add", nodeAddr, "dev", host)
		netnstest.Run(t, "", "ip", "link", "set", host, "up")
		netnstest.Run(t, ns, "ip", "addr", "add", peerAddr, "dev", peer)
		netnstest.Run(t, ns, "ip", "link", "set", peer, "up")
		return ns
	}
	client := lan("up1", "cl1", "198.51.100.1/24", "198.51.100.7/24")
	netnstest.Run(t, client, "ip", "route", "add", "default", "via", "198.51.100.1")
	remote := &pod{ns: lan("up2", "rm2", "203.0.113.1/24", "203.0.113.9/24")}
	netnstest.Run(t, remote.ns, "ip", "route", "add", "default", "via", "203.0.113.1")
	remote.serveTCP(t, "203.0.113.9:8080")
	for _, k := range []string{"net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.all.send_redirects=0"} {
		netnstest.Run(t, "", "sysctl", "-q", "-w", k)
	}

	b, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup, Interfaces: []string{"up1", "up2"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Cleanup(t.Context()) })
	nodePort := func(name string, port uint16, ep model.Endpoint) *model.ServicePort {
		s := sp(name, model.IPv4, model.TCP, "10.96.0.10", port, ep)
		s.Frontends[0].IP = mustAddr("10.96.0." + string(rune('0'+port%10)))
		s.Frontends = append(s.Frontends, model.Frontend{Kind: model.NodePort, IP: mustAddr("198.51.100.1"), Port: port})
		return s
	}
	toLocal := nodePort("local", 30081, model.Endpoint{IP: mustAddr("10.244.1.2"), Port: 8080, Local: true})
	toRemote := nodePort("remote", 30082, endpoint("203.0.113.9", 8080))
	empty := nodePort("empty", 30083, endpoint("203.0.113.9", 8080))
	empty.ClusterEndpoints = nil
	peerCluster := nodePort("peer-cluster", 30084, model.Endpoint{IP: mustAddr("10.244.1.2"), Port: 9090, Local: true})
	peerLocal := nodePort("peer-local", 30085, model.Endpoint{IP: mustAddr("10.244.1.2"), Port: 9090, Local: true})
	peerLocal.ExternalTrafficLocal = true
	peerLocal.LocalEndpoints = peerLocal.ClusterEndpoints
	if err := b.Sync(t.Context(), stateOf(toLocal, toRemote, empty, peerCluster, peerLocal)); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct{ frontend, want string }{
		{"198.51.100.1:30081", "10.244.1.2:8080"},
		{"198.51.100.1:30082", "203.0.113.9:8080"},
	} {
		for i := range 5 {
			var got []byte
			var err error
			inNamespace(t, client, func() {
				var c net.Conn
				if c, err = net.DialTimeout("tcp", tc.frontend, 3*time.Second); err != nil {
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(3 * time.Second))
				got, err = io.ReadAll(c)
			})
			if err != nil || string(got) != tc.want {
				t.Fatalf("connection %d to %s from outside: got %q, %v; want %s", i, tc.frontend, got, err, tc.want)
			}
		}
	}

	// externalTrafficPolicy Cluster masquerades, also to a local endpoint
	// (with the node's address toward the pod, as MASQUERADE would);
	// Local keeps the client's address.
	for _, tc := range []struct{ frontend, wantPeer string }{
		{"198.51.100.1:30084", "10.244.0.1:"},
		{"198.51.100.1:30085", "198.51.100.7:"},
	} {
		var got []byte
		var err error
		inNamespace(t, client, func() {
			var c net.Conn
			if c, err = net.DialTimeout("tcp", tc.frontend, 3*time.Second); err != nil {
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(3 * time.Second))
			got, err = io.ReadAll(c)
		})
		if err != nil || !strings.HasPrefix(string(got), tc.wantPeer) {
			t.Errorf("connection to %s: the endpoint saw %q (%v), want %s*", tc.frontend, got, err, tc.wantPeer)
		}
	}

	// Without endpoints: an ICMP port unreachable, which this kernel takes
	// as a soft error for the first SYN (TESTBED.md), so refused after
	// the retransmission.
	inNamespace(t, client, func() {
		var c net.Conn
		if c, err = net.DialTimeout("tcp", "198.51.100.1:30083", 3*time.Second); err == nil {
			c.Close()
		}
	})
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("connection to a NodePort without endpoints: %v, want connection refused", err)
	}
}
