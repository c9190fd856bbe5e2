//go:build linux

// Command demo runs the voting app of examples/voting-app on the test bed:
// a real apiserver, two node namespaces running a proxy (svcnat by
// default), and one pod namespace per Pod of the example running a
// stand-in that listens on the Pod's container ports. It shows traffic
// crossing each Service, prints `svcnat dump`, tells how to poke at it, and
// waits for Ctrl-C (or returns at once with --once) before removing
// everything.
//
// It builds nothing: pass the binaries (the Makefile's demo target builds
// them into bin/). Needs root.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes/scheme"
)

func main() {
	var (
		proxy    = flag.String("proxy", string(testbed.SvcnatIptables), "proxy on the nodes: svcnat-iptables, svcnat-ebpf, kube-proxy-iptables or kube-proxy-nftables")
		svcnat   = flag.String("svcnat", "bin/svcnat", "svcnat binary")
		echo     = flag.String("echoserver", "bin/echoserver", "echo server binary (test/echoserver)")
		k8sDir   = flag.String("k8s-bin-dir", testbed.DefaultK8sDir(), "directory holding kube-apiserver and kube-proxy")
		examples = flag.String("examples", "examples/voting-app", "directory of the example's Pod and Service manifests")
		once     = flag.Bool("once", false, "tear down right after showing the traffic (for CI)")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if err := run(*proxy, *svcnat, *echo, *k8sDir, *examples, *once, log); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

// app is the example: its Pods (placed on pod namespaces) and Services.
type app struct {
	pods     []*corev1.Pod
	services []*corev1.Service
	// where maps a Pod's name to the pod namespace that plays it.
	where map[string]*testbed.Pod
}

func run(proxyName, svcnat, echo, k8sDir, examples string, once bool, log *slog.Logger) error {
	kind, err := testbed.ParseProxyKinds(proxyName)
	if err != nil || len(kind) != 1 {
		return fmt.Errorf("--proxy %q: want exactly one proxy kind", proxyName)
	}
	a, err := load(examples)
	if err != nil {
		return err
	}
	b := testbed.Binaries{EchoServer: abs(echo), K8sDir: k8sDir, Etcd: "/usr/bin/etcd"}
	if kind[0].IsSvcnat() {
		b.Svcnat = abs(svcnat)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	fmt.Printf("Starting the test bed (etcd, kube-apiserver %s, 2 nodes, %d pods)...\n", testbed.K8sVersion, len(a.pods))
	perNode := (len(a.pods) + 1) / 2
	c, err := testbed.Start(ctx, testbed.Options{Nodes: 2, PodsPerNode: perNode, Binaries: b, Logger: log})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("\nRemoving the test bed (processes, namespaces, cgroups, files)...")
		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "demo: teardown:", err)
		}
	}()
	if err := a.place(c); err != nil {
		return err
	}
	fmt.Printf("Starting %s on every node...\n", kind[0])
	if err := c.StartProxies(ctx, kind[0]); err != nil {
		return err
	}
	if err := a.deploy(ctx, c); err != nil {
		return err
	}
	if err := a.showTraffic(ctx, c); err != nil {
		return err
	}
	if kind[0].IsSvcnat() {
		for _, n := range c.Nodes {
			out, err := n.Proxy.Dump(ctx)
			fmt.Printf("\n$ svcnat dump   # on %s, read back from the kernel\n%s", n.Name, out)
			if err != nil {
				return fmt.Errorf("svcnat dump on %s: %w", n.Name, err)
			}
		}
	}
	a.printHowTo(c, kind[0])
	if once {
		return nil
	}
	fmt.Println("\nThe demo keeps running; press Ctrl-C (or send SIGTERM) to tear it down.")
	<-ctx.Done()
	return nil
}

func abs(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	return a
}

// load reads the example's Pods and Services.
func load(dir string) (*app, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("read examples from %s: no *.yaml files (%v)", dir, err)
	}
	a := &app{where: map[string]*testbed.Pod{}}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("read example: %w", err)
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(data, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("decode example %s: %w", f, err)
		}
		switch o := obj.(type) {
		case *corev1.Pod:
			a.pods = append(a.pods, o)
		case *corev1.Service:
			a.services = append(a.services, o)
		default:
			return nil, fmt.Errorf("decode example %s: unexpected kind %T", f, obj)
		}
	}
	// Place the app's front ends and their store first, deterministically.
	order := []string{"voting-app-pod", "redis-pod", "worker-app-pod", "postgres-pod", "result-app-pod"}
	slices.SortFunc(a.pods, func(x, y *corev1.Pod) int {
		return slices.Index(order, x.Name) - slices.Index(order, y.Name)
	})
	return a, nil
}

