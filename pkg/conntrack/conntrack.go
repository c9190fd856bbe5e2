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
// namespace it runs in. It remembers what the last Clean saw, so that it
// reads the table only when a change can have made entries stale.
type Cleaner struct {
	log *slog.Logger
	// last is, per family, each UDP frontend's serving endpoints at the
	// last successful Clean; nil before the first one.
	last map[model.Family]staleFilter
}

// NewCleaner returns a Cleaner that logs what it deleted to log.
func NewCleaner(log *slog.Logger) *Cleaner { return &Cleaner{log: log} }

// Clean deletes UDP entries whose original destination is a frontend of a
// UDP ServicePort in s and whose reply source is not one of that
// ServicePort's ServingEndpoints. That covers both cases kube-proxy cleans:
// entries DNATed to an endpoint that left the Service (or stopped serving),
// and entries that were not translated at all (the reply would come from
// the frontend itself) because the Service had no endpoint when they were
// created. Flows to endpoints that still serve are kept, terminating ones
// and those that topology or a traffic policy no longer choose included,
// as kube-proxy keeps them: changes to a Service do not break its existing
// flows.
//
// The first Clean reconciles every UDP frontend against the whole table
// (repairing what changed while the agent was down); later ones look only
// at frontends that are new, gained their first endpoint, or lost one since
// the last Clean, and read the table only when there is such a frontend.
// After an error the next Clean reconciles everything again.
func (c *Cleaner) Clean(s *model.State) error {
	next := map[model.Family]staleFilter{}
	for _, sp := range s.ServicePorts {
		if sp.Protocol != model.UDP {
			continue
		}
		eps := make(map[netip.AddrPort]struct{}, len(sp.ServingEndpoints))
		for _, ep := range sp.ServingEndpoints {
			eps[netip.AddrPortFrom(ep.IP, ep.Port)] = struct{}{}
		}
		f := next[sp.Name.Family]
		if f == nil {
			f = staleFilter{}
			next[sp.Name.Family] = f
		}
		for _, fe := range sp.Frontends {
			f[netip.AddrPortFrom(fe.IP, fe.Port)] = eps
		}
	}
	last := c.last
	c.last = nil
	for fam, f := range next {
		if last != nil {
			f = f.changedSince(last[fam])
		}
		if len(f) == 0 {
			continue
		}
		af := netlink.InetFamily(unix.AF_INET)
		if fam == model.IPv6 {
			af = unix.AF_INET6
		}
		n, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, af, f)
		if err != nil {
			return fmt.Errorf("delete stale %s udp conntrack entries: %w", fam, err)
		}
		c.log.Debug("reconciled udp conntrack entries", "family", fam, "frontends", len(f), "deleted", n)
		if n > 0 {
			c.log.Info("deleted stale udp conntrack entries", "family", fam, "entries", n)
		}
	}
	c.last = next
	return nil
}

// staleFilter maps each UDP frontend to the endpoints its flows may be
// translated to.
type staleFilter map[netip.AddrPort]map[netip.AddrPort]struct{}

// changedSince returns the frontends of f whose flows last's can have
// made stale: new ones, ones that had no endpoint in last and have one
// now, and ones that lost an endpoint.
func (f staleFilter) changedSince(last staleFilter) staleFilter {
	out := staleFilter{}
	for fe, eps := range f {
		old, ok := last[fe]
		switch {
		case !ok, len(old) == 0 && len(eps) > 0:
			out[fe] = eps
		default:
			for ep := range old {
				if _, kept := eps[ep]; !kept {
					out[fe] = eps
					break
				}
			}
		}
	}
	return out
}

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
