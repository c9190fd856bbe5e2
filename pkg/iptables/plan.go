package iptables

import (
	"slices"
	"strings"
)

// tableChain names a chain.
type tableChain struct{ table, chain string }

// planTable decides which chains of one table a sync writes (declares,
// which flushes them, and fills with want's rules) and deletes, in name
// order. last is what the last successful sync wrote to the table; nil
// means nothing is known and the sync writes every chain of want and
// deletes every other svcnat chain of existing, the kernel's. Otherwise it
// writes the chains that differ from last or are to be repaired, and
// deletes those of last no longer wanted and any svcnat chain to repair
// that is neither wanted nor in last (one made outside svcnat).
func planTable(table string, want, last map[string][]string, existing []string, repair map[tableChain]bool) (write, del []string) {
	if last == nil {
		for _, c := range existing {
			if _, ok := want[c]; !ok {
				del = append(del, c)
			}
		}
		return sortedKeys(want), del
	}
	for _, c := range sortedKeys(want) {
		old, ok := last[c]
		if !ok || !slices.Equal(old, want[c]) || repair[tableChain{table, c}] {
			write = append(write, c)
		}
	}
	for _, c := range sortedKeys(last) {
		if _, ok := want[c]; !ok {
			del = append(del, c)
		}
	}
	for c := range repair {
		_, wanted := want[c.chain]
		_, written := last[c.chain]
		if c.table == table && strings.HasPrefix(c.chain, chainPrefix) && !wanted && !written {
			del = append(del, c.chain)
		}
	}
	slices.Sort(del)
	return write, del
}
