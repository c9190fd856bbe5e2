//go:build linux

package testbed

// The cluster mode: real nodes. Besides etcd and kube-apiserver, node1's
// namespace runs kube-controller-manager and kube-scheduler, and every node
// namespace runs containerd and a kubelet, so Pods, DaemonSets and
// EndpointSlices are real. Pods sit on a CNI bridge (cni0, the node's pod
// CIDR, host-local IPAM); the LAN routes pod CIDRs between nodes.
//
// Each node's containerd and kubelet also get a mount namespace of their
// own (made private, then shared inside, as on a real node), in which the
// node has its own bpffs at /sys/fs/bpf, its own /run, /var/log and
// /var/lib/cni, and a view of the kernel tunables kubelet checks that
// already holds the values it wants, so kubelet never changes the machine's
// sysctls. Mounts made there (container root file systems, volumes) vanish
// with the namespace. Containers run in per-node cgroups made beforehand in
// every hierarchy (kubelet's cgroupRoot, see TESTBED.md); the node's cgroup
// v2 directory is the one Node.Cgroup names, so an eBPF proxy attached there
// sees the node's pods.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// PauseImage is the pod sandbox image containerd runs (see BuildImages).
const PauseImage = "registry.k8s.io/pause:3.10.2"

// Kubelet is the containerd and kubelet of one node in cluster mode.
type Kubelet struct {
	Node *Node
	// Dir holds containerd's and kubelet's state, configuration and logs.
	Dir string
	// Socket is containerd's CRI socket.
	Socket string
	// CgroupRoot is kubelet's cgroupRoot, made in every cgroup hierarchy.
	CgroupRoot          string
	c                   *Cluster
	containerd, kubelet *Process
}

// clusterAPIServerFlags are kube-apiserver's flags in cluster mode: the
// kubernetes Service has the apiserver as its endpoint, and the apiserver
// reaches kubelets (logs, exec) at their nodes' addresses.
var clusterAPIServerFlags = []string{"--endpoint-reconciler-type=lease", "--kubelet-preferred-address-types=InternalIP"}

// Kernel tunables kubelet checks at start (and would otherwise set, machine
// wide): the node's mount namespace shows it these values instead.
var kubeletTunables = map[string]string{
	"vm/overcommit_memory":      "1",
	"vm/panic_on_oom":           "0",
	"kernel/panic":              "10",
	"kernel/panic_on_oops":      "1",
	"kernel/keys/root_maxkeys":  "1000000",
	"kernel/keys/root_maxbytes": "25000000",
}

// startKubelets runs kube-controller-manager and kube-scheduler, then
// containerd and kubelet on every node, imports images, and waits until
// every node is Ready and the default namespace can hold Pods.
func (c *Cluster) startKubelets(ctx context.Context, images []string) error {
	for _, bin := range []string{"kubelet", "kube-controller-manager", "kube-scheduler"} {
		if _, err := os.Stat(filepath.Join(c.Binaries.K8sDir, bin)); err != nil {
			return fmt.Errorf("start cluster mode: find %s (scripts/k8s-bins.sh builds it): %w", bin, err)
		}
	}
	for _, bin := range []string{"containerd", "ctr", "runc", "nsenter", "unshare"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("start cluster mode: find %s (Debian packages containerd, runc, util-linux): %w", bin, err)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		return fmt.Errorf("start cluster mode: find the CNI bridge plugin (Debian package containernetworking-plugins): %w", err)
	}
	if err := c.startControllers(); err != nil {
		return err
	}
	if err := c.serveDNS(); err != nil {
		return fmt.Errorf("start cluster DNS: %w", err)
	}
	for _, n := range c.Nodes {
		k := &Kubelet{Node: n, c: c, Dir: filepath.Join(c.Dir, "kubelet-"+n.Name), CgroupRoot: "/" + filepath.Base(n.Cgroup)}
		n.Kubelet = k
		if err := k.start(ctx, images); err != nil {
			return fmt.Errorf("start node %s: %w", n.Name, err)
		}
	}
	return c.waitNodesReady(ctx, 2*time.Minute)
}

