//go:build linux

package testbed

import (
	"context"
	"fmt"
	"time"
)

// ReplaceProxy stops the proxy on node n with SIGTERM (what it programmed
// stays in the kernel, as when its DaemonSet pod is deleted) and starts one
// of kind in its place, svcnat with the extra run flags, waiting until it is
// healthy. The old proxy's removal at Close still runs (svcnat cleanup,
// for svcnat).
func (c *Cluster) ReplaceProxy(ctx context.Context, n *Node, kind ProxyKind, extra ...string) error {
	p, err := c.newProxy(kind, n, extra)
	if err != nil {
		return fmt.Errorf("replace proxy on %s with %s: %w", n.Name, kind, err)
	}
	if n.Proxy != nil {
		n.Proxy.Stop()
	}
	n.Proxy = p
	if err := p.launch(); err != nil {
		return err
	}
	return p.WaitHealthy(ctx, 60*time.Second)
}