// place assigns each Pod of the example to a pod namespace, alternating
// nodes, and starts a stand-in listening on the Pod's container ports.
func (a *app) place(c *testbed.Cluster) error {
	for i, p := range a.pods {
		n := c.Nodes[i%len(c.Nodes)]
		ns := n.Pods[i/len(c.Nodes)]
		a.where[p.Name] = ns
		var ports testbed.PodPorts
		for _, ctr := range p.Spec.Containers {
			for _, cp := range ctr.Ports {
				switch {
				case cp.Protocol == corev1.ProtocolUDP:
					ports.UDP = append(ports.UDP, int(cp.ContainerPort))
				case cp.ContainerPort == 80:
					ports.HTTP = append(ports.HTTP, 80)
				default:
					ports.TCP = append(ports.TCP, int(cp.ContainerPort))
				}
			}
		}
		if len(ports.TCP)+len(ports.UDP)+len(ports.HTTP) == 0 {
			continue // the worker only connects out
		}
		if err := c.StartEcho(ns, ports); err != nil {
			return err
		}
	}
	fmt.Println("\nPods of the example, each played by a network namespace:")
	w := tabwriter.NewWriter(os.Stdout, 2, 8, 2, ' ', 0)
	fmt.Fprintln(w, "  POD\tNODE\tIP\tNAMESPACE\tLISTENS ON")
	for _, p := range a.pods {
		ns := a.where[p.Name]
		var ports []string
		for _, ctr := range p.Spec.Containers {
			for _, cp := range ctr.Ports {
				ports = append(ports, fmt.Sprint(cp.ContainerPort))
			}
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\t%s\n", p.Name, ns.Node.Name, ns.IP, ns.Netns, cmpOr(strings.Join(ports, ","), "-"))
	}
	return w.Flush()
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// deploy creates the Services and, playing the EndpointSlice controller,
// one EndpointSlice per Service for the Pods its selector matches.
func (a *app) deploy(ctx context.Context, c *testbed.Cluster) error {
	fmt.Println("\nApplying the Services and their EndpointSlices:")
	for i, s := range a.services {
		s = s.DeepCopy()
		s.Namespace = metav1.NamespaceDefault
		got, err := c.Kube.CoreV1().Services(s.Namespace).Create(ctx, s, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create service %s: %w", s.Name, err)
		}
		a.services[i] = got
		slice := a.sliceFor(got)
		if _, err := c.Kube.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create endpointslice for %s: %w", s.Name, err)
		}
		var eps []string
		for _, ep := range slice.Endpoints {
			eps = append(eps, fmt.Sprintf("%s (%s)", ep.Addresses[0], ep.TargetRef.Name))
		}
		ports := []string{}
		for _, p := range got.Spec.Ports {
			s := fmt.Sprintf("%d->%s", p.Port, p.TargetPort.String())
			if p.NodePort != 0 {
				s = fmt.Sprintf("%d:%d->%s", p.Port, p.NodePort, p.TargetPort.String())
			}
			ports = append(ports, s)
		}
		fmt.Printf("  service/%-15s %-9s %-14s %-16s endpoints: %s\n", got.Name, got.Spec.Type, got.Spec.ClusterIP,
			strings.Join(ports, ","), strings.Join(eps, ", "))
	}
	return nil
}

func (a *app) sliceFor(s *corev1.Service) *discoveryv1.EndpointSlice {
	sel := labels.SelectorFromSet(s.Spec.Selector)
	var ports []discoveryv1.EndpointPort
	var eps []discoveryv1.Endpoint
	for _, p := range a.pods {
		if len(s.Spec.Selector) == 0 || !sel.Matches(labels.Set(p.Labels)) {
			continue
		}
		ep := a.where[p.Name].Endpoint(testbed.Ready)
		ep.TargetRef.Name = p.Name
		eps = append(eps, ep)
	}
	for _, sp := range s.Spec.Ports {
		// The example's targetPorts are numbers.
		ports = append(ports, testbed.SlicePort(sp.Name, sp.Protocol, sp.TargetPort.IntVal))
	}
	return testbed.EndpointSlice(s.Namespace, s.Name, s.Name+"-demo", ports, eps...)
}

func (a *app) service(name string) *corev1.Service {
	for _, s := range a.services {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// hop is one arrow of the example's diagram.
type hop struct {
	from    string // a Pod of the example, or "" for the external client
	service string
	node    int // for NodePorts: which node's address the client uses
}

func (a *app) showTraffic(ctx context.Context, c *testbed.Cluster) error {
	hops := []hop{
		{"voting-app-pod", "redis", 0},
		{"worker-app-pod", "redis", 0},
		{"worker-app-pod", "db", 0},
		{"result-app-pod", "db", 0},
		{"", "voting-service", 0},
		{"", "voting-service", 1},
		{"", "result-service", 0},
		{"", "result-service", 1},
	}
	fmt.Println("\nTraffic through each Service (the answering stand-in reports the source address it saw):")
	for _, h := range hops {
		s := a.service(h.service)
		if s == nil {
			return fmt.Errorf("example has no service %s", h.service)
		}
		var from testbed.Origin
		var addr netip.AddrPort
		proto := "tcp"
		if s.Spec.Ports[0].TargetPort.IntVal == 80 {
			proto = "http"
		}
		if h.from == "" {
			from = c.ClientOrigin()
			addr = netip.AddrPortFrom(c.Nodes[h.node].IP, uint16(s.Spec.Ports[0].NodePort))
		} else {
			from = a.where[h.from].Origin()
			from.Name = h.from
			addr = netip.AddrPortFrom(netip.MustParseAddr(s.Spec.ClusterIP), uint16(s.Spec.Ports[0].Port))
		}
		r, err := firstAnswer(ctx, c, from, proto, addr)
		if err != nil {
			return fmt.Errorf("%s -> %s (%s): %w", cmpOr(h.from, "client"), h.service, addr, err)
		}
		fmt.Printf("  %-15s %-15s -> %-14s %-21s answered by %-15s (saw %s)\n", cmpOr(h.from, "external client"),
			from.IP, h.service, addr, a.podPlayedBy(r.Pod), r.Client)
	}
	return nil
}

// firstAnswer retries until the proxies have programmed the Service.
func firstAnswer(ctx context.Context, c *testbed.Cluster, from testbed.Origin, proto string, addr netip.AddrPort) (testbed.Result, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		rs, err := c.Probe(ctx, from, testbed.ProbeSpec{Proto: proto, Addr: addr, Timeout: 2 * time.Second})
		if err != nil {
			return testbed.Result{}, err
		}
		if rs[0].OK() {
			return rs[0], nil
		}
		if time.Now().After(deadline) {
			return rs[0], fmt.Errorf("no answer within 30s: %s", rs[0].Err)
		}
		select {
		case <-ctx.Done():
			return rs[0], ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
}

func (a *app) podPlayedBy(ns string) string {
	for name, p := range a.where {
		if p.Name == ns {
			return name
		}
	}
	return ns
}

func (a *app) printHowTo(c *testbed.Cluster, kind testbed.ProxyKind) {
	vote := a.where["voting-app-pod"]
	redis := a.service("redis")
	n1 := c.Nodes[0]
	inCgroup := func(n *testbed.Node, cmd string) string {
		if kind != testbed.SvcnatEBPF {
			return cmd
		}
		// eBPF socket hooks only see processes in the node's cgroup.
		return fmt.Sprintf("sh -c 'echo $$ > %s/cgroup.procs && exec %s'", n.Cgroup, cmd)
	}
	fmt.Printf(`
How to poke at it (as root, from another terminal):
  # the voting app from outside, through each node's NodePort
  ip netns exec %[1]s curl -s http://%[2]s:30004/
  ip netns exec %[1]s curl -s http://%[3]s:30005/
  # redis from the vote pod, through its ClusterIP
  %[4]s
  # the API objects
  ip netns exec %[5]s kubectl --kubeconfig %[6]s get svc,endpointslices -o wide
`, c.Client, n1.IP, c.Nodes[1].IP,
		inCgroup(vote.Node, fmt.Sprintf("ip netns exec %s %s probe -proto tcp -addr %s:%d", vote.Netns, c.Binaries.EchoServer, redis.Spec.ClusterIP, redis.Spec.Ports[0].Port)),
		n1.Netns, c.Kubeconfig)
	if kind.IsSvcnat() {
		fmt.Printf(`  # what svcnat programmed on node1, read back from the kernel
  ip netns exec %s %s dump --kubeconfig %s --node-name %s%s
`, n1.Netns, c.Binaries.Svcnat, c.Kubeconfig, n1.Name, backendFlags(n1, kind))
	}
	if kind == testbed.SvcnatIptables || kind == testbed.KubeProxyIptables {
		fmt.Printf("  ip netns exec %s iptables-save -t nat\n", n1.Netns)
	}
	fmt.Printf("  # logs of every process: %s\n", c.Dir)
}

func backendFlags(n *testbed.Node, kind testbed.ProxyKind) string {
	if kind == testbed.SvcnatEBPF {
		return fmt.Sprintf(" --backend=ebpf --bpffs-path=%s --cgroup-path=%s", n.Proxy.PinDir, n.Cgroup)
	}
	return " --backend=iptables"
}
