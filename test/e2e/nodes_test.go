//go:build linux && e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// startNodes starts the test bed's cluster mode (kubelet and containerd on
// every node) with the base images and extra image tars imported, or skips
// the test when kubelet, containerd or the CNI plugins are missing.
func startNodes(t *testing.T, b testbed.Binaries, images ...string) *testbed.Cluster {
	t.Helper()
	for _, bin := range []string{"kubelet", "kube-controller-manager", "kube-scheduler"} {
		if _, err := os.Stat(filepath.Join(b.K8sDir, bin)); err != nil {
			t.Skipf("%s missing (scripts/k8s-bins.sh builds it): %v", bin, err)
		}
	}
	for _, f := range []string{"/usr/bin/containerd", "/usr/sbin/runc", "/usr/lib/cni/bridge", "/bin/busybox"} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("%s missing (scripts/setup.sh installs it): %v", f, err)
		}
	}
	base, err := testbed.BuildImages(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c := startCluster(t, t.Context(), b, testbed.Options{Kubelets: true, Images: append(base, images...)})
	// Runs before the cluster's removal.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		out, _ := c.Kubectl(context.Background(), "get", "events", "-A", "--sort-by=.lastTimestamp")
		t.Logf("events:\n%s", out)
		for _, n := range c.Nodes {
			t.Logf("%s, last lines of %s", n.Name, n.Kubelet.Tail(30))
		}
	})
	return c
}

// TestNodes checks the cluster mode itself: the scheduler places a Pod on
// each node, kubelet runs it through containerd on the node's CNI bridge
// with an address of the node's pod CIDR, pods reach each other across
// nodes, kubectl exec reaches the kubelets, and Close leaves no cgroup
// behind.
func TestNodes(t *testing.T) {
	b := binaries(t)
	c := startNodes(t, b)
	ctx := t.Context()
	ips := map[string]string{}
	for _, n := range c.Nodes {
		name := "web-" + n.Name
		pod := webPod(name, n.Name)
		if _, err := c.Kube.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		p := waitPodRunning(t, c, "default", name, 90*time.Second)
		if p.Spec.NodeName != n.Name || !n.PodCIDR.Contains(mustAddr(t, p.Status.PodIP)) {
			t.Fatalf("pod %s runs on %s with address %s, want node %s and an address in %s", name, p.Spec.NodeName, p.Status.PodIP, n.Name, n.PodCIDR)
		}
		ips[n.Name] = p.Status.PodIP
	}
	// From the node namespace of node1 to the pod on node2 (the LAN routes
	// pod CIDRs), and from the pod on node1 to the pod on node2 by exec.
	resp, err := testbed.HTTPClientIn(c.Nodes[0].Netns, 5*time.Second).Get("http://" + ips["node2"] + ":8080/")
	if err != nil {
		t.Fatalf("node1 -> pod on node2: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if got := strings.TrimSpace(string(body)); got != "web-node2" {
		t.Errorf("node1 -> pod on node2: answer %q, want web-node2", got)
	}
	out, err := c.Kubectl(ctx, "exec", "web-node1", "--", "sh", "-c", httpGet+"; get "+ips["node2"]+" 8080")
	if err != nil || strings.TrimSpace(out) != "web-node2" {
		t.Errorf("kubectl exec web-node1 -- get pod on node2: %v: %q, want web-node2", err, out)
	}
	// The cluster DNS: a pod resolves a Service's name to its ClusterIP.
	svc, err := c.Kube.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{Port: 80}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out, err = c.Kubectl(ctx, "exec", "web-node2", "--", "nslookup", "web.default.svc.cluster.local")
	if err != nil || !strings.Contains(out, svc.Spec.ClusterIP) {
		t.Errorf("nslookup web.default.svc.cluster.local in web-node2: %v: %q, want %s", err, out, svc.Spec.ClusterIP)
	}
	cgroups, err := filepath.Glob("/sys/fs/cgroup/*/" + c.Prefix + "-node1")
	if err != nil || len(cgroups) < 2 {
		t.Fatalf("node1's cgroups: %v %v, want one per hierarchy", cgroups, err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("remove test bed: %v", err)
	}
	left, _ := filepath.Glob("/sys/fs/cgroup/*/" + c.Prefix + "-*")
	if len(left) > 0 {
		t.Errorf("cgroups left after Close: %v", left)
	}
}

// httpGet defines the shell function `get HOST PORT`, which prints the body
// of an HTTP GET of / (a line), or nothing when the request fails. Busybox's
// own wget crashes in Debian's busybox-static 1.35; nc does not.
const httpGet = `get() { printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$1" "$2" 2>/dev/null | tail -n 1; }`

// webPod is a busybox Pod on node serving its name over HTTP on 8080.
func webPod(name, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{
			NodeSelector:                  map[string]string{"kubernetes.io/hostname": node},
			TerminationGracePeriodSeconds: new(int64),
			Containers: []corev1.Container{{
				Name: "web", Image: testbed.BusyboxImage, ImagePullPolicy: corev1.PullNever,
				Command: []string{"sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"},
			}},
		},
	}
}

// waitPodRunning waits until the pod runs with all containers ready.
func waitPodRunning(t *testing.T, c *testbed.Cluster, namespace, name string, limit time.Duration) *corev1.Pod {
	t.Helper()
	var p *corev1.Pod
	eventually(t, fmt.Sprintf("pod %s/%s running and ready", namespace, name), limit, func() error {
		var err error
		if p, err = c.Kube.CoreV1().Pods(namespace).Get(t.Context(), name, metav1.GetOptions{}); err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodRunning {
			return fmt.Errorf("phase %s: %s", p.Status.Phase, podWaiting(p))
		}
		for _, cs := range p.Status.ContainerStatuses {
			if !cs.Ready {
				return fmt.Errorf("container %s not ready: %s", cs.Name, podWaiting(p))
			}
		}
		return nil
	})
	return p
}

// podWaiting says why a pod's containers wait, if they do.
func podWaiting(p *corev1.Pod) string {
	var out []string
	for _, cs := range p.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil {
			out = append(out, fmt.Sprintf("%s waiting: %s %s", cs.Name, w.Reason, w.Message))
		}
		if term := cs.LastTerminationState.Terminated; term != nil {
			out = append(out, fmt.Sprintf("%s last ended: %s %s (exit %d)", cs.Name, term.Reason, term.Message, term.ExitCode))
		}
	}
	for _, cond := range p.Status.Conditions {
		if cond.Status != corev1.ConditionTrue && cond.Message != "" {
			out = append(out, fmt.Sprintf("%s: %s", cond.Type, cond.Message))
		}
	}
	return strings.Join(out, "; ")
}

func mustAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatalf("parse address %q: %v", s, err)
	}
	return a
}
