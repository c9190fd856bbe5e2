//go:build linux

package testbed

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"
)

// sysctls every node namespace gets: forward packets, send no ICMP redirects
// (a redirect can swallow the reject that follows it, see TESTBED.md), no
// reverse-path filtering. They are set on "all", "default" and every
// interface, since the kernel combines them.
const nodeSysctls = `echo 1 > /proc/sys/net/ipv4/ip_forward
for d in /proc/sys/net/ipv4/conf/*; do echo 0 > $d/send_redirects; echo 0 > $d/rp_filter; done`

func (c *Cluster) addNetns(name string) error {
	if _, err := run("", "ip", "netns", "add", name); err != nil {
		return fmt.Errorf("create network namespace: %w", err)
	}
	c.onClose(func() error {
		if _, err := run("", "ip", "netns", "del", name); err != nil {
			return fmt.Errorf("delete network namespace: %w", err)
		}
		return nil
	})
	_, err := run(name, "ip", "link", "set", "lo", "up")
	return err
}

// nsRun runs a list of commands inside a namespace, stopping at the first
// failure.
func nsRun(netns string, cmds ...[]string) error {
	for _, cmd := range cmds {
		if _, err := run(netns, cmd...); err != nil {
			return err
		}
	}
	return nil
}

// cgroupRoot returns the cgroup v2 hierarchy: /sys/fs/cgroup/unified on a
// hybrid layout, /sys/fs/cgroup on a unified one.
func cgroupRoot() (string, error) {
	for _, d := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		if _, err := os.Stat(filepath.Join(d, "cgroup.procs")); err != nil {
			continue
		}
		if _, err := os.Stat(filepath.Join(d, "cgroup.max.depth")); err == nil {
			return d, nil
		}
	}
	return "", fmt.Errorf("find a cgroup v2 hierarchy: none under /sys/fs/cgroup")
}

func (c *Cluster) addCgroup(name string) (string, error) {
	root, err := cgroupRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cgroup: %w", err)
	}
	c.onClose(func() error { return removeCgroup(dir) })
	return dir, nil
}

// removeCgroup removes an empty cgroup, giving processes 5 s to leave it
// after being killed. A cgroup already gone is not an error.
func removeCgroup(dir string) error {
	var err error
	for range 50 {
		if err = os.Remove(dir); err == nil || os.IsNotExist(err) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("remove cgroup: %w", err)
}

// buildNetwork makes the LAN, the nodes, their pods and the client.
func (c *Cluster) buildNetwork(o Options) error {
	c.LAN = c.ns("lan")
	if err := c.addNetns(c.LAN); err != nil {
		return err
	}
	if err := nsRun(c.LAN,
		[]string{"ip", "link", "add", "br0", "type", "bridge"},
		[]string{"ip", "link", "set", "br0", "up"},
	); err != nil {
		return fmt.Errorf("build lan: %w", err)
	}
	for i := 1; i <= o.Nodes; i++ {
		n := &Node{
			Name:    fmt.Sprintf("node%d", i),
			IP:      netip.AddrFrom4([4]byte{192, 168, 77, byte(10 + i)}),
			PodCIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24),
			Zone:    fmt.Sprintf("zone-%c", 'a'+i-1),
		}
		n.Netns = c.ns(n.Name)
		if err := c.buildNode(n, o); err != nil {
			return fmt.Errorf("build node %s: %w", n.Name, err)
		}
		c.Nodes = append(c.Nodes, n)
	}
	if o.HardNetwork {
		if _, err := run(c.LAN, "sh", "-c", "ip link add br1 type bridge && ip link set br1 up"); err != nil {
			return fmt.Errorf("build second lan: %w", err)
		}
	}
	for _, n := range c.Nodes {
		if o.HardNetwork {
			if err := c.buildHardNode(n); err != nil {
				return fmt.Errorf("build overlay and second uplink of %s: %w", n.Name, err)
			}
		} else {
			for _, o := range c.Nodes {
				if o == n {
					continue
				}
				if _, err := run(n.Netns, "ip", "route", "add", o.PodCIDR.String(), "via", o.IP.String()); err != nil {
					return fmt.Errorf("route pods of %s on %s: %w", o.Name, n.Name, err)
				}
			}
		}
		if _, err := run(n.Netns, "sh", "-c", nodeSysctls); err != nil {
			return fmt.Errorf("set sysctls on %s: %w", n.Name, err)
		}
		if o.HardNetwork {
			// Source validation on the pod-facing interfaces, as CNIs
			// that check pod addresses do (Calico sets rp_filter=1 on its
			// veths; Cilium drops invalid sources on lxc devices).
			if _, err := run(n.Netns, "sh", "-c", "for d in /proc/sys/net/ipv4/conf/p-*; do echo 1 > $d/rp_filter; done"); err != nil {
				return fmt.Errorf("validate pod sources on %s: %w", n.Name, err)
			}
		}
	}
	c.Client = c.ns("client")
	if err := c.addNetns(c.Client); err != nil {
		return err
	}
	if err := c.plugLAN(c.Client, "client", netip.PrefixFrom(ClientIP, LANPrefix.Bits())); err != nil {
		return fmt.Errorf("build client: %w", err)
	}
	if _, err := run(c.Client, "ip", "route", "add", ExternalIPRange.String(), "via", c.Nodes[0].IP.String()); err != nil {
		return fmt.Errorf("route external IPs on the client: %w", err)
	}
	if o.HardNetwork {
		if err := c.buildRouter(); err != nil {
			return err
		}
		return c.buildIPv6()
	}
	return nil
}

