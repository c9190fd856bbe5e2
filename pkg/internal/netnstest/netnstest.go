//go:build linux

// Package netnstest lets privileged tests run inside network namespaces they
// create, never in the machine's root namespace. A test that programs the
// kernel starts with
//
//	if !netnstest.InNetns(t) {
//		return
//	}
//
// The first call re-runs that one test as a child process under
// `ip netns exec` in a fresh namespace, so everything the test body does
// (iptables, tc, sockets) happens there; the parent only reports the child's
// result and removes the namespace, also when the child fails.
package netnstest

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netns"
)

const (
	envNetns       = "SVCNAT_TEST_NETNS"
	envParentNetns = "SVCNAT_TEST_PARENT_NETNS"
)

var counter atomic.Int64

// Name returns a namespace name unique to this test process, starting with
// prefix, short enough for interface names derived from it.
func Name(prefix string) string {
	return fmt.Sprintf("%s%d-%d", prefix, os.Getpid()%100000, counter.Add(1))
}

// InNetns reports whether the caller runs inside the namespace made for it.
// Called from the parent, it skips the test when not root or without the ip
// tool, otherwise runs the test in a child process in a new namespace, fails
// the test if the child fails, and returns false. A benchmark runs the same
// way, with the parent's -test.benchtime and -test.benchmem (a
// -test.cpuprofile FILE makes the child write FILE.netns); the child's
// result lines are printed and the parent's benchmark ends there.
func InNetns(t testing.TB) bool {
	t.Helper()
	if os.Getenv(envNetns) != "" {
		return true
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace to program the kernel in")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs the ip tool (iproute2) to create a network namespace")
	}
	ns := NewNamespace(t, "sn-t")
	parts := strings.Split(t.Name(), "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	args := []string{"netns", "exec", ns, os.Args[0], "-test.run", strings.Join(parts, "/"), "-test.count", "1"}
	if _, ok := t.(*testing.B); ok {
		args = []string{"netns", "exec", ns, os.Args[0], "-test.run", "^$", "-test.bench", strings.Join(parts, "/"), "-test.count", "1"}
		for _, name := range []string{"test.benchtime", "test.benchmem", "test.cpuprofile"} {
			if f := flag.Lookup(name); f != nil && f.Value.String() != "" {
				v := f.Value.String()
				if name == "test.cpuprofile" {
					v += ".netns"
				}
				args = append(args, "-"+name+"="+v)
			}
		}
	}
	if testing.Verbose() {
		args = append(args, "-test.v")
	}
	cmd := exec.Command("ip", args...)
	parent, _ := os.Readlink("/proc/self/ns/net")
	cmd.Env = append(os.Environ(), envNetns+"="+ns, envParentNetns+"="+parent)
	out, err := cmd.CombinedOutput()
	if _, ok := t.(*testing.B); !ok || err != nil {
		t.Logf("in namespace %s:\n%s", ns, out)
	}
	if err != nil {
		t.Fatalf("test in namespace %s: %v", ns, err)
	}
	if strings.Contains(string(out), "no tests to run") {
		t.Fatalf("test in namespace %s did not run", ns)
	}
	if _, ok := t.(*testing.B); ok {
		// The child's result lines, as they are; then done: a benchmark
		// that returns is run again with a larger b.N.
		os.Stdout.Write(out)
		t.SkipNow()
	}
	return false
}

// NewNamespace creates a named network namespace with its loopback up and
// deletes it when the test ends. It can be called from inside a namespace
// made by InNetns (names are global).
func NewNamespace(t testing.TB, prefix string) string {
	t.Helper()
	ns := Name(prefix)
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("create network namespace %s: %v: %s", ns, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("delete network namespace %s: %v: %s", ns, err, out)
		}
	})
	Run(t, ns, "ip", "link", "set", "lo", "up")
	return ns
}

// Run runs a command inside namespace ns ("" for the current one) and
// returns its combined output; it fails the test if the command fails.
func Run(t testing.TB, ns string, name string, args ...string) string {
	t.Helper()
	if ns != "" {
		args = append([]string{"netns", "exec", ns, name}, args...)
		name = "ip"
	}
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Do runs fn on an OS thread switched into namespace ns and waits for it;
// sockets fn creates stay in ns. The thread stays locked, so Go discards it
// afterwards instead of reusing it in the wrong namespace.
func Do(t *testing.T, ns string, fn func()) {
	t.Helper()
	done := make(chan error)
	go func() {
		runtime.LockOSThread()
		target, err := netns.GetFromName(ns)
		if err == nil {
			defer target.Close()
			err = netns.Set(target)
		}
		if err == nil {
			fn()
		}
		done <- err
	}()
	if err := <-done; err != nil {
		t.Fatalf("enter namespace %s: %v", ns, err)
	}
}
