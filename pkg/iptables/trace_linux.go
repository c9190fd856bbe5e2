//go:build linux

package iptables

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/nodeaddr"
	"github.com/svcnat/svcnat/pkg/trace"
)

// xtRecentDir holds the xt_recent lists of the network namespace.
const xtRecentDir = "/proc/net/xt_recent"

// recentLists returns the svcnat affinity lists (xt_recent) that hold
// addr. The rules' --seconds are not checked against the entries' last
// use (kept in jiffies): an expired entry still counts.
func recentLists(addr netip.Addr) (map[string]bool, error) {
	entries, err := os.ReadDir(xtRecentDir)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read affinity lists: %w", err)
	}
	out := map[string]bool{}
	needle := "src=" + addr.String() + " "
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), chainPrefix) {
			continue
		}
		data, err := os.ReadFile(filepath.Join(xtRecentDir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("read affinity list %s: %w", e.Name(), err)
		}
		for line := range strings.Lines(string(data)) {
			if strings.HasPrefix(line, needle) {
				out[e.Name()] = true
			}
		}
	}
	return out, nil
}

// Trace walks svcnat's rules as the kernel holds them (iptables-save) for
// the first packet of q's connection, with the client's affinity lists
// (xt_recent) and this network namespace's addresses, and says which
// frontend it meets, the policy, and every way it can go. It reads the
// kernel only; any process can call it (no Init).
func (b *Backend) Trace(ctx context.Context, q trace.Query) (*trace.Result, error) {
	if err := b.resolve(ctx); err != nil {
		return nil, err
	}
	nodeAddrs, err := nodeaddr.List()
	if err != nil {
		return nil, err
	}
	family := model.FamilyOf(q.To.Addr())
	i := slices.IndexFunc(b.families, func(ft *familyTables) bool { return ft.family == family })
	if i < 0 {
		return nil, fmt.Errorf("trace: svcnat's iptables backend does not program %s here", family)
	}
	rs, err := b.families[i].read(ctx)
	if err != nil {
		return nil, err
	}
	rules, problems := parsedRules(rs)
	s, _ := decodeState(rs)
	res := &trace.Result{Backend: "iptables", Query: q}
	for _, p := range problems {
		res.Steps = append(res.Steps, "left out (not a rule svcnat writes): "+p)
	}
	trace.Describe(res, s)
	recent, err := recentLists(q.From.Addr())
	if err != nil {
		return nil, err
	}
	tr := newRuleTracer(rules, nodeAddrs)
	if q.Origin == trace.FromNode && !tr.local[q.From.Addr()] {
		res.Steps = append(res.Steps, fmt.Sprintf("warning: %s is not an address of this node; the rules tell the node's own packets by their source", q.From.Addr()))
	}
	outs := tr.trace(packet{src: q.From.Addr(), dst: q.To.Addr(), proto: q.Protocol, dport: q.To.Port(), recent: recent})
	res.Steps = append(res.Steps, tr.steps...)
	if res.Flows, err = trace.Flows(q); err != nil {
		return nil, err
	}
	for _, o := range outs {
		to := trace.Outcome{Probability: o.prob, Endpoint: o.dnat, Masquerade: o.masq, Pinned: o.pinned, Slot: -1}
		switch {
		case o.verdict == "drop":
			to.Verdict = trace.Drop
		case o.verdict == "reject":
			to.Verdict = trace.Reject
		case o.dnat.IsValid():
			to.Verdict = trace.Forward
		default:
			to.Verdict = trace.Untouched
		}
		if o.pinned && res.Policy != nil {
			res.Policy.PinnedTo = o.dnat
		}
		res.Outcomes = append(res.Outcomes, to)
	}
	trace.Finish(res)
	return res, nil
}
