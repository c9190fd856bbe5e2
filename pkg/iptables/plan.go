package iptables

import (
	"slices"
	"strings"
)

// tableChain names a chain.
type tableChain struct{ table, chain string }

// planTable decides which chains of one table a sync writes (declares,
// which flushes them, and fills with their rules) and deletes, in name
// order. rendered holds the sums of the chains the sync rendered (every
// chain whose rules may have changed), gone the chains it found no longer
// wanted, last the sums of what the last successful sync wrote to the
// table. A nil last means nothing is known: the sync then writes every
// chain rendered (which must be all of them) and deletes every other
// svcnat chain of existing, the kernel's. Otherwise it writes the rendered
// chains whose sum differs from last's or that are to be repaired, and
// deletes the chains of gone that last holds and any svcnat chain to repair
// that is neither rendered nor in last (one made outside svcnat).
func planTable(table string, rendered map[string]chainSum, gone map[tableChain]bool, last map[string]chainSum, existing []string, repair map[tableChain]bool) (write, del []string) {
	if last == nil {
		for _, c := range existing {
			if _, ok := rendered[c]; !ok {
				del = append(del, c)
			}
		}
		return sortedKeys(rendered), del
	}
	for _, c := range sortedKeys(rendered) {
		old, ok := last[c]
		if !ok || old != rendered[c] || repair[tableChain{table, c}] {
			write = append(write, c)
		}
	}
	for c := range gone {
		if _, ok := last[c.chain]; ok && c.table == table {
			del = append(del, c.chain)
		}
	}
	for c := range repair {
		_, wanted := rendered[c.chain]
		_, written := last[c.chain]
		if c.table == table && strings.HasPrefix(c.chain, chainPrefix) && !wanted && !written {
			del = append(del, c.chain)
		}
	}
	slices.Sort(del)
	return write, del
}
