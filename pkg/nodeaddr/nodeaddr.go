//go:build linux

// Package nodeaddr follows the addresses of the network namespace the agent
// runs in: NodePorts open on them.
package nodeaddr

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
)

// List returns every address on every interface of this network namespace,
// sorted, without duplicates. Which of them NodePorts use (not loopback, not
// link-local, inside --nodeport-addresses) is the model's decision.
func List() ([]netip.Addr, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list interface addresses: %w", err)
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out = append(out, ip.Unmap())
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out), nil
}

// Watcher keeps the current addresses and reports changes.
type Watcher struct {
	log      *slog.Logger
	onChange func()

	mu    sync.Mutex
	addrs []netip.Addr
}

// Watch lists the addresses, then follows netlink address notifications
// until ctx ends, calling onChange (which must not block) whenever the set
// of addresses changed. If the subscription breaks, it subscribes again.
func Watch(ctx context.Context, log *slog.Logger, onChange func()) (*Watcher, error) {
	w := &Watcher{log: log, onChange: onChange}
	ch, err := w.subscribe(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := w.refresh(); err != nil {
		return nil, err
	}
	go w.follow(ctx, ch)
	return w, nil
}

// Current returns the addresses last seen. The slice must not be modified.
func (w *Watcher) Current() []netip.Addr {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.addrs
}

func (w *Watcher) subscribe(ctx context.Context) (chan netlink.AddrUpdate, error) {
	ch := make(chan netlink.AddrUpdate, 64)
	err := netlink.AddrSubscribeWithOptions(ch, ctx.Done(), netlink.AddrSubscribeOptions{
		ErrorCallback: func(err error) {
			if ctx.Err() == nil { // closing the subscription on shutdown fails its last read
				w.log.Error("address subscription", "err", err)
			}
		},
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe to address changes: %w", err)
	}
	return ch, nil
}

// refresh lists the addresses again and reports whether they changed.
func (w *Watcher) refresh() (bool, error) {
	addrs, err := List()
	if err != nil {
		return false, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	changed := !slices.Equal(addrs, w.addrs)
	w.addrs = addrs
	return changed, nil
}

func (w *Watcher) follow(ctx context.Context, ch chan netlink.AddrUpdate) {
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-ch:
			if !ok {
				// The subscription ended (socket error): subscribe again,
				// then list, since changes may have been missed.
				if ch = w.resubscribe(ctx); ch == nil {
					return
				}
			}
			// Updates come in bursts; listing again is the truth.
			changed, err := w.refresh()
			if err != nil {
				w.log.Error("refresh node addresses", "err", err)
				continue
			}
			if changed {
				w.log.Info("node addresses changed", "addresses", w.Current())
				w.onChange()
			}
		}
	}
}

// resubscribe retries every second until it subscribed (or ctx ended: nil).
func (w *Watcher) resubscribe(ctx context.Context) chan netlink.AddrUpdate {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
		ch, err := w.subscribe(ctx)
		if err == nil {
			return ch
		}
		w.log.Error("resubscribe to address changes", "err", err)
	}
}
