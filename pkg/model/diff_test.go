package model

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestDiff(t *testing.T) {
	base := func() *State {
		web := &ServicePort{
			Name:     ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: IPv4},
			Protocol: TCP,
			Frontends: []Frontend{
				{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.10"), Port: 80},
				{Kind: NodePort, IP: netip.MustParseAddr("192.168.1.2"), Port: 30080},
			},
			ClusterEndpoints: []Endpoint{
				{IP: netip.MustParseAddr("10.244.1.5"), Port: 8080, Local: true},
				{IP: netip.MustParseAddr("10.244.2.5"), Port: 8080},
			},
		}
		dns := &ServicePort{
			Name:      ServicePortName{Namespace: "kube-system", Name: "dns", Family: IPv6},
			Protocol:  UDP,
			Frontends: []Frontend{{Kind: ClusterIP, IP: netip.MustParseAddr("fd00::10"), Port: 53}},
		}
		return &State{
			ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
			ServicePorts: map[ServicePortName]*ServicePort{web.Name: web, dns.Name: dns},
		}
	}
	webName := ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: IPv4}
	dnsName := ServicePortName{Namespace: "kube-system", Name: "dns", Family: IPv6}
	tests := []struct {
		name   string
		change func(got *State)
		want   []string
	}{
		{"equal", func(*State) {}, nil},
		{"missing and extra", func(s *State) {
			delete(s.ServicePorts, webName)
			extra := *s.ServicePorts[dnsName]
			extra.Name.Name = "dns2"
			s.ServicePorts[extra.Name] = &extra
		}, []string{
			"default/web:http (IPv4): missing",
			"kube-system/dns2 (IPv6): extra",
		}},
		{"frontends and endpoints", func(s *State) {
			sp := s.ServicePorts[webName]
			sp.Frontends = []Frontend{
				{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.10"), Port: 80},
				{Kind: NodePort, IP: netip.MustParseAddr("192.168.1.3"), Port: 30080},
			}
			sp.ClusterEndpoints = []Endpoint{
				{IP: netip.MustParseAddr("10.244.1.5"), Port: 8080},
				{IP: netip.MustParseAddr("10.244.3.5"), Port: 8080},
			}
			sp.LocalEndpoints = []Endpoint{{IP: netip.MustParseAddr("10.244.1.5"), Port: 8080, Local: true}}
		}, []string{
			"default/web:http (IPv4): frontend NodePort 192.168.1.2:30080 missing",
			"default/web:http (IPv4): frontend NodePort 192.168.1.3:30080 unexpected",
			"default/web:http (IPv4): cluster endpoint 10.244.2.5:8080 missing",
			"default/web:http (IPv4): cluster endpoint 10.244.3.5:8080 unexpected",
			"default/web:http (IPv4): cluster endpoint 10.244.1.5:8080 local false, want true",
			"default/web:http (IPv4): local endpoint 10.244.1.5:8080 unexpected",
		}},
		{"scalar fields", func(s *State) {
			sp := s.ServicePorts[dnsName]
			sp.Protocol = TCP
			sp.InternalTrafficLocal = true
			sp.ExternalTrafficLocal = true
			sp.AffinityTimeout = time.Minute
			sp.SourceRanges = []netip.Prefix{netip.MustParsePrefix("2001:db8::/32")}
			sp.HealthCheckNodePort = 32000
		}, []string{
			"kube-system/dns (IPv6): protocol TCP, want UDP",
			"kube-system/dns (IPv6): internalTrafficLocal true, want false",
			"kube-system/dns (IPv6): externalTrafficLocal true, want false",
			"kube-system/dns (IPv6): affinity timeout 1m0s, want 0s",
			"kube-system/dns (IPv6): source range 2001:db8::/32 unexpected",
			"kube-system/dns (IPv6): health check node port 32000, want 0",
		}},
		{"cluster CIDRs", func(s *State) {
			s.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.245.0.0/16")}
		}, []string{
			"cluster CIDR 10.244.0.0/16 missing",
			"cluster CIDR 10.245.0.0/16 unexpected",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := base()
			tt.change(got)
			d := Diff(base(), got)
			if !slices.Equal(d, tt.want) {
				t.Errorf("Diff:\n%s\nwant:\n%s", strings.Join(d, "\n"), strings.Join(tt.want, "\n"))
			}
			// Swapping the sides swaps missing and extra/unexpected.
			if back := Diff(got, base()); len(back) != len(tt.want) {
				t.Errorf("Diff(got, want) has %d lines, want %d:\n%s", len(back), len(tt.want), strings.Join(back, "\n"))
			}
		})
	}
	if d := Diff(nil, &State{}); len(d) != 0 {
		t.Errorf("Diff(nil, empty) = %v", d)
	}
	if d := Diff(nil, base()); len(d) != 3 {
		t.Errorf("Diff(nil, base) = %v, want 3 lines", d)
	}
}
