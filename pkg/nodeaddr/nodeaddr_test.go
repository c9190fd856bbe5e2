//go:build linux

package nodeaddr

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
)

func TestWatchFollowsAddresses(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changes := make(chan struct{}, 16)
	w, err := Watch(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), func() { changes <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	lo := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")}
	slices.SortFunc(lo, netip.Addr.Compare)
	if got := w.Current(); !slices.Equal(got, lo) {
		t.Fatalf("addresses of a new namespace: %v, want %v", got, lo)
	}

	netnstest.Run(t, "", "ip", "link", "add", "nav0", "type", "veth", "peer", "name", "nav1")
	netnstest.Run(t, "", "ip", "addr", "add", "192.0.2.10/24", "dev", "nav0")
	want := netip.MustParseAddr("192.0.2.10")
	waitFor(t, changes, func() bool { return slices.Contains(w.Current(), want) }, "192.0.2.10 to appear")

	netnstest.Run(t, "", "ip", "addr", "del", "192.0.2.10/24", "dev", "nav0")
	waitFor(t, changes, func() bool { return !slices.Contains(w.Current(), want) }, "192.0.2.10 to go")
}

func waitFor(t *testing.T, changes chan struct{}, cond func() bool, what string) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case <-changes:
			if cond() {
				return
			}
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}
