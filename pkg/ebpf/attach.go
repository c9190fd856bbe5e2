//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/model"
)

// The per-packet path for traffic from outside the node (bpf/tc.h): a TCX
// ingress program on each of Options.Interfaces picks the endpoint and
// creates the flow's conntrack entry with its NAT; nf_conntrack and nf_nat
// translate the packets. This file attaches the programs, keeps the
// nftables table without which nf_nat does not run, sweeps conntrack
// entries the state no longer allows, and exports the programs' counters.

// natTable is svcnat's nftables table. Its one chain is a nat-type base
// chain: while one exists in a network namespace the kernel runs nf_nat
// there (the NAT set up by the tc programs is applied by those hooks), and
// its rule's ct expression makes nf_tables register conntrack (with
// defragmentation) in the namespace. The rule only counts the first packets
// of svcnat's flows that nothing else masquerades.
const natTable = "svcnat"

func natTableSpec() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: natTable}
}

// ensureNATTable creates svcnat's nftables table, or makes an existing one
// hold exactly its chain and rule, in one transaction. Idempotent.
func ensureNATTable() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open nftables: %w", err)
	}
	defer c.CloseLasting()
	t := c.AddTable(natTableSpec())
	policy := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{
		Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &policy,
	})
	c.FlushChain(ch)
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeyMARK},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(ctMarkMask), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(ctMark)},
		&expr.Counter{},
	}})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("create nftables table inet %s (a nat chain, so that nf_nat runs): %w", natTable, err)
	}
	return nil
}

// deleteNATTable removes svcnat's nftables table; a missing table is not
// an error.
func deleteNATTable() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open nftables: %w", err)
	}
	defer c.CloseLasting()
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if errors.Is(err, unix.EPROTONOSUPPORT) {
		return nil // no nf_tables: nothing of ours there
	}
	if err != nil {
		return fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == natTable {
			c.DelTable(t)
			if err := c.Flush(); err != nil {
				return fmt.Errorf("delete nftables table inet %s: %w", natTable, err)
			}
		}
	}
	return nil
}

// The conntrack mark of svcnat's flows (bpf/svcnat.h): the mark generated
// from enum ct_mark, and the #define SVCNAT_CT_MARK_MASK, which is no enum
// (above int) and which TestCTMarkMaskMatchesC checks against svcnat.h.
const (
	ctMark     = uint32(svcnatCtMarkSVCNAT_CT_MARK)
	ctMarkMask = 0xffff0000
)

// kfuncs are the kernel functions the tc programs call, with the kernel
// part that provides them.
var kfuncs = []struct{ name, module string }{
	{"bpf_skb_ct_lookup", "nf_conntrack"},
	{"bpf_skb_ct_alloc", "nf_conntrack"},
	{"bpf_ct_insert_entry", "nf_conntrack"},
	{"bpf_ct_release", "nf_conntrack"},
	{"bpf_ct_change_timeout", "nf_conntrack"},
	{"bpf_ct_set_nat_info", "nf_nat"},
}

// probeKfuncs names the first kfunc the tc programs need that the
// kernel's BTF (vmlinux, or the module when it is one) does not have. Run
// after ensureNATTable, which loads nf_conntrack and nf_nat when they are
// modules.
func probeKfuncs() error {
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("kernel feature: BTF (CONFIG_DEBUG_INFO_BTF): %w", err)
	}
	for _, k := range kfuncs {
		var fn *btf.Func
		if kernel.TypeByName(k.name, &fn) == nil {
			continue
		}
		if mod, err := btf.LoadKernelModuleSpec(k.module); err == nil && mod.TypeByName(k.name, &fn) == nil {
			continue
		}
		return fmt.Errorf("kernel feature: kfunc %s (%s with BTF, Linux 6.1) for the tc programs (--interfaces)", k.name, k.module)
	}
	return nil
}

// tcLoaded is what initTC loads of the tc object: the programs and their
// counters. The maps they share with the socket hooks are the ones Init
// opened (b.pins).
type tcLoaded struct {
	tcPrograms
	Stats *ebpf.Map `ebpf:"svcnat_tc_stats"`
}

func (t *tcLoaded) Close() error { return errors.Join(t.tcPrograms.Close(), t.Stats.Close()) }