// startControllers runs kube-controller-manager and kube-scheduler in the
// first node's namespace.
func (c *Cluster) startControllers() error {
	n := c.Nodes[0]
	k8s := func(bin string) string { return filepath.Join(c.Binaries.K8sDir, bin) }
	cm, err := start(procSpec{name: "kube-controller-manager", netns: n.Netns, log: c.logPath("kube-controller-manager"), args: []string{
		k8s("kube-controller-manager"),
		"--kubeconfig=" + c.Kubeconfig, "--leader-elect=false",
		"--bind-address=127.0.0.1",
		// Pod CIDRs are the test bed's (registerNodes), not allocated.
		"--allocate-node-cidrs=false", "--cluster-cidr=" + ClusterCIDR.String(),
		"--service-cluster-ip-range=" + ServiceCIDR.String(),
		"--root-ca-file=" + filepath.Join(c.Dir, "pki", "apiserver.crt"),
		"--service-account-private-key-file=" + filepath.Join(c.Dir, "sa.key"),
		"--use-service-account-credentials=false",
		// Quick reactions, as tests wait on them.
		"--node-monitor-grace-period=20s",
	}})
	if err != nil {
		return err
	}
	c.onClose(func() error { cm.Stop(stopGrace); return nil })
	sched, err := start(procSpec{name: "kube-scheduler", netns: n.Netns, log: c.logPath("kube-scheduler"), args: []string{
		k8s("kube-scheduler"), "--kubeconfig=" + c.Kubeconfig, "--leader-elect=false", "--bind-address=127.0.0.1",
	}})
	if err != nil {
		return err
	}
	c.onClose(func() error { sched.Stop(stopGrace); return nil })
	return nil
}

// start prepares the node's cgroups, directories and configuration, runs
// containerd, imports images, and runs kubelet.
func (k *Kubelet) start(ctx context.Context, images []string) error {
	n := k.Node
	if err := k.makeCgroups(); err != nil {
		return err
	}
	// containerd, its shims and kubelet run in a cgroup v2 directory of
	// their own, so that teardown finds every one of them by PID.
	rt, err := k.c.addCgroup(n.Netns + "-rt")
	if err != nil {
		return err
	}
	k.c.onClose(func() error { return killCgroupTree(rt) })
	for _, d := range []string{"containerd", "cni", "ipam", "kubelet", "pod-logs", "sysctl"} {
		if err := os.MkdirAll(filepath.Join(k.Dir, d), 0o755); err != nil {
			return fmt.Errorf("make node directory: %w", err)
		}
	}
	if err := k.writeConfigs(); err != nil {
		return err
	}
	if k.containerd, err = start(procSpec{name: "containerd on " + n.Name, cgroup: rt, log: filepath.Join(k.Dir, "containerd.log"),
		args: k.containerdArgs()}); err != nil {
		return err
	}
	k.c.onClose(func() error { k.containerd.Stop(stopGrace); return nil })
	if err := k.waitContainerd(ctx); err != nil {
		return err
	}
	for _, img := range images {
		if err := k.Import(ctx, img); err != nil {
			return err
		}
	}
	pid := strconv.Itoa(k.containerd.PID())
	if k.kubelet, err = start(procSpec{name: "kubelet on " + n.Name, cgroup: rt, log: filepath.Join(k.Dir, "kubelet.log"), args: []string{
		"nsenter", "--net=/run/netns/" + n.Netns, "--mount=/proc/" + pid + "/ns/mnt", "--",
		filepath.Join(k.c.Binaries.K8sDir, "kubelet"),
		"--config=" + filepath.Join(k.Dir, "kubelet.yaml"),
		"--kubeconfig=" + k.c.Kubeconfig,
		"--hostname-override=" + n.Name, "--node-ip=" + n.IP.String(),
		"--root-dir=" + filepath.Join(k.Dir, "kubelet"),
		"--cert-dir=" + filepath.Join(k.Dir, "kubelet", "pki"),
	}}); err != nil {
		return err
	}
	k.c.onClose(func() error { k.kubelet.Stop(stopGrace); return nil })
	return nil
}

// containerdArgs enter the node's network namespace, make its mount
// namespace (see the top of this file) and exec containerd, which keeps the
// PID of the nsenter process.
func (k *Kubelet) containerdArgs() []string {
	var script strings.Builder
	script.WriteString("set -e\nmount --make-rshared /\n" +
		"mount -t tmpfs -o mode=755 tmpfs /run\nmount -t bpf bpf /sys/fs/bpf\n" +
		"mount -t tmpfs tmpfs /var/log\nmkdir -p /var/lib/cni\nmount -t tmpfs tmpfs /var/lib/cni\n")
	sysctlDir := filepath.Join(k.Dir, "sysctl")
	for _, key := range slices.Sorted(func(yield func(string) bool) {
		for key := range kubeletTunables {
			if !yield(key) {
				return
			}
		}
	}) {
		f := filepath.Join(sysctlDir, strings.ReplaceAll(key, "/", "."))
		fmt.Fprintf(&script, "echo %s > %s\nmount --bind %s /proc/sys/%s\n", kubeletTunables[key], f, f, key)
	}
	script.WriteString(`exec containerd --config "$1"` + "\n")
	return []string{"nsenter", "--net=/run/netns/" + k.Node.Netns, "--",
		"unshare", "--mount", "--propagation", "private", "--",
		"sh", "-c", script.String(), "sh", filepath.Join(k.Dir, "containerd.toml")}
}

