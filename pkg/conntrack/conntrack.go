//go:build linux

// Package conntrack removes UDP conntrack entries that a new state made
// stale. UDP has no connection teardown, so without this a client that
// keeps sending from the same socket stays pinned by conntrack to an
// endpoint that is gone, or to the reject verdict of a Service that had no
// endpoint when its flow started.
package conntrack

import (
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/model"
)

// Cleaner deletes stale UDP entries from the conntrack table of the network
// namespace it runs in.
type Cleaner struct {
	log *slog.Logger
}

// NewCleaner returns a Cleaner that logs what it deleted to log.
func NewCleaner(log *slog.Logger) *Cleaner { return &Cleaner{log: log} }

// Clean deletes every UDP entry whose original destination is a frontend
// of a UDP ServicePort in s and whose reply source is not one of that
// ServicePort's endpoints. That covers both cases kube-proxy cleans:
// entries DNATed to an endpoint that was removed, and entries that were not
// translated at all (the reply would come from the frontend itself) because
// the Service had no endpoint when they were created. Reconciling against
// the whole state, as current kube-proxy does, rather than diffing the
// previous and the new state, also repairs entries left over from before an
// agent restart. It does nothing when s has no UDP ServicePort.
func (c *Cleaner) Clean(s *model.State) error {
	byFamily := map[model.Family]staleFilter{}
	for _, sp := range s.ServicePorts {
		if sp.Protocol != model.UDP {
			continue
		}
		eps := map[netip.AddrPort]struct{}{}
		for _, set := range [][]model.Endpoint{sp.ClusterEndpoints, sp.LocalEndpoints} {
			for _, ep := range set {
				eps[netip.AddrPortFrom(ep.IP, ep.Port)] = struct{}{}
			}
		}
		f := byFamily[sp.Name.Family]
		if f == nil {
			f = staleFilter{}
			byFamily[sp.Name.Family] = f
		}
		for _, fe := range sp.Frontends {
			f[netip.AddrPortFrom(fe.IP, fe.Port)] = eps
		}
	}
	for fam, f := range byFamily {
		af := netlink.InetFamily(unix.AF_INET)
		if fam == model.IPv6 {
			af = unix.AF_INET6
		}
		n, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, af, f)
		if err != nil {
			return fmt.Errorf("delete stale %s udp conntrack entries: %w", fam, err)
		}
		if n > 0 {
			c.log.Info("deleted stale udp conntrack entries", "family", fam, "entries", n)
		}
	}
	return nil
}

// staleFilter maps each UDP frontend to the endpoints its flows may be
// translated to.
type staleFilter map[netip.AddrPort]map[netip.AddrPort]struct{}

// MatchConntrackFlow reports whether flow is a UDP flow to a frontend whose
// reply does not come from one of the frontend's endpoints.
func (f staleFilter) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	if flow.Forward.Protocol != unix.IPPROTO_UDP {
		return false
	}
	dst, ok1 := netip.AddrFromSlice(flow.Forward.DstIP)
	src, ok2 := netip.AddrFromSlice(flow.Reverse.SrcIP)
	if !ok1 || !ok2 {
		return false
	}
	eps, ok := f[netip.AddrPortFrom(dst.Unmap(), flow.Forward.DstPort)]
	if !ok {
		return false
	}
	_, current := eps[netip.AddrPortFrom(src.Unmap(), flow.Reverse.SrcPort)]
	return !current
}
