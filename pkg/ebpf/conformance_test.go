package ebpf

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/dataplane/conformance"
	"github.com/svcnat/svcnat/pkg/model"
)

// TestConformanceFakeKernel runs the dataplane conformance suite on the
// eBPF backend's planner and codec (the reconciler, encode and decode) over
// the in-memory maps of a fakeKernel, which check the datapath's invariant
// after every write: no root, no kernel. TestConformance runs the same
// suite on the kernel, with programs, pins and hooks.
func TestConformanceFakeKernel(t *testing.T) {
	k := newFakeKernel(1 << 16)
	inconsistent := k.checkDatapath()
	conformance.Run(t, func(t *testing.T) dataplane.Backend {
		return &fakeBackend{k: k, inconsistent: inconsistent}
	})
}

// fakeBackend is Backend's part above the kernel layer, over a fakeKernel
// that every fakeBackend of a test shares, as backends share the pinned
// maps: Init starts a reconciler that adopts what the maps hold, Sync is
// the reconciler's, Dump decodes the maps, and Cleanup empties them, as
// removing the pins does.
type fakeBackend struct {
	k            *fakeKernel
	inconsistent func() error
	rec          *reconciler
}

func (b *fakeBackend) Init(context.Context) error {
	if b.rec == nil {
		b.rec = &reconciler{maps: b.k.maps}
	}
	return nil
}

func (b *fakeBackend) Sync(_ context.Context, s *model.State) error {
	if b.rec == nil {
		return errors.New("sync: Init has not run")
	}
	if err := b.rec.sync(s); err != nil {
		return err
	}
	if err := b.inconsistent(); err != nil {
		return fmt.Errorf("the datapath saw a half-written Service: %w", err)
	}
	return nil
}

func (b *fakeBackend) Dump(context.Context) (*model.State, error) {
	s, _, err := readState(b.k.maps)
	return s, err
}

func (b *fakeBackend) Cleanup(context.Context) error {
	for _, empty := range b.k.clears {
		empty()
	}
	b.rec = nil
	return nil
}
