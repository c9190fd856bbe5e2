// Package dataplane defines what a svcnat backend is: the one place that
// writes Service translation into the kernel.
package dataplane

import (
	"context"

	"github.com/svcnat/svcnat/pkg/model"
)

// Backend programs a model.State into the kernel of the node it runs on.
// Implementations are not safe for concurrent use; the sync loop serialises
// calls.
type Backend interface {
	// Init prepares the host (hooks, jump rules, pinned maps) and adopts what
	// a previous run left programmed, without removing it: traffic through
	// Services keeps flowing while the agent restarts. Idempotent.
	Init(ctx context.Context) error
	// Sync makes the kernel match s. It writes only what differs from the
	// last successful Sync, and rewrites everything after a failure.
	// Idempotent and safe to retry. On error, what was programmed before is
	// either kept or replaced whole per ServicePort, never half-written.
	Sync(ctx context.Context, s *model.State) error
	// Dump reads back from the kernel what is programmed, without relying on
	// the backend's memory, so that another process can call it.
	Dump(ctx context.Context) (*model.State, error)
	// Cleanup removes everything svcnat installed and nothing else.
	// Removing what is already gone is not an error.
	Cleanup(ctx context.Context) error
}
