//go:build linux

package testbed

import (
	"errors"
	"fmt"
	"path/filepath"
)

// PID returns the process id of the running proxy, or 0 when none runs.
func (p *Proxy) PID() int {
	if !p.Running() {
		return 0
	}
	return p.proc.PID()
}

// StopProxies stops the proxy on every node, removes what it installed
// (svcnat cleanup, bpffs pins) and resets netfilter inside each node
// namespace (iptables in both back ends, nftables, conntrack), so another
// proxy can start on a clean node. Nodes without a proxy are only reset.
func (c *Cluster) StopProxies() error {
	var errs []error
	for _, n := range c.Nodes {
		if n.Proxy != nil {
			if err := n.Proxy.remove(); err != nil {
				errs = append(errs, err)
			}
			n.Proxy = nil
		}
		if err := resetNetfilter(n.Netns); err != nil {
			errs = append(errs, fmt.Errorf("reset netfilter on %s: %w", n.Name, err))
		}
	}
	return errors.Join(errs...)
}

// resetNetfilter flushes every iptables table (nf_tables and legacy back
// ends) and the nftables ruleset inside netns, and empties its conntrack
// table. Only ever run on a namespace of the test bed.
func resetNetfilter(netns string) error {
	if netns == "" {
		return errors.New("refusing to reset netfilter outside a namespace")
	}
	script := `set -e
for t in nat filter mangle raw; do
  for x in iptables-nft iptables-legacy ip6tables-nft ip6tables-legacy; do
    $x -t $t -F 2>/dev/null || true; $x -t $t -X 2>/dev/null || true
  done
done
nft flush ruleset
conntrack -F 2>/dev/null || true`
	_, err := run(netns, "sh", "-c", script)
	return err
}

// ebpfMounts returns a bpf filesystem for this run's pins and a view of the
// cgroup v2 hierarchy, both mounted under the run directory the first time.
// /sys/fs/bpf and /sys/fs/cgroup will not do: `ip netns exec` mounts a fresh
// /sys for the process it starts, which hides both from the agent, while the
// run directory stays visible. Node cgroups are direct children of the
// hierarchy's root, so a node's cgroup is <cgroups>/<base name>. The mounts
// are removed on Close, after the proxies.
func (c *Cluster) ebpfMounts() (pins, cgroups string, err error) {
	pins, cgroups = filepath.Join(c.Dir, "bpffs"), filepath.Join(c.Dir, "cgroup2")
	for _, m := range []struct{ dir, fstype string }{{pins, "bpf"}, {cgroups, "cgroup2"}} {
		if _, err := run("", "mountpoint", "-q", m.dir); err == nil {
			continue
		}
		if _, err := run("", "sh", "-c", "mkdir -p "+m.dir+" && mount -t "+m.fstype+" none "+m.dir); err != nil {
			return "", "", fmt.Errorf("mount %s: %w", m.fstype, err)
		}
		c.onClose(func() error {
			if _, err := run("", "umount", m.dir); err != nil {
				return fmt.Errorf("unmount %s: %w", m.dir, err)
			}
			return nil
		})
	}
	return pins, cgroups, nil
}