// initTC makes the per-packet path ready: the nftables table, the FORWARD
// accept (forward.go) and the tc programs, loaded against the maps Init opened. The programs are
// attached by attachInterface.
func (b *Backend) initTC() error {
	if err := ensureNATTable(); err != nil {
		return err
	}
	if err := ensureForwardAccept(); err != nil {
		return err
	}
	if err := probeKfuncs(); err != nil {
		return err
	}
	if b.tc != nil {
		return nil
	}
	spec, err := loadTc()
	if err != nil {
		return err
	}
	shared := map[string]*ebpf.Map{}
	for name, ms := range spec.Maps {
		if m, ok := b.pins.maps[name]; ok {
			shared[name] = m
			ms.MaxEntries = m.MaxEntries()
			ms.Pinning = ebpf.PinNone
		}
	}
	objs := &tcLoaded{}
	if err := spec.LoadAndAssign(objs, &ebpf.CollectionOptions{MapReplacements: shared}); err != nil {
		return fmt.Errorf("load tc programs: %w", err)
	}
	b.tc = objs
	b.tcStats.Store(objs.Stats)
	return nil
}

// attachInterface attaches the tc ingress program to a node interface
// (TCX), the Ethernet or the L3 variant after the device type.
func (b *Backend) attachInterface(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	index := l.Attrs().Index
	prog := b.tc.SvcnatTcIngress
	switch l.Attrs().EncapType {
	case "ether":
	case "loopback":
		return errors.New("a loopback device carries no traffic from outside the node")
	default:
		// IPIP, GRE, WireGuard, tun: no link-layer header.
		prog = b.tc.SvcnatTcIngressL3
	}
	pin := filepath.Join(b.opts.BPFFSPath, "links", "tc-"+name+"-ingress")
	onInterface := func(info link.Info) bool { return info.TCX() != nil && int(info.TCX().Ifindex) == index }
	tl, err := attachPinned(pin, prog, onInterface, func() (link.Link, error) {
		l, err := link.AttachTCX(link.TCXOptions{Interface: index, Program: prog, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return nil, fmt.Errorf("attach tc ingress program (kernel feature TCX, Linux 6.6): %w", err)
		}
		return l, nil
	})
	if err != nil {
		return err
	}
	b.links = append(b.links, tl)
	return nil
}

// detachOtherInterfaces removes the tc links an earlier run pinned for
// interfaces no longer in Options.Interfaces, and the egress and pod
// interface links of versions before the kernel did the NAT.
func (b *Backend) detachOtherInterfaces() error {
	keep := map[string]bool{}
	for _, name := range b.opts.Interfaces {
		keep["tc-"+name+"-ingress"] = true
	}
	dir := filepath.Join(b.opts.BPFFSPath, "links")
	pins, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("list pinned links: %w", err)
	}
	for _, p := range pins {
		if keep[p.Name()] || !(strings.HasPrefix(p.Name(), "tc-") || strings.HasPrefix(p.Name(), "pod-")) {
			continue
		}
		pin := filepath.Join(dir, p.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			return fmt.Errorf("load pinned link %s: %w", pin, err)
		}
		if err := errors.Join(l.Unpin(), l.Close()); err != nil {
			return fmt.Errorf("detach %s: %w", pin, err)
		}
		b.log.Info("detached tc program from an interface no longer configured", "link", p.Name())
	}
	return nil
}

// flowPolicy is what decides, for one frontend, whether an existing flow
// may go on: the rules new_flow in bpf/tc.h applies to a first packet.
type flowPolicy struct {
	sp   *model.ServicePort
	kind model.FrontendKind
}

type frontendKey struct {
	addr  netip.Addr
	port  uint16
	proto uint8
}

// staleFlows matches svcnat's conntrack entries (by mark) that the state
// no longer allows: their frontend is gone or belongs to another kind of
// frontend, their endpoint no longer serves, or (LoadBalancer) the client
// is outside the source ranges. A flow to an endpoint that still serves is
// kept even when new flows would not go there (it terminates, or topology
// or a traffic policy changed), as kube-proxy keeps such conntrack
// entries: a terminating endpoint drains its connections.
//
// A full filter judges every flow against frontends, which holds every
// frontend of the state. Otherwise only the flows to the frontends in
// frontends are judged, a zero flowPolicy meaning the frontend is gone,
// and every other flow is kept: the frontends of the ServicePorts a change
// named, before and after it.
type staleFlows struct {
	full      bool
	frontends map[frontendKey]flowPolicy
}

