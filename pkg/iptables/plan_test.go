package iptables

import (
	"slices"
	"testing"
)

// TestPlanTable: what a sync writes and deletes, from what was last
// written, what was rendered and found gone, the kernel's chains (full
// syncs only) and the chains to repair.
func TestPlanTable(t *testing.T) {
	a, b := sumOf([]string{"-j RETURN"}), sumOf([]string{"-j DROP"})
	rendered := map[string]chainSum{"SVCNAT-A": a, "SVCNAT-B": b, "SVCNAT-C": {}}
	for _, c := range []struct {
		name           string
		last           map[string]chainSum
		gone           map[tableChain]bool
		existing       []string
		repair         map[tableChain]bool
		write, deleted []string
	}{
		{name: "Full", existing: []string{"SVCNAT-A", "SVCNAT-OLD"},
			write: []string{"SVCNAT-A", "SVCNAT-B", "SVCNAT-C"}, deleted: []string{"SVCNAT-OLD"}},
		{name: "Unchanged", last: rendered, existing: []string{"SVCNAT-OLD"}},
		{name: "Changed", last: map[string]chainSum{"SVCNAT-A": b, "SVCNAT-B": b, "SVCNAT-GONE": {}, "SVCNAT-KEPT": a},
			gone:  map[tableChain]bool{{tableNAT, "SVCNAT-GONE"}: true, {tableFilter, "SVCNAT-KEPT"}: true, {tableNAT, "SVCNAT-NEVER"}: true},
			write: []string{"SVCNAT-A", "SVCNAT-C"}, deleted: []string{"SVCNAT-GONE"}},
		{name: "Repair", last: rendered, repair: map[tableChain]bool{
			{tableNAT, "SVCNAT-B"}: true, {tableNAT, "SVCNAT-STRAY"}: true, {tableFilter, "SVCNAT-A"}: true, {tableNAT, "PREROUTING"}: true,
		}, write: []string{"SVCNAT-B"}, deleted: []string{"SVCNAT-STRAY"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			write, del := planTable(tableNAT, rendered, c.gone, c.last, c.existing, c.repair)
			if !slices.Equal(write, c.write) || !slices.Equal(del, c.deleted) {
				t.Errorf("writes %q and deletes %q, want %q and %q", write, del, c.write, c.deleted)
			}
		})
	}
}
