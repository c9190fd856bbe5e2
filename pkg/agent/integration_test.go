package agent_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"maps"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/svcnat/svcnat/pkg/agent"
	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/watch"
)

// recordingBackend hands every programmed state to the test.
type recordingBackend struct{ states chan *model.State }

func (b *recordingBackend) Init(context.Context) error { return nil }
func (b *recordingBackend) Sync(_ context.Context, s *model.State) error {
	b.states <- &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: maps.Clone(s.ServicePorts)}
	return nil
}
func (b *recordingBackend) Dump(context.Context) (*model.State, error) {
	return nil, errors.New("unused")
}
func (b *recordingBackend) Cleanup(context.Context) error { return nil }

// TestAgentFollowsTheAPIServer wires the agent to the real watcher over a
// fake clientset, as `svcnat run` does, and checks that API changes reach
// the backend.
func TestAgentFollowsTheAPIServer(t *testing.T) {
	proto := corev1.ProtocolTCP
	port := int32(8080)
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP, ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"},
			Ports: []corev1.ServicePort{{Protocol: proto, Port: 80, TargetPort: intstr.FromInt32(port)}},
		},
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new(""), Protocol: &proto, Port: &port}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.244.0.5"}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}}},
	}
	client := fake.NewClientset(svc, slice)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	w, err := watch.New(client, "node1", 0, log)
	if err != nil {
		t.Fatal(err)
	}
	be := &recordingBackend{states: make(chan *model.State, 100)}
	a := agent.New(be, w, agent.Options{
		NodeName: "node1", MinSyncInterval: 10 * time.Millisecond, Logger: log,
		Metrics: agent.NewMetrics(prometheus.NewRegistry()),
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- a.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	}()
	w.Start(ctx, a)

	endpoints := func(want int) {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case s := <-be.states:
				n := -1
				for _, sp := range s.ServicePorts {
					n = len(sp.ClusterEndpoints)
				}
				if n == want {
					return
				}
			case <-deadline:
				t.Fatalf("no sync programmed ns/web with %d endpoints", want)
			}
		}
	}
	endpoints(1)

	slice = slice.DeepCopy()
	slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.244.0.6"}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}})
	if _, err := client.DiscoveryV1().EndpointSlices("ns").Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	endpoints(2)

	if err := client.CoreV1().Services("ns").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	endpoints(-1) // no ServicePort left
}
