//go:build linux

package iptables

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/svcnat/svcnat/pkg/model"
)

// fakeHost is an in-memory machine for the backend: per family and
// variant, a fakeRunner. Backends given the same fakeHost share its
// tables, as two processes share the kernel's.
type fakeHost struct {
	mu      sync.Mutex
	runners map[string]*fakeRunner
	// unusable makes runner fail for a family, as a host without IPv6.
	unusable map[model.Family]error
}

func newFakeHost() *fakeHost {
	return &fakeHost{runners: map[string]*fakeRunner{}, unusable: map[model.Family]error{}}
}

// fake returns the runner of a family and variant, made on first use.
func (h *fakeHost) fake(f model.Family, mode string) *fakeRunner {
	h.mu.Lock()
	defer h.mu.Unlock()
	key := string(f) + "/" + mode
	if h.runners[key] == nil {
		h.runners[key] = newFakeRunner(f)
	}
	return h.runners[key]
}

// detectMode picks the variant holding more rules, as execHost does.
func (h *fakeHost) detectMode(context.Context) string {
	count := func(mode string) int {
		n := 0
		for _, f := range []model.Family{model.IPv4, model.IPv6} {
			n += h.fake(f, mode).rules()
		}
		return n
	}
	if count(ModeLegacy) > count(ModeNFT) {
		return ModeLegacy
	}
	return ModeNFT
}

func (h *fakeHost) runner(f model.Family, mode string) (runner, error) {
	if err := h.unusable[f]; err != nil {
		return nil, err
	}
	return h.fake(f, mode), nil
}

func (h *fakeHost) tcpBeLiberal() bool { return false }

// builtinChains are the chains each table starts with, in the order
// iptables-save prints them.
var builtinChains = map[string][]string{
	tableNAT:    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
	tableFilter: {"INPUT", "FORWARD", "OUTPUT"},
}

// targets are the targets that are not chains (those svcnat and the tests
// use, and a few more).
var targets = map[string]bool{
	"ACCEPT": true, "DROP": true, "RETURN": true, "REJECT": true, "DNAT": true, "SNAT": true,
	"MASQUERADE": true, "MARK": true, "LOG": true, "CONNMARK": true, "REDIRECT": true,
}

// fakeTable is one table: chain name to rules, each rule as iptables-save
// prints it after "-A chain ".
type fakeTable map[string][]string

// fakeRunner models one family's iptables: tables of chains of rules.
// restore applies iptables-restore --noflush input table by table, each
// table's block whole or not at all; it rejects a jump to a chain that
// does not exist, the deletion of a chain that is not empty or is still
// jumped to, and a rule deleted or appended to a chain that is not there,
// quoting the failing line as the real binary does. save prints
// iptables-save text. Rules are kept as given: that the kernel prints
// svcnat's rules exactly as svcnat writes them is what
// TestKernelHoldsRenderedText proves on the real kernel.
type fakeRunner struct {
	family model.Family
	mu     sync.Mutex
	tables map[string]fakeTable
	// failRestore, when set, fails every restore without applying it, as
	// a restore binary that cannot run.
	failRestore error
	// beforeSave, when set, runs before save reads a table.
	beforeSave func()
}

func newFakeRunner(f model.Family) *fakeRunner {
	r := &fakeRunner{family: f, tables: map[string]fakeTable{}}
	for table, chains := range builtinChains {
		r.tables[table] = fakeTable{}
		for _, c := range chains {
			r.tables[table][c] = nil
		}
	}
	return r
}

func (r *fakeRunner) String() string { return "fake iptables-save" }

// rules counts the rules of every table.
func (r *fakeRunner) rules() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, t := range r.tables {
		for _, rules := range t {
			n += len(rules)
		}
	}
	return n
}

func (r *fakeRunner) restore(_ context.Context, payload string) error {
	if r.failRestore != nil {
		return r.failRestore
	}
	return r.apply(payload)
}

// apply applies iptables-restore input; the single-rule operations use
// it too, as iptables runs them through the same code.
func (r *fakeRunner) apply(payload string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	fail := func(n int, format string, args ...any) error {
		msg := fmt.Sprintf("line %d failed: %s", n, fmt.Sprintf(format, args...))
		return fmt.Errorf("apply %s rules with the fake: %s", r.family, quoteLine(msg, n, payload))
	}
	var table string
	var tx fakeTable
	lines := strings.Split(payload, "\n")
	for i, line := range lines {
		n := i + 1
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			if table != "" {
				return fail(n, "table %s not committed", table)
			}
			table = line[1:]
			if r.tables[table] == nil {
				return fail(n, "no table %q", table)
			}
			tx = maps.Clone(r.tables[table])
		case table == "":
			return fail(n, "outside a table")
		case line == "COMMIT":
			r.tables[table] = tx
			table = ""
		case strings.HasPrefix(line, ":"):
			f := strings.Fields(line[1:])
			switch {
			case len(f) != 3:
				return fail(n, "bad chain declaration")
			case slices.Contains(builtinChains[table], f[0]):
				if f[1] != "ACCEPT" && f[1] != "DROP" {
					return fail(n, "bad policy %q for built-in chain %s", f[1], f[0])
				}
			case f[1] != "-":
				return fail(n, "policy for user chain %s", f[0])
			default:
				// Creates the chain, or flushes it (--noflush).
				tx[f[0]] = nil
			}
		default:
			if err := tx.apply(table, line); err != nil {
				return fail(n, "%v", err)
			}
		}
	}
	if table != "" {
		return fail(len(lines), "COMMIT expected for table %s", table)
	}
	return nil
}

