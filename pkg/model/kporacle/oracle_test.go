package kporacle

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/model"
	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/kubernetes/pkg/proxy"
)

const nodeName, zone = "node1", "zone-a"

// generator makes valid random Services and EndpointSlices (as the API
// server would accept and default them).
type generator struct{ rng *rand.Rand }

func pick[T any](g generator, xs ...T) T { return xs[g.rng.IntN(len(xs))] }
func ptr[T any](x T) *T                  { return &x }

func (g generator) service(i int) *v1.Service {
	svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: fmt.Sprintf("s%d", i)}}
	sp := &svc.Spec
	sp.Type = pick(g, v1.ServiceTypeClusterIP, v1.ServiceTypeNodePort, v1.ServiceTypeLoadBalancer)
	v4, v6 := fmt.Sprintf("10.96.%d.%d", i/256, i%256), fmt.Sprintf("fd00:96::%x", i)
	sp.ClusterIPs = pick(g, []string{v4}, []string{v6}, []string{v4, v6}, []string{v6, v4})
	sp.ClusterIP = sp.ClusterIPs[0]
	for _, ip := range sp.ClusterIPs {
		f := v1.IPv4Protocol
		if strings.Contains(ip, ":") {
			f = v1.IPv6Protocol
		}
		sp.IPFamilies = append(sp.IPFamilies, f)
	}
	for p := range 1 + g.rng.IntN(3) {
		port := v1.ServicePort{Name: fmt.Sprintf("p%d", p), Port: int32(80 + p), Protocol: pick(g, v1.ProtocolTCP, v1.ProtocolUDP, v1.ProtocolSCTP)}
		if sp.Type != v1.ServiceTypeClusterIP && g.rng.IntN(5) > 0 {
			port.NodePort = int32(30000 + g.rng.IntN(2000))
		}
		sp.Ports = append(sp.Ports, port)
	}
	if g.rng.IntN(3) == 0 {
		sp.ExternalIPs = pick(g, []string{"203.0.113.1"}, []string{"2001:db8::1", "203.0.113.2"})
	}
	if g.rng.IntN(2) == 0 {
		sp.InternalTrafficPolicy = ptr(pick(g, v1.ServiceInternalTrafficPolicyLocal, v1.ServiceInternalTrafficPolicyCluster))
	}
	if sp.Type != v1.ServiceTypeClusterIP {
		sp.ExternalTrafficPolicy = pick(g, v1.ServiceExternalTrafficPolicyLocal, v1.ServiceExternalTrafficPolicyCluster)
	}
	if g.rng.IntN(3) == 0 {
		sp.SessionAffinity = v1.ServiceAffinityClientIP
		sp.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptr(int32(1 + g.rng.IntN(86400)))}}
	}
	if sp.Type != v1.ServiceTypeLoadBalancer {
		return svc
	}
	if sp.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal {
		sp.HealthCheckNodePort = int32(32000 + g.rng.IntN(700))
	}
	for range g.rng.IntN(4) {
		ing := v1.LoadBalancerIngress{IP: pick(g, "198.51.100.1", "198.51.100.2", "2001:db8:1::1", "")}
		if ing.IP == "" {
			ing.Hostname = "lb.example.com"
		} else if g.rng.IntN(3) == 0 {
			ing.IPMode = ptr(pick(g, v1.LoadBalancerIPModeVIP, v1.LoadBalancerIPModeProxy))
		}
		svc.Status.LoadBalancer.Ingress = append(svc.Status.LoadBalancer.Ingress, ing)
	}
	if g.rng.IntN(2) == 0 {
		sp.LoadBalancerSourceRanges = pick(g, []string{"10.0.0.0/8"}, []string{"10.1.2.0/24", "2001:db8::/32"},
			[]string{"0.0.0.0/0", "192.0.2.0/24"}, []string{"::/0"}, []string{" 10.1.2.3/16"})
	}
	return svc
}

