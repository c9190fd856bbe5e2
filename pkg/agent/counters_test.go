package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

type fixedCounters struct {
	c   map[model.ServicePortName]*dataplane.PortCounters
	err error
}

func (f *fixedCounters) Counters(context.Context) (map[model.ServicePortName]*dataplane.PortCounters, error) {
	return f.c, f.err
}

// counterSeries gathers reg and lists each counter sample as
// "name{label=value,...} value", sorted.
func counterSeries(t *testing.T, reg *prometheus.Registry) []string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var l []string
			for _, lp := range m.GetLabel() {
				l = append(l, lp.GetName()+"="+lp.GetValue())
			}
			out = append(out, mf.GetName()+"{"+strings.Join(l, ",")+"} "+strconv.FormatFloat(m.GetCounter().GetValue(), 'f', -1, 64))
		}
	}
	slices.Sort(out)
	return out
}

// TestCounterCollector: one series per Service port (packets and bytes
// only where the backend counts them), per endpoint only when asked, read
// at each scrape; a failed read leaves them out of the scrape without
// failing it.
func TestCounterCollector(t *testing.T) {
	packets, bytes := uint64(40), uint64(2160)
	r := &fixedCounters{c: map[model.ServicePortName]*dataplane.PortCounters{
		{Namespace: "ns", Name: "web", Port: "http", Family: model.IPv4}: {
			Counters:  dataplane.Counters{Connections: 12, Packets: &packets, Bytes: &bytes},
			Endpoints: map[string]uint64{"10.244.0.5:8080": 5, "10.244.1.5:8080": 7},
		},
		{Namespace: "ns", Name: "dns", Family: model.IPv6}: {
			Counters:  dataplane.Counters{Connections: 3},
			Endpoints: map[string]uint64{"[fd00::5]:53": 3},
		},
	}}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCounterCollector(r, false, log))
	want := []string{
		"svcnat_service_port_bytes_total{ip_family=IPv4,namespace=ns,port=http,service=web} 2160",
		"svcnat_service_port_connections_total{ip_family=IPv4,namespace=ns,port=http,service=web} 12",
		"svcnat_service_port_connections_total{ip_family=IPv6,namespace=ns,port=,service=dns} 3",
		"svcnat_service_port_packets_total{ip_family=IPv4,namespace=ns,port=http,service=web} 40",
	}
	if got := counterSeries(t, reg); !slices.Equal(got, want) {
		t.Errorf("without endpoint counters:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	withEndpoints := prometheus.NewRegistry()
	withEndpoints.MustRegister(NewCounterCollector(r, true, log))
	want = slices.Concat(want, []string{
		"svcnat_endpoint_connections_total{endpoint=10.244.0.5:8080,ip_family=IPv4,namespace=ns,port=http,service=web} 5",
		"svcnat_endpoint_connections_total{endpoint=10.244.1.5:8080,ip_family=IPv4,namespace=ns,port=http,service=web} 7",
		"svcnat_endpoint_connections_total{endpoint=[fd00::5]:53,ip_family=IPv6,namespace=ns,port=,service=dns} 3",
	})
	slices.Sort(want)
	if got := counterSeries(t, withEndpoints); !slices.Equal(got, want) {
		t.Errorf("with endpoint counters:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// The next scrape reads again.
	r.c[model.ServicePortName{Namespace: "ns", Name: "dns", Family: model.IPv6}].Connections = 4
	if got := counterSeries(t, reg); !slices.Contains(got, "svcnat_service_port_connections_total{ip_family=IPv6,namespace=ns,port=,service=dns} 4") {
		t.Errorf("second scrape did not read the counters again: %v", got)
	}
	r.err = errors.New("iptables-save: exit status 1")
	if got := counterSeries(t, reg); len(got) != 0 {
		t.Errorf("after a failed read: %v, want no series", got)
	}
}
