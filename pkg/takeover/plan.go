// Package takeover removes what upstream kube-proxy programmed on a node, and
// nothing else, so that svcnat can replace it without a gap: kube-proxy's
// iptables chains (every KUBE-* chain except the kubelet's) with the jumps to
// them from the built-in chains, in the nat, filter and mangle tables of both
// families and both iptables variants, and its nftables tables (ip kube-proxy,
// ip6 kube-proxy). Conntrack is left alone, so connections kube-proxy
// translated keep their translation; where kube-proxy's nftables tables go,
// a table of NAT base chains (svcnat-nat-hooks) takes their place in the
// same transaction, because the kernel tracks connections and applies
// their NAT only while some rule and NAT chain need it; svcnat's backends
// have such rules, but the takeover does not depend on them.
//
// This file is pure: it decides what to remove from iptables-save and
// `nft -j list` text. takeover_linux.go reads the kernel and removes it.
package takeover

import (
	"bufio"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// kubeletChains are KUBE-* chains the kubelet owns (or owned, before
// kube-proxy stopped sharing them): never removed.
var kubeletChains = map[string]bool{
	"KUBE-KUBELET-CANARY": true,
	"KUBE-FIREWALL":       true,
	"KUBE-MARK-DROP":      true,
}

// kubeProxyChain reports whether an iptables chain is kube-proxy's.
func kubeProxyChain(name string) bool {
	return strings.HasPrefix(name, "KUBE-") && !kubeletChains[name]
}

// Rule is one iptables rule: its chain and its arguments after -A CHAIN,
// unquoted (as go-iptables takes them).
type Rule struct {
	Chain string
	Spec  []string
}

// TablePlan is what to remove from one iptables table.
type TablePlan struct {
	Table string
	// Jumps are rules in built-in chains that jump to a removed chain;
	// they are deleted first.
	Jumps []Rule
	// Chains are flushed and deleted, in one transaction.
	Chains []string
	// Kept are kube-proxy chains left in place because a chain that is not
	// kube-proxy's jumps to them (directly or through another kept chain).
	Kept []string
}

// Empty reports whether there is nothing to remove.
func (p TablePlan) Empty() bool { return len(p.Jumps)+len(p.Chains) == 0 }

// PlanIptables reads iptables-save output (any number of tables) and
// returns, per table that holds any, what of kube-proxy's to remove, in the
// order the tables appear. Chains of other owners, and their rules, are
// never selected; a foreign user chain that jumps to a kube-proxy chain keeps
// that chain (and what it reaches) in place, listed in Kept.
func PlanIptables(save string) ([]TablePlan, error) {
	type table struct {
		name    string
		builtin map[string]bool
		chains  []string
		rules   []Rule
	}
	var tables []*table
	var cur *table
	sc := bufio.NewScanner(strings.NewReader(save))
	sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			cur = &table{name: line[1:], builtin: map[string]bool{}}
			tables = append(tables, cur)
		case line == "COMMIT":
			cur = nil
		case cur == nil:
			return nil, fmt.Errorf("parse iptables-save line %d %q: outside a table", n, line)
		case strings.HasPrefix(line, ":"):
			f := strings.Fields(line[1:])
			if len(f) < 2 {
				return nil, fmt.Errorf("parse iptables-save line %d %q: want :CHAIN POLICY", n, line)
			}
			cur.chains = append(cur.chains, f[0])
			cur.builtin[f[0]] = f[1] != "-"
		case strings.HasPrefix(line, "-A "):
			args, err := splitArgs(line)
			if err != nil {
				return nil, fmt.Errorf("parse iptables-save line %d: %w", n, err)
			}
			if len(args) < 2 {
				return nil, fmt.Errorf("parse iptables-save line %d %q: no chain", n, line)
			}
			cur.rules = append(cur.rules, Rule{Chain: args[1], Spec: args[2:]})
		default:
			return nil, fmt.Errorf("parse iptables-save line %d %q: unknown line", n, line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read iptables-save output: %w", err)
	}

	var plans []TablePlan
	for _, t := range tables {
		// Chains a foreign user chain reaches stay, transitively.
		kept := map[string]bool{}
		var queue []string
		for _, r := range t.rules {
			if target := jumpTarget(r.Spec); !kubeProxyChain(r.Chain) && !t.builtin[r.Chain] && kubeProxyChain(target) && !kept[target] {
				kept[target] = true
				queue = append(queue, target)
			}
		}
		for len(queue) > 0 {
			c := queue[0]
			queue = queue[1:]
			for _, r := range t.rules {
				if target := jumpTarget(r.Spec); r.Chain == c && kubeProxyChain(target) && !kept[target] {
					kept[target] = true
					queue = append(queue, target)
				}
			}
		}
		p := TablePlan{Table: t.name}
		for _, c := range t.chains {
			switch {
			case t.builtin[c] || !kubeProxyChain(c):
			case kept[c]:
				p.Kept = append(p.Kept, c)
			default:
				p.Chains = append(p.Chains, c)
			}
		}
		for _, r := range t.rules {
			if target := jumpTarget(r.Spec); t.builtin[r.Chain] && slices.Contains(p.Chains, target) {
				p.Jumps = append(p.Jumps, r)
			}
		}
		if !p.Empty() || len(p.Kept) > 0 {
			plans = append(plans, p)
		}
	}
	return plans, nil
}

// jumpTarget returns the chain a rule jumps or goes to, or "".
func jumpTarget(spec []string) string {
	for i := 0; i+1 < len(spec); i++ {
		if spec[i] == "-j" || spec[i] == "-g" || spec[i] == "--jump" || spec[i] == "--goto" {
			return spec[i+1]
		}
	}
	return ""
}

// splitArgs splits an iptables-save rule line into arguments as the shell
// would: double quotes group, a backslash escapes the next character.
func splitArgs(line string) ([]string, error) {
	var args []string
	var cur strings.Builder
	inArg, quoted := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
			inArg = true
		case c == '"':
			quoted = !quoted
			inArg = true
		case (c == ' ' || c == '\t') && !quoted:
			if inArg {
				args = append(args, cur.String())
				cur.Reset()
				inArg = false
			}
		default:
			cur.WriteByte(c)
			inArg = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("split rule %q: unterminated quote", line)
	}
	if inArg {
		args = append(args, cur.String())
	}
	return args, nil
}

// NftTable is an nftables table.
type NftTable struct {
	Family string `json:"family"`
	Name   string `json:"name"`
}

func (t NftTable) String() string { return t.Family + " " + t.Name }

// kubeProxyTables are the tables kube-proxy's nftables mode creates.
var kubeProxyTables = map[NftTable]bool{{"ip", "kube-proxy"}: true, {"ip6", "kube-proxy"}: true}

// PlanNft reads `nft -j list ruleset` (or `nft -j list tables`) output and
// returns kube-proxy's tables in it, in the order listed. Every other table
// (including iptables-nft's ip nat and ip filter, and inet tables of other
// tools) is left out.
func PlanNft(listJSON []byte) ([]NftTable, error) {
	var doc struct {
		Nftables []struct {
			Table *NftTable `json:"table"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(listJSON, &doc); err != nil {
		return nil, fmt.Errorf("decode nft -j list output: %w", err)
	}
	var out []NftTable
	for _, o := range doc.Nftables {
		if o.Table != nil && kubeProxyTables[*o.Table] {
			out = append(out, *o.Table)
		}
	}
	return out, nil
}
