//go:build linux

package iptables

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// jump is a rule svcnat adds to a built-in chain: matches, then a jump
// to one of svcnat's root chains.
type jump struct {
	table, chain string
	match        []string
	target       string
}

// spec is the rule as iptables arguments after the chain name.
func (j jump) spec() []string { return slices.Concat(j.match, []string{"-j", j.target}) }

var jumps = []jump{
	{tableNAT, "PREROUTING", []string{"-m", "comment", "--comment", "svcnat services"}, chainServices},
	{tableNAT, "OUTPUT", []string{"-m", "comment", "--comment", "svcnat services"}, chainServices},
	{tableNAT, "POSTROUTING", []string{"-m", "comment", "--comment", "svcnat masquerade"}, chainPostrouting},
	{tableFilter, "INPUT", []string{"-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "svcnat services"}, chainFilter},
	// Inserted before the next one, so it ends up below it.
	{tableFilter, "FORWARD", []string{"-m", "comment", "--comment", "svcnat forward"}, chainForward},
	{tableFilter, "FORWARD", []string{"-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "svcnat services"}, chainFilter},
	{tableFilter, "OUTPUT", []string{"-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "svcnat services"}, chainFilter},
}

// rootChains are checked on every Sync to notice rules changed behind
// svcnat's back.
var rootChains = []struct{ table, chain string }{
	{tableNAT, chainServices}, {tableNAT, chainPostrouting}, {tableFilter, chainFilter}, {tableFilter, chainForward},
}

// ensureJumps creates the root chains when missing and inserts the jump
// rules to them at the top of the built-in chains unless present.
func (ft *familyTables) ensureJumps() error {
	for _, j := range jumps {
		ft.wrote(j.table, j.chain)
	}
	for _, rc := range rootChains {
		ok, err := ft.run.chainExists(rc.table, rc.chain)
		if err != nil {
			return fmt.Errorf("look for %s chain %s/%s: %w", ft.family, rc.table, rc.chain, err)
		}
		if !ok {
			if err := ft.run.newChain(rc.table, rc.chain); err != nil {
				return fmt.Errorf("create %s chain %s/%s: %w", ft.family, rc.table, rc.chain, err)
			}
		}
	}
	for _, j := range jumps {
		ok, err := ft.run.ruleExists(j.table, j.chain, j.spec())
		if err != nil {
			return fmt.Errorf("check %s jump rule in %s/%s: %w", ft.family, j.table, j.chain, err)
		}
		if !ok {
			if err := ft.run.insertRule(j.table, j.chain, j.spec()); err != nil {
				return fmt.Errorf("insert %s jump rule in %s/%s: %w", ft.family, j.table, j.chain, err)
			}
		}
	}
	return nil
}

// kernelSums reads the family's tables as they stream out of
// iptables-save and returns the sum of each svcnat chain's rules, and the
// built-in chains missing one of svcnat's jump rules.
func (ft *familyTables) kernelSums(ctx context.Context) (map[tableChain]chainSum, map[tableChain]bool, error) {
	sums := map[tableChain]chainSum{}
	missing := map[tableChain]bool{}
	saved := make([]string, len(jumps))
	for i, j := range jumps {
		saved[i] = specText(j.spec())
	}
	for _, table := range []string{tableFilter, tableNAT} {
		jumped := make([]bool, len(jumps))
		err := ft.scanTable(ctx, table, func(_, chain, rule string, declared bool) error {
			if !strings.HasPrefix(chain, chainPrefix) {
				for i, j := range jumps {
					jumped[i] = jumped[i] || (!declared && j.table == table && j.chain == chain && rule == saved[i])
				}
				return nil
			}
			c := tableChain{table, chain}
			if declared {
				sums[c] = chainSum{}
			} else {
				sums[c] = sums[c].add(rule)
			}
			return nil
		})
		if err != nil {
			return nil, nil, err
		}
		for i, j := range jumps {
			if j.table == table && !jumped[i] {
				missing[tableChain{table, j.chain}] = true
			}
		}
	}
	return sums, missing, nil
}

// drift returns the chains where the kernel, as kernelSums read it,
// differs from p: svcnat chains with other rules, missing or extra svcnat
// chains, and built-in chains missing one of svcnat's jump rules.
func (p *programmed) drift(kernel map[tableChain]chainSum, missingJumps map[tableChain]bool) map[tableChain]bool {
	out := maps.Clone(missingJumps)
	for c, sum := range kernel {
		if want, ok := p.sums[c.table][c.chain]; !ok || want != sum {
			out[c] = true
		}
	}
	for table, sums := range p.sums {
		for c := range sums {
			if _, ok := kernel[tableChain{table, c}]; !ok {
				out[tableChain{table, c}] = true
			}
		}
	}
	return out
}

// specText is a rule given as iptables arguments as iptables-save prints
// it, after "-A chain ".
func specText(spec []string) string {
	words := make([]string, len(spec))
	for i, w := range spec {
		words[i] = quote(w)
	}
	return strings.Join(words, " ")
}

// CheckDrift compares svcnat's chains and jump rules in the kernel with
// what the last Sync wrote, reading every table with iptables-save, and
// reports whether something was changed outside svcnat; the next Sync
// (with any Change, an empty one too) repairs exactly that. It does not
// hold up Sync while it reads: a chain a Sync writes meanwhile is not
// judged (the kernel may show it before or after that write). Before the
// first successful Sync, and after a failed one, there is nothing to
// compare (the next Sync rewrites everything). Safe to call beside Sync
// once Init has returned; it never writes to the kernel.
func (b *Backend) CheckDrift(ctx context.Context) (bool, error) {
	b.checking.Lock()
	defer b.checking.Unlock()
	found := false
	for _, ft := range b.families {
		b.mu.Lock()
		compare := ft.prog != nil
		ft.written = map[tableChain]bool{}
		b.mu.Unlock()
		var kernel map[tableChain]chainSum
		var missing map[tableChain]bool
		var err error
		if compare {
			kernel, missing, err = ft.kernelSums(ctx)
		}
		b.mu.Lock()
		written := ft.written
		ft.written = nil
		if ft.prog != nil && compare && err == nil {
			for c := range ft.prog.drift(kernel, missing) {
				if !written[c] {
					ft.markRepair(c)
				}
			}
		}
		n := len(ft.repair)
		b.mu.Unlock()
		if err != nil {
			return found, fmt.Errorf("compare %s rules with the kernel: %w", ft.family, err)
		}
		if n > 0 {
			b.log.Warn("svcnat iptables rules changed outside svcnat; the next sync repairs them", "family", ft.family, "chains", n)
			found = true
		}
	}
	return found, nil
}

func (ft *familyTables) markRepair(c tableChain) {
	if ft.repair == nil {
		ft.repair = map[tableChain]bool{}
	}
	ft.repair[c] = true
}

// Sync makes the kernel's svcnat chains match s: one iptables-restore
// --noflush transaction per family, holding only the chains that differ
// from the last successful Sync (all of them after Init or a failure) and
// those found changed outside svcnat, and deleting chains no longer
// needed. Without s.Change it first compares the kernel with what it
// last wrote (as CheckDrift does, but in line); with a Change it reads
// nothing from the kernel. Traffic is never interrupted: no chain is
// flushed ahead of the transaction.
func (b *Backend) Sync(ctx context.Context, s *model.State) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.resolve(ctx); err != nil {
		return err
	}
	start := time.Now()
	b.lastWrite.full, b.lastWrite.written, b.lastWrite.deleted = false, 0, 0
	var errs []error
	failed := map[model.Family]error{}
	for _, ft := range b.families {
		if err := b.syncFamily(ctx, ft, s); err != nil {
			failed[ft.family] = err
			ft.prog = nil
			if le, ok := errors.AsType[*LockError](err); ok {
				b.log.Warn("waited for the xtables lock in vain; the sync fails and is retried",
					"family", ft.family, "waited", LockWait, "holder", cmp.Or(le.Holder, "unknown"))
			}
			errs = append(errs, err)
		}
	}
	b.log.Info("iptables sync", "servicePorts", len(s.ServicePorts), "full", b.lastWrite.full,
		"chainsWritten", b.lastWrite.written, "chainsDeleted", b.lastWrite.deleted,
		"duration", time.Since(start), "error", errors.Join(errs...))
	// A held xtables lock is transient and shared by both families: the
	// sync fails as a whole and is retried with back-off.
	_, locked := errors.AsType[*LockError](errors.Join(errs...))
	if len(failed) == 0 || len(failed) == len(b.families) || locked {
		return errors.Join(errs...)
	}
	// One family failed, the other is programmed: the failed family's
	// ServicePorts fail alone, so the other family's count as synced (a
	// failing family never keeps the other unhealthy). They keep what was
	// programmed before; the next Sync rewrites that family in full.
	perPort := dataplane.PortErrors{}
	for name := range s.ServicePorts {
		if err, ok := failed[name.Family]; ok {
			perPort[name] = err
		}
	}
	if len(perPort) == 0 {
		b.log.Error("iptables sync of an address family without service ports failed", "err", errors.Join(errs...))
		return nil
	}
	return perPort
}

func (b *Backend) syncFamily(ctx context.Context, ft *familyTables, s *model.State) error {
	full := ft.prog == nil
	if full {
		ft.prog = newProgrammed()
	} else if s.Change == nil {
		kernel, missing, err := ft.kernelSums(ctx)
		if err != nil {
			return fmt.Errorf("compare %s rules with the kernel: %w", ft.family, err)
		}
		for c := range ft.prog.drift(kernel, missing) {
			ft.markRepair(c)
		}
	}
	if len(ft.repair) > 0 {
		b.log.Warn("repairing svcnat iptables rules changed outside svcnat", "family", ft.family, "chains", len(ft.repair))
	}
	// A full sync renders everything, whatever the Change names (after a
	// failure of this family alone the agent hands a Change); so does a
	// repair, as the chains to repair may be any.
	p := ft.prog
	out, gone := p.update(s, ft.family, b.renderOptions, !full && len(ft.repair) == 0)
	sums := sumsOf(out)
	var payload strings.Builder
	for _, table := range []string{tableFilter, tableNAT} {
		var last map[string]chainSum
		var existing []string
		if full {
			var err error
			if existing, err = ft.chains(ctx, table); err != nil {
				return err
			}
		} else {
			last = p.sums[table]
		}
		write, del := planTable(table, sums[table], gone, last, existing, ft.repair)
		for _, c := range slices.Concat(write, del) {
			ft.wrote(table, c)
		}
		b.lastWrite.full = b.lastWrite.full || full
		b.lastWrite.written += len(write)
		b.lastWrite.deleted += len(del)
		if len(write)+len(del) > 0 {
			writeRestore(&payload, table, write, out.Tables[table], del)
		}
	}
	if payload.Len() > 0 {
		b.log.Debug("iptables-restore", "family", ft.family, "payload", payload.String())
		if err := ft.run.restore(ctx, payload.String()); err != nil {
			return err
		}
	}
	p.record(sums, gone)
	repairJumps := false
	for c := range ft.repair {
		repairJumps = repairJumps || !strings.HasPrefix(c.chain, chainPrefix)
	}
	ft.repair = nil
	if full || repairJumps {
		// A partial sync finds the jump rules in place, unless a
		// comparison found one missing.
		if err := ft.ensureJumps(); err != nil {
			return err
		}
	}
	for _, table := range []string{tableNAT, tableFilter} {
		b.rules.WithLabelValues(string(ft.family), table).Set(float64(p.rules[table]))
	}
	return nil
}

// wrote notes a chain a Sync writes for the CheckDrift that may be
// reading the kernel meanwhile.
func (ft *familyTables) wrote(table, chain string) {
	if ft.written != nil {
		ft.written[tableChain{table, chain}] = true
	}
}
