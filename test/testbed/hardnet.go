//go:build linux

package testbed

import (
	"fmt"
	"net/netip"
)

// The hard parts of real networks (Options.HardNetwork), inside the test
// bed's namespaces:
//
//	node N ov0      10.244.N.0/32     VXLAN over the LAN (id 1, port 4789)
//	                                  carrying the pod CIDRs, as flannel's
//	                                  flannel.1; routes to other nodes' pods
//	                                  leave through it
//	node N eth1     192.168.79.1N/24  a second uplink on a second bridge,
//	                                  which no route uses until a test
//	                                  points one at it (Cluster.RouteVia)
//	router          192.168.77.254    on the LAN; 192.168.76.254 toward the
//	                                  far client, that side's MTU 1280
//	far client      192.168.76.100    behind the router
//
// The pod-facing interfaces of the nodes validate sources (rp_filter=1).
var (
	Uplink2Prefix = netip.MustParsePrefix("192.168.79.0/24")
	RouterIP      = netip.MustParseAddr("192.168.77.254")
	FarPrefix     = netip.MustParsePrefix("192.168.76.0/24")
	FarClientIP   = netip.MustParseAddr("192.168.76.100")
)

// SmallMTU is the MTU of the router's hop toward the far client.
const SmallMTU = 1280

// buildHardNode gives a node its VXLAN overlay toward every other node,
// routes their pods through it, and plugs its second uplink.
func (c *Cluster) buildHardNode(n *Node) error {
	b := n.PodCIDR.Addr().As4()
	n.OverlayIP = netip.AddrFrom4(b)
	n.Uplink2IP = netip.AddrFrom4([4]byte{192, 168, 79, n.IP.As4()[3]})
	if err := c.plug("br1", "u2-"+n.Name, n.Netns, "eth1", netip.PrefixFrom(n.Uplink2IP, Uplink2Prefix.Bits())); err != nil {
		return err
	}
	cmds := [][]string{{"ip", "link", "add", "ov0", "type", "vxlan", "id", "1", "local", n.IP.String(), "dstport", "4789", "dev", "eth0"}}
	for _, o := range c.Nodes {
		if o != n {
			cmds = append(cmds, []string{"bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "ov0", "dst", o.IP.String()})
		}
	}
	cmds = append(cmds,
		[]string{"ip", "addr", "add", n.OverlayIP.String() + "/32", "dev", "ov0"},
		[]string{"ip", "link", "set", "ov0", "up"},
		[]string{"ip", "route", "add", FarPrefix.String(), "via", RouterIP.String()},
	)
	if err := nsRun(n.Netns, cmds...); err != nil {
		return err
	}
	// Routes to the pods of the nodes built before this one, and theirs
	// to this one's: each node is built once, after the earlier ones.
	for _, o := range c.Nodes {
		if o == n || !o.OverlayIP.IsValid() {
			continue
		}
		for _, r := range [][2]*Node{{n, o}, {o, n}} {
			if err := r[0].RouteVia(r[1], "ov0"); err != nil {
				return err
			}
		}
	}
	return nil
}

// RouteVia routes the node's traffic to other's pods through dev: "ov0"
// (the overlay) or "eth1" (the second uplink). It needs HardNetwork.
func (n *Node) RouteVia(other *Node, dev string) error {
	var via []string
	switch dev {
	case "ov0":
		via = []string{"via", other.OverlayIP.String(), "dev", "ov0", "onlink"}
	case "eth1":
		via = []string{"via", other.Uplink2IP.String(), "dev", "eth1"}
	default:
		return fmt.Errorf("route pods of %s on %s: device %q, want ov0 or eth1", other.Name, n.Name, dev)
	}
	if _, err := run(n.Netns, append([]string{"ip", "route", "replace", other.PodCIDR.String()}, via...)...); err != nil {
		return fmt.Errorf("route pods of %s on %s via %s: %w", other.Name, n.Name, dev, err)
	}
	return nil
}

// buildRouter puts the router on the LAN and the far client behind it.
func (c *Cluster) buildRouter() error {
	c.Router, c.FarClient = c.ns("router"), c.ns("far")
	for _, ns := range []string{c.Router, c.FarClient} {
		if err := c.addNetns(ns); err != nil {
			return err
		}
	}
	if err := c.plugLAN(c.Router, "router", netip.PrefixFrom(RouterIP, LANPrefix.Bits())); err != nil {
		return fmt.Errorf("build router: %w", err)
	}
	gw := FarPrefix.Addr().As4()
	gw[3] = 254
	if err := nsRun(c.Router,
		[]string{"ip", "link", "add", "rc0", "type", "veth", "peer", "name", "eth0", "netns", c.FarClient},
		[]string{"ip", "addr", "add", netip.PrefixFrom(netip.AddrFrom4(gw), FarPrefix.Bits()).String(), "dev", "rc0"},
		[]string{"ip", "link", "set", "rc0", "mtu", fmt.Sprint(SmallMTU), "up"},
		[]string{"ip", "route", "add", ExternalIPRange.String(), "via", c.Nodes[0].IP.String()},
		[]string{"sh", "-c", nodeSysctls},
	); err != nil {
		return fmt.Errorf("build router: %w", err)
	}
	if err := nsRun(c.FarClient,
		[]string{"ip", "addr", "add", netip.PrefixFrom(FarClientIP, FarPrefix.Bits()).String(), "dev", "eth0"},
		[]string{"ip", "link", "set", "eth0", "up"},
		[]string{"ip", "route", "add", "default", "via", netip.AddrFrom4(gw).String()},
	); err != nil {
		return fmt.Errorf("build far client: %w", err)
	}
	return nil
}

// FarClientOrigin returns the client behind the router as a traffic source.
func (c *Cluster) FarClientOrigin() Origin {
	return Origin{Name: "far-client", Netns: c.FarClient, IP: FarClientIP}
}