// add records the frontends of sp (nil: none) as owned by it.
func (f *staleFlows) add(sp *model.ServicePort) {
	if sp == nil {
		return
	}
	proto := protocols[sp.Protocol]
	for _, fe := range sp.Frontends {
		f.frontends[frontendKey{fe.IP.Unmap(), fe.Port, proto}] = flowPolicy{sp: sp, kind: fe.Kind}
	}
}

// gone records the frontends of sp (nil: none) as gone.
func (f *staleFlows) gone(sp *model.ServicePort) {
	if sp == nil {
		return
	}
	proto := protocols[sp.Protocol]
	for _, fe := range sp.Frontends {
		f.frontends[frontendKey{fe.IP.Unmap(), fe.Port, proto}] = flowPolicy{}
	}
}

// then makes f, a sweep not started yet, also do the work of g, which
// describes a later state: a full g replaces f, otherwise g's judgement of
// a frontend replaces f's.
func (f *staleFlows) then(g *staleFlows) *staleFlows {
	if g.full {
		return g
	}
	maps.Copy(f.frontends, g.frontends)
	return f
}

func addrOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// MatchConntrackFlow implements netlink.CustomConntrackFilter: true means
// delete.
func (f *staleFlows) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	if flow.Mark&ctMarkMask != ctMark {
		return false
	}
	p, ok := f.frontends[frontendKey{addrOf(flow.Forward.DstIP), flow.Forward.DstPort, flow.Forward.Protocol}]
	if !ok {
		return f.full
	}
	if p.sp == nil {
		return true
	}
	client := addrOf(flow.Forward.SrcIP)
	if p.kind == model.LoadBalancer && len(p.sp.SourceRanges) > 0 && !containsAddr(p.sp.SourceRanges, client) {
		return true
	}
	endpoint := netip.AddrPortFrom(addrOf(flow.Reverse.SrcIP), flow.Reverse.SrcPort)
	for _, set := range [][]model.Endpoint{p.sp.ClusterEndpoints, p.sp.LocalEndpoints, p.sp.ServingEndpoints} {
		for _, e := range set {
			if netip.AddrPortFrom(e.IP.Unmap(), e.Port) == endpoint {
				return false
			}
		}
	}
	return true
}

func containsAddr(prefixes []netip.Prefix, a netip.Addr) bool {
	for _, p := range prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// sweepFlows deletes svcnat's conntrack entries that f matches, so that
// the next packet of such a flow is a new flow: a UDP flow goes to a live
// endpoint, a TCP flow is reset. It returns how many it deleted.
func sweepFlows(f *staleFlows) (uint, error) {
	var n uint
	for _, family := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		d, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, family, f)
		n += d
		if err != nil {
			return n, fmt.Errorf("delete stale conntrack entries: %w", err)
		}
	}
	return n, nil
}

// flowSweeper runs sweepFlows in the background, one sweep at a time and
// always against the latest state, so that walking a conntrack table of
// many flows (about 1 s per 64,000 entries) never delays programming.
// The first request, and one without a Change (after a failed sync), is a
// full sweep (endpoints may have gone while the agent was down); after
// that a sweep judges only the flows to the frontends of the ServicePorts
// a change named, so a request costs what changed, not the state.
type flowSweeper struct {
	log *slog.Logger
	// synced are the ServicePorts of the last request, by name (nil before
	// the first): what a change names had these frontends before. Only
	// request uses it.
	synced map[model.ServicePortName]*model.ServicePort

	mu      sync.Mutex
	pending *staleFlows
	done    chan struct{} // closed when the running sweeps end; nil when idle
}

// request starts a sweep against s unless s.Change says nothing changed
// since the last request. It does not wait for it. The ServicePorts of s
// are not modified once synced (dataplane.Backend), so the sweep reads them
// without copying.
func (w *flowSweeper) request(s *model.State) {
	f := w.filter(s)
	if f == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.pending != nil {
		f = w.pending.then(f)
	}
	w.pending = f
	if w.done == nil {
		w.done = make(chan struct{})
		go w.run(w.done)
	}
}

// filter returns what a sweep after s must judge (nil: nothing), and
// remembers the ServicePorts of s for the next one.
func (w *flowSweeper) filter(s *model.State) *staleFlows {
	if w.synced == nil || s.Change == nil {
		f := &staleFlows{full: true, frontends: map[frontendKey]flowPolicy{}}
		for _, sp := range s.ServicePorts {
			f.add(sp)
		}
		w.synced = maps.Clone(s.ServicePorts)
		return f
	}
	if s.Change.Empty() {
		return nil
	}
	f := &staleFlows{frontends: map[frontendKey]flowPolicy{}}
	names := slices.Concat(s.Change.Updated, s.Change.Removed)
	// Every frontend the named ServicePorts had is gone unless one of them
	// (a LoadBalancer IP moved between two) still has it.
	for _, name := range names {
		f.gone(w.synced[name])
	}
	for _, name := range names {
		sp := s.ServicePorts[name]
		f.add(sp)
		if sp == nil {
			delete(w.synced, name)
		} else {
			w.synced[name] = sp
		}
	}
	return f
}

