//go:build linux

package testbed

import (
	"errors"
	"fmt"
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