// makeCgroups makes the node's cgroupRoot in every cgroup hierarchy (the v2
// one exists: Node.Cgroup), with the parent's cpuset, and arranges for the
// processes in them to be killed and the directories removed.
func (k *Kubelet) makeCgroups() error {
	dirs, err := cgroupDirs(filepath.Base(k.Node.Cgroup))
	if err != nil {
		return err
	}
	for _, d := range dirs {
		if d == k.Node.Cgroup {
			continue
		}
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("make cgroup: %w", err)
		}
		k.c.onClose(func() error { return killCgroupTree(d) })
		if filepath.Base(filepath.Dir(d)) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(filepath.Dir(d), f))
				if err == nil {
					err = os.WriteFile(filepath.Join(d, f), b, 0o644)
				}
				if err != nil {
					return fmt.Errorf("copy %s to cgroup %s: %w", f, d, err)
				}
			}
		}
	}
	// The pods' own cgroups below the node's cgroup v2 directory; the
	// directory itself is removed by addCgroup's cleanup.
	k.c.onClose(func() error { return killCgroupTree(k.Node.Cgroup, k.Node.Cgroup) })
	return nil
}

// cgroupDirs returns name's path in every mounted cgroup hierarchy
// (/sys/fs/cgroup/<hierarchy>/name on a hybrid layout, /sys/fs/cgroup/name
// on a unified one).
func cgroupDirs(name string) ([]string, error) {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return []string{filepath.Join("/sys/fs/cgroup", name)}, nil
	}
	entries, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return nil, fmt.Errorf("list cgroup hierarchies: %w", err)
	}
	var out []string
	for _, e := range entries {
		h := filepath.Join("/sys/fs/cgroup", e.Name())
		if _, err := os.Stat(filepath.Join(h, "cgroup.procs")); err == nil {
			out = append(out, filepath.Join(h, name))
		}
	}
	return out, nil
}

