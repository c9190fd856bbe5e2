// Package iptables is svcnat's iptables backend: a pure renderer from
// model.State to iptables-restore input, its exact inverse (a parser of
// iptables-save output), and a Backend that applies the difference between
// syncs with iptables-restore.
//
// The Backend is in three layers. Pure encoding and decoding: render.go
// and tree.go render the rules; save.go reads iptables-save text into
// chains, rule.go one rule's matches, decode.go the chains back into a
// model.State; render.go also keeps, between syncs, a sum of each chain
// written and just enough per ServicePort to render after a change only
// the chains it touches (programmed). Planning: sync.go decides what a
// sync writes from those sums and the chains rendered (planTable), and
// checks the kernel for changes made outside svcnat by summing the rules
// it reads. The kernel layer: runner.go, the iptables binaries and
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
	"encoding/binary"
	"fmt"
	"hash/maphash"
	"maps"
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
	// Grown once: a full sync's payload is tens of megabytes at 10,000
	// Services, and growing by doubling would leave as much garbage.
	b.Grow(restoreSize(table, write, rules, del))
	fmt.Fprintf(b, "*%s\n", table)
	for _, c := range slices.Concat(write, del) {
		fmt.Fprintf(b, ":%s - [0:0]\n", c)
	}
	for _, c := range write {
		for _, rule := range rules[c] {
			for _, w := range []string{"-A ", c, " ", rule, "\n"} {
				b.WriteString(w) // not Fprintf: no garbage per rule
			}
		}
	}
	for _, c := range del {
		fmt.Fprintf(b, "-X %s\n", c)
	}
	b.WriteString("COMMIT\n")
}

// restoreSize is the length of what writeRestore writes.
func restoreSize(table string, write []string, rules map[string][]string, del []string) int {
	size := len("*\nCOMMIT\n") + len(table)
	for _, c := range slices.Concat(write, del) {
		size += len(":c - [0:0]\n") - 1 + len(c)
	}
	for _, c := range write {
		for _, rule := range rules[c] {
			size += len("-A c r\n") - 2 + len(c) + len(rule)
		}
	}
	for _, c := range del {
		size += len("-X c\n") - 1 + len(c)
	}
	return size
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
	return render(s, family, renderOptions{masqBit: masqBit})
}

// renderOptions are the host's settings rules depend on.
type renderOptions struct {
	masqBit int
	// keepInvalid leaves out the DROP of forwarded packets in conntrack
	// state INVALID, as kube-proxy does when nf_conntrack_tcp_be_liberal
	// is set.
	keepInvalid bool
}

// render returns every chain of the family's part of s.
func render(s *model.State, family model.Family, o renderOptions) *Ruleset {
	out, _ := newProgrammed().update(s, family, o, false)
	return out
}

// programmed is what a Backend remembers of one family's rules between
// syncs, kept small: a sum of each chain (not its rules), and per
// ServicePort the names of its own chains, the leaf chains holding its
// frontend rules and its local endpoint addresses. Only the leaf chains'
// entries are kept whole, as they are shared by many ServicePorts. This
// lets a sync after a change render only the ServicePorts it names, the
// leaf chains they are in, and the few chains above the leaves.
type programmed struct {
	cidrs  []netip.Prefix
	frags  map[model.ServicePortName]fragment
	leaves map[tableChain][]leafEntry
	// locals counts the ServicePorts with a local endpoint per address;
	// hairpin counts the addresses per hairpin chain.
	locals  map[netip.Addr]int
	hairpin [16]int
	// always are the chains every update renders (the dispatch chains
	// above the leaves and the shared chains) as of the last update.
	always map[tableChain]bool
	// sums: table -> chain -> sum of its rules, for every chain of the
	// last update; rules: table -> number of rules.
	sums  map[string]map[string]chainSum
	rules map[string]int
}

func newProgrammed() *programmed {
	return &programmed{
		frags:  map[model.ServicePortName]fragment{},
		leaves: map[tableChain][]leafEntry{},
		locals: map[netip.Addr]int{},
		always: map[tableChain]bool{},
		sums:   map[string]map[string]chainSum{tableNAT: {}, tableFilter: {}},
		rules:  map[string]int{},
	}
}

