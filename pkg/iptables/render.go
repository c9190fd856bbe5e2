// Package iptables is svcnat's iptables backend: a pure renderer from
// model.State to iptables-restore input, its exact inverse (a parser of
// iptables-save output), and a Backend that applies the difference between
// syncs with iptables-restore.
//
// The Backend is in three layers: render.go and parse.go encode and decode
// (pure); sync.go plans what a sync writes from what was last written and
// the new rules (planTable), and checks the kernel for changes made outside
// svcnat; runner.go is the kernel layer, the iptables binaries and
// go-iptables behind a small runner interface, which the tests replace
// with an in-memory model of iptables (fake_test.go), so the sync logic
// and the dataplane conformance suite run without root. backend.go holds
// the lifecycle: New, Init, Dump, Verify, Raw, Cleanup.
//
// Layout of the rules, per family (nat table unless noted):
//
//	PREROUTING, OUTPUT -> SVCNAT-SERVICES: 16-way dispatch on destination
//	    address bits 0-3 (x) -> SVCNAT-A-x: 16-way on bits 4-7 (y) ->
//	    SVCNAT-A-xy (leaf: the frontends whose last byte is 0xyx); then, for local
//	    destinations, -> SVCNAT-NODEPORTS: dispatch on protocol and
//	    destination port bits 15-12, 11-8, 7-4 -> SVCNAT-P-TCP-xyz (leaf).
//	leaf frontend rule -> SVCNAT-SVC-<hash> (cluster endpoints) or
//	    SVCNAT-LCL-<hash> (local endpoints) or, for external frontends,
//	    SVCNAT-EXT-<hash> (traffic policy, masquerade marking).
//	SVCNAT-SVC/LCL: one DNAT rule per endpoint, random choice with
//	    statistic, session affinity with recent; no per-endpoint chains.
//	POSTROUTING -> SVCNAT-POSTROUTING: for DNATed connections, 16-way
//	    dispatch on source address bits 0-3 -> SVCNAT-H-x: hairpin
//	    masquerade per local endpoint address; then MASQUERADE of marked
//	    packets.
//	filter INPUT, FORWARD, OUTPUT (new connections) -> SVCNAT-FILTER: the
//	    same dispatch trees, leaves holding REJECT (no endpoints), DROP (no
//	    local endpoint, outside source ranges) and ACCEPT (health check
//	    node ports).
//	filter FORWARD -> SVCNAT-FORWARD (kube-proxy's KUBE-FORWARD): DROP
//	    packets conntrack finds INVALID (unless nf_conntrack_tcp_be_liberal),
//	    ACCEPT packets marked for masquerading and established flows, so
//	    Service traffic to other nodes passes a FORWARD policy of DROP.
//
// A new connection walks at most 16 rules per tree level plus one leaf, so its
// cost does not grow with the number of Services the way kube-proxy's
// KUBE-SERVICES does (at 10,000 Services the tracer test counts about 90
// rules for a packet that matches no Service, where kube-proxy walks 10,000);
// a bucket is a fixed function of the address (or port), so a change touches
// only the leaf chains of the frontends it concerns and nothing rebalances.
// There are no per-endpoint chains: 10,000 Services x 10 endpoints take about
// 11,400 nat chains and 125,000 rules (kube-proxy: about 110,000 chains and
// 320,000 rules), which is what iptables-restore's cost follows.
//
// Rule comments name the ServicePort ("namespace/name:port") and, on frontend
// rules, the frontend kind and the words "local" (traffic policy Local) and
// "affinity=<seconds>", which the parser needs when a frontend has no
// endpoints and its rule is a bare REJECT or DROP.
package iptables

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/svcnat/svcnat/pkg/model"
)

