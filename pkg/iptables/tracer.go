package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/svcnat/svcnat/pkg/model"
)

// The tracer walks parsed svcnat rules the way netfilter does for the first
// packet of a connection, exploring every random choice, and answers which
// endpoints the packet can reach, with what probability, and whether it is
// masqueraded, dropped or rejected. `svcnat trace` runs it on the rules
// iptables-save returns; the tests on rendered ones.

type packet struct {
	src, dst netip.Addr
	proto    model.Protocol
	dport    uint16
	// recent holds the xt_recent lists that already hold the source.
	recent map[string]bool
}

// outcome is one way a packet can end, with its probability.
type outcome struct {
	prob    float64
	dnat    netip.AddrPort // invalid when not DNATed
	verdict string         // "accept", "accepted" (by a rule), "drop", "reject"
	masq    bool
	// pinned: an affinity check rule (xt_recent --rcheck) chose dnat.
	pinned bool
}

func (o outcome) String() string {
	return fmt.Sprintf("%s dnat=%v masq=%v p=%.3f", o.verdict, o.dnat, o.masq, o.prob)
}

type tracer struct {
	rules map[string]map[string][]*rule
	local map[netip.Addr]bool // the node's addresses
	// evaluated counts the rules evaluated by the last trace, over all
	// branches.
	evaluated int
	// steps are the rules the last trace matched, in the order first
	// matched, as "table chain: rule".
	steps []string
}

func newRuleTracer(rules map[string]map[string][]*rule, nodeAddrs []netip.Addr) *tracer {
	tr := &tracer{rules: rules, local: map[netip.Addr]bool{}}
	for _, a := range nodeAddrs {
		tr.local[a] = true
	}
	return tr
}

// walk is the state of one branch of a packet's walk.
type walk struct {
	prob    float64
	mark    uint32
	dnat    netip.AddrPort
	verdict string // set by a terminating target
	masq    bool
	pinned  bool
	// done: a terminating target (DNAT, ACCEPT, DROP, ...) ended the
	// branch's walk of the current table's hook.
	done bool
}

func (tr *tracer) matches(r *rule, p packet, w walk) bool {
	if !r.src.matches(p.src) || !r.dst.matches(p.dst) {
		return false
	}
	if r.proto != "" && r.proto != strings.ToLower(string(p.proto)) {
		return false
	}
	if r.hasDport && (p.dport < r.dportLo || p.dport > r.dportHi) {
		return false
	}
	if r.srcType != "" && (r.srcType != "LOCAL" || !tr.local[p.src]) {
		return false
	}
	if r.dstType != "" && (r.dstType != "LOCAL" || !tr.local[p.dst]) {
		return false
	}
	if r.ctstate != "" && (r.ctstate != "DNAT" || !w.dnat.IsValid()) {
		return false
	}
	if r.hasMark && (w.mark&r.markMask == r.mark) == r.markNeg {
		return false
	}
	if r.rcheck && !p.recent[r.rcheckName] {
		return false
	}
	return true
}

// step records that r of table's chain matched.
func (tr *tracer) step(table, chain string, r *rule) {
	s := fmt.Sprintf("%s %s: %s", table, chain, r.text)
	if !slices.Contains(tr.steps, s) {
		tr.steps = append(tr.steps, s)
	}
}

// run walks chain for every branch in ws; branches come back either ended
// (verdict or DNAT) or having left the chain.
func (tr *tracer) run(table, chain string, p packet, ws []walk, depth int) []walk {
	if depth > 16 {
		panic("jump loop at " + chain)
	}
	var out []walk
	active := ws
	for _, r := range tr.rules[table][chain] {
		var next []walk
		for _, w := range active {
			tr.evaluated++
			if !tr.matches(r, p, w) {
				next = append(next, w)
				continue
			}
			tr.step(table, chain, r)
			if r.probability > 0 {
				miss := w
				miss.prob *= 1 - r.probability
				next = append(next, miss)
				w.prob *= r.probability
			}
			switch {
			case r.jumpsToChain:
				for _, sub := range tr.run(table, r.target, p, []walk{w}, depth+1) {
					if sub.done {
						out = append(out, sub)
					} else {
						next = append(next, sub)
					}
				}
			case r.target == "RETURN":
				out = append(out, w)
			case r.target == "DNAT":
				w.dnat, w.done, w.pinned = r.toDest, true, r.rcheck
				out = append(out, w)
			case r.target == "MARK":
				w.mark = w.mark&^r.setMarkMask ^ r.setMark
				next = append(next, w)
			case r.target == "MASQUERADE":
				w.masq, w.done = true, true
				out = append(out, w)
			case r.target == "ACCEPT":
				w.verdict, w.done = "accept", true
				out = append(out, w)
			case r.target == "DROP":
				w.verdict, w.done = "drop", true
				out = append(out, w)
			case r.target == "REJECT":
				w.verdict, w.done = "reject", true
				out = append(out, w)
			default:
				panic("tracer: unknown target " + r.target)
			}
		}
		active = next
	}
	return append(out, active...)
}

// trace follows a new connection's first packet through nat
// PREROUTING/OUTPUT, filter INPUT/FORWARD/OUTPUT and nat POSTROUTING.
func (tr *tracer) trace(p packet) []outcome {
	tr.evaluated = 0
	tr.steps = nil
	var outs []outcome
	for _, w := range tr.run(tableNAT, chainServices, p, []walk{{prob: 1}}, 0) {
		q := p
		if w.dnat.IsValid() {
			q.dst, q.dport = w.dnat.Addr(), w.dnat.Port()
		}
		w.done = false
		filtered := tr.run(tableFilter, chainFilter, q, []walk{w}, 0)
		for _, f := range filtered {
			if f.verdict == "drop" || f.verdict == "reject" {
				outs = append(outs, outcome{prob: f.prob, dnat: f.dnat, verdict: f.verdict})
				continue
			}
			// "accepted": a filter rule accepted it (not just no rule
			// dropped it).
			verdict := "accept"
			if f.verdict == "accept" {
				verdict = "accepted"
			}
			f.verdict, f.done = "", false
			post := tr.run(tableNAT, chainPostrouting, q, []walk{f}, 0)
			for _, pw := range post {
				outs = append(outs, outcome{prob: pw.prob, dnat: pw.dnat, verdict: verdict, masq: pw.masq, pinned: pw.pinned})
			}
		}
	}
	// Merge equal outcomes.
	var merged []outcome
	for _, o := range outs {
		if o.prob < 1e-9 {
			continue
		}
		i := slices.IndexFunc(merged, func(m outcome) bool {
			return m.dnat == o.dnat && m.verdict == o.verdict && m.masq == o.masq && m.pinned == o.pinned
		})
		if i < 0 {
			merged = append(merged, o)
		} else {
			merged[i].prob += o.prob
		}
	}
	slices.SortFunc(merged, func(a, b outcome) int { return strings.Compare(a.String(), b.String()) })
	return merged
}

// matches reports whether a is matched.
func (m *addrMatch) matches(a netip.Addr) bool {
	if !m.set() {
		return true
	}
	if a.BitLen() != m.addr.BitLen() {
		return false
	}
	x, v, k := a.AsSlice(), m.addr.AsSlice(), m.mask.AsSlice()
	eq := true
	for i := range x {
		if x[i]&k[i] != v[i]&k[i] {
			eq = false
		}
	}
	return eq != m.neg
}
