//go:build linux

package iptables

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/svcnat/svcnat/pkg/dataplane"
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

// TestSingleStack: with IPv6 disabled in the node's kernel the backend
// runs IPv4-only with a warning, as kube-proxy does, instead of failing or
// programming a family the node does not use (review finding 5).
func TestSingleStack(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	netnstest.Run(t, "", "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
	var logs strings.Builder
	b, err := New(Options{Mode: ModeNFT, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Init(t.Context()); err != nil {
		t.Fatalf("init with IPv6 disabled: %v", err)
	}
	t.Cleanup(func() { _ = b.Cleanup(context.Background()) })
	if got := b.Families(); !slices.Equal(got, []model.Family{model.IPv4}) {
		t.Errorf("families %v, want IPv4 only", got)
	}
	if !strings.Contains(logs.String(), "level=WARN msg=\"running single-stack") || !strings.Contains(logs.String(), "disable_ipv6=1") {
		t.Errorf("no warning saying why IPv6 is left out:\n%s", logs.String())
	}
	s := allCase()
	if err := b.Sync(t.Context(), s); err != nil {
		t.Fatalf("sync of a dual-stack state: %v", err)
	}
	got, err := b.Dump(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for name := range s.ServicePorts {
		if _, ok := got.ServicePorts[name]; ok != (name.Family == model.IPv4) {
			t.Errorf("%s programmed: %v", name, ok)
		}
	}
	strict, err := New(Options{Mode: ModeNFT, Families: []model.Family{model.IPv4, model.IPv6}})
	if err != nil {
		t.Fatal(err)
	}
	if err := strict.Init(t.Context()); err == nil || !strings.Contains(err.Error(), "IPv6") {
		t.Errorf("init asked for IPv6 on a node without it: %v, want an error naming IPv6", err)
	}
}

// TestFamilyFailsAlone: when one family's restore fails, the other
// family's ServicePorts are programmed and the failure is PortErrors naming
// only the failed family's, so the agent stays healthy for the rest.
func TestFamilyFailsAlone(t *testing.T) {
	k := &testKernel{mode: ModeNFT, host: newFakeHost()}
	b := k.initBackend(t, Options{})
	fake6 := k.fake(t, model.IPv6)
	fake6.failRestore = errors.New("ip6tables-restore cannot run")
	t.Cleanup(func() { fake6.failRestore = nil })
	s := allCase()
	err := b.Sync(t.Context(), s)
	pe, ok := errors.AsType[dataplane.PortErrors](err)
	if !ok {
		t.Fatalf("sync with a failing IPv6 restore: %v, want PortErrors", err)
	}
	v6 := 0
	for name := range s.ServicePorts {
		if name.Family == model.IPv6 {
			v6++
			if pe[name] == nil {
				t.Errorf("%s not named failed", name)
			}
		}
	}
	if len(pe) != v6 {
		t.Errorf("%d ServicePorts failed, want the %d IPv6 ones: %v", len(pe), v6, pe)
	}
	rs, err := b.families[0].read(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if want := Render(s, model.IPv4, DefaultMasqueradeBit); rs.Text() != want.Text() {
		t.Errorf("IPv4 not programmed:\n%s", rs.Text())
	}
}

// TestVerifyFindsStructuralDrift: every kind of breakage the decoded state
// cannot show is reported by Verify (what `svcnat dump --check` prints),
// and a foreign rule inside an svcnat chain is reported, not a failure of
// Dump (review finding 8).
func TestVerifyFindsStructuralDrift(t *testing.T) {
	onKernels(t, allKernels, func(t *testing.T, k *testKernel) {
		b := k.initBackend(t, Options{})
		s := allCase()
		ctx := t.Context()
		if err := b.Sync(ctx, s); err != nil {
			t.Fatal(err)
		}
		if problems, err := b.Verify(ctx); err != nil || len(problems) > 0 {
			t.Fatalf("in sync: %v %q, want nothing", err, problems)
		}
		chainOf := func(table, prefix string) string {
			for _, c := range sortedKeys(b.families[0].prog.sums[table]) {
				if strings.HasPrefix(c, prefix) {
					return c
				}
			}
			t.Fatalf("no chain %s* in the %s table", prefix, table)
			return ""
		}
		svc, ext := chainOf(tableNAT, prefixCluster), chainOf(tableNAT, prefixExternal)
		for _, tc := range []struct {
			name  string
			edit  string // iptables-restore input, nat table unless it names filter
			chain string // named in the report
		}{
			{"flushed services", "-F " + chainServices, chainServices},
			{"flushed node ports", "-F " + chainNodePorts, chainNodePorts},
			{"flushed filter", "*filter\n-F " + chainFilter, chainFilter},
			{"flushed forward", "*filter\n-F " + chainForward, chainForward},
			{"flushed postrouting", "-F " + chainPostrouting, chainPostrouting},
			{"flushed mark-masq", "-F " + chainMarkMasq, chainMarkMasq},
			{"flushed ext chain", "-F " + ext, ext},
			{"deleted jump", "-D PREROUTING -m comment --comment \"svcnat services\" -j " + chainServices, "PREROUTING"},
			{"RETURN prepended", "-I " + svc + " -j RETURN", svc},
			{"foreign rule", "-I " + svc + " -m length --length 1:100 -j RETURN", svc},
		} {
			edit := tc.edit
			if !strings.HasPrefix(edit, "*") {
				edit = "*nat\n" + edit
			}
			k.outside(t, model.IPv4, edit+"\nCOMMIT\n")
			problems, err := b.Verify(ctx)
			if err != nil {
				t.Fatalf("%s: verify: %v", tc.name, err)
			}
			if !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, "chain "+tc.chain+":") }) {
				t.Errorf("%s: not reported: %q", tc.name, problems)
			}
			if _, err := b.Dump(ctx); err != nil {
				t.Errorf("%s: dump failed: %v", tc.name, err)
			}
			if err := b.Sync(ctx, s); err != nil {
				t.Fatal(err)
			}
			if problems, _ := b.Verify(ctx); len(problems) > 0 {
				t.Fatalf("%s: after the repairing sync: %q", tc.name, problems)
			}
		}
	})
}

// TestSourceRangesAllowNode: where the cloud installs the LoadBalancer VIP
// as a local address, the node reaching its own VIP arrives with the VIP as
// source; when loadBalancerSourceRanges holds the node, kube-proxy lets
// that through, and so must the rules model.Build asks for (finding 6).
func TestSourceRangesAllowNode(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	topo := setupTopology(t)
	serve(t, topo.pods["10.244.1.2"], "pod1", model.TCP, 8080)
	const vip = "203.0.113.7"
	netnstest.Run(t, "", "ip", "addr", "add", vip+"/32", "dev", "lo")
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "t", Name: "lb"},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, ClusterIP: "10.96.0.30", ClusterIPs: []string{"10.96.0.30"},
			LoadBalancerSourceRanges: []string{"192.168.77.0/24"},
			Ports:                    []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80, NodePort: 30090}},
		},
		Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: vip}}}},
	}
	port, ready, node := int32(8080), true, "node1"
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "t", Name: "lb-1", Labels: map[string]string{discoveryv1.LabelServiceName: "lb"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: &port}},
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.1.2"}, NodeName: &node,
			Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
	}
	s, errs := model.Build(&model.Config{NodeName: node, NodeAddresses: []netip.Addr{netip.MustParseAddr(trafficNode)}},
		[]*corev1.Service{svc}, []*discoveryv1.EndpointSlice{es})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	b := initBackend(t, ModeNFT)
	if err := b.Sync(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // socat listening
	if out, err := query("", model.TCP, vip+":80"); err != nil || !strings.HasPrefix(out, "pod1 ") {
		t.Errorf("node -> its own VIP %s:80: %q, %v; want pod1", vip, out, err)
	}
	if out, err := query(topo.client, model.TCP, vip+":80"); err != nil || !strings.HasPrefix(out, "pod1 ") {
		t.Errorf("client in range -> VIP: %q, %v; want pod1", out, err)
	}
}
