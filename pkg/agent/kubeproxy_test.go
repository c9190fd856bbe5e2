package agent

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
)

// TestKubeProxyMetrics: the kube-proxy metrics carry kube-proxy's names and
// labels and move as kube-proxy's do: one sync observation per IP family,
// full for the first sync and partial for a one-Service change, the last
// sync's time, the network programming latency of a slice change under the
// slice's family, and the Service ports whose internal Local policy has no
// local endpoint.
func TestKubeProxyMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newHarness(t, func(o *Options) { o.Metrics = NewMetrics(reg) })
	slice := endpointSlice("web", "web-1", "10.244.0.5")
	k := h.src.put(service("web", "10.96.0.10"), slice)
	local := service("local", "10.96.0.11")
	local.Spec.InternalTrafficPolicy = new(corev1.ServiceInternalTrafficPolicyLocal)
	elsewhere := endpointSlice("local", "local-1", "10.244.1.5")
	elsewhere.Endpoints[0].NodeName = new("node2")
	localKey := h.src.put(local, elsewhere)
	h.cachesSynced()
	h.waitSync()
	h.waitArmed(30 * time.Second)

	changed := endpointSlice("web", "web-1", "10.244.0.6")
	changed.Annotations = map[string]string{triggerAnnotation: t0.Add(500 * time.Millisecond).Format(time.RFC3339Nano)}
	h.src.put(service("web", "10.96.0.10"), changed)
	h.advanceTo(time.Second)
	h.a.ServiceChanged(k)
	h.waitSync()
	h.waitArmed(31 * time.Second)

	got, families := gather(t, reg)
	for key, want := range map[string]float64{
		"kubeproxy_sync_proxy_rules_duration_seconds ip_family=IPv4 count":                           2,
		"kubeproxy_sync_proxy_rules_duration_seconds ip_family=IPv6 count":                           2,
		"kubeproxy_sync_full_proxy_rules_duration_seconds ip_family=IPv4 count":                      1,
		"kubeproxy_sync_partial_proxy_rules_duration_seconds ip_family=IPv6 count":                   1,
		"kubeproxy_sync_proxy_rules_last_timestamp_seconds ip_family=IPv4":                           float64(t0.Add(time.Second).Unix()),
		"kubeproxy_network_programming_duration_seconds ip_family=IPv4 count":                        1,
		"kubeproxy_network_programming_duration_seconds ip_family=IPv4 sum":                          0.5,
		"kubeproxy_sync_proxy_rules_no_local_endpoints_total ip_family=IPv4 traffic_policy=internal": 1,
		"kubeproxy_sync_proxy_rules_no_local_endpoints_total ip_family=IPv4 traffic_policy=external": 0,
		"kubeproxy_sync_proxy_rules_no_local_endpoints_total ip_family=IPv6 traffic_policy=internal": 0,
	} {
		if v, ok := got[key]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", key, v, ok, want)
		}
	}
	if _, ok := got["kubeproxy_network_programming_duration_seconds ip_family=IPv6 count"]; ok {
		t.Error("an IPv4 slice's change observed under IPv6")
	}
	// kube-proxy's buckets: 15 exponential from 1 ms; 80 for programming.
	for _, mf := range families {
		var want int
		switch mf.GetName() {
		case "kubeproxy_sync_proxy_rules_duration_seconds":
			want = 15
		case "kubeproxy_network_programming_duration_seconds":
			want = 2 + 59 + 12 + 7
		default:
			continue
		}
		if b := mf.GetMetric()[0].GetHistogram().GetBucket(); len(b) != want {
			t.Errorf("%s has %d buckets, want kube-proxy's %d", mf.GetName(), len(b), want)
		}
	}

	// The count follows each change (kept up to date per ServicePort, not
	// recounted): the Service gets a local endpoint, then another Service
	// without one appears.
	withLocal := endpointSlice("local", "local-1", "10.244.1.5", "10.244.0.9")
	withLocal.Endpoints[0].NodeName = new("node2")
	withLocal.Endpoints[1].NodeName = new("node1")
	h.src.put(local, withLocal)
	h.advanceTo(2 * time.Second)
	h.a.ServiceChanged(localKey)
	h.waitSync()
	h.waitArmed(32 * time.Second)
	const internal = "kubeproxy_sync_proxy_rules_no_local_endpoints_total ip_family=IPv4 traffic_policy=internal"
	if got, _ := gather(t, reg); got[internal] != 0 {
		t.Errorf("after a local endpoint appeared: %s = %v, want 0", internal, got[internal])
	}
	other := service("other", "10.96.0.12")
	other.Spec.InternalTrafficPolicy = new(corev1.ServiceInternalTrafficPolicyLocal)
	h.advanceTo(3 * time.Second)
	otherSlice := endpointSlice("other", "other-1", "10.244.1.6")
	otherSlice.Endpoints[0].NodeName = new("node2")
	h.a.ServiceChanged(h.src.put(other, otherSlice))
	h.waitSync()
	h.waitArmed(33 * time.Second)
	if got, _ := gather(t, reg); got[internal] != 1 {
		t.Errorf("after another Service without local endpoints: %s = %v, want 1", internal, got[internal])
	}
}

// gather returns the value of every gauge and the count and sum of every
// histogram in reg, keyed by name and labels.
func gather(t *testing.T, reg *prometheus.Registry) (map[string]float64, []*dto.MetricFamily) {
	t.Helper()
	got := map[string]float64{}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range families {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += " " + l.GetName() + "=" + l.GetValue()
			}
			switch {
			case m.Histogram != nil:
				got[key+" count"] = float64(m.GetHistogram().GetSampleCount())
				got[key+" sum"] = m.GetHistogram().GetSampleSum()
			case m.Gauge != nil:
				got[key] = m.GetGauge().GetValue()
			}
		}
	}
	return got, families
}
