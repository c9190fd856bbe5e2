package model

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestJSONRoundTrip encodes States (a hand-made one with every field set and
// the States of all fixtures), decodes them and checks nothing changed.
func TestJSONRoundTrip(t *testing.T) {
	full := &ServicePort{
		Name:     ServicePortName{Namespace: "default", Name: "lb", Port: "http", Family: IPv6},
		Protocol: UDP,
		Frontends: []Frontend{
			{Kind: ClusterIP, IP: netip.MustParseAddr("fd00::10"), Port: 80},
			{Kind: LoadBalancer, IP: netip.MustParseAddr("2001:db8::10"), Port: 80},
		},
		ClusterEndpoints:     []Endpoint{{IP: netip.MustParseAddr("fd00:1::1"), Port: 8080, Local: true}, {IP: netip.MustParseAddr("fd00:2::1"), Port: 8080}},
		LocalEndpoints:       []Endpoint{{IP: netip.MustParseAddr("fd00:1::1"), Port: 8080, Local: true}},
		InternalTrafficLocal: true,
		ExternalTrafficLocal: true,
		AffinityTimeout:      90 * time.Second,
		SourceRanges:         []netip.Prefix{netip.MustParsePrefix("2001:db8:1::/48")},
		HealthCheckNodePort:  32000,
	}
	states := map[string]*State{
		"empty": {},
		"full": {
			ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
			ServicePorts: map[ServicePortName]*ServicePort{full.Name: full},
		},
	}
	files, _ := filepath.Glob("testdata/*.yaml")
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		f, err := parseFixture(data)
		if err != nil {
			t.Fatal(err)
		}
		states[file], _ = Build(f.config, f.services, f.slices)
	}
	for name, s := range states {
		data, err := json.Marshal(s)
		if err != nil {
			t.Fatalf("%s: marshal: %v", name, err)
		}
		var back State
		if err := json.Unmarshal(data, &back); err != nil {
			t.Fatalf("%s: unmarshal %s: %v", name, data, err)
		}
		if d := Diff(s, &back); len(d) > 0 {
			t.Errorf("%s: round trip changed the State:\n%s", name, strings.Join(d, "\n"))
		}
		for n, sp := range s.ServicePorts {
			if !sp.Equal(back.ServicePorts[n]) {
				t.Errorf("%s: %s changed in the round trip", name, n)
			}
		}
		again, _ := json.Marshal(&back)
		if string(again) != string(data) {
			t.Errorf("%s: encoding is not stable:\n%s\n%s", name, data, again)
		}
	}
}

func TestJSONForm(t *testing.T) {
	sp := &ServicePort{
		Name:            ServicePortName{Namespace: "ns", Name: "a", Family: IPv4},
		Protocol:        TCP,
		Frontends:       []Frontend{{Kind: ClusterIP, IP: netip.MustParseAddr("10.96.0.1"), Port: 53}},
		AffinityTimeout: 3 * time.Hour,
	}
	s := &State{ServicePorts: map[ServicePortName]*ServicePort{sp.Name: sp}}
	got, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"clusterCIDRs":[],"servicePorts":[{"name":{"namespace":"ns","name":"a","family":"IPv4"},` +
		`"protocol":"TCP","frontends":[{"kind":"ClusterIP","ip":"10.96.0.1","port":53}],"affinityTimeout":"3h0m0s"}]}`
	if string(got) != want {
		t.Errorf("json.Marshal:\n got %s\nwant %s", got, want)
	}
}

func TestJSONDecodeErrors(t *testing.T) {
	sp := `{"name":{"namespace":"ns","name":"a","family":"IPv4"},"protocol":"TCP","frontends":[]}`
	for name, in := range map[string]string{
		"duplicate name": `{"servicePorts":[` + sp + `,` + sp + `]}`,
		"null port":      `{"servicePorts":[null]}`,
		"bad affinity":   `{"servicePorts":[{"name":{"name":"a"},"affinityTimeout":"forever"}]}`,
		"bad ip":         `{"servicePorts":[{"name":{"name":"a"},"frontends":[{"ip":"x"}]}]}`,
		"bad prefix":     `{"clusterCIDRs":["10.0.0.0/99"]}`,
	} {
		var s State
		if err := json.Unmarshal([]byte(in), &s); err == nil {
			t.Errorf("%s: Unmarshal(%s) succeeded", name, in)
		}
	}
}
