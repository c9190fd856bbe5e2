// Package dataplane defines what a svcnat backend is: the one place that
// writes Service translation into the kernel.
package dataplane

import (
	"context"
	"fmt"
	"slices"
	"strings"

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
	// Sync makes the kernel match s. When s.Change is set, it looks only
	// at the ServicePorts it names, relative to the last successful Sync:
	// its cost follows the change, not the state. A Change that names none
	// is the periodic reconcile: it checks that the kernel still holds what
	// was written and repairs what differs. Without a Change, Sync compares
	// everything. It writes only what differs, and rewrites everything
	// after a failure. Idempotent and safe to retry. Sync does not modify
	// s, and the caller does not modify the ServicePorts of s afterwards
	// (it replaces them), so a backend may keep pointers to them. On error, what was programmed before is
	// either kept or replaced whole per ServicePort, never half-written.
	//
	// A ServicePort the backend cannot program (a full map, say) fails
	// alone: Sync programs every other one and returns PortErrors naming
	// the failed ones. Any other error means the sync as a whole failed.
	Sync(ctx context.Context, s *model.State) error
	// Dump reads back from the kernel what is programmed, without relying on
	// the backend's memory, so that another process can call it.
	Dump(ctx context.Context) (*model.State, error)
	// Cleanup removes everything svcnat installed and nothing else.
	// Removing what is already gone is not an error.
	Cleanup(ctx context.Context) error
}

// PortErrors is what Sync returns when some ServicePorts could not be
// programmed and every other one was: the reason for each failed one. A
// failed ServicePort holds nothing in the kernel (its traffic is not
// translated), so that Dump and dump --check show it missing.
type PortErrors map[model.ServicePortName]error

// Error lists the failed ServicePorts in name order.
func (e PortErrors) Error() string {
	names := make([]model.ServicePortName, 0, len(e))
	for n := range e {
		names = append(names, n)
	}
	slices.SortFunc(names, model.ServicePortName.Compare)
	parts := make([]string, len(names))
	for i, n := range names {
		parts[i] = fmt.Sprintf("%s: %v", n, e[n])
	}
	return fmt.Sprintf("%d service ports not programmed: %s", len(e), strings.Join(parts, "; "))
}

// Changed is how many ServicePorts s.Change names, or "all" without one,
// for logs.
func Changed(s *model.State) string {
	if s.Change == nil {
		return "all"
	}
	return fmt.Sprint(len(s.Change.Updated) + len(s.Change.Removed))
}