func (w *flowSweeper) run(done chan struct{}) {
	for {
		w.mu.Lock()
		f := w.pending
		w.pending = nil
		if f == nil {
			w.done = nil
			w.mu.Unlock()
			close(done)
			return
		}
		w.mu.Unlock()
		start := time.Now()
		// Best effort: the maps are right, and a flow left behind ends by
		// itself (conntrack timeouts).
		if n, err := sweepFlows(f); err != nil {
			w.log.Warn("forget flows the state no longer allows", "error", err)
		} else if n > 0 {
			w.log.Info("forgot flows the state no longer allows", "conntrackEntries", n, "duration", time.Since(start))
		}
	}
}

// wait returns when no sweep runs.
func (w *flowSweeper) wait() {
	w.mu.Lock()
	done := w.done
	w.mu.Unlock()
	if done != nil {
		<-done
	}
}

// tcStatNames name the tc programs' counters (enum tc_stat) in the
// svcnat_ebpf_tc_packets_total metric.
var tcStatNames = map[tcTcStat]string{
	tcTcStatTC_STAT_NEW_FLOW:       "new_flow",
	tcTcStatTC_STAT_CT_FULL:        "conntrack_full",
	tcTcStatTC_STAT_NAT_FAILED:     "nat_failed",
	tcTcStatTC_STAT_NO_ROUTE:       "no_route",
	tcTcStatTC_STAT_SOURCE_RANGE:   "source_range_drop",
	tcTcStatTC_STAT_NO_LOCAL:       "no_local_endpoint_drop",
	tcTcStatTC_STAT_REJECT:         "reject",
	tcTcStatTC_STAT_REJECT_LIMITED: "reject_rate_limited",
	tcTcStatTC_STAT_BAD_ADDRESS:    "v4_mapped_drop",
	tcTcStatTC_STAT_REOPENED:       "reopened",
}

// tcStats reads the tc programs' counters, summed over CPUs.
func tcStats(m *ebpf.Map) (map[tcTcStat]uint64, error) {
	out := map[tcTcStat]uint64{}
	for stat := range tcStatNames {
		var perCPU []uint64
		if err := m.Lookup(uint32(stat), &perCPU); err != nil {
			return nil, fmt.Errorf("read map %s: %w", tcMapSvcnatTcStats, err)
		}
		for _, v := range perCPU {
			out[stat] += v
		}
	}
	return out, nil
}

// tcCollector exports the tc counters as svcnat_ebpf_tc_packets_total.
type tcCollector struct {
	b    *Backend
	desc *prometheus.Desc
}

func newTCCollector(b *Backend) *tcCollector {
	return &tcCollector{b: b, desc: prometheus.NewDesc("svcnat_ebpf_tc_packets_total",
		"First packets of flows from outside the node seen by the tc programs, by result.", []string{"result"}, nil)}
}

func (c *tcCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *tcCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.b.tcStats.Load()
	if m == nil {
		return
	}
	stats, err := tcStats(m)
	if err != nil {
		// The backend closed the map meanwhile.
		return
	}
	for stat, name := range tcStatNames {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(stats[stat]), name)
	}
}

// reportTCFailures logs the flows the tc programs could not translate
// since the last report: conntrack full, or no NAT port left.
func (b *Backend) reportTCFailures() {
	stats, err := tcStats(b.tc.Stats)
	if err != nil {
		b.log.Warn("read tc counters", "error", err)
		return
	}
	full, nat := stats[tcTcStatTC_STAT_CT_FULL], stats[tcTcStatTC_STAT_NAT_FAILED]
	if full > b.reported.full || nat > b.reported.nat {
		b.log.Warn("flows from outside the node dropped: not translated", "conntrackFull", full-b.reported.full,
			"natFailed", nat-b.reported.nat, "hint", "raise net.netfilter.nf_conntrack_max; nat_failed means no free NAT port toward an endpoint")
	}
	b.reported.full, b.reported.nat = full, nat
}
