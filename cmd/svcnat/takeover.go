package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/takeover"
)

// takeOverKubeProxy is the one value --take-over-from takes.
const takeOverKubeProxy = "kube-proxy"

// takeoverBackend is a backend that, once it has programmed a state and
// reads it back from the kernel unchanged, removes kube-proxy's rules
// (package takeover), and removes them again, at most every period, when
// they reappear (a kube-proxy still running puts them back). Conntrack is
// left alone, so connections kube-proxy translated keep working; new ones
// meet only svcnat's dataplane.
type takeoverBackend struct {
	dataplane.Backend
	log    *slog.Logger
	period time.Duration
	remove func(context.Context, *slog.Logger) (takeover.Removed, error)
	// verified is set once a Sync read back equal, took once a removal
	// succeeded; last is when a removal was last tried.
	verified, took bool
	last           time.Time
}

// withTakeover wraps b for --take-over-from; an empty from leaves b as is.
func withTakeover(b dataplane.Backend, from string, period time.Duration, log *slog.Logger) (dataplane.Backend, error) {
	switch from {
	case "":
		return b, nil
	case takeOverKubeProxy:
		return &takeoverBackend{Backend: b, log: log.With("takeOverFrom", from), period: period, remove: takeover.Remove}, nil
	}
	return nil, fmt.Errorf("--take-over-from %q: want kube-proxy", from)
}

// Sync programs s; after a successful Sync it checks the dataplane and takes
// over, as the type says. A failed check or removal is logged and tried
// again later; it never fails the sync.
func (b *takeoverBackend) Sync(ctx context.Context, s *model.State) error {
	if err := b.Backend.Sync(ctx, s); err != nil {
		return err
	}
	if !b.verified {
		got, err := b.Backend.Dump(ctx)
		if err != nil {
			b.log.Warn("take-over postponed: cannot read the dataplane back", "err", err)
			return nil
		}
		if diff := model.Diff(s, got); len(diff) > 0 {
			b.log.Warn("take-over postponed: the dataplane does not read back as programmed", "differences", len(diff), "first", diff[0])
			return nil
		}
		b.verified = true
		b.log.Info("dataplane programmed and read back; removing kube-proxy's rules", "servicePorts", len(s.ServicePorts))
	} else if time.Since(b.last) < b.period {
		return nil
	}
	r, err := b.remove(ctx, b.log)
	b.last = time.Now()
	switch {
	case err != nil:
		b.log.Error("remove kube-proxy's rules", "err", err, "jumps", r.Jumps, "chains", r.Chains, "nftTables", r.NftTables)
	case !b.took:
		b.took = true
		b.log.Info("took over from kube-proxy", "jumps", r.Jumps, "chains", r.Chains, "nftTables", r.NftTables)
	case r.Any():
		b.log.Warn("kube-proxy's rules reappeared and were removed again: stop kube-proxy on this node",
			"jumps", r.Jumps, "chains", r.Chains, "nftTables", r.NftTables)
	}
	return nil
}
