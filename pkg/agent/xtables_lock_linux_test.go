//go:build linux

package agent

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/iptables"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// realIptables returns an initialised iptables backend of the test's
// namespace, cleaned up when the test ends.
func realIptables(t *testing.T, mode string, log *slog.Logger) *iptables.Backend {
	t.Helper()
	b, err := iptables.New(iptables.Options{Mode: mode, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Cleanup(context.Background()) })
	return b
}

// TestXtablesLockHeld runs the agent with the real legacy iptables backend
// while another process holds the xtables lock for 30 s (review finding
// 9): every sync waits for it a bounded time (iptables.LockWait), fails
// with a log line naming the wait and the holder, and is retried with
// back-off; /livez turns unhealthy once work waited past its timeout; once
// the lock is free the next retry programs the rules and health recovers.
func TestXtablesLockHeld(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	// A lock file of the test's own, so no other iptables user on the
	// machine waits for this test (iptables honours XTABLES_LOCKFILE).
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	t.Setenv("XTABLES_LOCKFILE", lock)
	var logs lockedBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	b := realIptables(t, iptables.ModeLegacy, log)

	const held = 30 * time.Second
	holder := exec.Command("flock", "-x", lock, "sleep", strconv.Itoa(int(held.Seconds())))
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })
	for deadline := time.Now().Add(5 * time.Second); ; {
		locks, _ := os.ReadFile("/proc/locks")
		if strings.Contains(string(locks), " "+strconv.Itoa(holder.Process.Pid)+" ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("flock did not take the lock")
		}
		time.Sleep(10 * time.Millisecond)
	}
	lockedAt := time.Now()

	src := newFakeSources()
	close(src.synced)
	src.put(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"},
			Ports: []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP}}},
	})
	const syncPeriod = 4 * time.Second // health times out after 8 s
	a := New(b, src, Options{SyncPeriod: syncPeriod, RetryBackoff: time.Second, BackendName: "iptables", Logger: log})
	done := make(chan error, 1)
	go func() { done <- a.Run(t.Context()) }()

	sawUnhealthy := time.Duration(0)
	var recovered time.Duration
	for deadline := lockedAt.Add(held + 15*time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		st := a.Health().Status()
		since := time.Since(lockedAt)
		if !st.Healthy && sawUnhealthy == 0 {
			sawUnhealthy = since
		}
		if st.Healthy && !st.LastUpdated.IsZero() {
			recovered = since
			break
		}
	}
	out := logs.String()
	failures := strings.Count(out, "waited for the xtables lock in vain")
	t.Logf("lock held %v: %d syncs gave up waiting, unhealthy after %v, synced after %v", held, failures, sawUnhealthy, recovered)
	if recovered < held || recovered > held+2*iptables.LockWait+syncPeriod {
		t.Errorf("first successful sync %v after the lock was taken, want soon after it is released (%v)", recovered, held)
	}
	// Each sync gives up after LockWait, so a held lock of 30 s costs at
	// most 30/5 attempts and at least a few.
	if max := int(held / iptables.LockWait); failures < 3 || failures > max {
		t.Errorf("%d syncs gave up waiting for the lock, want 3..%d (each bounded by %v)", failures, max, iptables.LockWait)
	}
	if !strings.Contains(out, "holder=\"pid "+strconv.Itoa(holder.Process.Pid)+" (flock)\"") {
		t.Errorf("no log line names the lock holder (pid %d):\n%s", holder.Process.Pid, out)
	}
	if !strings.Contains(out, "retryIn=") || !strings.Contains(out, "held the xtables lock for more than 5s") {
		t.Errorf("no retry logged with the lock error:\n%s", out)
	}
	if sawUnhealthy == 0 || sawUnhealthy > 2*syncPeriod+iptables.LockWait+time.Second {
		t.Errorf("health turned unhealthy after %v, want within %v of the lock", sawUnhealthy, 2*syncPeriod+iptables.LockWait)
	}
	if st, err := b.Dump(t.Context()); err != nil || len(st.ServicePorts) != 1 {
		t.Errorf("after the lock was released: dump %v, %v; want the Service programmed; log:\n%s", st, err, out)
	}
}