// Chain names. Every chain svcnat owns starts with chainPrefix.
const (
	chainPrefix      = "SVCNAT-"
	chainServices    = "SVCNAT-SERVICES"
	chainNodePorts   = "SVCNAT-NODEPORTS"
	chainPostrouting = "SVCNAT-POSTROUTING"
	chainMarkMasq    = "SVCNAT-MARK-MASQ"
	chainOffCluster  = "SVCNAT-OFF-CLUSTER"
	chainFilter      = "SVCNAT-FILTER"
	chainForward     = "SVCNAT-FORWARD"
	prefixAddrTree   = "SVCNAT-A-"
	prefixPortTree   = "SVCNAT-P-"
	prefixHairpin    = "SVCNAT-H-"
	prefixCluster    = "SVCNAT-SVC-"
	prefixLocal      = "SVCNAT-LCL-"
	prefixExternal   = "SVCNAT-EXT-"

	tableNAT    = "nat"
	tableFilter = "filter"

	// addrLevels is the depth of the address dispatch tree (4 bits per
	// level, from the least significant end, where Service addresses vary).
	addrLevels = 2
	// portLevels is the depth of the NodePort dispatch tree (4 bits per
	// level, from the most significant end; leaves hold up to 16 ports).
	portLevels = 3

	// Comment words after the ServicePort name.
	flagLocal       = "local"
	flagAffinity    = "affinity="
	roleHealthCheck = "health-check"
	commentHairpin  = "hairpin"
	commentCIDR     = "cluster-cidr"
	commentMasq     = "masquerade"
	commentForward  = "forward"
)

// DefaultMasqueradeBit is the packet mark bit that asks for masquerading
// (0x2000); kube-proxy uses bit 14, so the two can run side by side.
const DefaultMasqueradeBit = 13

// Ruleset is svcnat's part of one family's iptables: table name ("nat",
// "filter") to chain name to rules, each rule in iptables-save form without
// the leading "-A <chain> ".
type Ruleset struct {
	Family model.Family
	Tables map[string]map[string][]string
}

func newRuleset(f model.Family) *Ruleset {
	return &Ruleset{Family: f, Tables: map[string]map[string][]string{
		tableNAT: {}, tableFilter: {},
	}}
}

// Text returns the ruleset in iptables-save form (tables in the order filter,
// nat; chains sorted by name; no counters), which iptables-restore accepts.
func (r *Ruleset) Text() string {
	var b strings.Builder
	for _, table := range []string{tableFilter, tableNAT} {
		writeRestore(&b, table, sortedKeys(r.Tables[table]), r.Tables[table], nil)
	}
	return b.String()
}

// writeRestore writes one table's iptables-restore transaction: it
// declares the chains of write and del (which creates or, with --noflush,
// flushes them, so chains to delete lose their rules and the references
// in them first), appends rules' rules to each chain of write, and deletes
// the chains of del.
func writeRestore(b *strings.Builder, table string, write []string, rules map[string][]string, del []string) {
	fmt.Fprintf(b, "*%s\n", table)
	for _, c := range slices.Concat(write, del) {
		fmt.Fprintf(b, ":%s - [0:0]\n", c)
	}
	for _, c := range write {
		for _, rule := range rules[c] {
			fmt.Fprintf(b, "-A %s %s\n", c, rule)
		}
	}
	for _, c := range del {
		fmt.Fprintf(b, "-X %s\n", c)
	}
	b.WriteString("COMMIT\n")
}

