package main

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/takeover"
)

// readBackBackend records what it is given; Dump returns it, or nothing
// while lose is set (a dataplane that did not take the state).
type readBackBackend struct {
	state *model.State
	lose  bool
}

func (b *readBackBackend) Init(context.Context) error { return nil }
func (b *readBackBackend) Sync(_ context.Context, s *model.State) error {
	b.state = s
	return nil
}
func (b *readBackBackend) Dump(context.Context) (*model.State, error) {
	if b.lose {
		return &model.State{}, nil
	}
	return b.state, nil
}
func (b *readBackBackend) Cleanup(context.Context) error { return nil }

func TestTakeoverOnlyAfterReadBack(t *testing.T) {
	inner := &readBackBackend{lose: true}
	dp, err := withTakeover(inner, takeOverKubeProxy, time.Hour, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	removals := 0
	dp.(*takeoverBackend).remove = func(context.Context, *slog.Logger) (takeover.Removed, error) {
		removals++
		return takeover.Removed{Chains: 1}, nil
	}
	name := model.ServicePortName{Namespace: "ns", Name: "web", Family: model.IPv4}
	s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{name: {Name: name, Protocol: "TCP"}}}
	ctx := t.Context()

	if err := dp.Sync(ctx, s); err != nil {
		t.Fatal(err)
	}
	if removals != 0 {
		t.Fatalf("kube-proxy's rules removed although the dataplane did not read back as programmed")
	}
	inner.lose = false
	for range 3 {
		if err := dp.Sync(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	if removals != 1 {
		t.Fatalf("removals after read-back = %d, want 1 (then none until the period passes)", removals)
	}
	dp.(*takeoverBackend).last = time.Now().Add(-2 * time.Hour)
	if err := dp.Sync(ctx, s); err != nil {
		t.Fatal(err)
	}
	if removals != 2 {
		t.Fatalf("removals after the period = %d, want 2", removals)
	}

	if _, err := withTakeover(inner, "kube-router", time.Hour, slog.Default()); err == nil {
		t.Error("--take-over-from kube-router accepted")
	}
	if got, _ := withTakeover(inner, "", time.Hour, slog.Default()); got != inner {
		t.Error("without --take-over-from the backend is wrapped")
	}
}
