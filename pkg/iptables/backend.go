//go:build linux

package iptables

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/svcnat/svcnat/pkg/model"
)

// Modes of Options.Mode.
const (
	ModeAuto   = "auto"
	ModeNFT    = "nft"
	ModeLegacy = "legacy"
)

// Options configure a Backend.
type Options struct {
	// Families to program; nil means each of IPv4 and IPv6 that the host
	// supports (kube-proxy's check: the iptables binaries of the family
	// work, and for IPv6 the kernel has it enabled), with a warning for a
	// family left out. A family named here that does not work is an error.
	Families []model.Family
	// Mode is the iptables variant: "nft", "legacy", or "auto" (or empty)
	// to use the one the host's rules are in.
	Mode string
	// MasqueradeBit is the packet mark bit (1-31) that asks for
	// masquerading; 0 means DefaultMasqueradeBit (so bit 0 cannot be
	// chosen).
	MasqueradeBit int
	// Registerer receives the backend's metrics; nil registers none.
	Registerer prometheus.Registerer
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Backend programs a model.State with iptables-restore. It implements
// dataplane.Backend; it is not safe for concurrent use, except that
// CheckDrift may run beside the other methods once Init has returned.
type Backend struct {
	// mu is held by Init, Sync and Cleanup throughout, and by CheckDrift
	// only to take what was last written and to hand over what it found.
	mu       sync.Mutex
	checking sync.Mutex // one CheckDrift at a time
	opts     Options
	log      *slog.Logger
	// host gives the kernel layer: execHost, or a model in tests.
	host     host
	mode     string // resolved: ModeNFT or ModeLegacy
	families []*familyTables
	rules    *prometheus.GaugeVec
	// renderOptions are set when the backend first looks at the host.
	renderOptions renderOptions

	// lastWrite counts the chains the last Sync wrote and deleted, for its
	// log line and the tests.
	lastWrite struct {
		full             bool
		written, deleted int
	}
}

// familyTables is the backend's view of one family's tables.
type familyTables struct {
	family model.Family
	run    runner
	// prog is what the last successful Sync wrote, in short; nil makes
	// the next Sync rewrite everything.
	prog *programmed
	// repair holds the chains a comparison found changed outside svcnat:
	// the next Sync rewrites (or deletes) those of svcnat, and puts back
	// the jump rules of the built-in ones.
	repair map[tableChain]bool
	// written, while a CheckDrift reads the kernel, collects the chains
	// Syncs write meanwhile: the kernel may show either version of them,
	// so the comparison cannot judge them. Nil when no CheckDrift runs.
	written map[tableChain]bool
}

// New validates opts and returns a Backend. It does not touch the kernel;
// Init, Sync, Dump and Cleanup find the iptables binaries on first use.
func New(opts Options) (*Backend, error) {
	if opts.Mode == "" {
		opts.Mode = ModeAuto
	}
	switch opts.Mode {
	case ModeAuto, ModeNFT, ModeLegacy:
	default:
		return nil, fmt.Errorf("iptables mode %q: want auto, nft or legacy", opts.Mode)
	}
	if opts.MasqueradeBit == 0 {
		opts.MasqueradeBit = DefaultMasqueradeBit
	}
	if opts.MasqueradeBit < 0 || opts.MasqueradeBit > 31 {
		return nil, fmt.Errorf("masquerade bit %d: want 0-31", opts.MasqueradeBit)
	}
	for _, f := range opts.Families {
		if f != model.IPv4 && f != model.IPv6 {
			return nil, fmt.Errorf("address family %q: want IPv4 or IPv6", f)
		}
	}
	b := &Backend{opts: opts, log: opts.Logger, host: execHost{}}
	if b.log == nil {
		b.log = slog.Default()
	}
	b.rules = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "svcnat", Subsystem: "iptables", Name: "rules",
		Help: "Rules svcnat last programmed, by address family and table.",
	}, []string{"family", "table"})
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(b.rules); err != nil {
			return nil, fmt.Errorf("register iptables metrics: %w", err)
		}
	}
	return b, nil
}

// Mode returns the iptables variant in use ("nft" or "legacy"), empty before
// the backend first looked at the host.
func (b *Backend) Mode() string { return b.mode }

