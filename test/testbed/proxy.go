//go:build linux

package testbed

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ProxyKind names a proxy implementation the test bed can run on its nodes.
type ProxyKind string

// The proxies the test bed knows.
const (
	SvcnatIptables    ProxyKind = "svcnat-iptables"
	SvcnatEBPF        ProxyKind = "svcnat-ebpf"
	KubeProxyIptables ProxyKind = "kube-proxy-iptables"
	KubeProxyNftables ProxyKind = "kube-proxy-nftables"
)

// ParseProxyKinds parses a comma-separated list of proxy kinds.
func ParseProxyKinds(s string) ([]ProxyKind, error) {
	var out []ProxyKind
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		switch k := ProxyKind(f); k {
		case SvcnatIptables, SvcnatEBPF, KubeProxyIptables, KubeProxyNftables:
			out = append(out, k)
		default:
			return nil, fmt.Errorf("parse proxy kind %q: want one of svcnat-iptables, svcnat-ebpf, kube-proxy-iptables, kube-proxy-nftables", f)
		}
	}
	return out, nil
}

// IsSvcnat reports whether the proxy is svcnat (rather than kube-proxy).
func (k ProxyKind) IsSvcnat() bool { return k == SvcnatIptables || k == SvcnatEBPF }

// HealthzPort is where every proxy serves /healthz inside its node namespace.
const HealthzPort = 10256

// Proxy is a proxy process on one node.
type Proxy struct {
	Kind ProxyKind
	Node *Node
	// PinDir is the bpffs directory of an eBPF proxy.
	PinDir string
	// cgroupPath is the node's cgroup as an eBPF proxy sees it (see
	// ebpfMounts).
	cgroupPath string
	// cgroup is the cgroup v2 directory the proxy runs in, with every
	// process it starts (iptables-restore, ...), so that CPUSeconds counts
	// their CPU as it is spent.
	cgroup string
	c      *Cluster
	proc   *Process
	runs   int

	// Extra are further flags for an svcnat proxy's run command.
	Extra []string
}

// StartProxies starts a proxy of the given kind on every node and waits
// until each reports healthy. Close stops them and removes what they
// installed outside their namespaces.
func (c *Cluster) StartProxies(ctx context.Context, kind ProxyKind) error {
	return c.startProxies(ctx, kind, true)
}

// LaunchProxies is StartProxies without waiting for health, for measuring
// how long a proxy takes from its start to programming the dataplane.
func (c *Cluster) LaunchProxies(ctx context.Context, kind ProxyKind) error {
	return c.startProxies(ctx, kind, false)
}

