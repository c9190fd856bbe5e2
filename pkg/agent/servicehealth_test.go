package agent

import (
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"testing"
	"time"

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