// slices returns up to three slices for svc, each address used once: which
// of two duplicates kube-proxy keeps depends on map iteration order, so
// duplicates have no reference behaviour to compare with.
func (g generator) slices(svc *v1.Service, i int) []*discovery.EndpointSlice {
	var out []*discovery.EndpointSlice
	n := 0
	for s := range g.rng.IntN(4) {
		fam := pick(g, discovery.AddressTypeIPv4, discovery.AddressTypeIPv6)
		es := &discovery.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: fmt.Sprintf("s%d-%d", i, s), Labels: map[string]string{discovery.LabelServiceName: svc.Name}},
			AddressType: fam,
		}
		for _, p := range svc.Spec.Ports {
			if g.rng.IntN(6) > 0 {
				es.Ports = append(es.Ports, discovery.EndpointPort{Name: ptr(p.Name), Port: ptr(int32(8000 + g.rng.IntN(3))), Protocol: ptr(p.Protocol)})
			}
		}
		hints := g.rng.IntN(4) // bit 0: zone hints, bit 1: node hints
		for range g.rng.IntN(6) {
			n++
			addr := fmt.Sprintf("10.244.%d.%d", i%256, n)
			if fam == discovery.AddressTypeIPv6 {
				addr = fmt.Sprintf("fd00:244:%x::%x", i, n)
			}
			ep := discovery.Endpoint{Addresses: []string{addr}}
			if g.rng.IntN(2) == 0 {
				ep.NodeName = ptr(pick(g, "node1", "node2", "node3"))
			}
			c := &ep.Conditions
			if g.rng.IntN(2) == 0 {
				c.Ready = ptr(g.rng.IntN(3) > 0)
			}
			if g.rng.IntN(2) == 0 {
				c.Serving = ptr(g.rng.IntN(2) == 0)
			}
			if g.rng.IntN(2) == 0 {
				c.Terminating = ptr(g.rng.IntN(2) == 0)
			}
			if hints > 0 && g.rng.IntN(8) > 0 { // now and then one is missing
				ep.Hints = &discovery.EndpointHints{}
				if hints&1 != 0 {
					ep.Hints.ForZones = []discovery.ForZone{{Name: pick(g, "zone-a", "zone-b")}}
				}
				if hints&2 != 0 {
					ep.Hints.ForNodes = []discovery.ForNode{{Name: pick(g, "node1", "node2")}}
				}
			}
			es.Endpoints = append(es.Endpoints, ep)
		}
		out = append(out, es)
	}
	return out
}

func addrPort(ip string, port int) string {
	return netip.AddrPortFrom(netip.MustParseAddr(ip), uint16(port)).String()
}

func kubeProxyEndpoints(eps []proxy.Endpoint) string {
	var s []string
	for _, e := range eps {
		l := ""
		if e.IsLocal() {
			l = " local"
		}
		s = append(s, addrPort(e.IP(), e.Port())+l)
	}
	slices.Sort(s)
	return strings.Join(s, ", ")
}

func modelEndpoints(eps []model.Endpoint) string {
	var s []string
	for _, e := range eps {
		l := ""
		if e.Local {
			l = " local"
		}
		s = append(s, e.String()+l)
	}
	slices.Sort(s)
	return strings.Join(s, ", ")
}

// TestMatchesKubeProxy compares, for every ServicePort of random input: the
// frontends, the endpoints internal, external and short-circuited traffic
// reach, what happens without endpoints, affinity, source ranges and the
// health check node port.
func TestMatchesKubeProxy(t *testing.T) {
	cfg := &model.Config{NodeName: nodeName, NodeZone: zone,
		NodeAddresses: []netip.Addr{netip.MustParseAddr("192.168.1.2"), netip.MustParseAddr("2001:db8:9::2")}}
	for seed := range uint64(5) {
		g := generator{rand.New(rand.NewPCG(seed, 7))}
		var svcs []*v1.Service
		var ess []*discovery.EndpointSlice
		for i := range 2000 {
			svc := g.service(i)
			svcs = append(svcs, svc)
			ess = append(ess, g.slices(svc, i)...)
		}
		state, errs := model.Build(cfg, svcs, ess)
		// What svcnat leaves alone on purpose (kube-proxy too) is not an
		// error in the generated objects; frontend conflicts are compared
		// below.
		var conflicts []*model.ConflictError
		errs = slices.DeleteFunc(errs, func(err error) bool {
			if ce, ok := errors.AsType[*model.ConflictError](err); ok {
				conflicts = append(conflicts, ce)
				return true
			}
			_, ignored := errors.AsType[*model.IgnoredError](err)
			return ignored
		})
		if len(errs) > 0 {
			t.Fatalf("seed %d: Build: %v", seed, errs)
		}
		// A frontend lost to another Service's is svcnat's choice where
		// kube-proxy programs both (CVE-2020-8554).
		lost := map[model.ServicePortName][]string{}
		for _, ce := range conflicts {
			lost[ce.Loser] = append(lost[ce.Loser], ce.Lost.String())
		}
		checked := 0
		for _, fam := range []v1.IPFamily{v1.IPv4Protocol, v1.IPv6Protocol} {
			sct := proxy.NewServiceChangeTracker(fam, nil, nil)
			for _, svc := range svcs {
				sct.Update(nil, svc)
			}
			services := proxy.ServicePortMap{}
			services.Update(sct)
			ect := proxy.NewEndpointsChangeTracker(fam, nodeName, nil, nil)
			for _, es := range ess {
				ect.EndpointSliceUpdate(es, false)
			}
			endpoints := proxy.EndpointsMap{}
			endpoints.Update(ect)
			for name, info := range services {
				n := model.ServicePortName{Namespace: name.Namespace, Name: name.Name, Port: name.Port, Family: model.Family(fam)}
				sp := state.ServicePorts[n]
				if sp == nil {
					t.Errorf("seed %d: %s: missing from the model", seed, n)
					continue
				}
				checked++
				for _, d := range compare(cfg, info, endpoints[name], sp, lost[n]) {
					t.Errorf("seed %d: %s: %s", seed, n, d)
				}
			}
		}
		if checked != len(state.ServicePorts) {
			t.Errorf("seed %d: model has %d ServicePorts, kube-proxy %d", seed, len(state.ServicePorts), checked)
		}
	}
}

