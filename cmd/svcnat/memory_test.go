package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync/atomic"
	"testing"
	"time"
)

// TestMemoryPolicy checks the documented default: GOGC=50 (and
// releaseMemory) unless the GOGC environment variable says otherwise.
func TestMemoryPolicy(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	t.Setenv("GOGC", "")
	if err := os.Unsetenv("GOGC"); err != nil {
		t.Fatal(err)
	}
	debug.SetGCPercent(100)
	if !setMemoryPolicy() {
		t.Error("without GOGC: policy not applied")
	}
	if got := debug.SetGCPercent(100); got != defaultGCPercent {
		t.Errorf("without GOGC: GC percent %d, want %d", got, defaultGCPercent)
	}
	t.Setenv("GOGC", "200")
	debug.SetGCPercent(200) // as the runtime read it at start
	if setMemoryPolicy() {
		t.Error("with GOGC=200: policy applied")
	}
	if got := debug.SetGCPercent(100); got != 200 {
		t.Errorf("with GOGC=200: GC percent %d, want 200 left alone", got)
	}
}

// TestReleaseMemory runs releaseMemory against the real runtime, with a
// live heap of 64 MiB: nothing is returned before the first sync; the
// first quiet check after it returns memory (a forced collection); then
// nothing while little is held beyond the live heap; 24 MiB of garbage not
// collected yet is (free memory alone missed it), and so are the 64 MiB a
// burst left free; an ended context stops it.
func TestReleaseMemory(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	forced := func() uint64 {
		s := []metrics.Sample{{Name: "/gc/cycles/forced:gc-cycles"}}
		metrics.Read(s)
		return s[0].Value.Uint64()
	}
	// waitForced waits until the forced collections exceed n, or fails.
	waitForced := func(n uint64, what string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); forced() <= n; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no memory returned %s", what)
			}
		}
	}
	const interval = 5 * time.Millisecond
	quiet := func(what string) {
		t.Helper()
		before := forced()
		time.Sleep(20 * interval)
		if n := forced() - before; n > 0 {
			t.Fatalf("%d collections forced %s", n, what)
		}
	}
	live := make([]byte, 64<<20)
	for i := range live {
		live[i] = 1
	}
	runtime.GC()
	var last atomic.Pointer[time.Time]
	last.Store(&time.Time{})
	ctx, cancel := context.WithCancel(t.Context())
	stopped := make(chan struct{})
	go func() {
		releaseMemory(ctx, interval, func() time.Time { return *last.Load() }, log)
		close(stopped)
	}()
	quiet("before the first sync")
	synced := time.Now().Add(-time.Hour)
	n := forced()
	last.Store(&synced)
	waitForced(n, "after the first sync")
	quiet("with little of the heap free")
	// A sync leaves garbage below the next collection's goal (the heap may
	// grow by half or all of the live heap): it waits uncollected, taking
	// memory.
	n = forced()
	syncing := time.Now().Add(time.Hour) // no release while it runs
	last.Store(&syncing)
	garbage := make([]byte, 24<<20)
	for i := range garbage {
		garbage[i] = 1
	}
	garbage = nil
	last.Store(&synced)
	waitForced(n, "with 24 MiB of garbage not yet collected")
	quiet("once the garbage was collected")
	burst := make([]byte, 64<<20)
	for i := range burst {
		burst[i] = 1
	}
	burst = nil
	runtime.GC()
	if _, beyond := heapLiveBeyond(); beyond < 32<<20 {
		t.Skipf("the runtime returned the burst's memory itself (%d MiB left)", beyond>>20)
	}
	waitForced(forced(), "with the burst's 64 MiB free")
	// The collection counts before FreeOSMemory returns the memory.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		live, beyond := heapLiveBeyond()
		if beyond <= live/4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the release: %d MiB beyond %d MiB live", beyond>>20, live>>20)
		}
	}
	cancel()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("did not return when the context ended")
	}
	runtime.KeepAlive(live)
	runtime.KeepAlive(burst)
	runtime.KeepAlive(garbage)
}
