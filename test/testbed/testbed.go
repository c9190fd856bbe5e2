//go:build linux

// Package testbed runs a small but real Kubernetes cluster on one machine for
// svcnat's end-to-end tests and its demo: etcd and kube-apiserver inside a
// node network namespace, two node namespaces joined by a LAN bridge, pod
// namespaces behind veths, and an external client on the LAN. Pods run the
// echo server (test/echoserver). Proxies (svcnat or upstream kube-proxy) run
// in the node namespaces.
//
// Everything is made inside network namespaces and cgroups the test bed
// creates, named with a per-run prefix; the machine's root namespace is never
// changed and no traffic is sent from it. Close removes it all, and Start
// arranges for Close to run on SIGINT and SIGTERM.
//
// Addresses (all inside the test bed's namespaces):
//
//	LAN          192.168.77.0/24  node1 .11, node2 .12, client .100
//	pods         10.244.N.0/24    node N; gateway .1, pods .10 upwards
//	services     10.96.0.0/16     allocated by the apiserver
//	external IPs 192.168.78.0/24  routed by the client to node1
package testbed

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Fixed addressing of the test bed.
var (
	LANPrefix       = netip.MustParsePrefix("192.168.77.0/24")
	ClientIP        = netip.MustParseAddr("192.168.77.100")
	ServiceCIDR     = netip.MustParsePrefix("10.96.0.0/16")
	ClusterCIDR     = netip.MustParsePrefix("10.244.0.0/16")
	ExternalIPRange = netip.MustParsePrefix("192.168.78.0/24")
)

// Options configure a test bed.
type Options struct {
	// Nodes is the number of nodes (default 2).
	Nodes int
	// PodsPerNode is the number of pod namespaces per node (default 3),
	// named <node>-a, <node>-b, ...
	PodsPerNode int
	// PodPorts are the ports every pod's echo server listens on. With none,
	// Start starts no echo servers; see StartEcho.
	PodPorts PodPorts
	// Binaries locates the programs to run.
	Binaries Binaries
	// HandleSignals makes Start install a SIGINT/SIGTERM handler that closes
	// the test bed and exits with status 130. Leave it off when the caller
	// handles signals itself and calls Close.
	HandleSignals bool
	Logger        *slog.Logger
	// Kubelets selects the cluster mode (cluster.go): kube-controller-manager,
	// kube-scheduler, and containerd and kubelet on every node, with no pod
	// namespaces (PodsPerNode and PodPorts are ignored).
	Kubelets bool
	// HardNetwork adds the hard parts of real networks (hardnet.go): a
	// VXLAN overlay carrying the pod CIDRs between the nodes, a second
	// uplink, a router with a 1280-byte hop to a far client, and source
	// validation on the pod interfaces.
	HardNetwork bool
	// Images are docker-archive tars imported on every node in cluster mode
	// (BuildImages makes the ones every node needs).
	Images []string
}

// PodPorts are the ports a pod's echo server listens on.
type PodPorts struct {
	TCP, UDP, HTTP []int
}

func (p PodPorts) empty() bool { return len(p.TCP)+len(p.UDP)+len(p.HTTP) == 0 }

// DefaultPodPorts are the ports the end-to-end suite uses.
var DefaultPodPorts = PodPorts{TCP: []int{8080, 8081}, UDP: []int{5353}, HTTP: []int{80}}

// Cluster is a running test bed.
type Cluster struct {
	// Prefix starts every name this run creates.
	Prefix string
	// Dir holds logs, keys, the kubeconfig and etcd's data.
	Dir        string
	LAN        string // the LAN namespace
	Client     string // the external client namespace
	Nodes      []*Node
	Kubeconfig string
	Kube       kubernetes.Interface
	RESTConfig *rest.Config
	Binaries   Binaries
	Log        *slog.Logger
	// SvcnatFlags are further flags for every svcnat proxy started from
	// now on (the benchmark sizes the eBPF maps for its load with them).
	SvcnatFlags []string

	// Router and FarClient are the router and the client behind its
	// 1280-byte hop (HardNetwork only).
	Router, FarClient string

	etcd, apiserver *Process
	apiserverFlags  []string // added to the defaults
	token           string
	proxies         int // proxies started, to name their cgroups
	mu              sync.Mutex
	cleanups        []func() error
	closeOnce       sync.Once
	closeErr        error
	stopSignals     func()
}

// Node is one node namespace.
type Node struct {
	Name    string // Kubernetes node name: node1, node2, ...
	Netns   string
	IP      netip.Addr // address on the LAN
	PodCIDR netip.Prefix
	Zone    string
	// With HardNetwork: OverlayIP (on ov0), Uplink2IP (on eth1), and the
	// IPv6 address on the LAN and pod CIDR.
	OverlayIP, Uplink2IP, IP6 netip.Addr
	PodCIDR6                  netip.Prefix
	// Cgroup is a cgroup v2 directory; pod processes of this node run in it,
	// and an eBPF proxy attaches its socket hooks to it.
	Cgroup string
	Pods   []*Pod
	// Proxy is the proxy running on this node, if any.
	Proxy *Proxy
	// Kubelet runs the node's containerd and kubelet in cluster mode.
	Kubelet *Kubelet
}