// Rules counts the rules of a table.
func (r *Ruleset) Rules(table string) int {
	n := 0
	for _, rules := range r.Tables[table] {
		n += len(rules)
	}
	return n
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// Render returns the rules that program the family's part of s. masqBit is
// the mark bit for masquerading. Render is pure and deterministic: equal
// states give equal rulesets.
func Render(s *model.State, family model.Family, masqBit int) *Ruleset {
	return render(s, family, renderOptions{masqBit: masqBit}, nil)
}

// renderOptions are the host's settings rules depend on.
type renderOptions struct {
	masqBit int
	// keepInvalid leaves out the DROP of forwarded packets in conntrack
	// state INVALID, as kube-proxy does when nf_conntrack_tcp_be_liberal
	// is set.
	keepInvalid bool
}

// renderCache keeps what each ServicePort contributed to the last render,
// so that the next render formats only the ServicePorts its State's Change
// names.
type renderCache struct {
	cidrs     []netip.Prefix
	fragments map[model.ServicePortName]*fragment
}

// render is Render, reusing and refreshing cache when it is not nil.
func render(s *model.State, family model.Family, o renderOptions, cache *renderCache) *Ruleset {
	r := &renderer{
		rs:          newRuleset(family),
		family:      family,
		keepInvalid: o.keepInvalid,
		masqMark:    fmt.Sprintf("0x%x", uint32(1)<<o.masqBit),
		leaves:      map[string]map[string][]leafEntry{tableNAT: {}, tableFilter: {}},
		locals:      map[netip.Addr]bool{},
	}
	for _, c := range s.ClusterCIDRs {
		if model.FamilyOf(c.Addr()) == family {
			r.cidrs = append(r.cidrs, c)
		}
	}
	reuse := cache != nil && s.Change != nil && slices.Equal(cache.cidrs, r.cidrs)
	if cache != nil {
		if !reuse {
			cache.cidrs, cache.fragments = r.cidrs, map[model.ServicePortName]*fragment{}
		}
		if s.Change != nil {
			for _, name := range slices.Concat(s.Change.Updated, s.Change.Removed) {
				delete(cache.fragments, name)
			}
		}
	}
	// Map order is fine: leaf entries are sorted, and merging keeps the
	// order of one ServicePort's entries.
	for _, sp := range s.ServicePorts {
		if sp.Name.Family != family {
			continue
		}
		var frag *fragment
		if cache != nil {
			frag = cache.fragments[sp.Name]
		}
		if frag == nil {
			frag = r.servicePort(sp)
			if cache != nil {
				cache.fragments[sp.Name] = frag
			}
		}
		r.merge(frag)
	}
	r.shared()
	for _, table := range []string{tableNAT, tableFilter} {
		r.trees(table)
	}
	return r.rs
}

type renderer struct {
	rs          *Ruleset
	family      model.Family
	keepInvalid bool
	masqMark    string
	cidrs       []netip.Prefix
	// leaves: table -> leaf chain -> entries, sorted before writing.
	leaves map[string]map[string][]leafEntry
	locals map[netip.Addr]bool
}

// fragment is what one ServicePort contributes: its own nat chains, its
// entries in the dispatch trees' leaves, its local endpoint addresses.
// Fragments are not changed once made.
type fragment struct {
	chains map[string][]string
	leaves []leafRef
	locals []netip.Addr
}

type leafRef struct {
	table, chain string
	entry        leafEntry
}

func (f *fragment) add(chain, rule string) { f.chains[chain] = append(f.chains[chain], rule) }

// leaf adds a frontend rule to the leaf chain of its dispatch tree: the
// port tree for NodePorts (their addresses are few and shared by all
// NodePorts), the address tree for the others.
func (f *fragment) leaf(table string, fe model.Frontend, sp *model.ServicePort, rule string) {
	chain := addrLeaf(fe.IP)
	if fe.Kind == model.NodePort {
		chain = portLeaf(sp.Protocol, fe.Port)
	}
	f.leaves = append(f.leaves, leafRef{table, chain, leafEntry{ip: fe.IP, proto: sp.Protocol, port: fe.Port, name: sp.Name, rule: rule}})
}

func (r *renderer) merge(f *fragment) {
	nat := r.rs.Tables[tableNAT]
	for c, rules := range f.chains {
		nat[c] = rules
	}
	for _, l := range f.leaves {
		leaves := r.leaves[l.table]
		e := l.entry
		e.seq = len(leaves[l.chain])
		leaves[l.chain] = append(leaves[l.chain], e)
	}
	for _, a := range f.locals {
		r.locals[a] = true
	}
}

// leafEntry is one rule in a dispatch tree's leaf chain.
type leafEntry struct {
	ip    netip.Addr // invalid for health check ports
	proto model.Protocol
	port  uint16
	name  model.ServicePortName
	seq   int
	rule  string
}

func (r *renderer) add(table, chain string, rule string) {
	r.rs.Tables[table][chain] = append(r.rs.Tables[table][chain], rule)
}

// chainHash names a ServicePort's chains: 16 base32 characters of the SHA-256
// of its name, so that chain names stay at most 28 characters.
func chainHash(parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return base32.StdEncoding.EncodeToString(sum[:10])
}

func proto(p model.Protocol) string { return strings.ToLower(string(p)) }

func hostPrefix(a netip.Addr) string { return netip.PrefixFrom(a, a.BitLen()).String() }

func portMatch(p model.Protocol, port string) string {
	return fmt.Sprintf("-p %s -m %s --dport %s", proto(p), proto(p), port)
}

// quote renders a string the way iptables-save does (xtables_save_string).
func quote(s string) string {
	plain := s != "" && strings.Trim(s, "_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") == ""
	if plain {
		return s
	}
	var b strings.Builder
	b.WriteByte('"')
	for _, c := range []byte(s) {
		if c == '"' || c == '\\' || c == '\'' {
			b.WriteByte('\\')
		}
		b.WriteByte(c)
	}
	b.WriteByte('"')
	return b.String()
}

func comment(s string) string { return "-m comment --comment " + quote(s) }

// spnComment is the ServicePort part of a comment: "namespace/name[:port]";
// the family is the table's.
func spnComment(n model.ServicePortName) string {
	n.Family = model.IPv4
	return n.String()
}

// frontendComment describes a frontend rule: "<service port> <kind>", then
// "local" when the traffic policy governing the frontend is Local and
// "affinity=<seconds>" with session affinity. These words carry what the
// matches alone cannot show when a frontend has no endpoints.
func frontendComment(sp *model.ServicePort, kind model.FrontendKind) string {
	words := []string{spnComment(sp.Name), string(kind)}
	if (kind.External() && sp.ExternalTrafficLocal) || (!kind.External() && sp.InternalTrafficLocal) {
		words = append(words, flagLocal)
	}
	if sp.AffinityTimeout > 0 {
		words = append(words, flagAffinity+strconv.FormatInt(affinitySeconds(sp), 10))
	}
	return strings.Join(words, " ")
}

func affinitySeconds(sp *model.ServicePort) int64 {
	return int64(math.Ceil(sp.AffinityTimeout.Seconds()))
}

func (r *renderer) servicePort(sp *model.ServicePort) *fragment {
	fr := &fragment{chains: map[string][]string{}}
	h := chainHash(sp.Name.String())
	svc, lcl, ext := prefixCluster+h, prefixLocal+h, prefixExternal+h
	spc := spnComment(sp.Name)
	if len(sp.ClusterEndpoints) > 0 {
		if len(r.cidrs) > 0 {
			fr.add(svc, comment(spc)+" -j "+chainOffCluster)
		}
		r.endpoints(fr, svc, sp, sp.ClusterEndpoints)
	}
	if len(sp.LocalEndpoints) > 0 {
		r.endpoints(fr, lcl, sp, sp.LocalEndpoints)
	}
	for _, e := range slices.Concat(sp.ClusterEndpoints, sp.LocalEndpoints) {
		if e.Local {
			fr.locals = append(fr.locals, e.IP)
		}
	}

	rejectWith := "icmp-port-unreachable"
	if r.family == model.IPv6 {
		rejectWith = "icmp6-port-unreachable"
	}
	noEndpoints := "-j DROP"
	if sp.NoEndpoints() == model.Reject {
		noEndpoints = "-j REJECT --reject-with " + rejectWith
	}
	extUsed := false
	for _, f := range sp.Frontends {
		match := fmt.Sprintf("-d %s %s %s", hostPrefix(f.IP), portMatch(sp.Protocol, strconv.Itoa(int(f.Port))),
			comment(frontendComment(sp, f.Kind)))
		entry := func(table string, rule string) { fr.leaf(table, f, sp, rule) }
		ranges := f.Kind == model.LoadBalancer && len(sp.SourceRanges) > 0
		if !f.Kind.External() {
			if eps := sp.InternalEndpoints(); len(eps) > 0 {
				if sp.InternalTrafficLocal {
					if len(r.cidrs) > 0 {
						entry(tableNAT, match+" -j "+chainOffCluster)
					}
					entry(tableNAT, match+" -j "+lcl)
				} else {
					entry(tableNAT, match+" -j "+svc)
				}
			} else {
				entry(tableFilter, match+" "+noEndpoints)
			}
			continue
		}
		eps := sp.ExternalEndpoints()
		if len(eps) > 0 || (sp.ExternalTrafficLocal && len(sp.ClusterEndpoints) > 0) {
			extUsed = true
			if ranges {
				for _, src := range sp.SourceRanges {
					entry(tableNAT, "-s "+src.String()+" "+match+" -j "+ext)
				}
			} else {
				entry(tableNAT, match+" -j "+ext)
			}
		}
		switch {
		case len(eps) == 0 && ranges && sp.NoEndpoints() == model.Reject:
			for _, src := range sp.SourceRanges {
				entry(tableFilter, "-s "+src.String()+" "+match+" "+noEndpoints)
			}
			entry(tableFilter, match+" -j DROP")
		case len(eps) == 0:
			entry(tableFilter, match+" "+noEndpoints)
		case ranges:
			entry(tableFilter, match+" -j DROP")
		}
	}
	if extUsed {
		if sp.ExternalTrafficLocal {
			for _, c := range r.cidrs {
				fr.add(ext, "-s "+c.String()+" "+comment(spc)+" -j "+svc)
			}
			fr.add(ext, comment(spc)+" -m addrtype --src-type LOCAL -j "+chainMarkMasq)
			fr.add(ext, comment(spc)+" -m addrtype --src-type LOCAL -j "+svc)
			if len(sp.LocalEndpoints) > 0 {
				fr.add(ext, comment(spc)+" -j "+lcl)
			}
		} else {
			fr.add(ext, comment(spc)+" -j "+chainMarkMasq)
			fr.add(ext, comment(spc)+" -j "+svc)
		}
	}
	if sp.HealthCheckNodePort != 0 {
		fr.leaves = append(fr.leaves, leafRef{tableFilter, portLeaf(model.TCP, sp.HealthCheckNodePort), leafEntry{
			proto: model.TCP, port: sp.HealthCheckNodePort, name: sp.Name,
			rule: fmt.Sprintf("%s -m addrtype --dst-type LOCAL %s -j ACCEPT",
				portMatch(model.TCP, strconv.Itoa(int(sp.HealthCheckNodePort))),
				comment(spc+" "+roleHealthCheck)),
		}})
	}
	return fr
}

// endpoints writes one DNAT rule per endpoint into chain: with affinity, a
// first pass sends clients seen within the timeout back to their endpoint;
// then endpoint i of n is chosen with probability 1/(n-i).
func (r *renderer) endpoints(fr *fragment, chain string, sp *model.ServicePort, eps []model.Endpoint) {
	// The comment says which endpoints run on this node: locality is a
	// property of the ServicePort's endpoint, not of the address alone.
	head := func(e model.Endpoint) string {
		c := spnComment(sp.Name)
		if e.Local {
			c += " " + flagLocal
		}
		return fmt.Sprintf("-p %s %s", proto(sp.Protocol), comment(c))
	}
	mask := "255.255.255.255"
	if r.family == model.IPv6 {
		mask = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
	}
	recent := func(e model.Endpoint) string {
		return fmt.Sprintf("--name %s --mask %s --rsource", chainPrefix+chainHash(sp.Name.String(), e.String()), mask)
	}
	if sp.AffinityTimeout > 0 {
		for _, e := range eps {
			fr.add(chain, fmt.Sprintf("%s -m recent --rcheck --seconds %d --reap %s -m recent --set %s -j DNAT --to-destination %s",
				head(e), affinitySeconds(sp), recent(e), recent(e), e))
		}
	}
	for i, e := range eps {
		rule := head(e)
		if n := len(eps) - i; n > 1 {
			rule += " -m statistic --mode random --probability " + probability(n)
		}
		if sp.AffinityTimeout > 0 {
			rule += " -m recent --set " + recent(e)
		}
		fr.add(chain, rule+" -j DNAT --to-destination "+e.String())
	}
}

// probability formats 1/n as iptables-save prints it: xt_statistic keeps
// it as a fraction of 2^31.
func probability(n int) string {
	fixed := math.Round(float64(0x80000000) / float64(n))
	return strconv.FormatFloat(fixed/0x80000000, 'f', 11, 64)
}
