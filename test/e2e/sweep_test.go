//go:build linux && e2e

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
)

// TestSweepDeadRun kills a test bed with SIGKILL while a pod process runs
// that dropped its privileges (as postgres does, which clears Pdeathsig),
// and checks that the next test bed's start removes what the dead one
// left: that process, its network namespaces and its /etc/netns files.
func TestSweepDeadRun(t *testing.T) {
	if os.Getenv("SVCNAT_SWEEP_HELPER") == "1" {
		deadRun(t)
		return
	}
	b := binaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestSweepDeadRun$", "-test.v")
	cmd.Env = append(os.Environ(), "SVCNAT_SWEEP_HELPER=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var prefix string
	var orphan int
	for sc := bufio.NewScanner(out); sc.Scan(); {
		if _, err := fmt.Sscanf(sc.Text(), "READY %s %d", &prefix, &orphan); err == nil {
			break
		}
		t.Log("helper:", sc.Text())
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if orphan == 0 {
		t.Fatal("the helper test bed did not come up")
	}
	if !alive(orphan) {
		t.Fatalf("pid %d died with its test bed: the test no longer models a process without Pdeathsig", orphan)
	}

	startCluster(t, t.Context(), b, testbed.Options{Nodes: 1, PodsPerNode: 1})
	deadline := time.Now().Add(5 * time.Second)
	for alive(orphan) && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if alive(orphan) {
		t.Errorf("pid %d of the dead run %s still runs after the next start", orphan, prefix)
	}
	if left, _ := filepath.Glob(filepath.Join("/etc/netns", prefix+"-*")); len(left) > 0 {
		t.Errorf("/etc/netns files of the dead run remain: %v", left)
	}
	if out, err := exec.Command("ip", "netns", "list").Output(); err != nil || strings.Contains(string(out), prefix+"-") {
		t.Errorf("network namespaces of the dead run remain (%v):\n%s", err, out)
	}
}

// alive reports whether pid is the orphan: a sleep still running.
func alive(pid int) bool {
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return err == nil && strings.TrimSpace(string(comm)) == "sleep"
}

// deadRun is the helper process: a test bed with a pod process running as
// nobody, reported on stdout; then it waits to be killed.
func deadRun(t *testing.T) {
	b := binaries(t)
	c, err := testbed.Start(t.Context(), testbed.Options{Nodes: 1, PodsPerNode: 1, Binaries: b})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close() // only if the parent's deadline passes first
	p := c.Nodes[0].Pods[0]
	if err := c.SetHosts(p, map[string]netip.Addr{"db": netip.MustParseAddr("10.96.0.10")}); err != nil {
		t.Fatal(err)
	}
	proc, err := c.StartInPod(p, "orphan", "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sleep", "120")
	if err != nil {
		t.Fatal(err)
	}
	for !alive(proc.PID()) { // ip netns exec and setpriv exec it in turn
		if proc.Exited() {
			t.Fatalf("the pod process ended:\n%s", proc.Tail(10))
		}
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Printf("READY %s %d\n", c.Prefix, proc.PID())
	time.Sleep(time.Minute)
}