// killCgroupTree kills, by PID, every process in the cgroup directory dir
// and below, then removes the directories below dir and dir itself unless
// it is one of keep. Only directories are removed (rmdir), deepest first.
func killCgroupTree(dir string, keep ...string) error {
	if !strings.HasPrefix(dir, "/sys/fs/cgroup/") || !strings.Contains(filepath.Base(dir), "-") {
		return fmt.Errorf("remove cgroup %s: not a test bed cgroup", dir)
	}
	var last error
	for range 50 {
		var dirs []string
		alive := 0
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.IsDir() {
				return nil
			}
			dirs = append(dirs, p)
			b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if err != nil {
				return err
			}
			for f := range strings.FieldsSeq(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
					alive++
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			return nil
		})
		if errors.Is(err, fs.ErrNotExist) && len(dirs) == 0 {
			return nil
		}
		if err != nil {
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		if alive == 0 {
			last = nil
			for i := len(dirs) - 1; i >= 0; i-- {
				if slices.Contains(keep, dirs[i]) {
					continue
				}
				if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
					last = fmt.Errorf("remove cgroup %s: %w", dirs[i], err)
				}
			}
			if last == nil {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if last == nil {
		last = fmt.Errorf("remove cgroup %s: processes still alive", dir)
	}
	return last
}

// writeConfigs writes containerd's configuration, the runc wrapper, the
// CNI network and kubelet's configuration.
func (k *Kubelet) writeConfigs() error {
	runc, err := exec.LookPath("runc")
	if err != nil {
		return fmt.Errorf("find runc: %w", err)
	}
	k.Socket = filepath.Join(k.Dir, "containerd.sock")
	wrapper := filepath.Join(k.Dir, "runc")
	files := map[string]string{
		// This sandbox forbids a negative oom_score_adj, which kubelet asks
		// for pod sandboxes and node-critical pods (TESTBED.md): clamp it.
		wrapper: `#!/bin/sh
prev=
for a in "$@"; do
	case $prev in --bundle | -b) bundle=$a ;; esac
	case $a in --bundle=*) bundle=${a#--bundle=} ;; esac
	prev=$a
done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
	sed -i -E 's/"oomScoreAdj":-[0-9]+/"oomScoreAdj":0/' "$bundle/config.json"
fi
exec ` + runc + ` "$@"
`,
		filepath.Join(k.Dir, "containerd.toml"): fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = %[6]q
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %[7]q
`, filepath.Join(k.Dir, "containerd", "root"), filepath.Join(k.Dir, "containerd", "state"), k.Socket,
			filepath.Join(k.Dir, "containerd", "opt"), PauseImage, wrapper, filepath.Join(k.Dir, "cni")),
		filepath.Join(k.Dir, "cni", "10-testbed.conflist"): fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "testbed",
  "plugins": [{
    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
`, filepath.Join(k.Dir, "ipam"), k.Node.PodCIDR.String()),
		filepath.Join(k.Dir, "kubelet.yaml"): fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %s
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://%s
podLogsDir: %s
cgroupDriver: cgroupfs
cgroupRoot: %s
failCgroupV1: false
failSwapOn: false
protectKernelDefaults: true
resolvConf: ""
clusterDomain: %s
clusterDNS: [%s]
serializeImagePulls: false
# Images are imported, never pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 1Mi, nodefs.available: 1%%, imagefs.available: 1%%, nodefs.inodesFree: 1%%}
`, k.Node.IP, k.Socket, filepath.Join(k.Dir, "pod-logs"), k.CgroupRoot, ClusterDomain, k.c.Nodes[0].IP),
	}
	for path, content := range files {
		mode := os.FileMode(0o644)
		if path == wrapper {
			mode = 0o755
		}
		if err := os.WriteFile(path, []byte(content), mode); err != nil {
			return fmt.Errorf("write node configuration: %w", err)
		}
	}
	return nil
}

// waitContainerd waits until containerd answers on its socket.
func (k *Kubelet) waitContainerd(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := k.ctr(ctx, "version")
		if err == nil {
			return nil
		}
		if k.containerd.Exited() || time.Now().After(deadline) {
			return fmt.Errorf("wait for containerd on %s: %v: %s; log:\n%s", k.Node.Name, err, out, k.containerd.Tail(20))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (k *Kubelet) ctr(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ctr", append([]string{"--address", k.Socket, "--namespace", "k8s.io"}, args...)...).CombinedOutput()
	return string(out), err
}

// Import imports a docker-archive image tar into the node's containerd.
func (k *Kubelet) Import(ctx context.Context, tar string) error {
	if out, err := k.ctr(ctx, "images", "import", tar); err != nil {
		return fmt.Errorf("import image %s on %s: %w: %s", tar, k.Node.Name, err, strings.TrimSpace(out))
	}
	return nil
}

// ImportImage imports a docker-archive image tar on every node.
func (c *Cluster) ImportImage(ctx context.Context, tar string) error {
	for _, n := range c.Nodes {
		if n.Kubelet == nil {
			return fmt.Errorf("import image %s: node %s runs no kubelet", tar, n.Name)
		}
		if err := n.Kubelet.Import(ctx, tar); err != nil {
			return err
		}
	}
	return nil
}

// Tail returns the end of the node's kubelet and containerd logs.
func (k *Kubelet) Tail(n int) string {
	return "kubelet:\n" + k.kubelet.Tail(n) + "\ncontainerd:\n" + k.containerd.Tail(n)
}

// waitNodesReady waits until every kubelet reports its node Ready and the
// default namespace has its ServiceAccount and root CA (which Pods need).
func (c *Cluster) waitNodesReady(ctx context.Context, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	pending := "nodes"
	for {
		var err error
		if pending, err = c.clusterPending(ctx); err != nil {
			return err
		}
		if pending == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			msg := fmt.Sprintf("wait for the cluster: %v: %s", ctx.Err(), pending)
			for _, n := range c.Nodes {
				msg += fmt.Sprintf("\n%s %s", n.Name, n.Kubelet.Tail(15))
			}
			return errors.New(msg)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// clusterPending says what the cluster still lacks, or "" when ready.
func (c *Cluster) clusterPending(ctx context.Context) (string, error) {
	for _, n := range c.Nodes {
		for _, p := range []*Process{n.Kubelet.kubelet, n.Kubelet.containerd} {
			if p.Exited() {
				return "", fmt.Errorf("wait for node %s: %s exited; log:\n%s", n.Name, p.Name, p.Tail(30))
			}
		}
		node, err := c.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return "node " + n.Name + ": " + err.Error(), nil
		}
		ready := false
		for _, cond := range node.Status.Conditions {
			ready = ready || cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue && cond.Reason == "KubeletReady"
		}
		if !ready {
			return "node " + n.Name + " not Ready from its kubelet", nil
		}
	}
	if _, err := c.Kube.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
		return "ServiceAccount default/default: " + err.Error(), nil
	}
	if _, err := c.Kube.CoreV1().ConfigMaps("default").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{}); err != nil {
		if !apierrors.IsNotFound(err) {
			return "", fmt.Errorf("get ConfigMap default/kube-root-ca.crt: %w", err)
		}
		return "ConfigMap default/kube-root-ca.crt", nil
	}
	return "", nil
}

// Node returns the node with the given name, or nil.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}
