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
// The nodes, their pods, the router and the far client are dual-stack:
// IPv4 as above, IPv6 below (the LAN client and the second uplink stay
// IPv4-only); the apiserver allocates ClusterIPs of both families.
//
//	LAN          fd00:77::/64      node N ::(10+N) (hex), router ::fe
//	pods         fd00:244:N::/64   node N; gateway ::1, pods ::a upwards;
//	                               ov0 fd00:244:N::/128
//	far          fd00:76::/64      router ::fe, far client ::100
//	services     fd00:96::/112
var (
	Uplink2Prefix = netip.MustParsePrefix("192.168.79.0/24")
	RouterIP      = netip.MustParseAddr("192.168.77.254")
	FarPrefix     = netip.MustParsePrefix("192.168.76.0/24")
	FarClientIP   = netip.MustParseAddr("192.168.76.100")

	LANPrefix6   = netip.MustParsePrefix("fd00:77::/64")
	RouterIP6    = netip.MustParseAddr("fd00:77::fe")
	FarPrefix6   = netip.MustParsePrefix("fd00:76::/64")
	FarClientIP6 = netip.MustParseAddr("fd00:76::100")
	ClusterCIDR6 = netip.MustParsePrefix("fd00:244::/48")
	ServiceCIDR6 = netip.MustParsePrefix("fd00:96::/112")
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

// buildIPv6 adds the IPv6 half of the hard network to what buildHardNode
// and buildRouter made.
func (c *Cluster) buildIPv6() error {
	withLast := func(p netip.Prefix, last byte) netip.Addr {
		b := p.Addr().As16()
		b[15] = last
		return netip.AddrFrom16(b)
	}
	addr := func(a netip.Addr, bits int, dev string) []string {
		return []string{"ip", "-6", "addr", "add", netip.PrefixFrom(a, bits).String(), "dev", dev, "nodad"}
	}
	for i, n := range c.Nodes {
		b := ClusterCIDR6.Addr().As16()
		b[5] = byte(i + 1)
		n.PodCIDR6 = netip.PrefixFrom(netip.AddrFrom16(b), 64)
		n.IP6 = withLast(LANPrefix6, n.IP.As4()[3])
	}
	for _, n := range c.Nodes {
		cmds := [][]string{
			{"sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"},
			addr(n.IP6, LANPrefix6.Bits(), "eth0"),
			addr(n.PodCIDR6.Addr(), 128, "ov0"),
			{"ip", "-6", "route", "add", FarPrefix6.String(), "via", RouterIP6.String()},
		}
		for _, o := range c.Nodes {
			if o != n {
				cmds = append(cmds, []string{"ip", "-6", "route", "add", o.PodCIDR6.String(), "via", o.PodCIDR6.Addr().String(), "dev", "ov0", "onlink"})
			}
		}
		gw := withLast(n.PodCIDR6, 1)
		for j, p := range n.Pods {
			p.IP6 = withLast(n.PodCIDR6, byte(10+j))
			hostSide := "p-" + string(rune('a'+j))
			cmds = append(cmds, addr(gw, 128, hostSide),
				[]string{"ip", "-6", "route", "add", p.IP6.String() + "/128", "dev", hostSide})
			if err := nsRun(p.Netns, addr(p.IP6, 128, "eth0"),
				[]string{"ip", "-6", "route", "add", gw.String(), "dev", "eth0"},
				[]string{"ip", "-6", "route", "add", "default", "via", gw.String(), "dev", "eth0"},
			); err != nil {
				return fmt.Errorf("address pod %s (IPv6): %w", p.Name, err)
			}
		}
		if err := nsRun(n.Netns, cmds...); err != nil {
			return fmt.Errorf("build IPv6 of %s: %w", n.Name, err)
		}
	}
	if err := nsRun(c.Router,
		[]string{"sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"},
		addr(RouterIP6, LANPrefix6.Bits(), "eth0"),
		addr(withLast(FarPrefix6, 0xfe), FarPrefix6.Bits(), "rc0"),
	); err != nil {
		return fmt.Errorf("build router (IPv6): %w", err)
	}
	if err := nsRun(c.FarClient, addr(FarClientIP6, FarPrefix6.Bits(), "eth0"),
		[]string{"ip", "-6", "route", "add", "default", "via", withLast(FarPrefix6, 0xfe).String()},
	); err != nil {
		return fmt.Errorf("build far client (IPv6): %w", err)
	}
	return nil
}

// dualStack reports whether the test bed has IPv6 (HardNetwork).
func (c *Cluster) dualStack() bool { return len(c.Nodes) > 0 && c.Nodes[0].IP6.IsValid() }

// serviceCIDRs is the apiserver's --service-cluster-ip-range.
func (c *Cluster) serviceCIDRs() string {
	if c.dualStack() {
		return ServiceCIDR.String() + "," + ServiceCIDR6.String()
	}
	return ServiceCIDR.String()
}

// clusterCIDRs is the proxies' --cluster-cidr.
func (c *Cluster) clusterCIDRs() string {
	if c.dualStack() {
		return ClusterCIDR.String() + "," + ClusterCIDR6.String()
	}
	return ClusterCIDR.String()
}
