package agent

import (
	"encoding/json"
	"net/http"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/clock"
)

// toBeDeletedTaint marks a node the cluster autoscaler is about to remove;
// load balancers should stop sending it new connections.
const toBeDeletedTaint = "ToBeDeletedByClusterAutoscaler"

// Health tracks whether the agent keeps the dataplane up to date, with
// kube-proxy's semantics: unhealthy once a change (or a due periodic sync)
// has waited longer than the timeout without a successful sync.
type Health struct {
	clock   clock.Clock
	timeout time.Duration
	node    func() *corev1.Node

	mu           sync.Mutex
	lastUpdated  time.Time
	oldestQueued time.Time
}

// HealthStatus is the JSON body of /healthz and /livez, field for field
// kube-proxy's.
type HealthStatus struct {
	LastUpdated  time.Time `json:"lastUpdated"`
	CurrentTime  time.Time `json:"currentTime"`
	NodeEligible *bool     `json:"nodeEligible,omitempty"`
	Healthy      bool      `json:"healthy"`
}

func newHealth(c clock.Clock, timeout time.Duration, node func() *corev1.Node) *Health {
	return &Health{clock: c, timeout: timeout, node: node}
}

// queued records that a change waits to be programmed.
func (h *Health) queued() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.oldestQueued.IsZero() {
		h.oldestQueued = h.clock.Now()
	}
}

// waited returns how long the oldest change waiting has waited at now;
// zero when none waits.
func (h *Health) waited(now time.Time) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.oldestQueued.IsZero() {
		return 0
	}
	return now.Sub(h.oldestQueued)
}

// updated records a successful sync: nothing waits any more.
func (h *Health) updated() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastUpdated = h.clock.Now()
	h.oldestQueued = time.Time{}
}

// Status returns the agent's health, without the node's eligibility.
func (h *Health) Status() HealthStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.clock.Now()
	return HealthStatus{
		LastUpdated: h.lastUpdated,
		CurrentTime: now,
		Healthy:     h.oldestQueued.IsZero() || now.Sub(h.oldestQueued) < h.timeout,
	}
}

// nodeEligible reports whether load balancers may send this node traffic:
// its Node exists, is not being deleted, and is not about to be removed by
// the cluster autoscaler.
func (h *Health) nodeEligible() bool {
	n := h.node()
	if n == nil || n.DeletionTimestamp != nil {
		return false
	}
	for _, t := range n.Spec.Taints {
		if t.Key == toBeDeletedTaint {
			return false
		}
	}
	return true
}

// Handler serves /healthz (synced at least once, healthy, and the node
// eligible) and /livez (healthy), answering 200 or 503 with a HealthStatus.
func (h *Health) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		st := h.Status()
		eligible := h.nodeEligible()
		st.NodeEligible = &eligible
		// Unlike kube-proxy, not ready before the first sync: until then
		// this node's dataplane may not match the cluster.
		h.write(w, st, st.Healthy && eligible && !st.LastUpdated.IsZero())
	})
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) {
		st := h.Status()
		h.write(w, st, st.Healthy)
	})
	return mux
}

func (h *Health) write(w http.ResponseWriter, st HealthStatus, ok bool) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if ok {
		// As kube-proxy does: a healthy answer is as fresh as now, which is
		// what load balancer health checkers that compare it expect.
		st.LastUpdated = st.CurrentTime
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	body, _ := json.Marshal(st)
	_, _ = w.Write(body)
}
