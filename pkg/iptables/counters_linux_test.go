//go:build linux

package iptables

import (
	"strings"
	"testing"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// TestCounters: real connections through the rules move the DNAT rules'
// packet counters by one per connection (UDP: per flow), on the endpoint
// each went to, as Counters reads them back with iptables-save -c.
func TestCounters(t *testing.T) {
	for _, mode := range []string{ModeNFT, ModeLegacy} {
		t.Run(mode, func(t *testing.T) {
			if !netnstest.InNetns(t) {
				return
			}
			topo, b := programTraffic(t, mode)
			pod1 := topo.pods["10.244.1.2"]

			const webConns, dnsFlows, npConns = 10, 2, 3
			reached := map[string]uint64{}
			for range webConns {
				out, err := query(pod1, model.TCP, "10.96.0.10:80")
				if err != nil {
					t.Fatalf("pod1 -> 10.96.0.10:80: %v", err)
				}
				name, _, _ := strings.Cut(out, " ")
				reached[map[string]string{"pod1": "10.244.1.2:8080", "pod2": "10.244.1.3:8080"}[name]]++
			}
			for range dnsFlows { // each from a socket of its own: a flow each
				if out, err := query(pod1, model.UDP, "10.96.0.53:53"); err != nil || !strings.HasPrefix(out, "pod2 ") {
					t.Fatalf("pod1 -> udp 10.96.0.53:53: %q, %v", out, err)
				}
			}
			for range npConns {
				if _, err := query(topo.client, model.TCP, trafficNode+":30080"); err != nil {
					t.Fatalf("client -> node port 30080: %v", err)
				}
			}

			c, err := b.Counters(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			name := func(n string) model.ServicePortName {
				return model.ServicePortName{Namespace: "t", Name: n, Family: model.IPv4}
			}
			web, dns, np := c[name("web")], c[name("dns")], c[name("np")]
			if web == nil || dns == nil || np == nil {
				t.Fatalf("counters: %v", c)
			}
			if web.Connections != webConns || len(web.Endpoints) != 2 {
				t.Errorf("web: %d connections, endpoints %v; want %d on both endpoints", web.Connections, web.Endpoints, webConns)
			}
			for ep, n := range reached {
				if web.Endpoints[ep] != n {
					t.Errorf("web endpoint %s: counted %d, %d connections reached it", ep, web.Endpoints[ep], n)
				}
			}
			if dns.Connections != dnsFlows || dns.Endpoints["10.244.1.3:5353"] != dnsFlows {
				t.Errorf("dns: %d connections, endpoints %v; want %d", dns.Connections, dns.Endpoints, dnsFlows)
			}
			if np.Connections != npConns || np.Endpoints["10.244.1.2:8080"] != npConns {
				t.Errorf("np: %d connections, endpoints %v; want %d", np.Connections, np.Endpoints, npConns)
			}
			if web.Packets != nil || web.Bytes != nil {
				t.Errorf("web: packets %v, bytes %v reported; the nat table sees first packets only", web.Packets, web.Bytes)
			}
		})
	}
}
