package dataplane

import (
	"context"

	"github.com/svcnat/svcnat/pkg/model"
)

// Counters is what a backend's datapath counted for one Service port or one
// of its endpoints, read from the kernel. What each field means depends on
// where the backend translates (see docs/metrics.md):
//
//   - Connections: new connections translated to an endpoint. iptables: the
//     packet counters of the nat table's DNAT rules, which only a
//     connection's first packet traverses. eBPF: a socket's first connect()
//     or sendmsg() to a frontend (or a change of its endpoint), and each flow
//     from outside the node whose conntrack entry the tc program created.
//   - Packets, Bytes (IP header included): eBPF only, and only the packets the
//     tc program sees: those arriving on the node's interfaces for a
//     frontend, client to Service. Nil when the backend cannot count them;
//     the socket hooks never see packets.
type Counters struct {
	Connections uint64  `json:"connections"`
	Packets     *uint64 `json:"packets,omitempty"`
	Bytes       *uint64 `json:"bytes,omitempty"`
}

// PortCounters are the counters of one Service port, in total and per
// endpoint it holds now. A backend may reset them when it rewrites the
// Service port (iptables, when its endpoint chain is rewritten).
type PortCounters struct {
	Counters
	// Endpoints holds the connections per endpoint ("ip:port").
	Endpoints map[string]uint64 `json:"endpoints,omitempty"`
}

// CounterReader is a Backend that reads its datapath's counters back from
// the kernel. Like Dump, Counters needs no Init and works from any process;
// it is safe to call concurrently with Sync.
type CounterReader interface {
	Counters(ctx context.Context) (map[model.ServicePortName]*PortCounters, error)
}
