package agent

import (
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/svcnat/svcnat/pkg/model"
)

func freePort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

func healthCheckState(port uint16, local ...string) *model.State {
	s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for _, fam := range []model.Family{model.IPv4, model.IPv6} {
		sp := &model.ServicePort{
			Name:                 model.ServicePortName{Namespace: "ns", Name: "lb", Family: fam},
			Protocol:             model.TCP,
			ExternalTrafficLocal: true,
			HealthCheckNodePort:  port,
		}
		for _, ip := range local {
			a := netip.MustParseAddr(ip)
			if model.FamilyOf(a) == fam {
				sp.LocalEndpoints = append(sp.LocalEndpoints, model.Endpoint{IP: a, Port: 8080, Local: true})
				sp.LocalReadyEndpoints = append(sp.LocalReadyEndpoints, model.Endpoint{IP: a, Port: 8080, Local: true})
			}
		}
		s.ServicePorts[sp.Name] = sp
	}
	return s
}

func TestServiceHealthCheckNodePorts(t *testing.T) {
	clock := clocktesting.NewFakeClock(t0)
	proxy := newHealth(clock, time.Minute, nil)
	sh := newServiceHealth("127.0.0.1", proxy, slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer sh.Close()
	port := freePort(t)
	url := "http://127.0.0.1:" + strconv.Itoa(int(port)) + "/"

	sh.Sync(healthCheckState(port, "10.244.0.5", "10.244.0.6", "fd00::5"))
	code, body := get(t, url)
	var got healthCheckBody
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("body %q: %v", body, err)
	}
	if code != http.StatusOK || got.Service.Namespace != "ns" || got.Service.Name != "lb" || got.LocalEndpoints != 3 || !got.ServiceProxyHealthy {
		t.Errorf("with local endpoints: %d %s", code, body)
	}

	sh.Sync(healthCheckState(port))
	if code, body := get(t, url); code != http.StatusServiceUnavailable || !json.Valid([]byte(body)) {
		t.Errorf("without local endpoints: %d %s, want 503", code, body)
	}

	// An unhealthy agent fails the check even with local endpoints.
	sh.Sync(healthCheckState(port, "10.244.0.5"))
	proxy.queued()
	clock.Step(2 * time.Minute)
	if code, body := get(t, url); code != http.StatusServiceUnavailable {
		t.Errorf("unhealthy agent: %d %s, want 503", code, body)
	}
	proxy.updated()

	// Moving to another port closes the old one.
	port2 := freePort(t)
	sh.Sync(healthCheckState(port2, "10.244.0.5"))
	if code, _ := get(t, "http://127.0.0.1:"+strconv.Itoa(int(port2))+"/"); code != http.StatusOK {
		t.Errorf("new port: %d, want 200", code)
	}
	if _, err := http.Get(url); err == nil {
		t.Error("old health check port still answers")
	}

	// Without the Service, nothing listens.
	sh.Sync(&model.State{})
	if _, err := http.Get("http://127.0.0.1:" + strconv.Itoa(int(port2)) + "/"); err == nil {
		t.Error("health check port of a removed Service still answers")
	}
}

// TestServiceHealthDrainsTerminating builds the state from API objects: a
// node whose only local endpoint terminates (still serving) answers 503, so
// load balancers send it no new connections, while its rules still send
// traffic that arrives to that endpoint (KEP-1669, as kube-proxy).
func TestServiceHealthDrainsTerminating(t *testing.T) {
	port := freePort(t)
	ready, serving, terminating := false, true, true
	node, endpointPort := "node1", int32(8080)
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "lb"},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1"},
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal, HealthCheckNodePort: int32(port),
			Ports: []corev1.ServicePort{{Port: 80, NodePort: 30080, Protocol: corev1.ProtocolTCP}},
		},
		Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: "203.0.113.7"}}}},
	}
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: "lb-1", Labels: map[string]string{discoveryv1.LabelServiceName: "lb"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: &endpointPort}},
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.0.5"}, NodeName: &node,
			Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating}}},
	}
	sps, errs := model.BuildService(&model.Config{NodeName: node}, svc, []*discoveryv1.EndpointSlice{es})
	if len(errs) > 0 || len(sps) != 1 {
		t.Fatal(sps, errs)
	}
	if len(sps[0].LocalEndpoints) != 1 {
		t.Fatalf("local endpoints %v: traffic must still reach the terminating endpoint", sps[0].LocalEndpoints)
	}
	sh := newServiceHealth("127.0.0.1", newHealth(clocktesting.NewFakeClock(t0), time.Minute, nil), slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer sh.Close()
	url := "http://127.0.0.1:" + strconv.Itoa(int(port)) + "/"
	sh.Sync(&model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{sps[0].Name: sps[0]}})
	if code, body := get(t, url); code != http.StatusServiceUnavailable || !strings.Contains(body, `"localEndpoints": 0`) {
		t.Errorf("only a terminating local endpoint: %d %s, want 503 with localEndpoints 0", code, body)
	}
	ready = true
	sps, _ = model.BuildService(&model.Config{NodeName: node}, svc, []*discoveryv1.EndpointSlice{es})
	sh.Sync(&model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{sps[0].Name: sps[0]}})
	if code, body := get(t, url); code != http.StatusOK {
		t.Errorf("a ready local endpoint: %d %s, want 200", code, body)
	}
}
