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
	"maps"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/model"
)

// Cleaner deletes stale UDP entries from the conntrack table of the network
// namespace it runs in. It remembers what the last Clean saw, so that it
// reads the table only when a change can have made entries stale, and
// looks only at the ServicePorts a change names.
type Cleaner struct {
	log *slog.Logger
	// deleteFlows deletes the entries of family that filter matches
	// (netlink; a fake in tests).
	deleteFlows func(family model.Family, filter staleFilter) (uint, error)
	// frontends is, per family, each UDP frontend's serving endpoints at
	// the last successful Clean, and owned the frontends of each UDP
	// ServicePort then; both nil before the first one.
	frontends map[model.Family]staleFilter
	owned     map[model.ServicePortName][]netip.AddrPort
}

// NewCleaner returns a Cleaner that logs what it deleted to log.
func NewCleaner(log *slog.Logger) *Cleaner {
	return &Cleaner{log: log, deleteFlows: deleteFlows}
}

// deleteFlows deletes the entries of family's table that filter matches.
func deleteFlows(family model.Family, filter staleFilter) (uint, error) {
	af := netlink.InetFamily(unix.AF_INET)
	if family == model.IPv6 {
		af = unix.AF_INET6
	}
	return netlink.ConntrackDeleteFilters(netlink.ConntrackTable, af, filter)
}

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
// When s.Change is set, Clean looks only at the ServicePorts it names (s
// as the last Clean saw it, plus that change), so its cost follows the
// change; without, at every ServicePort. After an error the next Clean
// reconciles everything again.
func (c *Cleaner) Clean(s *model.State) error {
	first := c.frontends == nil
	var names []model.ServicePortName
	switch {
	case first:
		c.frontends, c.owned = map[model.Family]staleFilter{}, map[model.ServicePortName][]netip.AddrPort{}
		names = slices.Collect(maps.Keys(s.ServicePorts))
	case s.Change == nil:
		names = slices.Concat(slices.Collect(maps.Keys(s.ServicePorts)), slices.Collect(maps.Keys(c.owned)))
		slices.SortFunc(names, model.ServicePortName.Compare)
		names = slices.Compact(names)
	default:
		names = slices.Concat(s.Change.Updated, s.Change.Removed)
	}
	// before holds what each frontend the named ServicePorts had or have
	// served at the last Clean; then the named ones are replaced.
	before := map[frontend]served{}
	remember := func(fe frontend) {
		if _, ok := before[fe]; !ok {
			eps, ok := c.frontends[fe.family][fe.addr]
			before[fe] = served{eps, ok}
		}
	}
	for _, name := range names {
		for _, addr := range c.owned[name] {
			fe := frontend{name.Family, addr}
			remember(fe)
			delete(c.frontends[fe.family], addr)
		}
		delete(c.owned, name)
	}
	for _, name := range names {
		sp := s.ServicePorts[name]
		if sp == nil || sp.Protocol != model.UDP {
			continue
		}
		eps := make(map[netip.AddrPort]struct{}, len(sp.ServingEndpoints))
		for _, ep := range sp.ServingEndpoints {
			eps[netip.AddrPortFrom(ep.IP, ep.Port)] = struct{}{}
		}
		f := c.frontends[name.Family]
		if f == nil {
			f = staleFilter{}
			c.frontends[name.Family] = f
		}
		for _, fe := range sp.Frontends {
			addr := netip.AddrPortFrom(fe.IP, fe.Port)
			remember(frontend{name.Family, addr})
			f[addr] = eps
			c.owned[name] = append(c.owned[name], addr)
		}
	}
	stale := map[model.Family]staleFilter{}
	for fe, was := range before {
		eps, ok := c.frontends[fe.family][fe.addr]
		if !ok || !first && !was.madeStale(eps) {
			continue
		}
		if stale[fe.family] == nil {
			stale[fe.family] = staleFilter{}
		}
		stale[fe.family][fe.addr] = eps
	}
	for fam, f := range stale {
		n, err := c.deleteFlows(fam, f)
		if err != nil {
			c.frontends, c.owned = nil, nil
			return fmt.Errorf("delete stale %s udp conntrack entries: %w", fam, err)
		}
		c.log.Debug("reconciled udp conntrack entries", "family", fam, "frontends", len(f), "deleted", n)
		if n > 0 {
			c.log.Info("deleted stale udp conntrack entries", "family", fam, "entries", n)
		}
	}
	return nil
}

// frontend is a UDP frontend of one family.
type frontend struct {
	family model.Family
	addr   netip.AddrPort
}

// served is what a frontend's flows could be translated to at the last
// Clean, and whether it was a frontend then.
type served struct {
	eps map[netip.AddrPort]struct{}
	ok  bool
}

// madeStale says whether moving from was to eps can have made flows
// stale: the frontend is new, had no endpoint and has one now, or lost an
// endpoint.
func (was served) madeStale(eps map[netip.AddrPort]struct{}) bool {
	if !was.ok || len(was.eps) == 0 && len(eps) > 0 {
		return true
	}
	for ep := range was.eps {
		if _, kept := eps[ep]; !kept {
			return true
		}
	}
	return false
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