// Pod is one pod namespace running the echo server.
type Pod struct {
	Name  string // node1-a, ...
	Netns string
	IP    netip.Addr
	Node  *Node
	// IP6 is the pod's IPv6 address (HardNetwork only).
	IP6  netip.Addr
	echo *Process
}

// Start builds the test bed: namespaces, control plane, Node objects, pods.
// On error everything made so far is removed. The caller must Close it.
func Start(ctx context.Context, o Options) (_ *Cluster, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("start test bed: needs root (creates network namespaces and cgroups)")
	}
	if o.Nodes == 0 {
		o.Nodes = 2
	}
	if o.Kubelets {
		o.PodsPerNode, o.PodPorts = 0, PodPorts{}
	} else if o.PodsPerNode == 0 {
		o.PodsPerNode = 3
	}
	if o.Nodes > 9 || o.PodsPerNode > 26 {
		return nil, fmt.Errorf("start test bed: %d nodes x %d pods is more than the addressing supports", o.Nodes, o.PodsPerNode)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if err := o.Binaries.check(); err != nil {
		return nil, fmt.Errorf("start test bed: %w", err)
	}
	if err := sweep(); err != nil {
		o.Logger.Warn("leftovers of an earlier run remain", "err", err)
	}
	c := &Cluster{
		Prefix:   fmt.Sprintf("snt%05d", os.Getpid()%100000),
		Binaries: o.Binaries,
		Log:      o.Logger,
	}
	c.Dir, err = os.MkdirTemp("", c.Prefix+"-")
	if err != nil {
		return nil, fmt.Errorf("start test bed: make run directory: %w", err)
	}
	c.onClose(func() error { return removeRunDir(c.Dir) })
	if err := c.lockRun(); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("start test bed: %w", err)
	}
	if o.HandleSignals {
		c.handleSignals()
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
		}
	}()
	c.Log.Info("starting test bed", "prefix", c.Prefix, "dir", c.Dir)
	if err := c.buildNetwork(o); err != nil {
		return nil, err
	}
	if o.Kubelets {
		c.apiserverFlags = clusterAPIServerFlags
	}
	if err := c.startControlPlane(ctx); err != nil {
		return nil, err
	}
	if err := c.registerNodes(ctx); err != nil {
		return nil, err
	}
	if o.Kubelets {
		return c, c.startKubelets(ctx, o.Images)
	}
	if o.PodPorts.empty() {
		return c, nil
	}
	for _, n := range c.Nodes {
		for _, p := range n.Pods {
			if err := c.StartEcho(p, o.PodPorts); err != nil {
				return nil, err
			}
		}
	}
	return c, nil
}

// onClose registers f to run on Close, in reverse order of registration.
func (c *Cluster) onClose(f func() error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cleanups = append(c.cleanups, f)
}

// Close stops every process and removes every namespace, cgroup and file the
// test bed made. It is safe to call more than once and from a signal handler.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		if c.stopSignals != nil {
			c.stopSignals()
		}
		c.mu.Lock()
		fs := c.cleanups
		c.cleanups = nil
		c.mu.Unlock()
		var errs []error
		for i := len(fs) - 1; i >= 0; i-- {
			if err := fs[i](); err != nil {
				errs = append(errs, err)
			}
		}
		c.closeErr = errors.Join(errs...)
		if c.closeErr != nil {
			c.Log.Error("test bed teardown", "err", c.closeErr)
		} else {
			c.Log.Info("test bed removed", "prefix", c.Prefix)
		}
	})
	return c.closeErr
}

func (c *Cluster) handleSignals() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan struct{})
	c.stopSignals = func() { signal.Stop(ch); close(done) }
	go func() {
		select {
		case s := <-ch:
			c.Log.Warn("signal received, removing the test bed", "signal", s)
			_ = c.Close()
			os.Exit(130)
		case <-done:
		}
	}()
}

// Pod returns the pod with the given name, or nil.
func (c *Cluster) Pod(name string) *Pod {
	for _, n := range c.Nodes {
		for _, p := range n.Pods {
			if p.Name == name {
				return p
			}
		}
	}
	return nil
}

// ns returns the namespace name for a role.
func (c *Cluster) ns(role string) string { return c.Prefix + "-" + role }

func (c *Cluster) logPath(name string) string { return filepath.Join(c.Dir, name+".log") }

// Processes started by the test bed get this long to end on SIGTERM.
const stopGrace = 5 * time.Second
