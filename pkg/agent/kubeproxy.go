package agent

import (
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/svcnat/svcnat/pkg/model"
)

// kubeProxyMetrics are the metrics of upstream kube-proxy (pkg/proxy/metrics,
// v1.37) that dashboards and ClusterLoader2 read, with kube-proxy's names,
// labels and buckets. kube-proxy runs one proxier per IP family and labels
// each by ip_family; svcnat programs both families in one sync, so a sync
// is observed once for each family the node programs (docs/metrics.md).
type kubeProxyMetrics struct {
	syncDuration, syncFull, syncPartial *prometheus.HistogramVec
	lastSync                            *prometheus.GaugeVec
	programming                         *prometheus.HistogramVec
	noLocalEndpoints                    *prometheus.GaugeVec
}

func newKubeProxyMetrics() *kubeProxyMetrics {
	sync := func(name, help string) *prometheus.HistogramVec {
		return prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Subsystem: "kubeproxy", Name: name, Help: help,
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 15),
		}, []string{"ip_family"})
	}
	var programmingBuckets []float64
	for _, b := range [][]float64{
		prometheus.LinearBuckets(0.25, 0.25, 2), // 0.25s, 0.50s
		prometheus.LinearBuckets(1, 1, 59),      // 1s ... 59s
		prometheus.LinearBuckets(60, 5, 12),     // 60s ... 115s
		prometheus.LinearBuckets(120, 30, 7),    // 2min ... 5min
	} {
		programmingBuckets = append(programmingBuckets, b...)
	}
	return &kubeProxyMetrics{
		syncDuration: sync("sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds"),
		syncFull:     sync("sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs"),
		syncPartial:  sync("sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for partial resyncs"),
		lastSync: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Subsystem: "kubeproxy", Name: "sync_proxy_rules_last_timestamp_seconds",
			Help: "The last time proxy rules were successfully synced",
		}, []string{"ip_family"}),
		programming: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Subsystem: "kubeproxy", Name: "network_programming_duration_seconds",
			Help:    "In Cluster Network Programming Latency in seconds",
			Buckets: programmingBuckets,
		}, []string{"ip_family"}),
		noLocalEndpoints: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Subsystem: "kubeproxy", Name: "sync_proxy_rules_no_local_endpoints_total",
			Help: "Number of services with a Local traffic policy and no endpoints",
		}, []string{"traffic_policy", "ip_family"}),
	}
}

func (m *kubeProxyMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.syncDuration, m.syncFull, m.syncPartial, m.lastSync, m.programming, m.noLocalEndpoints}
}

// trigger is an EndpointSlice change (its last-change-trigger-time) not
// programmed yet, and the family of the slice.
type trigger struct {
	at     time.Time
	family model.Family
}

// observeSync records how long a sync took, successful or not, as
// kube-proxy does: full when every Service was rebuilt or a failed sync is
// retried (kube-proxy's full resyncs: at start, after a failure), partial
// otherwise.
func (m *kubeProxyMetrics) observeSync(families []model.Family, took time.Duration, full bool) {
	for _, f := range families {
		m.syncDuration.WithLabelValues(string(f)).Observe(took.Seconds())
		if full {
			m.syncFull.WithLabelValues(string(f)).Observe(took.Seconds())
		} else {
			m.syncPartial.WithLabelValues(string(f)).Observe(took.Seconds())
		}
	}
}

// noLocal counts, per IP family and traffic policy ("internal",
// "external"), the Service ports whose Local traffic policy has no local
// endpoint while endpoints exist elsewhere (kube-proxy drops their traffic
// and counts each once per policy). The agent keeps it up to date as
// ServicePorts change, so that a sync does not walk the whole state.
type noLocal map[noLocalKey]int

type noLocalKey struct {
	family model.Family
	policy string
}

// add counts sp (d = 1) or stops counting it (d = -1); nil is no port.
func (n noLocal) add(sp *model.ServicePort, d int) {
	if sp == nil || len(sp.ClusterEndpoints) == 0 || len(sp.LocalEndpoints) > 0 {
		return
	}
	if sp.InternalTrafficLocal {
		n[noLocalKey{sp.Name.Family, "internal"}] += d
	}
	if sp.ExternalTrafficLocal {
		n[noLocalKey{sp.Name.Family, "external"}] += d
	}
}

// synced records a successful sync for families: when it finished, the
// network programming latency of the slice changes it programmed, and the
// Service ports without a local endpoint for their Local policy.
func (m *kubeProxyMetrics) synced(families []model.Family, now time.Time, counts noLocal, programmed []trigger) {
	for _, f := range families {
		m.lastSync.WithLabelValues(string(f)).Set(float64(now.UnixNano()) / 1e9)
		for _, policy := range []string{"internal", "external"} {
			m.noLocalEndpoints.WithLabelValues(policy, string(f)).Set(float64(counts[noLocalKey{f, policy}]))
		}
	}
	for _, t := range programmed {
		if slices.Contains(families, t.family) {
			m.programming.WithLabelValues(string(t.family)).Observe(now.Sub(t.at).Seconds())
		}
	}
}