// resolve finds the binaries of the configured mode once.
func (b *Backend) resolve(ctx context.Context) error {
	if b.families != nil {
		return nil
	}
	mode := b.opts.Mode
	if mode == ModeAuto {
		mode = b.host.detectMode(ctx)
	}
	var fams []*familyTables
	families := b.opts.Families
	if families == nil {
		families = []model.Family{model.IPv4, model.IPv6}
	}
	var errs []error
	for _, f := range families {
		r, err := b.host.runner(f, mode)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fams = append(fams, &familyTables{family: f, run: r})
	}
	switch {
	case len(fams) == 0:
		return errors.Join(errs...)
	case len(errs) > 0 && b.opts.Families != nil:
		return errors.Join(errs...)
	case len(errs) > 0:
		b.log.Warn("running single-stack: an address family is not usable", "family", fams[0].family, "err", errors.Join(errs...))
	}
	b.mode, b.families = mode, fams
	b.renderOptions = renderOptions{masqBit: b.opts.MasqueradeBit, keepInvalid: b.host.tcpBeLiberal()}
	if b.renderOptions.keepInvalid {
		b.log.Info("nf_conntrack_tcp_be_liberal is set: not dropping forwarded packets in conntrack state INVALID")
	}
	b.log.Info("iptables backend", "mode", mode, "families", b.Families())
	return nil
}

// Families returns the address families the backend programs; nil before
// it first looked at the host.
func (b *Backend) Families() []model.Family {
	var out []model.Family
	for _, ft := range b.families {
		out = append(out, ft.family)
	}
	return out
}

// Init finds the iptables binaries and makes sure svcnat's root chains and
// the jump rules to them exist. It keeps whatever svcnat rules a previous
// run left, so traffic keeps flowing; the first Sync replaces them.
// Idempotent.
func (b *Backend) Init(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.resolve(ctx); err != nil {
		return err
	}
	for _, ft := range b.families {
		ft.prog = nil
		if err := ft.ensureJumps(); err != nil {
			return err
		}
	}
	return nil
}

// scanTable streams one table out of the kernel into scanSave's fn,
// without holding the text whole.
func (ft *familyTables) scanTable(ctx context.Context, table string, fn func(table, chain, rule string, declared bool) error) error {
	return ft.run.save(ctx, table, false, func(r io.Reader) error { return scanSave(ft.family, r, fn) })
}

// chains lists svcnat's chains in a table.
func (ft *familyTables) chains(ctx context.Context, table string) ([]string, error) {
	var out []string
	err := ft.scanTable(ctx, table, func(_, chain, _ string, declared bool) error {
		if declared && strings.HasPrefix(chain, chainPrefix) {
			out = append(out, chain)
		}
		return nil
	})
	slices.Sort(out)
	return out, err
}

// read returns svcnat's rules of one family as the kernel holds them.
func (ft *familyTables) read(ctx context.Context) (*Ruleset, error) {
	rs := newRuleset(ft.family)
	for _, table := range []string{tableFilter, tableNAT} {
		if err := ft.scanTable(ctx, table, rs.add); err != nil {
			return nil, err
		}
	}
	return rs, nil
}

// Dump reads svcnat's rules from the kernel with iptables-save and decodes
// them; it does not use what the backend remembers, so any process can call
// it (without Init).
func (b *Backend) Dump(ctx context.Context) (*model.State, error) {
	if err := b.resolve(ctx); err != nil {
		return nil, err
	}
	var rss []*Ruleset
	for _, ft := range b.families {
		rs, err := ft.read(ctx)
		if err != nil {
			return nil, err
		}
		rss = append(rss, rs)
	}
	s, problems := decodeState(rss...)
	for _, p := range problems {
		b.log.Warn("svcnat iptables rule left out of the dump", "problem", p)
	}
	return s, nil
}

