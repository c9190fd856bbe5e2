//go:build linux

package iptables

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	goipt "github.com/coreos/go-iptables/iptables"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/model"
)

// runner is the kernel layer of one address family's iptables: everything
// the backend does to the kernel goes through it. The real one runs the
// iptables binaries of one variant (execRunner); tests use an in-memory
// model of the same semantics.
type runner interface {
	// restore applies payload, iptables-restore input, without flushing
	// what it does not name (--noflush): each table's block up to COMMIT
	// applies whole or not at all. An error quotes the failing line when
	// the input names one; a held xtables lock is a *LockError.
	restore(ctx context.Context, payload string) error
	// save streams one table in iptables-save form into fn, with packet
	// and byte counters when counters is set. fn's error is returned.
	save(ctx context.Context, table string, counters bool, fn func(io.Reader) error) error
	chainExists(table, chain string) (bool, error)
	newChain(table, chain string) error
	// ruleExists, insertRule (at the top) and deleteRule (when present)
	// take a rule as iptables arguments after the chain name.
	ruleExists(table, chain string, spec []string) (bool, error)
	insertRule(table, chain string, spec []string) error
	deleteRule(table, chain string, spec []string) error
	// String names what the rules are read with, for Raw's header.
	String() string
}

// host is what the backend asks the machine before it has runners.
type host interface {
	// detectMode returns the variant holding the host's rules.
	detectMode(ctx context.Context) string
	// runner returns the kernel layer of one family in one variant, or an
	// error saying why that family is not usable.
	runner(f model.Family, mode string) (runner, error)
	// tcpBeLiberal reports whether conntrack accepts out-of-window TCP
	// segments (then only out-of-window RSTs are INVALID).
	tcpBeLiberal() bool
}

// execHost is the real machine: iptables binaries on PATH and /proc.
type execHost struct{}

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
func (execHost) detectMode(ctx context.Context) string {
	legacy := countRules(ctx, "iptables-legacy-save") + countRules(ctx, "ip6tables-legacy-save")
	nft := countRules(ctx, "iptables-nft-save") + countRules(ctx, "ip6tables-nft-save")
	if legacy > nft {
		return ModeLegacy
	}
	return ModeNFT
}

// runner finds the binaries of one family and checks that they work (and,
// for IPv6, that the kernel has it enabled), as kube-proxy does before it
// picks single- or dual-stack.
func (execHost) runner(f model.Family, mode string) (runner, error) {
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
	return &execRunner{family: f, saveBin: paths[base+"-save"], restoreBin: paths[base+"-restore"], ipt: ipt}, nil
}

func (execHost) tcpBeLiberal() bool {
	v, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
	return err == nil && strings.TrimSpace(string(v)) == "1"
}

// execRunner runs one family's iptables binaries of one variant, and
// go-iptables (which runs the iptables binary) for single rules.
type execRunner struct {
	family              model.Family
	saveBin, restoreBin string
	ipt                 *goipt.IPTables
}

func (r *execRunner) String() string { return r.saveBin }

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

// quoteLine adds line n of payload to msg, quoted, when there is one.
func quoteLine(msg string, n int, payload string) string {
	if lines := strings.Split(payload, "\n"); n > 0 && n <= len(lines) {
		msg += fmt.Sprintf(" (line %d: %q)", n, lines[n-1])
	}
	return msg
}

// restore feeds payload to iptables-restore --noflush, waiting at most
// LockWait for the xtables lock.
func (r *execRunner) restore(ctx context.Context, payload string) error {
	cmd := exec.CommandContext(ctx, r.restoreBin, "--noflush", fmt.Sprintf("--wait=%d", int(LockWait.Seconds())))
	cmd.Stdin = strings.NewReader(payload)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "holding the xtables lock") {
			return &LockError{Family: r.family, Holder: lockHolder()}
		}
		if m := failedLine.FindStringSubmatch(msg); m != nil {
			n, _ := strconv.Atoi(m[1])
			msg = quoteLine(msg, n, payload)
		}
		return fmt.Errorf("apply %s rules with %s: %w: %s", r.family, r.restoreBin, err, msg)
	}
	return nil
}

// save streams the save binary's output for one table into fn, without
// holding the text whole.
func (r *execRunner) save(ctx context.Context, table string, counters bool, fn func(io.Reader) error) error {
	args := []string{"-t", table}
	if counters {
		args = append(args, "-c")
	}
	cmd := exec.CommandContext(ctx, r.saveBin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("read %s %s table with %s: %w", r.family, table, r.saveBin, err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("read %s %s table with %s: %w", r.family, table, r.saveBin, err)
	}
	fnErr := fn(out)
	// Let the binary finish writing whatever fn left unread.
	_, _ = io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("read %s %s table with %s: %w: %s", r.family, table, r.saveBin, err, strings.TrimSpace(stderr.String()))
	}
	return fnErr
}

func (r *execRunner) chainExists(table, chain string) (bool, error) {
	return r.ipt.ChainExists(table, chain)
}

func (r *execRunner) newChain(table, chain string) error { return r.ipt.NewChain(table, chain) }

func (r *execRunner) ruleExists(table, chain string, spec []string) (bool, error) {
	return r.ipt.Exists(table, chain, spec...)
}

func (r *execRunner) insertRule(table, chain string, spec []string) error {
	return r.ipt.Insert(table, chain, 1, spec...)
}

func (r *execRunner) deleteRule(table, chain string, spec []string) error {
	return r.ipt.DeleteIfExists(table, chain, spec...)
}
