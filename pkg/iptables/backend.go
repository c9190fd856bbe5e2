//go:build linux

package iptables

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	goipt "github.com/coreos/go-iptables/iptables"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/dataplane"
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
	mode     string // resolved: ModeNFT or ModeLegacy
	families []*familyTables
	rules    *prometheus.GaugeVec
	// renderOptions are set when the backend first looks at the host.
	renderOptions renderOptions

	// lastWrite counts the chains the last Sync wrote and deleted, for tests.
	lastWrite struct {
		full             bool
		written, deleted int
	}
}

// familyTables is the backend's view of one family's tables.
type familyTables struct {
	family  model.Family
	save    string // path of the *-save binary
	restore string // path of the *-restore binary
	ipt     *goipt.IPTables
	// last is what the last successful Sync wrote; nil makes the next Sync
	// rewrite everything. A Ruleset is not changed once written, so
	// CheckDrift reads it without holding Backend.mu.
	last *Ruleset
	// cache makes rendering after a small change cost little.
	cache renderCache
	// repair holds the chains a comparison found changed outside svcnat:
	// the next Sync rewrites (or deletes) those of svcnat, and puts back
	// the jump rules of the built-in ones.
	repair map[tableChain]bool
	// written, while a CheckDrift reads the kernel, collects the chains
	// Syncs write meanwhile: the kernel may show either version of them,
	// so the comparison cannot judge them. Nil when no CheckDrift runs.
	written map[tableChain]bool
}

// tableChain names a chain.
type tableChain struct{ table, chain string }

// jump is a rule svcnat adds to a built-in chain.
type jump struct {
	table, chain string
	spec         []string
}

