//go:build linux

package ebpf

import (
	"io"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// TestNodePortCost measures what the tc path costs traffic from outside
// the node: new connections (connect, read a short answer to EOF, close)
// and a bulk download, straight to a pod routed through the node, through
// a NodePort (externalTrafficPolicy Local, DNAT only) and through a
// NodePort that masquerades (Cluster). The three ways are interleaved one
// connection at a time so that they share the machine's load. Run with
// SVCNAT_BENCH=1; it reports, it does not judge.
func TestNodePortCost(t *testing.T) {
	if os.Getenv("SVCNAT_BENCH") == "" {
		t.Skip("set SVCNAT_BENCH=1 to measure")
	}
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	p := newPod(t, "10.244.1.2/24")
	p.serveTCP(t, "10.244.1.2:8080")
	var bulk net.Listener
	inNamespace(t, p.ns, func() { bulk, _ = net.Listen("tcp", "10.244.1.2:9000") })
	t.Cleanup(func() { bulk.Close() })
	const bulkBytes = 64 << 20
	go func() {
		buf := make([]byte, 64<<10)
		for {
			c, err := bulk.Accept()
			if err != nil {
				return
			}
			for sent := 0; sent < bulkBytes; sent += len(buf) {
				if _, err := c.Write(buf); err != nil {
					break
				}
			}
			c.Close()
		}
	}()
	client := netnstest.NewNamespace(t, "sn-c")
	vethPair(t, "", "up1", []string{"198.51.100.1/24"}, client, "cl1", []string{"198.51.100.7/24"})
	netnstest.Run(t, client, "ip", "route", "add", "default", "via", "198.51.100.1")
	forwarding(t, "")

	nodePort := func(name string, ip string, port, target uint16, local bool) *model.ServicePort {
		s := sp(name, model.IPv4, model.TCP, ip, port, model.Endpoint{IP: mustAddr("10.244.1.2"), Port: target, Local: true})
		s.Frontends = append(s.Frontends, model.Frontend{Kind: model.NodePort, IP: mustAddr("198.51.100.1"), Port: port})
		if local {
			s.ExternalTrafficLocal = true
			s.LocalEndpoints = s.ClusterEndpoints
		}
		return s
	}
	startNode(t, env, Options{},
		nodePort("local", "10.96.0.1", 30081, 8080, true), nodePort("masq", "10.96.0.2", 30082, 8080, false),
		nodePort("bulk-local", "10.96.0.3", 30091, 9000, true), nodePort("bulk-masq", "10.96.0.4", 30092, 9000, false),
	)

	ways := []struct{ name, short, bulk string }{
		{"straight to the pod", "10.244.1.2:8080", "10.244.1.2:9000"},
		{"NodePort, Local (DNAT)", "198.51.100.1:30081", "198.51.100.1:30091"},
		{"NodePort, Cluster (DNAT+SNAT)", "198.51.100.1:30082", "198.51.100.1:30092"},
	}
	const rounds = 1500
	lat := make([][]time.Duration, len(ways))
	inNamespace(t, client, func() {
		for range rounds {
			for i, w := range ways {
				start := time.Now()
				c, err := net.DialTimeout("tcp", w.short, 3*time.Second)
				if err != nil {
					t.Errorf("%s: %v", w.name, err)
					return
				}
				io.ReadAll(c)
				c.Close()
				lat[i] = append(lat[i], time.Since(start))
			}
		}
	})
	var mbps [3][]float64
	inNamespace(t, client, func() {
		for range 3 {
			for i, w := range ways {
				start := time.Now()
				c, err := net.DialTimeout("tcp", w.bulk, 3*time.Second)
				if err != nil {
					t.Errorf("%s: %v", w.name, err)
					return
				}
				n, _ := io.Copy(io.Discard, c)
				c.Close()
				if n != bulkBytes {
					t.Errorf("%s: %d of %d bytes", w.name, n, bulkBytes)
				}
				mbps[i] = append(mbps[i], float64(n)*8/1e6/time.Since(start).Seconds())
			}
		}
	})
	for i, w := range ways {
		slices.Sort(lat[i])
		slices.Sort(mbps[i])
		t.Logf("%-30s connection median %v p90 %v; bulk median %.0f Mbit/s", w.name,
			lat[i][len(lat[i])/2], lat[i][len(lat[i])*9/10], mbps[i][1])
	}
}