// chainSum stands for a chain's rules: their number and a hash of them in
// order.
type chainSum struct {
	hash  uint64
	rules int
}

// sumSeed seeds the hashes of chainSum; sums are never kept beyond the
// process.
var sumSeed = maphash.MakeSeed()

// add returns the sum of the chain with rule appended.
func (c chainSum) add(rule string) chainSum {
	var h maphash.Hash
	h.SetSeed(sumSeed)
	var prev [8]byte
	binary.LittleEndian.PutUint64(prev[:], c.hash)
	h.Write(prev[:])
	h.WriteString(rule)
	return chainSum{hash: h.Sum64(), rules: c.rules + 1}
}

func sumOf(rules []string) chainSum {
	var c chainSum
	for _, r := range rules {
		c = c.add(r)
	}
	return c
}

// update brings p to s, except for its sums (record), and returns the
// rules of every chain whose rules may have changed and the chains no
// longer wanted. With incremental set, and when s carries a Change and the
// cluster CIDRs are those of the last update, it renders only the
// ServicePorts the Change names and the chains they share (so the Change
// must name every ServicePort that differs from p's last update); otherwise
// every chain (gone then holds every chain of p's sums not rendered).
func (p *programmed) update(s *model.State, family model.Family, o renderOptions, incremental bool) (out *Ruleset, gone map[tableChain]bool) {
	r := &renderer{
		rs:          newRuleset(family),
		family:      family,
		keepInvalid: o.keepInvalid,
		masqMark:    fmt.Sprintf("0x%x", uint32(1)<<o.masqBit),
	}
	for _, c := range s.ClusterCIDRs {
		if model.FamilyOf(c.Addr()) == family {
			r.cidrs = append(r.cidrs, c)
		}
	}
	gone = map[tableChain]bool{}
	var names []model.ServicePortName
	dirtyLeaves := map[tableChain]bool{}
	var dirtyHairpin [16]bool
	if incremental && s.Change != nil && slices.Equal(p.cidrs, r.cidrs) {
		names = slices.Concat(s.Change.Updated, s.Change.Removed)
		slices.SortFunc(names, model.ServicePortName.Compare)
		names = slices.Compact(names)
		for c := range p.always {
			gone[c] = true
		}
	} else {
		for table, sums := range p.sums {
			for c := range sums {
				gone[tableChain{table, c}] = true
			}
		}
		sums, rules := p.sums, p.rules
		*p = *newProgrammed()
		p.sums, p.rules = sums, rules
		for name := range s.ServicePorts {
			names = append(names, name)
		}
		dirtyHairpin = [16]bool{true, true, true, true, true, true, true, true, true, true, true, true, true, true, true, true}
	}
	p.cidrs = r.cidrs
	for _, name := range names {
		if f, ok := p.frags[name]; ok {
			for _, c := range ownChains(name) {
				gone[tableChain{tableNAT, c}] = true
			}
			for _, l := range f.leaves {
				p.leaves[l] = slices.DeleteFunc(p.leaves[l], func(e leafEntry) bool { return e.name == name })
				dirtyLeaves[l] = true
			}
			for _, a := range f.locals {
				if p.locals[a]--; p.locals[a] == 0 {
					delete(p.locals, a)
					p.hairpin[hairpinBucket(a)]--
					dirtyHairpin[hairpinBucket(a)] = true
				}
			}
			delete(p.frags, name)
		}
		sp := s.ServicePorts[name]
		if sp == nil || name.Family != family {
			continue
		}
		sr := r.servicePort(sp)
		f := fragment{locals: sr.locals}
		maps.Copy(r.rs.Tables[tableNAT], sr.chains)
		for i, l := range sr.leaves {
			l.entry.seq = i
			p.leaves[l.chain] = append(p.leaves[l.chain], l.entry)
			if !slices.Contains(f.leaves, l.chain) {
				f.leaves = append(f.leaves, l.chain)
			}
			dirtyLeaves[l.chain] = true
		}
		for _, a := range f.locals {
			if p.locals[a]++; p.locals[a] == 1 {
				p.hairpin[hairpinBucket(a)]++
				dirtyHairpin[hairpinBucket(a)] = true
			}
		}
		p.frags[name] = f
	}
	for l := range dirtyLeaves {
		if len(p.leaves[l]) == 0 {
			delete(p.leaves, l)
			gone[l] = true
		}
	}
	p.always = map[tableChain]bool{}
	r.shared(p, dirtyHairpin, gone)
	for _, table := range []string{tableNAT, tableFilter} {
		r.trees(p, table, dirtyLeaves)
	}
	for c := range gone {
		if _, rendered := r.rs.Tables[c.table][c.chain]; rendered {
			delete(gone, c)
		} else if _, written := p.sums[c.table][c.chain]; !written {
			delete(gone, c)
		}
	}
	return r.rs, gone
}

