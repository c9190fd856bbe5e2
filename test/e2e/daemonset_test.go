//go:build linux && e2e

package e2e

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// TestDaemonSet deploys svcnat as users do, `kubectl apply -f deploy/`, on
// the cluster mode's real nodes, for each svcnat backend in
// SVCNAT_E2E_PROXIES: the DaemonSet's pods run on every node, privileged in
// the node's network namespace, read the API as the ServiceAccount of
// deploy/rbac.yaml, and pass their probes; a Service then carries a pod's
// connections to pods on both nodes; and a rolling update of the DaemonSet
// (a new image tag) runs while a client pod opens new connections through
// the Service, none of which may fail.
func TestDaemonSet(t *testing.T) {
	kinds, err := testbed.ParseProxyKinds(cmpOr(os.Getenv("SVCNAT_E2E_PROXIES"), string(testbed.SvcnatIptables)))
	if err != nil {
		t.Fatal(err)
	}
	b := binaries(t)
	for _, kind := range kinds {
		if !kind.IsSvcnat() {
			continue
		}
		t.Run(string(kind), func(t *testing.T) {
			if b.Svcnat == "" {
				if b.Svcnat, err = testbed.BuildSvcnat(t.TempDir()); err != nil {
					t.Skipf("svcnat binary missing: %v", err)
				}
			}
			testDaemonSet(t, b, kind)
		})
	}
}