var jumps = []jump{
	{tableNAT, "PREROUTING", []string{"-m", "comment", "--comment", "svcnat services", "-j", chainServices}},
	{tableNAT, "OUTPUT", []string{"-m", "comment", "--comment", "svcnat services", "-j", chainServices}},
	{tableNAT, "POSTROUTING", []string{"-m", "comment", "--comment", "svcnat masquerade", "-j", chainPostrouting}},
	{tableFilter, "INPUT", []string{"-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "svcnat services", "-j", chainFilter}},
	// Inserted before the next one, so it ends up below it.
	{tableFilter, "FORWARD", []string{"-m", "comment", "--comment", "svcnat forward", "-j", chainForward}},
	{tableFilter, "FORWARD", []string{"-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "svcnat services", "-j", chainFilter}},
	{tableFilter, "OUTPUT", []string{"-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "svcnat services", "-j", chainFilter}},
}

// rootChains are checked on every Sync to notice rules changed behind
// svcnat's back.
var rootChains = []struct{ table, chain string }{
	{tableNAT, chainServices}, {tableNAT, chainPostrouting}, {tableFilter, chainFilter}, {tableFilter, chainForward},
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
	b := &Backend{opts: opts, log: opts.Logger}
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

func binaryBase(f model.Family) string {
	if f == model.IPv6 {
		return "ip6tables"
	}
	return "iptables"
}

// countRules counts the rules a save binary prints; 0 when it cannot run.
func countRules(ctx context.Context, save string) int {
	out, err := exec.CommandContext(ctx, save).Output()
	if err != nil {
		return 0
	}
	return bytes.Count(out, []byte("\n-A "))
}

// detectMode picks the variant holding more rules, as kube-proxy's
// iptables-wrapper does; nft when tied (both empty in a fresh namespace).
func detectMode(ctx context.Context) string {
	legacy := countRules(ctx, "iptables-legacy-save") + countRules(ctx, "ip6tables-legacy-save")
	nft := countRules(ctx, "iptables-nft-save") + countRules(ctx, "ip6tables-nft-save")
	if legacy > nft {
		return ModeLegacy
	}
	return ModeNFT
}

// resolve finds the binaries of the configured mode once.
func (b *Backend) resolve(ctx context.Context) error {
	if b.families != nil {
		return nil
	}
	mode := b.opts.Mode
	if mode == ModeAuto {
		mode = detectMode(ctx)
	}
	var fams []*familyTables
	families := b.opts.Families
	if families == nil {
		families = []model.Family{model.IPv4, model.IPv6}
	}
	var errs []error
	for _, f := range families {
		ft, err := newFamilyTables(f, mode)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fams = append(fams, ft)
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
	b.renderOptions = renderOptions{masqBit: b.opts.MasqueradeBit, keepInvalid: tcpBeLiberal()}
	if b.renderOptions.keepInvalid {
		b.log.Info("nf_conntrack_tcp_be_liberal is set: not dropping forwarded packets in conntrack state INVALID")
	}
	b.log.Info("iptables backend", "mode", mode, "families", b.Families())
	return nil
}

// newFamilyTables finds the binaries of one family and checks that they
// work (and, for IPv6, that the kernel has it enabled), as kube-proxy does
// before it picks single- or dual-stack.
func newFamilyTables(f model.Family, mode string) (*familyTables, error) {
	if f == model.IPv6 {
		if _, err := os.Stat("/proc/net/if_inet6"); err != nil {
			return nil, fmt.Errorf("use %s: no kernel support (no /proc/net/if_inet6)", f)
		}
		if v, err := os.ReadFile("/proc/sys/net/ipv6/conf/all/disable_ipv6"); err == nil && strings.TrimSpace(string(v)) == "1" {
			return nil, fmt.Errorf("use %s: disabled in the kernel (net.ipv6.conf.all.disable_ipv6=1)", f)
		}
	}
	base := binaryBase(f) + "-" + mode
	paths := map[string]string{}
	for _, name := range []string{base, base + "-save", base + "-restore"} {
		p, err := exec.LookPath(name)
		if err != nil {
			return nil, fmt.Errorf("find %s (iptables %s mode, %s): %w", name, mode, f, err)
		}
		paths[name] = p
	}
	proto := goipt.ProtocolIPv4
	if f == model.IPv6 {
		proto = goipt.ProtocolIPv6
	}
	ipt, err := goipt.New(goipt.IPFamily(proto), goipt.Path(paths[base]), goipt.Timeout(10))
	if err != nil {
		return nil, fmt.Errorf("use %s: %w", paths[base], err)
	}
	if _, err := ipt.ChainExists(tableNAT, "POSTROUTING"); err != nil {
		return nil, fmt.Errorf("use %s: nat table not usable: %w", paths[base], err)
	}
	return &familyTables{family: f, save: paths[base+"-save"], restore: paths[base+"-restore"], ipt: ipt}, nil
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

// tcpBeLiberal reports whether this network namespace's conntrack accepts
// out-of-window TCP segments (then only out-of-window RSTs are INVALID).
func tcpBeLiberal() bool {
	v, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
	return err == nil && strings.TrimSpace(string(v)) == "1"
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
		ft.last = nil
		if err := ft.ensureJumps(); err != nil {
			return err
		}
	}
	return nil
}

// ensureJumps creates the root chains when missing and inserts the jump
// rules to them at the top of the built-in chains unless present.
func (ft *familyTables) ensureJumps() error {
	for _, j := range jumps {
		ft.wrote(j.table, j.chain)
	}
	for _, rc := range rootChains {
		ok, err := ft.ipt.ChainExists(rc.table, rc.chain)
		if err != nil {
			return fmt.Errorf("look for %s chain %s/%s: %w", ft.family, rc.table, rc.chain, err)
		}
		if !ok {
			if err := ft.ipt.NewChain(rc.table, rc.chain); err != nil {
				return fmt.Errorf("create %s chain %s/%s: %w", ft.family, rc.table, rc.chain, err)
			}
		}
	}
	for _, j := range jumps {
		ok, err := ft.ipt.Exists(j.table, j.chain, j.spec...)
		if err != nil {
			return fmt.Errorf("check %s jump rule in %s/%s: %w", ft.family, j.table, j.chain, err)
		}
		if !ok {
			if err := ft.ipt.Insert(j.table, j.chain, 1, j.spec...); err != nil {
				return fmt.Errorf("insert %s jump rule in %s/%s: %w", ft.family, j.table, j.chain, err)
			}
		}
	}
	return nil
}

// drift reads the kernel's tables as they stream out of iptables-save
// and returns the chains that differ from last: svcnat chains with other
// rules, missing or extra svcnat chains, and built-in chains missing one of
// svcnat's jump rules.
func (ft *familyTables) drift(ctx context.Context, last *Ruleset) (map[tableChain]bool, error) {
	out := map[tableChain]bool{}
	saved := make([]string, len(jumps))
	for i, j := range jumps {
		saved[i] = j.saved()
	}
	for _, table := range []string{tableFilter, tableNAT} {
		want := last.Tables[table]
		// matched counts the rules of each svcnat chain in the kernel that
		// equal last's so far; -1 once one differs.
		matched := map[string]int{}
		jumped := make([]bool, len(jumps))
		err := ft.scanTable(ctx, table, func(_, chain, rule string, declared bool) error {
			if !strings.HasPrefix(chain, chainPrefix) {
				for i, j := range jumps {
					jumped[i] = jumped[i] || (!declared && j.table == table && j.chain == chain && rule == saved[i])
				}
				return nil
			}
			n, seen := matched[chain]
			switch {
			case declared:
				matched[chain] = 0
			case seen && n >= 0 && n < len(want[chain]) && want[chain][n] == rule:
				matched[chain] = n + 1
			default:
				matched[chain] = -1
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		for c, n := range matched {
			if rules, ok := want[c]; !ok || n != len(rules) {
				out[tableChain{table, c}] = true
			}
		}
		for c := range want {
			if _, ok := matched[c]; !ok {
				out[tableChain{table, c}] = true
			}
		}
		for i, j := range jumps {
			if j.table == table && !jumped[i] {
				out[tableChain{table, j.chain}] = true
			}
		}
	}
	return out, nil
}

// saved is the jump rule as iptables-save prints it, after "-A chain ".
func (j jump) saved() string {
	words := make([]string, len(j.spec))
	for i, w := range j.spec {
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
		last := ft.last
		ft.written = map[tableChain]bool{}
		b.mu.Unlock()
		var drift map[tableChain]bool
		var err error
		if last != nil {
			drift, err = ft.drift(ctx, last)
		}
		b.mu.Lock()
		written := ft.written
		ft.written = nil
		if ft.last != nil {
			for c := range drift {
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
			ft.last = nil
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
	want := render(s, ft.family, b.renderOptions, &ft.cache)
	full := ft.last == nil
	if !full && s.Change == nil {
		drift, err := ft.drift(ctx, ft.last)
		if err != nil {
			return fmt.Errorf("compare %s rules with the kernel: %w", ft.family, err)
		}
		for c := range drift {
			ft.markRepair(c)
		}
	}
	if len(ft.repair) > 0 {
		b.log.Warn("repairing svcnat iptables rules changed outside svcnat", "family", ft.family, "chains", len(ft.repair))
	}
	var payload strings.Builder
	for _, table := range []string{tableFilter, tableNAT} {
		wantChains := want.Tables[table]
		var write, del []string
		if full {
			write = sortedKeys(wantChains)
			existing, err := ft.chains(ctx, table)
			if err != nil {
				return err
			}
			for _, c := range existing {
				if _, ok := wantChains[c]; !ok {
					del = append(del, c)
				}
			}
		} else {
			lastChains := ft.last.Tables[table]
			for _, c := range sortedKeys(wantChains) {
				old, ok := lastChains[c]
				if !ok || !slices.Equal(old, wantChains[c]) || ft.repair[tableChain{table, c}] {
					write = append(write, c)
				}
			}
			for _, c := range sortedKeys(lastChains) {
				if _, ok := wantChains[c]; !ok {
					del = append(del, c)
				}
			}
			// A chain of svcnat's name in the kernel that svcnat did not
			// write, nor wants.
			for c := range ft.repair {
				_, wanted := wantChains[c.chain]
				_, written := lastChains[c.chain]
				if c.table == table && strings.HasPrefix(c.chain, chainPrefix) && !wanted && !written {
					del = append(del, c.chain)
				}
			}
			slices.Sort(del)
		}
		for _, c := range slices.Concat(write, del) {
			ft.wrote(table, c)
		}
		b.lastWrite.full = b.lastWrite.full || full
		b.lastWrite.written += len(write)
		b.lastWrite.deleted += len(del)
		if len(write)+len(del) == 0 {
			continue
		}
		fmt.Fprintf(&payload, "*%s\n", table)
		// Declaring a chain flushes it inside the transaction: chains to
		// delete lose their rules (and their references) first.
		for _, c := range slices.Concat(write, del) {
			fmt.Fprintf(&payload, ":%s - [0:0]\n", c)
		}
		for _, c := range write {
			for _, r := range wantChains[c] {
				fmt.Fprintf(&payload, "-A %s %s\n", c, r)
			}
		}
		for _, c := range del {
			fmt.Fprintf(&payload, "-X %s\n", c)
		}
		payload.WriteString("COMMIT\n")
	}
	if payload.Len() > 0 {
		b.log.Debug("iptables-restore", "family", ft.family, "payload", payload.String())
		if err := ft.restoreText(ctx, payload.String()); err != nil {
			return err
		}
	}
	ft.last = want
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
		b.rules.WithLabelValues(string(ft.family), table).Set(float64(want.Rules(table)))
	}
	return nil
}

var failedLine = regexp.MustCompile(`line (\d+) failed`)

// LockWait is how long iptables-restore waits for the xtables lock (legacy
// iptables; nf_tables needs none) before it gives up, as kube-proxy's -w 5:
// a sync then fails and is retried with back-off instead of hanging.
const LockWait = 5 * time.Second

// LockError is returned when another process held the xtables lock for
// all of LockWait.
type LockError struct {
	Family model.Family
	// Holder names the process holding the lock ("pid 123 (iptables)"),
	// empty when it could not be found.
	Holder string
}

func (e *LockError) Error() string {
	holder := "another process"
	if e.Holder != "" {
		holder = e.Holder
	}
	return fmt.Sprintf("apply %s rules: %s held the xtables lock for more than %v", e.Family, holder, LockWait)
}

// lockHolder names the process holding a lock on the xtables lock file,
// from /proc/locks; empty when there is none or it cannot tell.
func lockHolder() string {
	path := cmp.Or(os.Getenv("XTABLES_LOCKFILE"), "/run/xtables.lock")
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return ""
	}
	locks, err := os.ReadFile("/proc/locks")
	if err != nil {
		return ""
	}
	for line := range strings.Lines(string(locks)) {
		// "1: FLOCK  ADVISORY  WRITE 13511 fe:00:9977910 0 EOF"
		f := strings.Fields(line)
		if len(f) < 6 || f[len(f)-3] == "" {
			continue
		}
		dev := strings.Split(f[len(f)-3], ":")
		if len(dev) != 3 || dev[2] != strconv.FormatUint(st.Ino, 10) {
			continue
		}
		pid := f[len(f)-4]
		comm, _ := os.ReadFile("/proc/" + pid + "/comm")
		return fmt.Sprintf("pid %s (%s)", pid, strings.TrimSpace(string(comm)))
	}
	return ""
}

// restoreText feeds payload to iptables-restore --noflush, waiting at most
// LockWait for the xtables lock.
func (ft *familyTables) restoreText(ctx context.Context, payload string) error {
	cmd := exec.CommandContext(ctx, ft.restore, "--noflush", fmt.Sprintf("--wait=%d", int(LockWait.Seconds())))
	cmd.Stdin = strings.NewReader(payload)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "holding the xtables lock") {
			return &LockError{Family: ft.family, Holder: lockHolder()}
		}
		if m := failedLine.FindStringSubmatch(msg); m != nil {
			if n, _ := strconv.Atoi(m[1]); n > 0 {
				if lines := strings.Split(payload, "\n"); n <= len(lines) {
					msg += fmt.Sprintf(" (line %d: %q)", n, lines[n-1])
				}
			}
		}
		return fmt.Errorf("apply %s rules with %s: %w: %s", ft.family, ft.restore, err, msg)
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

// scanTable streams one table out of the save binary into scanSave's fn,
// without holding the text whole.
func (ft *familyTables) scanTable(ctx context.Context, table string, fn func(table, chain, rule string, declared bool) error) error {
	cmd := exec.CommandContext(ctx, ft.save, "-t", table)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("read %s %s table with %s: %w", ft.family, table, ft.save, err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("read %s %s table with %s: %w", ft.family, table, ft.save, err)
	}
	scanErr := scanSave(ft.family, out, fn)
	if scanErr != nil {
		_, _ = io.Copy(io.Discard, out) // let the binary finish writing
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("read %s %s table with %s: %w: %s", ft.family, table, ft.save, err, strings.TrimSpace(stderr.String()))
	}
	return scanErr
}

// saveTable returns iptables-save output for one table, with the save
// binary's extra flags (-c: with counters).
func (ft *familyTables) saveTable(ctx context.Context, table string, flags ...string) (string, error) {
	cmd := exec.CommandContext(ctx, ft.save, append([]string{"-t", table}, flags...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("read %s %s table with %s: %w: %s", ft.family, table, ft.save, err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
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
		want := render(s, ft.family, b.renderOptions, nil)
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
			if ok, err := ft.ipt.Exists(j.table, j.chain, j.spec...); err != nil || !ok {
				out = append(out, fmt.Sprintf("%s %s chain %s: jump to %s missing", ft.family, j.table, j.chain, j.spec[len(j.spec)-1]))
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
		fmt.Fprintf(&out, "# %s (%s, %s)\n%s", ft.family, b.mode, ft.save, rs.Text())
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
		ft.last = nil
		for _, j := range jumps {
			// A rule cannot jump to a missing chain (and legacy iptables
			// fails to check for one).
			target := j.spec[len(j.spec)-1]
			if ok, err := ft.ipt.ChainExists(j.table, target); err != nil {
				return fmt.Errorf("look for %s chain %s/%s: %w", ft.family, j.table, target, err)
			} else if !ok {
				continue
			}
			if err := ft.ipt.DeleteIfExists(j.table, j.chain, j.spec...); err != nil {
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
			fmt.Fprintf(&payload, "*%s\n", table)
			for _, c := range chains {
				fmt.Fprintf(&payload, ":%s - [0:0]\n", c)
			}
			for _, c := range chains {
				fmt.Fprintf(&payload, "-X %s\n", c)
			}
			payload.WriteString("COMMIT\n")
		}
		if payload.Len() > 0 {
			if err := ft.restoreText(ctx, payload.String()); err != nil {
				return fmt.Errorf("delete svcnat chains: %w", err)
			}
		}
		for _, table := range []string{tableNAT, tableFilter} {
			b.rules.WithLabelValues(string(ft.family), table).Set(0)
		}
	}
	return nil
}
