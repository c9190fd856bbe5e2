//go:build linux

package testbed

import (
	"context"
	"fmt"
	"path/filepath"
	"time"
)

// ReplaceProxy stops the proxy on node n with SIGTERM (what it programmed
// stays in the kernel, as when its DaemonSet pod is deleted) and starts one
// of kind in its place, svcnat with the extra run flags, waiting until it is
// healthy. The old proxy's removal at Close still runs (svcnat cleanup,
// for svcnat).
func (c *Cluster) ReplaceProxy(ctx context.Context, n *Node, kind ProxyKind, extra ...string) error {
	if kind.IsSvcnat() && c.Binaries.Svcnat == "" {
		return fmt.Errorf("replace proxy on %s with %s: no svcnat binary", n.Name, kind)
	}
	p := &Proxy{Kind: kind, Node: n, Extra: extra, c: c}
	if kind == SvcnatEBPF {
		pins, cgroups, err := c.ebpfMounts()
		if err != nil {
			return fmt.Errorf("replace proxy on %s with %s: %w", n.Name, kind, err)
		}
		p.PinDir = filepath.Join(pins, n.Netns)
		p.cgroupPath = filepath.Join(cgroups, filepath.Base(n.Cgroup))
	}
	if n.Proxy != nil {
		n.Proxy.Stop()
	}
	n.Proxy = p
	c.onClose(p.remove)
	if err := p.launch(); err != nil {
		return err
	}
	return p.WaitHealthy(ctx, 60*time.Second)
}