// Verify reports what is wrong with svcnat's rules in the kernel beyond
// what Dump's decoded state shows: every chain that differs from what
// svcnat writes for the state the kernel holds (a flushed root or dispatch
// chain, a deleted rule, a foreign rule inside an svcnat chain), rules it
// cannot decode, and missing jump rules from the built-in chains. Nil
// means the kernel holds exactly what svcnat would write for Dump's state.
// It reads the kernel only; any process can call it.
func (b *Backend) Verify(ctx context.Context) ([]string, error) {
	if err := b.resolve(ctx); err != nil {
		return nil, err
	}
	var out []string
	for _, ft := range b.families {
		rs, err := ft.read(ctx)
		if err != nil {
			return nil, err
		}
		s, problems := decodeState(rs)
		out = append(out, problems...)
		want := render(s, ft.family, b.renderOptions)
		for _, table := range []string{tableFilter, tableNAT} {
			got, wantChains := rs.Tables[table], want.Tables[table]
			for _, c := range sortedKeys(wantChains) {
				if _, ok := got[c]; !ok {
					out = append(out, fmt.Sprintf("%s %s chain %s: missing", ft.family, table, c))
				} else if d := chainDiff(got[c], wantChains[c]); d != "" {
					out = append(out, fmt.Sprintf("%s %s chain %s: %s", ft.family, table, c, d))
				}
			}
			for _, c := range sortedKeys(got) {
				if _, ok := wantChains[c]; !ok {
					out = append(out, fmt.Sprintf("%s %s chain %s: not one svcnat writes for what the kernel holds (%d rules)", ft.family, table, c, len(got[c])))
				}
			}
		}
		for _, j := range jumps {
			if ok, err := ft.run.ruleExists(j.table, j.chain, j.spec()); err != nil || !ok {
				out = append(out, fmt.Sprintf("%s %s chain %s: jump to %s missing", ft.family, j.table, j.chain, j.target))
			}
		}
	}
	return out, nil
}

// chainDiff describes how a chain's rules differ from the wanted ones;
// empty when they do not.
func chainDiff(got, want []string) string {
	if slices.Equal(got, want) {
		return ""
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	first := fmt.Sprintf("rule %d", i+1)
	switch {
	case i < len(got) && i < len(want):
		first += fmt.Sprintf(" is %q, want %q", got[i], want[i])
	case i < len(got):
		first += fmt.Sprintf(" %q is extra", got[i])
	default:
		first += fmt.Sprintf(" %q is missing", want[i])
	}
	return fmt.Sprintf("%d rules, want %d; first difference: %s", len(got), len(want), first)
}

// Raw returns svcnat's rules as the kernel holds them, in iptables-save
// form, one block per family.
func (b *Backend) Raw(ctx context.Context) (string, error) {
	if err := b.resolve(ctx); err != nil {
		return "", err
	}
	var out strings.Builder
	for _, ft := range b.families {
		rs, err := ft.read(ctx)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&out, "# %s (%s, %s)\n%s", ft.family, b.mode, ft.run, rs.Text())
	}
	return out.String(), nil
}

// Cleanup removes the jump rules and every SVCNAT- chain, and nothing else.
// What is already gone is not an error.
func (b *Backend) Cleanup(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.resolve(ctx); err != nil {
		return err
	}
	for _, ft := range b.families {
		ft.prog = nil
		for _, j := range jumps {
			// A rule cannot jump to a missing chain (and legacy iptables
			// fails to check for one).
			if ok, err := ft.run.chainExists(j.table, j.target); err != nil {
				return fmt.Errorf("look for %s chain %s/%s: %w", ft.family, j.table, j.target, err)
			} else if !ok {
				continue
			}
			if err := ft.run.deleteRule(j.table, j.chain, j.spec()); err != nil {
				return fmt.Errorf("delete %s jump rule from %s/%s: %w", ft.family, j.table, j.chain, err)
			}
		}
		var payload strings.Builder
		for _, table := range []string{tableFilter, tableNAT} {
			chains, err := ft.chains(ctx, table)
			if err != nil {
				return err
			}
			if len(chains) == 0 {
				continue
			}
			writeRestore(&payload, table, nil, nil, chains)
		}
		if payload.Len() > 0 {
			if err := ft.run.restore(ctx, payload.String()); err != nil {
				return fmt.Errorf("delete svcnat chains: %w", err)
			}
		}
		for _, table := range []string{tableNAT, tableFilter} {
			b.rules.WithLabelValues(string(ft.family), table).Set(0)
		}
	}
	return nil
}
