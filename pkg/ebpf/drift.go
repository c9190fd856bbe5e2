//go:build linux

package ebpf

import (
	"context"
	"fmt"
)

// CheckDrift compares the desired-state maps in the kernel with what the
// reconciler last wrote and reports whether something else changed them;
// the next Sync (with any Change, an empty one too) then compares
// everything and repairs it. The agent runs it beside the sync loop every
// --sync-period (agent.DriftChecker), so that reading the maps back (about
// 0.2 s of CPU at 10,000 Services) never holds up a change: only the
// comparison in memory runs under the lock Sync holds. A Sync that writes
// while the maps are read makes the read inconclusive (the kernel may show
// the entries before or after that write): no drift is reported, and the
// next check reads again. Before the first successful Sync, and after a
// failed one, there is nothing to compare (the next Sync compares
// everything anyway). It never writes to the kernel.
func (b *Backend) CheckDrift(ctx context.Context) (bool, error) {
	b.checking.Lock() // Close waits for a running check
	defer b.checking.Unlock()
	b.mu.Lock()
	rec := b.rec
	if rec == nil || rec.written == nil {
		b.mu.Unlock()
		return false, nil
	}
	writes := rec.writes
	b.mu.Unlock()
	cur, err := readTable(rec.maps)
	if err != nil {
		return false, fmt.Errorf("compare ebpf maps with what was written: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if rec.writes != writes || rec.written == nil || cur.equal(rec.written) {
		return false, nil
	}
	rec.written = nil
	b.log.Warn("svcnat's ebpf maps changed outside svcnat; the next sync repairs them")
	return true, nil
}