func testDaemonSet(t *testing.T, b testbed.Binaries, kind testbed.ProxyKind) {
	ctx := t.Context()
	began := time.Now()
	img, err := testbed.BuildSvcnatImage(t.TempDir(), b.Svcnat, testbed.SvcnatImage, "svcnat:v2")
	if err != nil {
		t.Fatal(err)
	}
	c := startNodes(t, b, img)
	t.Logf("cluster with kubelets up in %v", time.Since(began).Round(time.Millisecond))

	// deploy/ as shipped, with the two edits its comments ask for.
	out, err := c.DeploySvcnat(ctx, kind)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kubectl apply:\n%s", out)
	waitDaemonSet(t, c, 1)
	t.Logf("DaemonSet ready on every node after %v", time.Since(began).Round(time.Millisecond))
	pods := svcnatPods(t, c)
	for _, p := range pods {
		ctr := p.Spec.Containers[0]
		if !p.Spec.HostNetwork || ctr.SecurityContext == nil || ctr.SecurityContext.Privileged == nil || !*ctr.SecurityContext.Privileged ||
			p.Spec.ServiceAccountName != "svcnat" || p.Status.PodIP != p.Status.HostIP {
			t.Errorf("pod %s on %s: hostNetwork %v, privileged %v, service account %q, pod IP %s, host IP %s; want host network, privileged, svcnat, the node's IP",
				p.Name, p.Spec.NodeName, p.Spec.HostNetwork, ctr.SecurityContext, p.Spec.ServiceAccountName, p.Status.PodIP, p.Status.HostIP)
		}
	}

	// Backends on both nodes, a Service, a client on node1.
	for _, n := range c.Nodes {
		if _, err := c.Kube.CoreV1().Pods("default").Create(ctx, webPod("web-"+n.Name, n.Name), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	svc, err := c.Kube.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var webIPs []string
	for _, n := range c.Nodes {
		webIPs = append(webIPs, waitPodRunning(t, c, "default", "web-"+n.Name, 90*time.Second).Status.PodIP)
	}
	// The EndpointSlice controller lists a pod some time after it is ready:
	// probe only once the Service's slices hold both.
	eventually(t, "the web Service's EndpointSlices list both pods ready", 60*time.Second, func() error {
		slices, err := c.Kube.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=web"})
		if err != nil {
			return err
		}
		ready := map[string]bool{}
		for _, s := range slices.Items {
			for _, ep := range s.Endpoints {
				if ep.Conditions.Ready != nil && *ep.Conditions.Ready {
					for _, a := range ep.Addresses {
						ready[a] = true
					}
				}
			}
		}
		for _, ip := range webIPs {
			if !ready[ip] {
				return fmt.Errorf("%s not ready in the slices (%v)", ip, ready)
			}
		}
		return nil
	})
	// Each agent runs the backend asked for; an eBPF agent attaches to its
	// node's cgroup, which holds the node's pods.
	backend := strings.TrimPrefix(string(kind), "svcnat-")
	for _, p := range svcnatPods(t, c) {
		logs := podLog(t, c, "kube-system", p.Name)
		if !strings.Contains(logs, "backend="+backend) {
			t.Errorf("svcnat pod %s on %s: no backend=%s in its log:\n%s", p.Name, p.Spec.NodeName, backend, logs)
		}
		if kind != testbed.SvcnatEBPF {
			continue
		}
		n := c.Node(p.Spec.NodeName)
		if !strings.Contains(logs, "cgroup="+n.Cgroup) {
			t.Errorf("svcnat pod %s: not attached to %s:\n%s", p.Name, n.Cgroup, logs)
		}
		if procs := cgroupProcs(t, n.Cgroup); procs == 0 {
			t.Errorf("no process in %s and below: the node's pods are not in the cgroup svcnat attaches to", n.Cgroup)
		}
	}
	url := svc.Spec.ClusterIP + " 80"
	// Through the Service from a pod, once the agents have programmed it
	// (up to 30 s): both backends answer.
	client := clientPod("probe", c.Nodes[0].Name, fmt.Sprintf(httpGet+`; i=0
while [ $i -lt 30 ] && [ -z "$(get %[1]s)" ]; do sleep 1; i=$((i+1)); done
i=0; while [ $i -lt 40 ]; do get %[1]s; i=$((i+1)); done`, url))
	answers := runClientPod(t, c, client, 2*time.Minute)
	for _, n := range c.Nodes {
		if !strings.Contains(answers, "web-"+n.Name) {
			t.Errorf("40 requests to %s from a pod on %s: no answer from web-%s; got:\n%s", url, c.Nodes[0].Name, n.Name, answers)
		}
	}

	// A rolling update to another image tag while a client opens new
	// connections through the Service, one every 50 ms for 75 s.
	stream := clientPod("stream", c.Nodes[0].Name, fmt.Sprintf(httpGet+`; ok=0; fail=0; end=$(($(date +%%s)+75))
while [ $(date +%%s) -lt $end ]; do
	case $(get %s) in web-*) ok=$((ok+1)) ;; *) fail=$((fail+1)); echo "failed at $(date +%%T)" ;; esac
	sleep 0.05
done
echo "ok=$ok fail=$fail"`, url))
	if _, err := c.Kube.CoreV1().Pods("default").Create(ctx, stream, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPodRunning(t, c, "default", "stream", time.Minute)
	time.Sleep(5 * time.Second)
	if out, err := c.Kubectl(ctx, "-n", "kube-system", "set", "image", "daemonset/svcnat", "svcnat=svcnat:v2"); err != nil {
		t.Fatalf("kubectl set image: %v\n%s", err, out)
	}
	rollout := time.Now()
	waitDaemonSet(t, c, 2)
	t.Logf("rolling update done in %v", time.Since(rollout).Round(time.Millisecond))
	for _, p := range svcnatPods(t, c) {
		if img := p.Spec.Containers[0].Image; img != "svcnat:v2" {
			t.Errorf("pod %s runs %s after the update, want svcnat:v2", p.Name, img)
		}
	}
	logs := waitClientPod(t, c, "stream", 2*time.Minute)
	m := regexp.MustCompile(`ok=(\d+) fail=(\d+)`).FindStringSubmatch(logs)
	if m == nil {
		t.Fatalf("stream client: no summary in its log:\n%s", logs)
	}
	ok, _ := strconv.Atoi(m[1])
	fail, _ := strconv.Atoi(m[2])
	t.Logf("during the rolling update: %d connections, %d failed", ok+fail, fail)
	if fail > 0 || ok < 100 {
		t.Errorf("rolling update: %d of %d new connections through the Service failed (want none, and at least 100 made):\n%s", fail, ok+fail, logs)
	}
	for _, p := range svcnatPods(t, c) {
		if r := p.Status.ContainerStatuses[0].RestartCount; r > 0 {
			t.Errorf("svcnat pod %s restarted %d times (liveness)", p.Name, r)
		}
	}
}

// waitDaemonSet waits until svcnat's DaemonSet has generation gen observed,
// updated, available and ready on every node.
func waitDaemonSet(t *testing.T, c *testbed.Cluster, gen int64) {
	t.Helper()
	eventually(t, fmt.Sprintf("DaemonSet svcnat generation %d ready on every node", gen), 3*time.Minute, func() error {
		pending, err := c.DaemonSetPending(t.Context(), gen)
		if err != nil || pending == "" {
			return err
		}
		why := []string{pending}
		for _, p := range svcnatPods(t, c) {
			why = append(why, fmt.Sprintf("%s on %s: %s %s", p.Name, p.Spec.NodeName, p.Status.Phase, podWaiting(&p)))
		}
		return errors.New(strings.Join(why, "; "))
	})
}

func svcnatPods(t *testing.T, c *testbed.Cluster) []corev1.Pod {
	t.Helper()
	l, err := c.Kube.CoreV1().Pods("kube-system").List(t.Context(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=svcnat"})
	if err != nil {
		t.Fatal(err)
	}
	return l.Items
}

// clientPod is a busybox Pod on node that runs script once.
func clientPod(name, node, script string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			NodeSelector:                  map[string]string{"kubernetes.io/hostname": node},
			RestartPolicy:                 corev1.RestartPolicyNever,
			TerminationGracePeriodSeconds: new(int64),
			Containers: []corev1.Container{{
				Name: "client", Image: testbed.BusyboxImage, ImagePullPolicy: corev1.PullNever,
				Command: []string{"sh", "-c", script},
			}},
		},
	}
}

// runClientPod creates the pod, waits until it ends and returns its log.
func runClientPod(t *testing.T, c *testbed.Cluster, p *corev1.Pod, limit time.Duration) string {
	t.Helper()
	if _, err := c.Kube.CoreV1().Pods("default").Create(t.Context(), p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return waitClientPod(t, c, p.Name, limit)
}

// waitClientPod waits until the pod in default ends and returns its log.
func waitClientPod(t *testing.T, c *testbed.Cluster, name string, limit time.Duration) string {
	t.Helper()
	eventually(t, "pod "+name+" done", limit, func() error {
		p, err := c.Kube.CoreV1().Pods("default").Get(t.Context(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			return fmt.Errorf("phase %s: %s", p.Status.Phase, podWaiting(p))
		}
		return nil
	})
	return podLog(t, c, "default", name)
}

func podLog(t *testing.T, c *testbed.Cluster, namespace, name string) string {
	t.Helper()
	b, err := c.Kube.CoreV1().Pods(namespace).GetLogs(name, &corev1.PodLogOptions{}).DoRaw(t.Context())
	if err != nil {
		t.Fatalf("logs of pod %s/%s: %v", namespace, name, err)
	}
	return string(b)
}

// cgroupProcs counts the processes in a cgroup and below.
func cgroupProcs(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		n += len(strings.Fields(string(b)))
		return err
	})
	if err != nil {
		t.Fatalf("count processes in %s: %v", dir, err)
	}
	return n
}
