package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/watch"
)

var update = flag.Bool("update", false, "rewrite golden files")

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden file (run with -update to create it): %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs:\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

func ep(s string, local bool) model.Endpoint {
	ap := netip.MustParseAddrPort(s)
	return model.Endpoint{IP: ap.Addr(), Port: ap.Port(), Local: local}
}

func fe(kind model.FrontendKind, s string) model.Frontend {
	ap := netip.MustParseAddrPort(s)
	return model.Frontend{Kind: kind, IP: ap.Addr(), Port: ap.Port()}
}

func dumpState() *model.State {
	sps := []*model.ServicePort{
		{
			Name: model.ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: model.IPv4}, Protocol: model.TCP,
			Frontends:        []model.Frontend{fe(model.ClusterIP, "10.96.0.10:80"), fe(model.NodePort, "192.0.2.1:30080")},
			ClusterEndpoints: []model.Endpoint{ep("10.244.0.5:8080", true), ep("10.244.1.5:8080", false)},
			AffinityTimeout:  3 * time.Hour,
		},
		{
			Name: model.ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: model.IPv6}, Protocol: model.TCP,
			Frontends:        []model.Frontend{fe(model.ClusterIP, "[fd00::10]:80")},
			ClusterEndpoints: []model.Endpoint{ep("[fd00:244::5]:8080", false)},
		},
		{
			Name: model.ServicePortName{Namespace: "kube-system", Name: "dns", Port: "dns", Family: model.IPv4}, Protocol: model.UDP,
			Frontends: []model.Frontend{fe(model.ClusterIP, "10.96.0.53:53")},
		},
		{
			Name: model.ServicePortName{Namespace: "shop", Name: "lb", Family: model.IPv4}, Protocol: model.TCP,
			Frontends:            []model.Frontend{fe(model.LoadBalancer, "203.0.113.7:443")},
			ClusterEndpoints:     []model.Endpoint{ep("10.244.1.9:8443", false)},
			ExternalTrafficLocal: true,
			SourceRanges:         []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")},
			HealthCheckNodePort:  32000,
		},
	}
	s := &model.State{
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		ServicePorts: map[model.ServicePortName]*model.ServicePort{},
	}
	for _, sp := range sps {
		s.ServicePorts[sp.Name] = sp
	}
	return s
}

func TestDumpTable(t *testing.T) {
	var out bytes.Buffer
	if err := writeTable(&out, dumpState(), nil); err != nil {
		t.Fatal(err)
	}
	golden(t, "dump.table", out.Bytes())
}

func TestDumpJSONRoundTrips(t *testing.T) {
	var out bytes.Buffer
	if err := writeJSON(&out, dumpState(), nil); err != nil {
		t.Fatal(err)
	}
	golden(t, "dump.json", out.Bytes())
	var back model.State
	if err := back.UnmarshalJSON(out.Bytes()); err != nil {
		t.Fatal(err)
	}
	if d := model.Diff(dumpState(), &back); len(d) != 0 {
		t.Errorf("JSON round trip differs: %v", d)
	}
}

// dumpBackend is a backend whose kernel holds a fixed state.
type dumpBackend struct{ state *model.State }

func (b *dumpBackend) Init(context.Context) error { return errors.New("dump must not call Init") }
func (b *dumpBackend) Sync(context.Context, *model.State) error {
	return errors.New("dump must not call Sync")
}
func (b *dumpBackend) Dump(context.Context) (*model.State, error) { return b.state, nil }
func (b *dumpBackend) Cleanup(context.Context) error              { return errors.New("dump must not call Cleanup") }

