//go:build linux

package testbed

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Kubectl runs the test bed's kubectl against the cluster, from the first
// node's namespace, and returns its combined output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	full := append([]string{"netns", "exec", c.Nodes[0].Netns, filepath.Join(c.Binaries.K8sDir, "kubectl"), "--kubeconfig", c.Kubeconfig}, args...)
	out, err := exec.CommandContext(ctx, "ip", full...).CombinedOutput()
	return string(out), err
}

// DeploySvcnat applies deploy/ (RBAC, apiserver address, DaemonSet) with
// kubectl in cluster mode, edited only as its comments tell users to: the
// apiserver's address, and for SvcnatEBPF the eBPF flags, with each node's
// own cgroup (never the machine's root cgroup). It returns kubectl's output
// and does not wait for the pods.
func (c *Cluster) DeploySvcnat(ctx context.Context, kind ProxyKind) (string, error) {
	src, err := sourceRoot()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp(c.Dir, "deploy-")
	if err != nil {
		return "", fmt.Errorf("deploy svcnat: %w", err)
	}
	edits := map[string][2]string{
		"apiserver-config.yaml": {"KUBERNETES_SERVICE_HOST: svcnat-control-plane", "KUBERNETES_SERVICE_HOST: " + c.Nodes[0].IP.String()},
		"rbac.yaml":             {},
		"daemonset.yaml":        {},
	}
	if kind == SvcnatEBPF {
		cgroup := filepath.Join(filepath.Dir(c.Nodes[0].Cgroup), c.Prefix+"-$(NODE_NAME)")
		edits["daemonset.yaml"] = [2]string{"            - --backend=iptables\n",
			"            - --backend=ebpf\n            - --cgroup-path=" + cgroup + "\n            - --bpf-interfaces=eth0\n"}
	}
	args := []string{"apply"}
	for _, f := range []string{"rbac.yaml", "apiserver-config.yaml", "daemonset.yaml"} {
		b, err := os.ReadFile(filepath.Join(src, "deploy", f))
		if err != nil {
			return "", fmt.Errorf("deploy svcnat: %w", err)
		}
		s, e := string(b), edits[f]
		if e[0] != "" {
			if !strings.Contains(s, e[0]) {
				return "", fmt.Errorf("deploy svcnat: deploy/%s no longer contains %q", f, e[0])
			}
			s = strings.Replace(s, e[0], e[1], 1)
		}
		out := filepath.Join(dir, f)
		if err := os.WriteFile(out, []byte(s), 0o644); err != nil {
			return "", fmt.Errorf("deploy svcnat: %w", err)
		}
		args = append(args, "-f", out)
	}
	out, err := c.Kubectl(ctx, args...)
	if err != nil {
		return out, fmt.Errorf("deploy svcnat: kubectl apply -f deploy/: %w: %s", err, out)
	}
	return out, nil
}

// DaemonSetPending says why svcnat's DaemonSet is not yet at generation gen
// (or later), updated, ready and available on every node; "" when it is.
func (c *Cluster) DaemonSetPending(ctx context.Context, gen int64) (string, error) {
	ds, err := c.Kube.AppsV1().DaemonSets("kube-system").Get(ctx, "svcnat", metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("get DaemonSet kube-system/svcnat: %w", err)
	}
	st, want := ds.Status, int32(len(c.Nodes))
	if ds.Generation >= gen && st.ObservedGeneration >= ds.Generation && st.DesiredNumberScheduled == want &&
		st.UpdatedNumberScheduled == want && st.NumberReady == want && st.NumberAvailable == want {
		return "", nil
	}
	return fmt.Sprintf("generation %d (observed %d): desired %d, updated %d, ready %d, available %d",
		ds.Generation, st.ObservedGeneration, st.DesiredNumberScheduled, st.UpdatedNumberScheduled, st.NumberReady, st.NumberAvailable), nil
}
