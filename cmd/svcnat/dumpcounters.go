package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// portCounters is what dump shows of the datapath's counters, nil when the
// backend has none.
type portCounters map[model.ServicePortName]*dataplane.PortCounters

// readCounters reads b's counters from the kernel, nil when b counts
// nothing.
func readCounters(ctx context.Context, b dataplane.Backend) (portCounters, error) {
	r, ok := b.(dataplane.CounterReader)
	if !ok {
		return nil, nil
	}
	c, err := r.Counters(ctx)
	if err != nil {
		return nil, fmt.Errorf("read counters: %w", err)
	}
	return c, nil
}

// of returns the counters of Service port n: zero when nothing counted it.
func (c portCounters) of(n model.ServicePortName) *dataplane.PortCounters {
	if pc := c[n]; pc != nil {
		return pc
	}
	return &dataplane.PortCounters{}
}

// connectionsCell is the CONNS column: new connections translated.
func (c portCounters) connectionsCell(n model.ServicePortName) string {
	if c == nil {
		return "-"
	}
	return strconv.FormatUint(c.of(n).Connections, 10)
}

// trafficCell is the PACKETS/BYTES column: what the datapath saw itself
// ("-" where it counts no packets).
func (c portCounters) trafficCell(n model.ServicePortName) string {
	pc := c.of(n)
	if c == nil || pc.Packets == nil || pc.Bytes == nil {
		return "-"
	}
	return fmt.Sprintf("%d/%d", *pc.Packets, *pc.Bytes)
}

// endpointSuffix is " [N]", the connections endpoint e of n got, or empty
// without counters.
func (c portCounters) endpointSuffix(n model.ServicePortName, e model.Endpoint) string {
	if c == nil {
		return ""
	}
	return fmt.Sprintf(" [%d]", c.of(n).Endpoints[e.String()])
}

// dumpJSON is the -o json form: the State's own, each Service port with a
// "counters" field when the backend counts.
type dumpJSON struct {
	ClusterCIDRs []netip.Prefix `json:"clusterCIDRs"`
	ServicePorts []dumpPort     `json:"servicePorts"`
}

type dumpPort struct {
	sp       *model.ServicePort
	counters *dataplane.PortCounters
}

// MarshalJSON is the Service port's JSON with "counters" added last.
func (p dumpPort) MarshalJSON() ([]byte, error) {
	b, err := json.Marshal(p.sp)
	if err != nil || p.counters == nil {
		return b, err
	}
	c, err := json.Marshal(p.counters)
	if err != nil {
		return nil, err
	}
	b = append(b[:len(b)-1], `,"counters":`...)
	return append(append(b, c...), '}'), nil
}

func newDumpJSON(s *model.State, c portCounters) dumpJSON {
	w := dumpJSON{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: []dumpPort{}}
	if w.ClusterCIDRs == nil {
		w.ClusterCIDRs = []netip.Prefix{}
	}
	for _, sp := range s.Sorted() {
		p := dumpPort{sp: sp}
		if c != nil {
			p.counters = c.of(sp.Name)
		}
		w.ServicePorts = append(w.ServicePorts, p)
	}
	return w
}
