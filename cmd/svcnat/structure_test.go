package main

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/svcnat/svcnat/pkg/model"
)

// verifyingBackend is a dumpBackend that programs IPv4 only and reports
// structural problems, as the iptables backend's Verify does.
type verifyingBackend struct {
	dumpBackend
	problems []string
}

func (b *verifyingBackend) Families() []model.Family { return []model.Family{model.IPv4} }
func (b *verifyingBackend) Verify(context.Context) ([]string, error) {
	return b.problems, nil
}

// dump --check reports structural drift even when the decoded state
// matches, and does not count the family a single-stack node leaves out.
func TestCheckStructure(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP, ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10", "fd00::10"},
			Ports: []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80}},
		},
	}
	client := fake.NewClientset(svc)
	cfg := &model.Config{NodeName: "node1"}
	all, _ := model.Build(cfg, []*corev1.Service{svc}, nil)
	got := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for n, sp := range all.ServicePorts {
		if n.Family == model.IPv4 {
			got.ServicePorts[n] = sp
		}
	}
	b := &verifyingBackend{dumpBackend: dumpBackend{got}}
	var out bytes.Buffer
	if err := check(t.Context(), client, b, cfg, &out); err != nil {
		t.Fatalf("single-stack node in sync: %v\n%s", err, &out)
	}
	b.problems = []string{"IPv4 nat chain SVCNAT-SERVICES: 0 rules, want 3"}
	out.Reset()
	if err := check(t.Context(), client, b, cfg, &out); !errors.Is(err, errDrift) || !strings.Contains(out.String(), "SVCNAT-SERVICES") {
		t.Errorf("flushed root chain: %v\n%s", err, &out)
	}
}
