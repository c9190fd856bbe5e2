package agent

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/svcnat/svcnat/pkg/dataplane"
)

// CounterCollector exports the datapath's counters (dataplane.Counters),
// read from the kernel at each scrape: one series per Service port, and per
// endpoint only when asked for (the endpoints of a cluster change all the
// time and can be many). Service ports are the cluster's own, so the
// number of series is bounded by what the cluster defines, never by
// traffic.
type CounterCollector struct {
	reader    dataplane.CounterReader
	endpoints bool
	log       *slog.Logger

	connections, packets, bytes, endpointConnections *prometheus.Desc
}

// counterReadTimeout bounds one read of the counters (a scrape).
const counterReadTimeout = 10 * time.Second

var portLabels = []string{"namespace", "service", "port", "ip_family"}

// NewCounterCollector returns a collector of r's counters; endpoints adds
// the per-endpoint series (--metrics-endpoint-counters).
func NewCounterCollector(r dataplane.CounterReader, endpoints bool, log *slog.Logger) *CounterCollector {
	return &CounterCollector{
		reader: r, endpoints: endpoints, log: log,
		connections: prometheus.NewDesc("svcnat_service_port_connections_total",
			"New connections translated to an endpoint of the Service port, as the datapath counts them (docs/metrics.md); "+
				"iptables restarts it when svcnat rewrites the Service port's endpoint chain.", portLabels, nil),
		packets: prometheus.NewDesc("svcnat_service_port_packets_total",
			"Packets toward the Service port that arrived on the node's --interfaces (eBPF tc path only; the socket hooks see no packets).",
			portLabels, nil),
		bytes: prometheus.NewDesc("svcnat_service_port_bytes_total",
			"Bytes (IP header included) of svcnat_service_port_packets_total.", portLabels, nil),
		endpointConnections: prometheus.NewDesc("svcnat_endpoint_connections_total",
			"New connections translated to the endpoint (ip:port) of the Service port; only with --metrics-endpoint-counters.",
			append(portLabels[:len(portLabels):len(portLabels)], "endpoint"), nil),
	}
}

// Describe implements prometheus.Collector.
func (c *CounterCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.connections
	ch <- c.packets
	ch <- c.bytes
	if c.endpoints {
		ch <- c.endpointConnections
	}
}

// Collect implements prometheus.Collector. A failed read is logged and
// leaves the counters out of this scrape; the other metrics are served.
func (c *CounterCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), counterReadTimeout)
	defer cancel()
	counters, err := c.reader.Counters(ctx)
	if err != nil {
		c.log.Warn("read datapath counters for /metrics", "err", err)
		return
	}
	for name, pc := range counters {
		labels := []string{name.Namespace, name.Name, name.Port, string(name.Family)}
		ch <- prometheus.MustNewConstMetric(c.connections, prometheus.CounterValue, float64(pc.Connections), labels...)
		if pc.Packets != nil && pc.Bytes != nil {
			ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(*pc.Packets), labels...)
			ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(*pc.Bytes), labels...)
		}
		if !c.endpoints {
			continue
		}
		for ep, n := range pc.Endpoints {
			ch <- prometheus.MustNewConstMetric(c.endpointConnections, prometheus.CounterValue, float64(n), append(labels, ep)...)
		}
	}
}
