//go:build linux

package iptables

import (
	"os/exec"
	"strings"
	"time"

	"net/netip"
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane/conformance"
	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// parityState holds what broke the decoder (review
// kube-proxy-parity-2026-11-30, finding 3 and the locality case): a UDP and
// an SCTP LoadBalancer with externalTrafficPolicy Local and a health check,
// and an endpoint address that is local for one Service and not for
// another (a reused Pod IP, or slices that disagree for a moment).
func parityState() *model.State {
	a := netip.MustParseAddr
	s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for i, p := range []model.Protocol{model.UDP, model.SCTP} {
		sp := &model.ServicePort{
			Name:     model.ServicePortName{Namespace: "kube-system", Name: "lb-" + string(p), Port: "dns", Family: model.IPv4},
			Protocol: p,
			Frontends: []model.Frontend{
				{Kind: model.ClusterIP, IP: netip.AddrFrom4([4]byte{10, 96, 0, byte(10 + i)}), Port: 53},
				{Kind: model.LoadBalancer, IP: netip.AddrFrom4([4]byte{203, 0, 113, byte(10 + i)}), Port: 53},
			},
			ClusterEndpoints:     []model.Endpoint{{IP: a("10.244.1.5"), Port: 5353, Local: true}, {IP: a("10.244.2.5"), Port: 5353}},
			LocalEndpoints:       []model.Endpoint{{IP: a("10.244.1.5"), Port: 5353, Local: true}},
			ExternalTrafficLocal: true,
			HealthCheckNodePort:  uint16(32000 + i),
		}
		s.ServicePorts[sp.Name] = sp
	}
	other := &model.ServicePort{
		Name:             model.ServicePortName{Namespace: "default", Name: "other", Family: model.IPv4},
		Protocol:         model.TCP,
		Frontends:        []model.Frontend{{Kind: model.ClusterIP, IP: a("10.96.0.20"), Port: 80}},
		ClusterEndpoints: []model.Endpoint{{IP: a("10.244.1.5"), Port: 5353}},
	}
	s.ServicePorts[other.Name] = other
	return s
}

func TestRoundTripParity(t *testing.T) {
	s := parityState()
	for _, d := range conformance.Diff(s, roundTrip(t, s)) {
		t.Error(d)
	}
}

func TestDumpParityInKernel(t *testing.T) {
	for _, mode := range []string{ModeNFT, ModeLegacy} {
		t.Run(mode, func(t *testing.T) {
			if !netnstest.InNetns(t) {
				return
			}
			b := initBackend(t, mode)
			s := parityState()
			if err := b.Sync(t.Context(), s); err != nil {
				t.Fatal(err)
			}
			got, err := b.Dump(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range conformance.Diff(s, got) {
				t.Error(d)
			}
		})
	}
}

// TestForwardPolicyDrop: on a node whose FORWARD policy is DROP (what
// Docker sets), NodePort traffic to an endpoint behind the node still
// flows, as with kube-proxy's KUBE-FORWARD; and a forwarded packet that
// conntrack finds INVALID (here: a flow whose entry was deleted, with
// nf_conntrack_tcp_loose=0) is dropped by svcnat's rule instead of passed
// on un-NATed (review finding 4).
func TestForwardPolicyDrop(t *testing.T) {
	for _, mode := range []string{ModeNFT, ModeLegacy} {
		t.Run(mode, func(t *testing.T) {
			if !netnstest.InNetns(t) {
				return
			}
			topo := setupTopology(t)
			pod1 := topo.pods["10.244.1.2"]
			serve(t, pod1, "pod1", model.TCP, 8080)
			ipt := "iptables-" + mode
			netnstest.Run(t, "", ipt, "-P", "FORWARD", "DROP")
			b := initBackend(t, mode)
			if err := b.Sync(t.Context(), trafficState()); err != nil {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond) // socat listening
			for i := range 5 {
				out, err := query(topo.client, model.TCP, trafficNode+":30080")
				if err != nil || out != "pod1 "+trafficGW {
					t.Fatalf("connection %d: client -> node port 30080 with FORWARD policy DROP: %q, %v; want pod1", i, out, err)
				}
			}

			netnstest.Run(t, "", ipt, "-P", "FORWARD", "ACCEPT")
			netnstest.Run(t, "", "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
			hold := exec.Command("ip", "netns", "exec", pod1, "socat", "TCP-LISTEN:9000,reuseaddr", "OPEN:/dev/null")
			if err := hold.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = hold.Process.Kill(); _ = hold.Wait() })
			time.Sleep(200 * time.Millisecond)
			client := exec.Command("ip", "netns", "exec", topo.client, "socat", "-T", "5", "-", "TCP:10.244.1.2:9000")
			in, err := client.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := client.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = client.Process.Kill(); _ = client.Wait() })
			if _, err := in.Write([]byte("before\n")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			netnstest.Run(t, "", "conntrack", "-D", "-p", "tcp", "--dport", "9000")
			if _, err := in.Write([]byte("after\n")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			counters := netnstest.Run(t, "", ipt+"-save", "-c", "-t", "filter")
			dropped := false
			for _, line := range strings.Split(counters, "\n") {
				if strings.Contains(line, "-A "+chainForward+" -m conntrack --ctstate INVALID") {
					dropped = !strings.HasPrefix(line, "[0:")
				}
			}
			if !dropped {
				t.Errorf("no INVALID packet dropped by %s:\n%s", chainForward, counters)
			}
		})
	}
}