// compare returns the differences between kube-proxy's view of one service
// port and the model's.
func compare(cfg *model.Config, info proxy.ServicePort, eps []proxy.Endpoint, sp *model.ServicePort, lost []string) []string {
	var diffs []string
	differ := func(what string, kp, m any) {
		diffs = append(diffs, fmt.Sprintf("%s: kube-proxy %v, model %v", what, kp, m))
	}
	if string(info.Protocol()) != string(sp.Protocol) {
		differ("protocol", info.Protocol(), sp.Protocol)
	}
	want := []string{"ClusterIP " + addrPort(info.ClusterIP().String(), info.Port())}
	if info.NodePort() != 0 {
		for _, a := range cfg.NodeAddresses {
			if model.FamilyOf(a) == sp.Name.Family {
				want = append(want, "NodePort "+addrPort(a.String(), info.NodePort()))
			}
		}
	}
	for _, ip := range info.ExternalIPs() {
		want = append(want, "ExternalIP "+addrPort(ip.String(), info.Port()))
	}
	for _, ip := range info.LoadBalancerVIPs() {
		want = append(want, "LoadBalancer "+addrPort(ip.String(), info.Port()))
	}
	want = slices.DeleteFunc(want, func(f string) bool { return slices.Contains(lost, f) })
	slices.Sort(want)
	want = slices.Compact(want)
	var got []string
	for _, f := range sp.Frontends {
		got = append(got, f.String())
	}
	if !slices.Equal(want, got) {
		differ("frontends", want, got)
	}
	external := len(want) > 1

	var wantRanges, gotRanges []string
	if slices.ContainsFunc(want, func(f string) bool { return strings.HasPrefix(f, "LoadBalancer ") }) { // the model leaves unused fields empty
		allowFromNode := false
		for _, r := range info.LoadBalancerSourceRanges() {
			wantRanges = append(wantRanges, r.String())
			// kube-proxy's proxiers (iptables/proxier.go "allowFromNode")
			// also accept the VIPs as sources when a range holds the node.
			allowFromNode = allowFromNode || slices.ContainsFunc(cfg.NodeAddresses, func(a netip.Addr) bool {
				return r.Contains(net.IP(a.AsSlice()))
			})
		}
		if allowFromNode {
			for _, ip := range info.LoadBalancerVIPs() {
				wantRanges = append(wantRanges, netip.PrefixFrom(netip.MustParseAddr(ip.String()), len(ip)*8).String())
			}
		}
	}
	for _, r := range sp.SourceRanges {
		gotRanges = append(gotRanges, r.String())
	}
	slices.SortFunc(wantRanges, func(a, b string) int {
		return model.ComparePrefixes(netip.MustParsePrefix(a).Masked(), netip.MustParsePrefix(b).Masked())
	})
	if wantRanges = slices.Compact(wantRanges); !slices.Equal(wantRanges, gotRanges) {
		differ("source ranges", wantRanges, gotRanges)
	}
	if kp := time.Duration(info.StickyMaxAgeSeconds()) * time.Second; kp != sp.AffinityTimeout {
		differ("affinity", kp, sp.AffinityTimeout)
	}
	if info.HealthCheckNodePort() != int(sp.HealthCheckNodePort) {
		differ("health check node port", info.HealthCheckNodePort(), sp.HealthCheckNodePort)
	}
	if info.InternalPolicyLocal() != sp.InternalTrafficLocal {
		differ("internal policy Local", info.InternalPolicyLocal(), sp.InternalTrafficLocal)
	}
	if kp := info.ExternalPolicyLocal() && external; kp != sp.ExternalTrafficLocal {
		differ("external policy Local in effect", kp, sp.ExternalTrafficLocal)
	}

	cluster, local, _, hasAny := proxy.CategorizeEndpoints(eps, info, nodeName, map[string]string{v1.LabelTopologyZone: zone})
	internal := cluster
	if info.InternalPolicyLocal() {
		internal = local
	}
	if kp, m := kubeProxyEndpoints(internal), modelEndpoints(sp.InternalEndpoints()); kp != m {
		differ("internal endpoints", kp, m)
	}
	empty := len(internal) == 0
	if external {
		ext := cluster
		if info.ExternalPolicyLocal() {
			ext = local
			if kp, m := kubeProxyEndpoints(cluster), modelEndpoints(sp.ClusterEndpoints); kp != m {
				differ("short-circuit endpoints", kp, m)
			}
		}
		if kp, m := kubeProxyEndpoints(ext), modelEndpoints(sp.ExternalEndpoints()); kp != m {
			differ("external endpoints", kp, m)
		}
		empty = empty || len(ext) == 0
	}
	if empty {
		// kube-proxy rejects when the Service has no usable endpoint
		// anywhere, and drops otherwise.
		kp := model.Drop
		if !hasAny {
			kp = model.Reject
		}
		if m := sp.NoEndpoints(); kp != m {
			differ("action without endpoints", kp, m)
		}
	}
	return diffs
}
