//go:build linux

package iptables

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// topology: the test's own namespace is the node; two pod namespaces hang
// off it on veths (/32 routes), a client namespace sits on the node's
// "LAN" address, and the service range is routed out of a spare veth so
// that rejects are not preceded by ICMP redirects.
type topology struct {
	pods   map[string]string // namespace by pod IP
	client string
}

const (
	trafficNode   = "192.168.77.1"
	trafficClient = "192.168.77.100"
	trafficGW     = "10.244.1.1"
)

func setupTopology(t *testing.T) *topology {
	t.Helper()
	run := func(ns string, args ...string) { netnstest.Run(t, ns, args[0], args[1:]...) }
	run("", "sysctl", "-qw", "net.ipv4.ip_forward=1")
	run("", "sysctl", "-qw", "net.ipv4.conf.all.send_redirects=0")
	run("", "sysctl", "-qw", "net.ipv4.conf.default.send_redirects=0")
	topo := &topology{pods: map[string]string{}}
	for i, ip := range []string{"10.244.1.2", "10.244.1.3"} {
		ns := netnstest.NewNamespace(t, "sn-pod")
		host := fmt.Sprintf("vp%d", i)
		run("", "ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
		run("", "ip", "addr", "add", trafficGW+"/32", "dev", host)
		run("", "ip", "link", "set", host, "up")
		run("", "ip", "route", "add", ip+"/32", "dev", host)
		run(ns, "ip", "addr", "add", ip+"/32", "dev", "eth0")
		run(ns, "ip", "link", "set", "eth0", "up")
		run(ns, "ip", "route", "add", trafficGW, "dev", "eth0", "scope", "link")
		run(ns, "ip", "route", "add", "default", "via", trafficGW, "dev", "eth0")
		topo.pods[ip] = ns
	}
	topo.client = netnstest.NewNamespace(t, "sn-cli")
	run("", "ip", "link", "add", "vc", "type", "veth", "peer", "name", "eth0", "netns", topo.client)
	run("", "ip", "addr", "add", trafficNode+"/24", "dev", "vc")
	run("", "ip", "link", "set", "vc", "up")
	run(topo.client, "ip", "addr", "add", trafficClient+"/24", "dev", "eth0")
	run(topo.client, "ip", "link", "set", "eth0", "up")
	run(topo.client, "ip", "route", "add", "default", "via", trafficNode)
	// The service range leaves through a veth whose peer drops everything.
	run("", "ip", "link", "add", "vsvc", "type", "veth", "peer", "name", "vsvc-peer")
	run("", "ip", "link", "set", "vsvc", "up")
	run("", "ip", "link", "set", "vsvc-peer", "up")
	run("", "ip", "route", "add", "10.96.0.0/12", "dev", "vsvc")
	return topo
}

// serve starts a socat server in ns that answers every connection or
// datagram with "<name> <peer address>"; it is killed when the test ends.
func serve(t *testing.T, ns, name string, proto model.Protocol, port int) {
	t.Helper()
	listen := fmt.Sprintf("TCP-LISTEN:%d,fork,reuseaddr", port)
	reply := "echo " + name + " $SOCAT_PEERADDR"
	if proto == model.UDP {
		listen = fmt.Sprintf("UDP-RECVFROM:%d,fork", port)
		// Read the datagram first: writing it to an exited shell would
		// end the server's child before it answers.
		reply = "read -r x; " + reply
	}
	cmd := exec.Command("ip", "netns", "exec", ns, "socat", listen, "SYSTEM:"+reply)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start socat in %s: %v", ns, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
}

// query connects from ns ("" for the node) to addr and returns the reply,
// or the error socat reports. Bounded by 4 s.
func query(ns string, proto model.Protocol, addr string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	target := "TCP:" + addr + ",connect-timeout=3"
	if proto == model.UDP {
		target = "UDP:" + addr
	}
	args := []string{"socat", "-t", "3", "-T", "3", "-", target}
	if ns != "" {
		args = append([]string{"ip", "netns", "exec", ns}, args...)
	}
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	// TCP sends nothing (the server's echo does not read, and writing to
	// it races with its exit); UDP needs a datagram to answer.
	if proto == model.UDP {
		cmd.Stdin = strings.NewReader("ping\n")
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

func trafficState() *model.State {
	ep := func(ip string) model.Endpoint {
		return model.Endpoint{IP: netip.MustParseAddr(ip), Port: 8080, Local: true}
	}
	fe := func(k model.FrontendKind, ip string, port uint16) model.Frontend {
		return model.Frontend{Kind: k, IP: netip.MustParseAddr(ip), Port: port}
	}
	sp := func(name string, p model.Protocol, fes ...model.Frontend) *model.ServicePort {
		return &model.ServicePort{Name: model.ServicePortName{Namespace: "t", Name: name, Family: model.IPv4}, Protocol: p, Frontends: fes}
	}
	web := sp("web", model.TCP, fe(model.ClusterIP, "10.96.0.10", 80))
	web.ClusterEndpoints = []model.Endpoint{ep("10.244.1.2"), ep("10.244.1.3")}
	dns := sp("dns", model.UDP, fe(model.ClusterIP, "10.96.0.53", 53))
	dns.ClusterEndpoints = []model.Endpoint{{IP: netip.MustParseAddr("10.244.1.3"), Port: 5353, Local: true}}
	np := sp("np", model.TCP, fe(model.ClusterIP, "10.96.0.20", 80), fe(model.NodePort, trafficNode, 30080))
	np.ClusterEndpoints = []model.Endpoint{ep("10.244.1.2")}
	local := sp("local", model.TCP, fe(model.ClusterIP, "10.96.0.21", 80), fe(model.NodePort, trafficNode, 30081))
	local.ClusterEndpoints = []model.Endpoint{ep("10.244.1.2")}
	local.LocalEndpoints = []model.Endpoint{ep("10.244.1.2")}
	local.ExternalTrafficLocal = true
	empty := sp("empty", model.TCP, fe(model.ClusterIP, "10.96.0.99", 80))
	s := &model.State{ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}, ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for _, x := range []*model.ServicePort{web, dns, np, local, empty} {
		s.ServicePorts[x.Name] = x
	}
	return s
}

// programTraffic builds the topology with its servers listening (pod1 TCP
// 8080, pod2 TCP 8080 and UDP 5353) and a backend of mode holding
// trafficState.
func programTraffic(t *testing.T, mode string) (*topology, *Backend) {
	topo := setupTopology(t)
	pod1, pod2 := topo.pods["10.244.1.2"], topo.pods["10.244.1.3"]
	serve(t, pod1, "pod1", model.TCP, 8080)
	serve(t, pod2, "pod2", model.TCP, 8080)
	serve(t, pod2, "pod2", model.UDP, 5353)
	b := initBackend(t, mode)
	if err := b.Sync(t.Context(), trafficState()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // socat listening
	return topo, b
}

// TestTraffic sends real TCP and UDP through the programmed rules.
func TestTraffic(t *testing.T) {
	for _, mode := range []string{ModeNFT, ModeLegacy} {
		t.Run(mode, func(t *testing.T) {
			if !netnstest.InNetns(t) {
				return
			}
			topo, _ := programTraffic(t, mode)
			pod1, pod2 := topo.pods["10.244.1.2"], topo.pods["10.244.1.3"]

			t.Run("ClusterIPFromPodReachesEveryEndpoint", func(t *testing.T) {
				seen := map[string]bool{}
				for i := 0; i < 30 && len(seen) < 2; i++ {
					out, err := query(pod2, model.TCP, "10.96.0.10:80")
					if err != nil {
						t.Fatalf("pod2 -> 10.96.0.10:80: %v", err)
					}
					name, peer, _ := strings.Cut(out, " ")
					seen[name] = true
					// pod2 reaching itself is hairpin traffic: masqueraded
					// to the node; pod2 reaching pod1 keeps its address.
					want := map[string]string{"pod1": "10.244.1.3", "pod2": trafficGW}[name]
					if peer != want {
						t.Errorf("%s saw the connection from %s, want %s", name, peer, want)
					}
				}
				if !seen["pod1"] || !seen["pod2"] {
					t.Errorf("30 connections reached %v, want both endpoints", seen)
				}
			})
			t.Run("UDPClusterIP", func(t *testing.T) {
				out, err := query(pod1, model.UDP, "10.96.0.53:53")
				if err != nil || out != "pod2 10.244.1.2" {
					t.Errorf("pod1 -> udp 10.96.0.53:53: %q, %v; want pod2 seeing 10.244.1.2", out, err)
				}
			})
			t.Run("NodePortClusterPolicyMasquerades", func(t *testing.T) {
				out, err := query(topo.client, model.TCP, trafficNode+":30080")
				if err != nil || out != "pod1 "+trafficGW {
					t.Errorf("client -> node port 30080: %q, %v; want pod1 seeing the node (%s)", out, err, trafficGW)
				}
			})
			t.Run("NodePortLocalPolicyKeepsSource", func(t *testing.T) {
				out, err := query(topo.client, model.TCP, trafficNode+":30081")
				if err != nil || out != "pod1 "+trafficClient {
					t.Errorf("client -> node port 30081: %q, %v; want pod1 seeing the client (%s)", out, err, trafficClient)
				}
			})
			t.Run("ClusterIPFromNode", func(t *testing.T) {
				out, err := query("", model.TCP, "10.96.0.20:80")
				if err != nil || !strings.HasPrefix(out, "pod1 ") {
					t.Errorf("node -> 10.96.0.20:80: %q, %v", out, err)
				}
			})
			t.Run("NoEndpointsRejected", func(t *testing.T) {
				start := time.Now()
				_, err := query(pod1, model.TCP, "10.96.0.99:80")
				elapsed := time.Since(start)
				if err == nil || !strings.Contains(err.Error(), "Connection refused") {
					t.Errorf("pod1 -> 10.96.0.99:80 (no endpoints): %v, want connection refused", err)
				}
				if elapsed > 3*time.Second {
					t.Errorf("refusal took %v, want under 3 s", elapsed)
				}
				t.Logf("refused after %v", elapsed)
			})
		})
	}
}
