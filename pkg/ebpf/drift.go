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
// comparison in memory runs under the lock Sync holds. It compares digests
// (count and sum of entry hashes per map), not copies: a copy of the maps
// was 26 MB of garbage per check at 10,000 Services, which kept the agent's
// resident memory at rest well above its live heap. A Sync that writes
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
	got := make([]digest, len(rec.maps))
	for i, m := range rec.maps {
		d, err := m.digestKernel()
		if err != nil {
			return false, fmt.Errorf("compare ebpf maps with what was written: %w", err)
		}
		got[i] = d
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if rec.writes != writes || rec.written == nil {
		return false, nil
	}
	drift := false
	for i, m := range rec.maps {
		drift = drift || m.digest(rec.written) != got[i]
	}
	if !drift {
		return false, nil
	}
	rec.written = nil
	b.log.Warn("svcnat's ebpf maps changed outside svcnat; the next sync repairs them")
	return true, nil
}
