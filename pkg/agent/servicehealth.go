package agent

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/svcnat/svcnat/pkg/model"
)

// ServiceHealth serves the healthCheckNodePorts of Services with
// externalTrafficPolicy Local, as kube-proxy does: 200 when this node has
// ready local endpoints for the Service (and the agent is healthy), 503
// otherwise (also while the local endpoints only terminate),
// so that load balancers send traffic only to nodes that can take it.
type ServiceHealth struct {
	host  string
	proxy *Health
	log   *slog.Logger

	mu      sync.Mutex
	servers map[types.NamespacedName]*healthCheckServer
}

type healthCheckServer struct {
	port   uint16
	server *http.Server
	local  int // local endpoints; guarded by ServiceHealth.mu
}

// healthCheckBody is kube-proxy's healthCheckNodePort answer.
type healthCheckBody struct {
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	LocalEndpoints      int  `json:"localEndpoints"`
	ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
}

func newServiceHealth(host string, proxy *Health, log *slog.Logger) *ServiceHealth {
	return &ServiceHealth{host: host, proxy: proxy, log: log, servers: map[types.NamespacedName]*healthCheckServer{}}
}

// Sync opens a server for every Service in s with a HealthCheckNodePort,
// closes those of Services that no longer have one (or moved port), and
// updates the local endpoint counts. A port that cannot be opened is
// logged and tried again on the next Sync.
func (sh *ServiceHealth) Sync(s *model.State) {
	want := map[types.NamespacedName]uint16{}
	local := map[types.NamespacedName]map[string]struct{}{}
	for _, sp := range s.ServicePorts {
		if sp.HealthCheckNodePort == 0 {
			continue
		}
		key := types.NamespacedName{Namespace: sp.Name.Namespace, Name: sp.Name.Name}
		want[key] = sp.HealthCheckNodePort
		if local[key] == nil {
			local[key] = map[string]struct{}{}
		}
		// Ready ones only: a node whose local endpoints all terminate
		// fails the check, so load balancers drain it (as kube-proxy).
		for _, ep := range sp.LocalReadyEndpoints {
			local[key][ep.IP.String()] = struct{}{}
		}
	}
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for key, srv := range sh.servers {
		if port, ok := want[key]; !ok || port != srv.port {
			sh.log.Info("closing health check node port", "service", key, "port", srv.port)
			_ = srv.server.Close()
			delete(sh.servers, key)
		}
	}
	for key, port := range want {
		srv := sh.servers[key]
		if srv == nil {
			var err error
			if srv, err = sh.open(key, port); err != nil {
				sh.log.Error("open health check node port", "service", key, "port", port, "err", err)
				continue
			}
			sh.servers[key] = srv
		}
		srv.local = len(local[key])
	}
}

func (sh *ServiceHealth) open(key types.NamespacedName, port uint16) (*healthCheckServer, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(sh.host, strconv.Itoa(int(port))))
	if err != nil {
		return nil, err
	}
	srv := &healthCheckServer{port: port}
	srv.server = &http.Server{
		Handler:           http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { sh.serve(w, key, srv) }),
		ReadHeaderTimeout: 5 * time.Second,
	}
	go func() {
		if err := srv.server.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			sh.log.Error("serve health check node port", "service", key, "port", port, "err", err)
		}
	}()
	sh.log.Info("opened health check node port", "service", key, "port", port)
	return srv, nil
}

func (sh *ServiceHealth) serve(w http.ResponseWriter, key types.NamespacedName, srv *healthCheckServer) {
	sh.mu.Lock()
	n := srv.local
	sh.mu.Unlock()
	var body healthCheckBody
	body.Service.Namespace, body.Service.Name = key.Namespace, key.Name
	body.LocalEndpoints = n
	body.ServiceProxyHealthy = sh.proxy.Status().Healthy
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("X-Load-Balancing-Endpoint-Weight", strconv.Itoa(n))
	if n > 0 && body.ServiceProxyHealthy {
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	out, _ := json.MarshalIndent(body, "", "\t")
	_, _ = w.Write(out)
}

// Close stops every health check server, waiting briefly for requests in
// flight.
func (sh *ServiceHealth) Close() {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for key, srv := range sh.servers {
		_ = srv.server.Shutdown(ctx)
		delete(sh.servers, key)
	}
}