// apply applies one command of iptables-restore input to t: -N, -F, -X,
// -A, -I (at a position, 1 by default) and -D (by position or rule).
func (t fakeTable) apply(table, line string) error {
	cmd, rest, _ := strings.Cut(line, " ")
	chain, rule, _ := strings.Cut(rest, " ")
	rules, exists := t[chain]
	switch {
	case chain == "":
		return fmt.Errorf("%s without a chain", cmd)
	case cmd == "-N":
		if exists {
			return fmt.Errorf("chain %s already exists", chain)
		}
		t[chain] = nil
		return nil
	case !exists:
		return fmt.Errorf("no chain %s in table %s", chain, table)
	}
	switch cmd {
	case "-F":
		t[chain] = nil
	case "-X":
		if slices.Contains(builtinChains[table], chain) {
			return fmt.Errorf("cannot delete built-in chain %s", chain)
		}
		if len(rules) > 0 {
			return fmt.Errorf("chain %s is not empty", chain)
		}
		for from, rs := range t {
			for _, r := range rs {
				if target(r) == chain {
					return fmt.Errorf("chain %s is still jumped to from %s", chain, from)
				}
			}
		}
		delete(t, chain)
	case "-A", "-I":
		pos := 1
		if cmd == "-I" {
			if first, after, _ := strings.Cut(rule, " "); after != "" {
				if p, err := strconv.Atoi(first); err == nil {
					pos, rule = p, after
				}
			}
		}
		if rule == "" {
			return fmt.Errorf("rule without matches or target")
		}
		tg := target(rule)
		if _, ok := t[tg]; tg != "" && !targets[tg] && (!ok || slices.Contains(builtinChains[table], tg)) {
			return fmt.Errorf("couldn't load target %q", tg)
		}
		if cmd == "-A" {
			t[chain] = append(slices.Clone(rules), rule)
		} else if pos < 1 || pos > len(rules)+1 {
			return fmt.Errorf("index of insertion %d too big", pos)
		} else {
			t[chain] = slices.Insert(slices.Clone(rules), pos-1, rule)
		}
	case "-D":
		i := slices.Index(rules, rule)
		if p, err := strconv.Atoi(rule); err == nil {
			i = p - 1
		}
		if i < 0 || i >= len(rules) {
			return errors.New("bad rule (does a matching rule exist in that chain?)")
		}
		t[chain] = slices.Delete(slices.Clone(rules), i, i+1)
	default:
		return fmt.Errorf("unknown command %q", cmd)
	}
	return nil
}

// target returns the target of a rule (after -j or -g), empty when none.
func target(rule string) string {
	words, err := tokenize(rule)
	if err != nil {
		return ""
	}
	for i, w := range words[:max(len(words)-1, 0)] {
		if w == "-j" || w == "-g" {
			return words[i+1]
		}
	}
	return ""
}

func (r *fakeRunner) save(_ context.Context, table string, counters bool, fn func(io.Reader) error) error {
	if r.beforeSave != nil {
		r.beforeSave()
	}
	r.mu.Lock()
	t := r.tables[table]
	if t == nil {
		r.mu.Unlock()
		return fmt.Errorf("read %s %s table with the fake: no such table", r.family, table)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Generated by the fake\n*%s\n", table)
	builtin := builtinChains[table]
	var user []string
	for c := range t {
		if !slices.Contains(builtin, c) {
			user = append(user, c)
		}
	}
	slices.Sort(user)
	for _, c := range builtin {
		fmt.Fprintf(&b, ":%s ACCEPT [0:0]\n", c)
	}
	for _, c := range user {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, c := range slices.Concat(builtin, user) {
		for _, rule := range t[c] {
			if counters {
				b.WriteString("[0:0] ")
			}
			fmt.Fprintf(&b, "-A %s %s\n", c, rule)
		}
	}
	b.WriteString("COMMIT\n# Completed\n")
	r.mu.Unlock()
	return fn(strings.NewReader(b.String()))
}

func (r *fakeRunner) chainExists(table, chain string) (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.tables[table]
	if t == nil {
		return false, fmt.Errorf("no table %q", table)
	}
	_, ok := t[chain]
	return ok, nil
}

func (r *fakeRunner) newChain(table, chain string) error {
	return r.apply(fmt.Sprintf("*%s\n-N %s\nCOMMIT\n", table, chain))
}

func (r *fakeRunner) ruleExists(table, chain string, spec []string) (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.tables[table]
	rules, ok := t[chain]
	if !ok {
		return false, fmt.Errorf("no chain %s in table %s", chain, table)
	}
	return slices.Contains(rules, specText(spec)), nil
}

func (r *fakeRunner) insertRule(table, chain string, spec []string) error {
	return r.apply(fmt.Sprintf("*%s\n-I %s 1 %s\nCOMMIT\n", table, chain, specText(spec)))
}

func (r *fakeRunner) deleteRule(table, chain string, spec []string) error {
	if ok, err := r.ruleExists(table, chain, spec); err != nil || !ok {
		return err
	}
	return r.apply(fmt.Sprintf("*%s\n-D %s %s\nCOMMIT\n", table, chain, specText(spec)))
}
