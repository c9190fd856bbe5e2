package iptables

import (
	"slices"
	"testing"
)

// TestPlanTable: what a sync writes and deletes, from what was last
// written, what is wanted, the kernel's chains (full syncs only) and the
// chains to repair.
func TestPlanTable(t *testing.T) {
	want := map[string][]string{"SVCNAT-A": {"-j RETURN"}, "SVCNAT-B": {"-j DROP"}, "SVCNAT-C": nil}
	for _, c := range []struct {
		name           string
		last           map[string][]string
		existing       []string
		repair         map[tableChain]bool
		write, deleted []string
	}{
		{name: "Full", existing: []string{"SVCNAT-A", "SVCNAT-OLD"},
			write: []string{"SVCNAT-A", "SVCNAT-B", "SVCNAT-C"}, deleted: []string{"SVCNAT-OLD"}},
		{name: "Unchanged", last: want, existing: []string{"SVCNAT-OLD"}},
		{name: "Changed", last: map[string][]string{"SVCNAT-A": {"-j DROP"}, "SVCNAT-B": {"-j DROP"}, "SVCNAT-GONE": nil},
			write: []string{"SVCNAT-A", "SVCNAT-C"}, deleted: []string{"SVCNAT-GONE"}},
		{name: "Repair", last: want, repair: map[tableChain]bool{
			{tableNAT, "SVCNAT-B"}: true, {tableNAT, "SVCNAT-STRAY"}: true, {tableFilter, "SVCNAT-A"}: true, {tableNAT, "PREROUTING"}: true,
		}, write: []string{"SVCNAT-B"}, deleted: []string{"SVCNAT-STRAY"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			write, del := planTable(tableNAT, want, c.last, c.existing, c.repair)
			if !slices.Equal(write, c.write) || !slices.Equal(del, c.deleted) {
				t.Errorf("writes %q and deletes %q, want %q and %q", write, del, c.write, c.deleted)
			}
		})
	}
}
