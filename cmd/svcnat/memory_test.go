package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"sync/atomic"
	"testing"
	"time"
)

// TestMemoryPolicy checks the documented default: GOGC=50 unless the GOGC
// environment variable says otherwise.
func TestMemoryPolicy(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	t.Setenv("GOGC", "")
	if err := os.Unsetenv("GOGC"); err != nil {
		t.Fatal(err)
	}
	debug.SetGCPercent(100)
	setMemoryPolicy()
	if got := debug.SetGCPercent(100); got != defaultGCPercent {
		t.Errorf("without GOGC: GC percent %d, want %d", got, defaultGCPercent)
	}
	t.Setenv("GOGC", "200")
	debug.SetGCPercent(200) // as the runtime read it at start
	setMemoryPolicy()
	if got := debug.SetGCPercent(100); got != 200 {
		t.Errorf("with GOGC=200: GC percent %d, want 200 left alone", got)
	}
}

// TestReleaseAfterFirstSync checks that the memory is returned once the
// first sync is done, not before, and that an ended context stops the wait.
func TestReleaseAfterFirstSync(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var synced, checks atomic.Int32
	done := make(chan struct{})
	go func() {
		releaseAfterFirstSync(t.Context(), time.Millisecond, func() bool { checks.Add(1); return synced.Load() == 1 }, log)
		close(done)
	}()
	for checks.Load() < 3 {
		time.Sleep(time.Millisecond)
	}
	select {
	case <-done:
		t.Fatal("returned before the first sync")
	default:
	}
	synced.Store(1)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("did not return after the first sync")
	}

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	stopped := make(chan struct{})
	go func() {
		releaseAfterFirstSync(ctx, time.Hour, func() bool { return false }, log)
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("did not return when the context ended")
	}
}
