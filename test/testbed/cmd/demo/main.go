//go:build linux

// Command demo runs the voting app of examples/voting-app on the test bed:
// a real apiserver, two node namespaces running a proxy (svcnat by
// default), and one pod namespace per Pod of the example running the real
// program: Debian's redis-server and postgres, and the example's vote,
// worker and result (package votingapp). It casts votes through
// voting-service's NodePort from the external client, shows result-service's
// counts change, prints `svcnat dump`, tells how to open the pages, and
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
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
	"github.com/svcnat/svcnat/test/testbed/votingapp"
)

func main() {
	var (
		proxy    = flag.String("proxy", string(testbed.SvcnatIptables), "proxy on the nodes: svcnat-iptables, svcnat-ebpf, kube-proxy-iptables or kube-proxy-nftables")
		svcnat   = flag.String("svcnat", "bin/svcnat", "svcnat binary")
		echo     = flag.String("echoserver", "bin/echoserver", "echo server binary (test/echoserver; the test bed's probe)")
		appBin   = flag.String("app-bin-dir", "bin/voting-app", "directory holding vote, worker, result and browser (built from examples/voting-app)")
		k8sDir   = flag.String("k8s-bin-dir", testbed.DefaultK8sDir(), "directory holding kube-apiserver and kube-proxy")
		examples = flag.String("examples", "examples/voting-app", "directory of the example's Pod and Service manifests")
		once     = flag.Bool("once", false, "tear down right after showing the votes (for CI)")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	began := time.Now()
	err := run(*proxy, *svcnat, *echo, *appBin, *k8sDir, *examples, *once, log)
	fmt.Printf("demo took %v\n", time.Since(began).Round(100*time.Millisecond))
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(proxyName, svcnat, echo, appBin, k8sDir, examples string, once bool, log *slog.Logger) error {
	kind, err := testbed.ParseProxyKinds(proxyName)
	if err != nil || len(kind) != 1 {
		return fmt.Errorf("--proxy %q: want exactly one proxy kind", proxyName)
	}
	a, err := votingapp.Load(examples)
	if err != nil {
		return err
	}
	vb, err := votingapp.Locate(appBin, false)
	if err != nil {
		return err
	}
	b := testbed.Binaries{EchoServer: abs(echo), K8sDir: k8sDir, Etcd: "/usr/bin/etcd"}
	if kind[0].IsSvcnat() {
		b.Svcnat = abs(svcnat)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	fmt.Printf("Starting the test bed (etcd, kube-apiserver %s, 2 nodes, %d pods)...\n", testbed.K8sVersion, len(a.Pods))
	perNode := (len(a.Pods) + 1) / 2
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
	fmt.Printf("Starting %s on every node...\n", kind[0])
	if err := c.StartProxies(ctx, kind[0]); err != nil {
		return err
	}
	fmt.Println("Deploying the voting app: redis-server, postgres (initdb first), vote, worker, result...")
	if err := a.Deploy(ctx, c, vb); err != nil {
		return err
	}
	printPods(a)
	printServices(a)
	tally, err := castVotes(ctx, a, c)
	if err != nil {
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
	printHowTo(a, c, kind[0])
	if once {
		return nil
	}
	fmt.Println("\nThe demo keeps running and prints result-service's counts when they change;")
	fmt.Println("press Ctrl-C (or send SIGTERM) to tear it down.")
	watch(ctx, a, c, tally)
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

func printPods(a *votingapp.App) {
	fmt.Println("\nPods of the example, each played by a network namespace running the real program:")
	w := tabwriter.NewWriter(os.Stdout, 2, 8, 2, ' ', 0)
	fmt.Fprintln(w, "  POD\tNODE\tIP\tNAMESPACE\tPROGRAM")
	for _, p := range a.Pods {
		ns := a.Where[p.Name]
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\t%s\n", p.Name, ns.Node.Name, ns.IP, ns.Netns, a.Program[p.Name])
	}
	w.Flush()
}

func printServices(a *votingapp.App) {
	fmt.Println("\nServices, and the EndpointSlices written for them (no controller-manager here):")
	var names []string
	for _, s := range a.Services {
		var eps []string
		for _, ep := range a.SliceFor(s).Endpoints {
			eps = append(eps, fmt.Sprintf("%s (%s)", ep.Addresses[0], ep.TargetRef.Name))
		}
		var ports []string
		for _, p := range s.Spec.Ports {
			if p.NodePort != 0 {
				ports = append(ports, fmt.Sprintf("%d:%d->%s", p.Port, p.NodePort, p.TargetPort.String()))
			} else {
				ports = append(ports, fmt.Sprintf("%d->%s", p.Port, p.TargetPort.String()))
			}
		}
		fmt.Printf("  service/%-15s %-9s %-14s %-16s endpoints: %s\n", s.Name, s.Spec.Type, s.Spec.ClusterIP,
			strings.Join(ports, ","), strings.Join(eps, ", "))
		if s.Spec.Type == "ClusterIP" {
			names = append(names, fmt.Sprintf("%s -> %s", s.Name, s.Spec.ClusterIP))
		}
	}
	sort.Strings(names)
	fmt.Printf("\nNo cluster DNS here: each pod's /etc/hosts names the ClusterIPs (%s),\n"+
		"so vote and worker reach redis as redis:6379 and worker and result reach postgres as db:5432.\n",
		strings.Join(names, ", "))
}

// castVotes casts votes in rounds through voting-service on alternating
// nodes and shows result-service's counts after each round.
func castVotes(ctx context.Context, a *votingapp.App, c *testbed.Cluster) (votingapp.Tally, error) {
	fmt.Println("\nVotes from the external client (192.168.77.100), through voting-service's NodePort;")
	fmt.Println("vote pushes each to redis, worker moves it to postgres, result-service counts it:")
	rounds := [][]string{{"a", "a", "b"}, {"b", "b", "a", "b"}, {"a", "a", "a"}}
	var t votingapp.Tally
	for i, round := range rounds {
		voteNode, resultNode := c.Nodes[i%2], c.Nodes[(i+1)%2]
		for _, o := range round {
			if err := a.Vote(ctx, voteNode, o); err != nil {
				return t, err
			}
		}
		var err error
		if t, err = a.WaitTally(ctx, resultNode, t.Total+len(round), 30*time.Second); err != nil {
			return t, err
		}
		fmt.Printf("  %d votes (%s) to %-24s -> %s shows Cats %d, Dogs %d (%d votes)\n", len(round), strings.Join(round, ","),
			a.URL(voteNode, "voting-service", ""), a.URL(resultNode, "result-service", ""), t.A, t.B, t.Total)
	}
	fmt.Printf("\nThe worker's last lines (it pops from redis and writes to postgres):\n%s\n", indent(a.Log("worker-app-pod", 3)))
	return t, nil
}

func indent(s string) string { return "  " + strings.ReplaceAll(s, "\n", "\n  ") }

func printHowTo(a *votingapp.App, c *testbed.Cluster, kind testbed.ProxyKind) {
	n1, n2 := c.Nodes[0], c.Nodes[1]
	vote, result := a.URL(n1, "voting-service", "/"), a.URL(n2, "result-service", "/")
	fmt.Printf(`
How to open the pages yourself (as root, from another terminal). They are
reachable only from the test bed's external client namespace, %[1]s:
  ip netns exec %[1]s curl -s %[2]s
  ip netns exec %[1]s curl -s -d vote=b %[2]s
  ip netns exec %[1]s curl -s %[3]sresults.json
In a browser: carry a local port into the client namespace (this listens on
127.0.0.1 of this machine; each connection is made from inside %[1]s):
  socat TCP-LISTEN:8004,bind=127.0.0.1,reuseaddr,fork EXEC:'ip netns exec %[1]s socat STDIO TCP:%[4]s' &
  socat TCP-LISTEN:8005,bind=127.0.0.1,reuseaddr,fork EXEC:'ip netns exec %[1]s socat STDIO TCP:%[5]s' &
then open http://127.0.0.1:8004/ and http://127.0.0.1:8005/ (ssh -L 8004:127.0.0.1:8004 -L 8005:127.0.0.1:8005
for a remote machine); stop both socat by their PIDs afterwards.
  # the API objects
  ip netns exec %[6]s %[8]s --kubeconfig %[7]s get svc,endpointslices -o wide
`, c.Client, vote, result, strings.TrimPrefix(strings.TrimSuffix(vote, "/"), "http://"),
		strings.TrimPrefix(strings.TrimSuffix(result, "/"), "http://"), n1.Netns, c.Kubeconfig, filepath.Join(c.Binaries.K8sDir, "kubectl"))
	if kind.IsSvcnat() {
		fmt.Printf(`  # what svcnat programmed on node1, read back from the kernel
  ip netns exec %s %s dump --kubeconfig %s --node-name %s%s
`, n1.Netns, c.Binaries.Svcnat, c.Kubeconfig, n1.Name, backendFlags(n1, kind))
	}
	if kind == testbed.SvcnatIptables || kind == testbed.KubeProxyIptables {
		fmt.Printf("  ip netns exec %s iptables-save -t nat\n", n1.Netns)
	}
	fmt.Printf("  # logs of every process (redis.log, postgres.log, vote.log, worker.log, result.log, ...): %s\n", c.Dir)
}

func backendFlags(n *testbed.Node, kind testbed.ProxyKind) string {
	if kind == testbed.SvcnatEBPF {
		return fmt.Sprintf(" --backend=ebpf --bpffs-path=%s --cgroup-path=%s", n.Proxy.PinDir, n.Cgroup)
	}
	return " --backend=iptables"
}

// watch prints result-service's counts whenever they change, every 2 s,
// for at most 30 minutes (the demo itself waits for Ctrl-C).
func watch(ctx context.Context, a *votingapp.App, c *testbed.Cluster, last votingapp.Tally) {
	for range 900 {
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
		t, err := a.Tally(ctx, c.Nodes[1])
		if err != nil {
			if ctx.Err() == nil {
				fmt.Println("  result-service:", err)
			}
			continue
		}
		if t != last {
			fmt.Printf("  %s  result-service shows Cats %d, Dogs %d (%d votes)\n", time.Now().Format("15:04:05"), t.A, t.B, t.Total)
		}
		last = t
	}
	fmt.Println("  (stopped watching the counts after 30 minutes; the demo keeps running)")
}