// plugLAN connects netns to the LAN bridge with a veth named port on the
// bridge side and eth0 inside netns.
func (c *Cluster) plugLAN(netns, port string, addr netip.Prefix) error {
	return c.plug("br0", port, netns, "eth0", addr)
}

// plug connects netns to a bridge of the LAN namespace with a veth named
// port on the bridge side and ifname inside netns.
func (c *Cluster) plug(bridge, port, netns, ifname string, addr netip.Prefix) error {
	if err := nsRun(c.LAN,
		[]string{"ip", "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", netns},
		[]string{"ip", "link", "set", port, "master", bridge, "up"},
	); err != nil {
		return err
	}
	return nsRun(netns,
		[]string{"ip", "addr", "add", addr.String(), "dev", ifname},
		[]string{"ip", "link", "set", ifname, "up"},
	)
}

func (c *Cluster) buildNode(n *Node, o Options) error {
	if err := c.addNetns(n.Netns); err != nil {
		return err
	}
	if err := c.plugLAN(n.Netns, n.Name, netip.PrefixFrom(n.IP, LANPrefix.Bits())); err != nil {
		return err
	}
	// Locally generated connects to a ClusterIP need a route before any NAT
	// hook runs; use the LAN side so pod traffic leaves by another interface.
	if _, err := run(n.Netns, "ip", "route", "add", ServiceCIDR.String(), "dev", "eth0"); err != nil {
		return err
	}
	var err error
	if n.Cgroup, err = c.addCgroup(n.Netns); err != nil {
		return err
	}
	gw := n.PodCIDR.Addr().Next()
	for j := range o.PodsPerNode {
		letter := string(rune('a' + j))
		p := &Pod{Name: n.Name + "-" + letter, Node: n}
		p.Netns = c.ns(p.Name)
		b := n.PodCIDR.Addr().As4()
		b[3] = byte(10 + j)
		p.IP = netip.AddrFrom4(b)
		if err := c.addNetns(p.Netns); err != nil {
			return err
		}
		hostSide := "p-" + letter
		if err := nsRun(n.Netns,
			[]string{"ip", "link", "add", hostSide, "type", "veth", "peer", "name", "eth0", "netns", p.Netns},
			[]string{"ip", "addr", "add", gw.String() + "/32", "dev", hostSide},
			[]string{"ip", "link", "set", hostSide, "up"},
			[]string{"ip", "route", "add", p.IP.String() + "/32", "dev", hostSide},
		); err != nil {
			return fmt.Errorf("plug pod %s: %w", p.Name, err)
		}
		if err := nsRun(p.Netns,
			[]string{"ip", "addr", "add", p.IP.String() + "/32", "dev", "eth0"},
			[]string{"ip", "link", "set", "eth0", "up"},
			[]string{"ip", "route", "add", gw.String(), "dev", "eth0"},
			[]string{"ip", "route", "add", "default", "via", gw.String(), "dev", "eth0"},
		); err != nil {
			return fmt.Errorf("address pod %s: %w", p.Name, err)
		}
		n.Pods = append(n.Pods, p)
	}
	return nil
}

// StartEcho starts the pod's echo server in its namespace and its node's
// cgroup, listening on ports; Close stops it.
func (c *Cluster) StartEcho(p *Pod, ports PodPorts) error {
	if p.echo != nil {
		return fmt.Errorf("start echo server in %s: already running", p.Name)
	}
	args := []string{c.Binaries.EchoServer, "serve", "-name", p.Name,
		"-tcp", joinInts(ports.TCP), "-udp", joinInts(ports.UDP), "-http", joinInts(ports.HTTP)}
	proc, err := start(procSpec{name: "echo " + p.Name, netns: p.Netns, cgroup: p.Node.Cgroup, args: args, log: c.logPath("echo-" + p.Name)})
	if err != nil {
		return err
	}
	p.echo = proc
	c.onClose(func() error { proc.Stop(stopGrace); return nil })
	// The server logs "serving" once every listener is bound: wait for it,
	// so that no probe meets a port that is not open yet.
	if err := proc.WaitLog("msg=serving", 10*time.Second); err != nil {
		return fmt.Errorf("start echo server in %s: %w", p.Name, err)
	}
	return nil
}

func joinInts(v []int) string {
	s := ""
	for i, x := range v {
		if i > 0 {
			s += ","
		}
		s += fmt.Sprint(x)
	}
	return s
}
