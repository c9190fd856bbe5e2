//go:build linux

package takeover

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"

	goipt "github.com/coreos/go-iptables/iptables"
)

// tables are the iptables tables kube-proxy writes to.
var tables = []string{"nat", "filter", "mangle"}

// Removed counts what Remove removed.
type Removed struct {
	// Jumps are rules in built-in chains, Chains kube-proxy's chains, over
	// every iptables variant and family; NftTables kube-proxy's tables.
	Jumps, Chains, NftTables int
}

// Any reports whether anything was removed.
func (r Removed) Any() bool { return r.Jumps+r.Chains+r.NftTables > 0 }

// Remove removes kube-proxy's iptables chains (both variants, both
// families, where the binaries are installed and the family usable), the
// jumps to them from the built-in chains, and its nftables tables, and
// nothing else. It never touches conntrack. Idempotent: with nothing of
// kube-proxy's left it removes nothing and returns a zero Removed. A part
// that cannot be removed (say, a chain a foreign rule jumps to) is named in
// the error; the rest is still removed.
func Remove(ctx context.Context, log *slog.Logger) (Removed, error) {
	var total Removed
	var errs []error
	for _, mode := range []string{"nft", "legacy"} {
		for _, proto := range []goipt.Protocol{goipt.ProtocolIPv4, goipt.ProtocolIPv6} {
			r, err := removeIptables(ctx, log, mode, proto)
			total.Jumps += r.Jumps
			total.Chains += r.Chains
			errs = append(errs, err)
		}
	}
	n, err := removeNft(ctx, log)
	total.NftTables = n
	errs = append(errs, err)
	return total, errors.Join(errs...)
}

func removeIptables(ctx context.Context, log *slog.Logger, mode string, proto goipt.Protocol) (Removed, error) {
	base := "iptables-" + mode
	if proto == goipt.ProtocolIPv6 {
		base = "ip6tables-" + mode
	}
	var r Removed
	path, err := exec.LookPath(base)
	if err != nil {
		return r, nil // that variant is not installed: nothing of it to remove
	}
	ipt, err := goipt.New(goipt.IPFamily(proto), goipt.Path(path), goipt.Timeout(10))
	if err != nil {
		return r, fmt.Errorf("use %s: %w", base, err)
	}
	var save strings.Builder
	for _, t := range tables {
		if mode == "legacy" && !legacyTableLoaded(proto, t) {
			// Reading a legacy table would create it in this namespace.
			continue
		}
		out, err := output(ctx, nil, base+"-save", "-t", t)
		if err != nil {
			// A family the kernel lacks (IPv6 disabled) has no tables to
			// read, and nothing of kube-proxy's either.
			log.Debug("cannot read iptables table, skipping it", "binary", base+"-save", "table", t, "err", err)
			continue
		}
		save.WriteString(out)
	}
	plans, err := PlanIptables(save.String())
	if err != nil {
		return r, fmt.Errorf("plan removal of kube-proxy's %s rules: %w", base, err)
	}
	var errs []error
	for _, p := range plans {
		if len(p.Kept) > 0 {
			errs = append(errs, fmt.Errorf("remove kube-proxy's %s %s chains: %s kept, a chain that is not kube-proxy's jumps to them", base, p.Table, strings.Join(p.Kept, ", ")))
		}
		for _, j := range p.Jumps {
			if err := ipt.DeleteIfExists(p.Table, j.Chain, j.Spec...); err != nil {
				errs = append(errs, fmt.Errorf("delete jump %s %s %s: %w", base, p.Table, strings.Join(append([]string{j.Chain}, j.Spec...), " "), err))
				continue
			}
			r.Jumps++
		}
		if len(p.Chains) == 0 {
			continue
		}
		// Declaring a chain in a restore flushes it; then delete them all,
		// in one transaction (they jump to one another).
		var payload strings.Builder
		fmt.Fprintf(&payload, "*%s\n", p.Table)
		for _, c := range p.Chains {
			fmt.Fprintf(&payload, ":%s - [0:0]\n", c)
		}
		for _, c := range p.Chains {
			fmt.Fprintf(&payload, "-X %s\n", c)
		}
		payload.WriteString("COMMIT\n")
		if _, err := output(ctx, strings.NewReader(payload.String()), base+"-restore", "--noflush", "--wait=5"); err != nil {
			errs = append(errs, fmt.Errorf("delete kube-proxy's %s %s chains: %w", base, p.Table, err))
			continue
		}
		r.Chains += len(p.Chains)
		log.Info("removed kube-proxy's iptables rules", "binary", base, "table", p.Table, "jumps", len(p.Jumps), "chains", len(p.Chains))
	}
	return r, errors.Join(errs...)
}

