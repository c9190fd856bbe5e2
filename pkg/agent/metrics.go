package agent

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the agent's Prometheus metrics.
type Metrics struct {
	syncDuration       prometheus.Histogram
	programmingLatency prometheus.Histogram
	syncErrors         prometheus.Counter
	invalidObjects     *prometheus.CounterVec
	ignoredObjects     *prometheus.CounterVec
	lastSync           prometheus.Gauge
	services           prometheus.Gauge
	servicePorts       prometheus.Gauge
	endpoints          prometheus.Gauge
	backendInfo        *prometheus.GaugeVec
	frontendConflicts  prometheus.Gauge
	servicePortsFailed prometheus.Gauge
	kubeProxy          *kubeProxyMetrics
}

// NewMetrics creates the agent's metrics and registers them with reg
// (nil: not registered). It panics if they are already registered there.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		syncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "svcnat_sync_duration_seconds",
			Help:    "Time one sync took: rebuilding changed Services and programming the backend.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		programmingLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "svcnat_network_programming_duration_seconds",
			Help: "Time from an EndpointSlice change (its endpoints.kubernetes.io/last-change-trigger-time) " +
				"to the sync that programmed it.",
			Buckets: append(prometheus.LinearBuckets(0.25, 0.25, 8), 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60, 120, 300),
		}),
		syncErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "svcnat_sync_errors_total",
			Help: "Syncs whose backend programming failed (they are retried).",
		}),
		invalidObjects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "svcnat_invalid_objects_total",
			Help: "Invalid parts of Kubernetes objects skipped while building Services, by object kind.",
		}, []string{"kind"}),
		ignoredObjects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "svcnat_ignored_objects_total",
			Help: "Valid parts of Kubernetes objects svcnat leaves alone on purpose (FQDN slices, slices of another family, slice ports no Service port matches, hostname-only or ipMode Proxy ingress), counted once per object and reason, by object kind.",
		}, []string{"kind"}),
		lastSync: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "svcnat_last_sync_timestamp_seconds",
			Help: "When the last successful sync finished, in seconds since the epoch.",
		}),
		services: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "svcnat_services",
			Help: "Services programmed.",
		}),
		servicePorts: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "svcnat_service_ports",
			Help: "Service ports programmed (one per port and address family).",
		}),
		endpoints: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "svcnat_endpoints",
			Help: "Cluster endpoints programmed, summed over Service ports.",
		}),
		backendInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "svcnat_backend_info",
			Help: "The dataplane backend in use (value 1).",
		}, []string{"backend"}),
		frontendConflicts: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "svcnat_frontend_conflicts",
			Help: "Frontends claimed by two Service ports whose losing claim is not programmed " +
				"(named in the log and by svcnat dump --check).",
		}),
		servicePortsFailed: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "svcnat_service_ports_failed",
			Help: "Service ports the backend could not program in the last sync, every other one being programmed " +
				"(named in the log and by svcnat dump --check).",
		}),
		kubeProxy: newKubeProxyMetrics(),
	}
	if reg != nil {
		reg.MustRegister(m.kubeProxy.collectors()...)
		reg.MustRegister(m.syncDuration, m.programmingLatency, m.syncErrors, m.invalidObjects, m.ignoredObjects,
			m.lastSync, m.services, m.servicePorts, m.endpoints, m.backendInfo, m.frontendConflicts, m.servicePortsFailed)
	}
	return m
}
