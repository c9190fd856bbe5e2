//go:build linux

package agent

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/iptables"
	"github.com/svcnat/svcnat/pkg/model"
)

// TestFailingFamilyKeepsOtherHealthy runs the agent with the real iptables
// backend on a node whose ip6tables-restore fails (a broken install): the
// IPv4 half of a dual-stack Service is programmed and the agent is healthy;
// only the IPv6 ServicePort is reported failed (review finding 5).
func TestFailingFamilyKeepsOtherHealthy(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	shim := t.TempDir()
	if err := os.WriteFile(filepath.Join(shim, "ip6tables-nft-restore"), []byte("#!/bin/sh\necho broken >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", shim+string(os.PathListSeparator)+os.Getenv("PATH"))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	b := realIptables(t, iptables.ModeNFT, log)

	src := newFakeSources()
	close(src.synced)
	src.put(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10", "fd00::10"},
			Ports: []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP}}},
	})
	m := NewMetrics(prometheus.NewRegistry())
	a := New(b, src, Options{SyncPeriod: time.Minute, Metrics: m, Logger: log})
	go func() { _ = a.Run(t.Context()) }()
	for deadline := time.Now().Add(10 * time.Second); a.Health().Status().LastUpdated.IsZero(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no successful sync with a failing IPv6 family")
		}
	}
	if st := a.Health().Status(); !st.Healthy {
		t.Errorf("health %+v with IPv4 programmed, want healthy", st)
	}
	if got := gaugeValue(t, m.servicePortsFailed); got != 1 {
		t.Errorf("svcnat_service_ports_failed = %v, want 1 (the IPv6 one)", got)
	}
	got, err := b.Dump(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	v4 := model.ServicePortName{Namespace: "ns", Name: "web", Family: model.IPv4}
	if _, ok := got.ServicePorts[v4]; !ok {
		t.Errorf("IPv4 service port not programmed: %v", got.ServicePorts)
	}
}