// legacyTableLoaded reports whether the legacy (x_tables) table exists in
// this network namespace, as /proc/net/ip{,6}_tables_names lists them.
func legacyTableLoaded(proto goipt.Protocol, table string) bool {
	file := "/proc/net/ip_tables_names"
	if proto == goipt.ProtocolIPv6 {
		file = "/proc/net/ip6_tables_names"
	}
	b, err := os.ReadFile(file)
	return err == nil && slices.Contains(strings.Fields(string(b)), table)
}

func removeNft(ctx context.Context, log *slog.Logger) (int, error) {
	if _, err := exec.LookPath("nft"); err != nil {
		return 0, nil // no nftables tools: kube-proxy's nftables mode cannot have run
	}
	out, err := output(ctx, nil, "nft", "-j", "list", "tables")
	if err != nil {
		return 0, fmt.Errorf("list nftables tables: %w", err)
	}
	found, err := PlanNft([]byte(out))
	if err != nil || len(found) == 0 {
		return 0, err
	}
	// In the same transaction, keep conntrack and the family's NAT hooks
	// registered: they apply the translation of every connection conntrack
	// holds, and with kube-proxy's table gone a node whose only NAT rules
	// were kube-proxy's would stop translating established connections.
	var batch strings.Builder
	for _, t := range found {
		batch.WriteString(natHooksTable(t.Family))
		fmt.Fprintf(&batch, "delete table %s\n", t)
	}
	if _, err := output(ctx, strings.NewReader(batch.String()), "nft", "-f", "-"); err != nil {
		return 0, fmt.Errorf("delete kube-proxy's nftables tables %v: %w", found, err)
	}
	log.Info("removed kube-proxy's nftables tables", "tables", fmt.Sprint(found))
	return len(found), nil
}

// NATHooksTable is the nftables table, one per family, that keeps
// conntrack and its NAT working for the connections kube-proxy translated
// after kube-proxy's nftables tables are removed: the kernel tracks
// connections in a namespace only while some rule needs conntrack (a ct or
// NAT expression), and applies conntrack's NAT only while a NAT chain is
// hooked in. It holds NAT base chains on the four hooks and one rule that
// only counts new connections (a ct expression), nothing else.
const NATHooksTable = "svcnat-nat-hooks"

func natHooksTable(family string) string {
	return fmt.Sprintf(`add table %[1]s %[2]s { comment "keeps NAT of established connections working after svcnat took over from kube-proxy; removed by svcnat cleanup"; }
add chain %[1]s %[2]s prerouting { type nat hook prerouting priority -100; }
add chain %[1]s %[2]s input { type nat hook input priority 100; }
add chain %[1]s %[2]s output { type nat hook output priority -100; }
add chain %[1]s %[2]s postrouting { type nat hook postrouting priority 100; }
flush chain %[1]s %[2]s prerouting
add rule %[1]s %[2]s prerouting ct state new counter
`, family, NATHooksTable)
}

// RemoveNATHooks removes the tables that keep the NAT hooks registered (see
// Remove), for svcnat cleanup. Idempotent; without nft there is nothing to
// remove. Connections translated by kube-proxy before a takeover lose their
// translation if nothing else on the node has NAT chains.
func RemoveNATHooks(ctx context.Context) error {
	if _, err := exec.LookPath("nft"); err != nil {
		return nil
	}
	var errs []error
	for _, family := range []string{"ip", "ip6"} {
		if _, err := output(ctx, nil, "nft", "list", "table", family, NATHooksTable); err != nil {
			continue // not there
		}
		if _, err := output(ctx, nil, "nft", "delete", "table", family, NATHooksTable); err != nil {
			errs = append(errs, fmt.Errorf("remove nftables table %s %s: %w", family, NATHooksTable, err))
		}
	}
	return errors.Join(errs...)
}

// output runs a command with stdin and returns its standard output; the
// error carries its standard error.
func output(ctx context.Context, stdin *strings.Reader, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = stdin
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}
