//go:build linux

package iptables

import (
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// TestRunner holds the fake kernel to what the real one does: the same
// calls, on the fake and on both real variants, must give the same
// results.
func TestRunner(t *testing.T) {
	onKernels(t, allKernels, func(t *testing.T, k *testKernel) {
		r, err := k.host.runner(model.IPv4, k.mode)
		if err != nil {
			t.Fatal(err)
		}
		ctx := t.Context()
		exists := func(table, chain string) bool {
			t.Helper()
			ok, err := r.chainExists(table, chain)
			if err != nil {
				t.Fatal(err)
			}
			return ok
		}
		rules := func(table, chain string) []string {
			t.Helper()
			var out []string
			err := r.save(ctx, table, false, func(save io.Reader) error {
				return scanSave(model.IPv4, save, func(_, c, rule string, declared bool) error {
					if c == chain && !declared {
						out = append(out, rule)
					}
					return nil
				})
			})
			if err != nil {
				t.Fatal(err)
			}
			return out
		}
		restore := func(payload string) error { return r.restore(ctx, payload) }

		t.Run("TableIsOneTransaction", func(t *testing.T) {
			err := restore("*filter\n:SVCNAT-T1 - [0:0]\nCOMMIT\n" +
				"*nat\n:SVCNAT-T2 - [0:0]\n-A SVCNAT-T2 -j RETURN\n-A SVCNAT-T2 -j SVCNAT-MISSING\nCOMMIT\n")
			if err == nil || !strings.Contains(err.Error(), "SVCNAT-MISSING") {
				t.Errorf("jump to a chain that does not exist: %v, want an error naming it", err)
			}
			if exists(tableNAT, "SVCNAT-T2") {
				t.Error("the failed nat transaction left chain SVCNAT-T2")
			}
			if !exists(tableFilter, "SVCNAT-T1") {
				t.Error("the filter transaction committed before the failure was undone")
			}
			if err := restore("*filter\n:SVCNAT-T1 - [0:0]\n-X SVCNAT-T1\nCOMMIT\n"); err != nil {
				t.Fatal(err)
			}
		})
		t.Run("DeclaringFlushes", func(t *testing.T) {
			for range 2 {
				if err := restore("*nat\n:SVCNAT-T3 - [0:0]\n-A SVCNAT-T3 -j RETURN\nCOMMIT\n"); err != nil {
					t.Fatal(err)
				}
			}
			if got := rules(tableNAT, "SVCNAT-T3"); !slices.Equal(got, []string{"-j RETURN"}) {
				t.Errorf("chain declared twice holds %q, want the one rule", got)
			}
		})
		t.Run("ReferencedChainStays", func(t *testing.T) {
			if err := restore("*nat\n:SVCNAT-T4 - [0:0]\n-A SVCNAT-T4 -j SVCNAT-T3\nCOMMIT\n"); err != nil {
				t.Fatal(err)
			}
			if err := restore("*nat\n:SVCNAT-T3 - [0:0]\n-X SVCNAT-T3\nCOMMIT\n"); err == nil {
				t.Error("deleted a chain still jumped to")
			}
			if !exists(tableNAT, "SVCNAT-T3") {
				t.Error("the failed deletion removed the chain")
			}
			// As a sync deletes chains: declared (flushed) first.
			if err := restore("*nat\n:SVCNAT-T3 - [0:0]\n:SVCNAT-T4 - [0:0]\n-X SVCNAT-T3\n-X SVCNAT-T4\nCOMMIT\n"); err != nil {
				t.Fatal(err)
			}
			if exists(tableNAT, "SVCNAT-T3") || exists(tableNAT, "SVCNAT-T4") {
				t.Error("chains left after their deletion")
			}
		})
		t.Run("JumpRules", func(t *testing.T) {
			if err := r.newChain(tableNAT, "SVCNAT-T5"); err != nil {
				t.Fatal(err)
			}
			first := []string{"-m", "comment", "--comment", "svcnat t5", "-j", "SVCNAT-T5"}
			second := []string{"-p", "tcp", "-j", "SVCNAT-T5"}
			for _, spec := range [][]string{first, second} {
				if err := r.insertRule(tableNAT, "PREROUTING", spec); err != nil {
					t.Fatal(err)
				}
			}
			if got, want := rules(tableNAT, "PREROUTING"), []string{specText(second), specText(first)}; !slices.Equal(got, want) {
				t.Errorf("PREROUTING holds %q, want %q (each inserted at the top)", got, want)
			}
			for range 2 {
				if err := r.deleteRule(tableNAT, "PREROUTING", first); err != nil {
					t.Fatal(err)
				}
			}
			if ok, err := r.ruleExists(tableNAT, "PREROUTING", first); err != nil || ok {
				t.Errorf("deleted rule exists: %v, %v", ok, err)
			}
			if ok, err := r.ruleExists(tableNAT, "PREROUTING", second); err != nil || !ok {
				t.Errorf("rule left in place does not exist: %v, %v", ok, err)
			}
			if err := restore("*nat\n-D PREROUTING 1\n:SVCNAT-T5 - [0:0]\n-X SVCNAT-T5\nCOMMIT\n"); err != nil {
				t.Fatal(err)
			}
		})
		t.Run("SaveParsesBack", func(t *testing.T) {
			s := allCase()
			want := Render(s, model.IPv4, DefaultMasqueradeBit)
			if err := restore(want.Text()); err != nil {
				t.Fatal(err)
			}
			got := newRuleset(model.IPv4)
			for _, table := range []string{tableFilter, tableNAT} {
				if err := r.save(ctx, table, false, func(out io.Reader) error { return scanSave(model.IPv4, out, got.add) }); err != nil {
					t.Fatal(err)
				}
			}
			if got.Text() != want.Text() {
				t.Errorf("saved\n%s\nwritten\n%s", got.Text(), want.Text())
			}
			counters := map[model.ServicePortName]*dataplane.PortCounters{}
			if err := r.save(ctx, tableNAT, true, func(out io.Reader) error { return countDNAT(model.IPv4, out, counters) }); err != nil {
				t.Fatal(err)
			}
			for name, sp := range s.ServicePorts {
				if name.Family == model.IPv4 && len(sp.ClusterEndpoints) > 0 && counters[name] == nil {
					t.Errorf("no counters for %s in save -c", name)
				}
			}
			var del strings.Builder
			for _, table := range []string{tableFilter, tableNAT} {
				writeRestore(&del, table, nil, nil, sortedKeys(want.Tables[table]))
			}
			if err := restore(del.String()); err != nil {
				t.Fatal(err)
			}
		})
	})
}