func (c *Cluster) startProxies(ctx context.Context, kind ProxyKind, wait bool) error {
	for _, n := range c.Nodes {
		p, err := c.newProxy(kind, n, nil)
		if err != nil {
			return fmt.Errorf("start %s on %s: %w", kind, n.Name, err)
		}
		n.Proxy = p
		if err := p.launch(); err != nil {
			return err
		}
		if !wait {
			continue
		}
		if err := p.WaitHealthy(ctx, 60*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// newProxy makes a proxy of kind for node n, svcnat with the extra run
// flags, in a cgroup of its own; Close removes it, after what it installed
// outside its namespace. launch starts it.
func (c *Cluster) newProxy(kind ProxyKind, n *Node, extra []string) (*Proxy, error) {
	if kind.IsSvcnat() && c.Binaries.Svcnat == "" {
		return nil, errors.New("no svcnat binary")
	}
	p := &Proxy{Kind: kind, Node: n, Extra: extra, c: c}
	if kind == SvcnatEBPF {
		pins, cgroups, err := c.ebpfMounts()
		if err != nil {
			return nil, err
		}
		p.PinDir = filepath.Join(pins, n.Netns)
		p.cgroupPath = filepath.Join(cgroups, filepath.Base(n.Cgroup))
	}
	c.proxies++
	var err error
	if p.cgroup, err = c.addCgroup(fmt.Sprintf("%s-proxy%d", n.Netns, c.proxies)); err != nil {
		return nil, err
	}
	c.onClose(func() error { return killCgroupTree(p.cgroup) })
	c.onClose(p.remove)
	return p, nil
}

// backendArgs are the flags naming an svcnat backend and where it lives.
func (p *Proxy) backendArgs() []string {
	switch p.Kind {
	case SvcnatEBPF:
		return []string{"--backend=ebpf", "--cgroup-path=" + p.cgroupPath, "--bpffs-path=" + p.PinDir, "--bpf-interfaces=eth0"}
	default:
		return []string{"--backend=iptables"}
	}
}

func (p *Proxy) args() []string {
	n := p.Node
	switch p.Kind {
	case KubeProxyIptables, KubeProxyNftables:
		mode := strings.TrimPrefix(string(p.Kind), "kube-proxy-")
		return []string{filepath.Join(p.c.Binaries.K8sDir, "kube-proxy"),
			"--kubeconfig=" + p.c.Kubeconfig, "--hostname-override=" + n.Name,
			"--proxy-mode=" + mode, "--cluster-cidr=" + p.c.clusterCIDRs(),
			"--conntrack-max-per-core=0",
			"--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
			"--conntrack-udp-timeout=0", "--conntrack-udp-timeout-stream=0",
			"--metrics-bind-address=127.0.0.1:10249",
			fmt.Sprintf("--healthz-bind-address=0.0.0.0:%d", HealthzPort),
			"--v=2"}
	default:
		return append([]string{p.c.Binaries.Svcnat, "run",
			"--kubeconfig=" + p.c.Kubeconfig, "--node-name=" + n.Name,
			"--cluster-cidr=" + p.c.clusterCIDRs(),
			// pprof beside the metrics, in the node namespace only, so the
			// benchmark can save profiles.
			"--profiling", "--metrics-bind-address=127.0.0.1:10249",
			fmt.Sprintf("--healthz-bind-address=0.0.0.0:%d", HealthzPort),
		}, slices.Concat(p.backendArgs(), p.c.SvcnatFlags, p.Extra)...)
	}
}

// Start starts the proxy process (again) and waits until it is healthy.
func (p *Proxy) Start(ctx context.Context) error {
	if err := p.launch(); err != nil {
		return err
	}
	return p.WaitHealthy(ctx, 60*time.Second)
}

// launch starts the proxy process without waiting for it.
func (p *Proxy) launch() error {
	if p.proc != nil && !p.proc.Exited() {
		return fmt.Errorf("start %s on %s: already running as pid %d", p.Kind, p.Node.Name, p.proc.PID())
	}
	p.runs++
	var err error
	p.proc, err = start(procSpec{
		name:   fmt.Sprintf("%s on %s", p.Kind, p.Node.Name),
		netns:  p.Node.Netns,
		cgroup: p.cgroup,
		log:    p.c.logPath(fmt.Sprintf("proxy-%s", p.Node.Name)),
		args:   p.args(),
	})
	return err
}

// CPUSeconds is the CPU time the proxy and the processes it started have
// spent since its first start, read from its cgroup: a child's CPU counts
// as it is spent, not when the proxy reaps it (as /proc's cutime would).
func (p *Proxy) CPUSeconds() (float64, error) {
	return cgroupCPUSeconds(p.cgroup)
}

// cgroupCPUSeconds reads usage_usec from the cgroup v2 directory's cpu.stat.
func cgroupCPUSeconds(dir string) (float64, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0, fmt.Errorf("read cpu time of cgroup: %w", err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			usec, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("read cpu time of cgroup %s: %w", dir, err)
			}
			return float64(usec) / 1e6, nil
		}
	}
	return 0, fmt.Errorf("read cpu time of cgroup %s: no usage_usec in cpu.stat", dir)
}

// WaitHealthy waits until the proxy's /healthz answers 200.
func (p *Proxy) WaitHealthy(ctx context.Context, limit time.Duration) error {
	client := HTTPClientIn(p.Node.Netns, time.Second)
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz", HealthzPort)
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	return waitHTTPOK(ctx, client, url, "", p.proc, fmt.Sprintf("%s on %s to be healthy", p.Kind, p.Node.Name), 200*time.Millisecond)
}

// Kill kills the proxy with SIGKILL, leaving what it programmed in place.
func (p *Proxy) Kill() {
	if p.proc != nil {
		p.proc.Kill()
	}
}

// Stop stops the proxy with SIGTERM.
func (p *Proxy) Stop() {
	if p.proc != nil {
		p.proc.Stop(stopGrace)
	}
}

// Running reports whether the proxy process is alive.
func (p *Proxy) Running() bool { return p.proc != nil && !p.proc.Exited() }

// Tail returns the end of the proxy's log.
func (p *Proxy) Tail(n int) string {
	if p.proc == nil {
		return ""
	}
	return p.proc.Tail(n)
}

// remove stops the proxy and removes what it installed outside its node
// namespace (bpffs pins); rules inside the namespace go with it.
func (p *Proxy) remove() error {
	p.Stop()
	if !p.Kind.IsSvcnat() {
		return nil
	}
	var errs []string
	if out, err := p.Svcnat(context.Background(), append([]string{"cleanup"}, p.backendArgs()...)...); err != nil {
		errs = append(errs, fmt.Sprintf("svcnat cleanup on %s: %v: %s", p.Node.Name, err, out))
	}
	if p.PinDir != "" {
		if err := os.RemoveAll(p.PinDir); err != nil {
			errs = append(errs, fmt.Sprintf("remove pins %s: %v", p.PinDir, err))
		}
	}
	if errs != nil {
		return fmt.Errorf("remove proxy: %s", strings.Join(errs, "; "))
	}
	return nil
}

// Svcnat runs an svcnat subcommand (dump, cleanup, ...) in the proxy's node
// namespace and returns its combined output.
func (p *Proxy) Svcnat(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	full := append([]string{"netns", "exec", p.Node.Netns, p.c.Binaries.Svcnat}, args...)
	out, err := exec.CommandContext(ctx, "ip", full...).CombinedOutput()
	return string(out), err
}

// Dump runs `svcnat dump` with the flags that match the running agent,
// plus extra (for example "--check").
func (p *Proxy) Dump(ctx context.Context, extra ...string) (string, error) {
	args := append([]string{"dump", "--log-level=warn", "--kubeconfig=" + p.c.Kubeconfig, "--node-name=" + p.Node.Name,
		"--cluster-cidr=" + p.c.clusterCIDRs()}, p.backendArgs()...)
	return p.Svcnat(ctx, append(args, extra...)...)
}

// Trace runs `svcnat trace` with the backend flags of the running agent,
// plus args.
func (p *Proxy) Trace(ctx context.Context, args ...string) (string, error) {
	return p.Svcnat(ctx, append(append([]string{"trace", "--log-level=warn"}, p.backendArgs()...), args...)...)
}
