//go:build linux

package iptables

import (
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