func TestCheck(t *testing.T) {
	proto := corev1.ProtocolUDP
	port := int32(5353)
	objs := []*corev1.Service{{
		ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "dns"},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP, ClusterIP: "10.96.0.53", ClusterIPs: []string{"10.96.0.53"},
			Ports: []corev1.ServicePort{{Name: "dns", Protocol: proto, Port: 53, TargetPort: intstr.FromInt32(5353)}},
		},
	}, {
		// Another proxy's: neither side has it.
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "other", Labels: map[string]string{watch.LabelServiceProxyName: "foo"}},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP, ClusterIP: "10.96.0.99", ClusterIPs: []string{"10.96.0.99"},
			Ports: []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80}},
		},
	}}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "kube-system", Name: "dns-1", Labels: map[string]string{discoveryv1.LabelServiceName: "dns"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("dns"), Protocol: &proto, Port: &port}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.0.7"}, NodeName: new("node1"), Conditions: discoveryv1.EndpointConditions{Ready: new(true)}},
			{Addresses: []string{"10.244.1.7"}, NodeName: new("node2"), Conditions: discoveryv1.EndpointConditions{Ready: new(true)}},
		},
	}
	// A slice of dns labelled headless: neither side uses it.
	headless := slice.DeepCopy()
	headless.Name, headless.Labels[corev1.IsHeadlessService] = "dns-headless", ""
	headless.Endpoints[0].Addresses = []string{"10.244.0.8"}
	client := fake.NewClientset(objs[0], objs[1], slice, headless, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node1"}})
	cfg := func() *model.Config {
		return &model.Config{NodeName: "node1", ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}}
	}
	want, errs := model.Build(cfg(), objs[:1], []*discoveryv1.EndpointSlice{slice})
	if len(errs) != 0 || len(want.ServicePorts) != 1 {
		t.Fatalf("fixture builds %d service ports, errors %v", len(want.ServicePorts), errs)
	}

	t.Run("in sync", func(t *testing.T) {
		var out bytes.Buffer
		if err := check(context.Background(), client, &dumpBackend{want}, cfg(), &out); err != nil {
			t.Errorf("check = %v, want nil; output:\n%s", err, &out)
		}
		if !strings.Contains(out.String(), "in sync: 1 service ports") {
			t.Errorf("output: %s", &out)
		}
	})

	t.Run("drift", func(t *testing.T) {
		got, _ := model.Build(cfg(), objs[:1], []*discoveryv1.EndpointSlice{slice})
		for _, sp := range got.ServicePorts {
			sp.ClusterEndpoints = sp.ClusterEndpoints[:1] // the kernel lost an endpoint
		}
		var out bytes.Buffer
		err := check(context.Background(), client, &dumpBackend{got}, cfg(), &out)
		if !errors.Is(err, errDrift) {
			t.Errorf("check = %v, want errDrift", err)
		}
		t.Logf("drift output:\n%s", &out)
		if !strings.Contains(out.String(), "10.244.1.7:5353") || !strings.Contains(out.String(), "drift: 1 differences") {
			t.Errorf("output does not name the missing endpoint:\n%s", &out)
		}
	})

	t.Run("conflict", func(t *testing.T) {
		// An externalIP on dns's ClusterIP and port: the kernel holds only
		// dns's claim, as the agent programs it; check names the conflict
		// and finds no drift.
		thief := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "evil", Name: "thief"},
			Spec: corev1.ServiceSpec{
				Type: corev1.ServiceTypeClusterIP, ClusterIP: "10.96.0.66", ClusterIPs: []string{"10.96.0.66"},
				ExternalIPs: []string{"10.96.0.53"},
				Ports:       []corev1.ServicePort{{Name: "dns", Protocol: proto, Port: 53}},
			},
		}
		client := fake.NewClientset(objs[0], thief, slice, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node1"}})
		kernel, errs := model.Build(cfg(), []*corev1.Service{objs[0], thief}, []*discoveryv1.EndpointSlice{slice})
		if len(errs) != 1 {
			t.Fatalf("errors %v, want the conflict", errs)
		}
		var out bytes.Buffer
		if err := check(context.Background(), client, &dumpBackend{kernel}, cfg(), &out); err != nil {
			t.Errorf("check = %v, want nil; output:\n%s", err, &out)
		}
		if !strings.Contains(out.String(), "conflict (the agent programs the winner only): service port evil/thief:dns: ExternalIP 10.96.0.53:53/UDP is also the ClusterIP of service port kube-system/dns:dns") {
			t.Errorf("output does not name the conflict:\n%s", &out)
		}
	})

	t.Run("empty kernel", func(t *testing.T) {
		var out bytes.Buffer
		empty := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
		if err := check(context.Background(), client, &dumpBackend{empty}, cfg(), &out); !errors.Is(err, errDrift) {
			t.Errorf("check against an empty kernel = %v, want errDrift; output:\n%s", err, &out)
		}
	})
}

func TestConfigFileFlagsWin(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "svcnat.yaml")
	if err := os.WriteFile(path, []byte("node-name: from-file\ncluster-cidr: [10.244.0.0/16, fd00:244::/56]\nsync-period: 1m\nmin-sync-period: 2s\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	root := newRootCommand()
	run, _, err := root.Find([]string{"run"})
	if err != nil {
		t.Fatal(err)
	}
	if err := run.ParseFlags([]string{"--config", path, "--min-sync-period=5s"}); err != nil {
		t.Fatal(err)
	}
	if err := applyConfigFile(run.Flags(), path); err != nil {
		t.Fatal(err)
	}
	for flag, want := range map[string]string{
		"node-name":       "from-file",
		"cluster-cidr":    "[10.244.0.0/16,fd00:244::/56]",
		"sync-period":     "1m0s",
		"min-sync-period": "5s",
	} {
		if got := run.Flags().Lookup(flag).Value.String(); got != want {
			t.Errorf("--%s = %q, want %q", flag, got, want)
		}
	}
	if err := os.WriteFile(path, []byte("no-such-flag: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := applyConfigFile(run.Flags(), path); err == nil || !strings.Contains(err.Error(), "no-such-flag") {
		t.Errorf("unknown key: err = %v", err)
	}
}