// sumsOf returns the sums of a ruleset's chains: table -> chain -> sum.
func sumsOf(rs *Ruleset) map[string]map[string]chainSum {
	out := map[string]map[string]chainSum{}
	for table, chains := range rs.Tables {
		out[table] = make(map[string]chainSum, len(chains))
		for c, rules := range chains {
			out[table][c] = sumOf(rules)
		}
	}
	return out
}

// record notes in p's sums the chains an update rendered (with their
// sums) and found gone, once they are written.
func (p *programmed) record(sums map[string]map[string]chainSum, gone map[tableChain]bool) {
	for c := range gone {
		p.rules[c.table] -= p.sums[c.table][c.chain].rules
		delete(p.sums[c.table], c.chain)
	}
	for table, chains := range sums {
		for c, sum := range chains {
			p.rules[table] += sum.rules - p.sums[table][c].rules
			p.sums[table][c] = sum
		}
	}
}

type renderer struct {
	rs          *Ruleset
	family      model.Family
	keepInvalid bool
	masqMark    string
	cidrs       []netip.Prefix
}

// fragment is what programmed keeps of one ServicePort: the leaf chains
// holding its frontend rules and the addresses of its local endpoints.
// (Its own chains are named after it: ownChains.)
type fragment struct {
	leaves []tableChain
	locals []netip.Addr
}

// ownChains names the nat chains a ServicePort may have.
func ownChains(n model.ServicePortName) [3]string {
	h := chainHash(n.String())
	return [3]string{prefixCluster + h, prefixLocal + h, prefixExternal + h}
}

// spRules is what one ServicePort contributes to the rules: its own nat
// chains, its entries in the dispatch trees' leaves, its local endpoint
// addresses.
type spRules struct {
	chains map[string][]string
	leaves []leafRef
	locals []netip.Addr
}

type leafRef struct {
	chain tableChain
	entry leafEntry
}

func (f *spRules) add(chain, rule string) { f.chains[chain] = append(f.chains[chain], rule) }

// leaf adds a frontend rule to the leaf chain of its dispatch tree: the
// port tree for NodePorts (their addresses are few and shared by all
// NodePorts), the address tree for the others.
func (f *spRules) leaf(table string, fe model.Frontend, sp *model.ServicePort, rule string) {
	chain := addrLeaf(fe.IP)
	if fe.Kind == model.NodePort {
		chain = portLeaf(sp.Protocol, fe.Port)
	}
	f.leaves = append(f.leaves, leafRef{tableChain{table, chain}, leafEntry{ip: fe.IP, proto: sp.Protocol, port: fe.Port, name: sp.Name, rule: rule}})
}

// leafEntry is one rule in a dispatch tree's leaf chain.
type leafEntry struct {
	ip    netip.Addr // invalid for health check ports
	proto model.Protocol
	port  uint16
	name  model.ServicePortName
	seq   int // order among the ServicePort's entries
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

func (r *renderer) servicePort(sp *model.ServicePort) *spRules {
	fr := &spRules{chains: map[string][]string{}}
	own := ownChains(sp.Name)
	svc, lcl, ext := own[0], own[1], own[2]
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
		fr.leaves = append(fr.leaves, leafRef{tableChain{tableFilter, portLeaf(model.TCP, sp.HealthCheckNodePort)}, leafEntry{
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
func (r *renderer) endpoints(fr *spRules, chain string, sp *model.ServicePort, eps []model.Endpoint) {
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
