//go:build linux && e2e

package e2e

import (
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/svcnat/svcnat/test/testbed"
)

// TestDeployManifests sends deploy/*.yaml to the test bed's apiserver with
// a server-side dry run and strict field validation, so a schema error in
// the manifests fails here rather than on a user's cluster.
func TestDeployManifests(t *testing.T) {
	b := binaries(t)
	// kubectl of the same Kubernetes version, built with kube-apiserver
	// (the machine's own kubectl may be missing or of another version).
	kubectl := filepath.Join(b.K8sDir, "kubectl")
	files, err := filepath.Glob("../../deploy/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("find deploy/*.yaml: %v (%d files)", err, len(files))
	}
	// kind's cluster config is not a Kubernetes object.
	files = slices.DeleteFunc(files, func(f string) bool { return filepath.Base(f) == "kind-config.yaml" })
	c := startCluster(t, t.Context(), b, testbed.Options{Nodes: 1, PodsPerNode: 1, PodPorts: testbed.DefaultPodPorts})
	args := []string{"netns", "exec", c.Nodes[0].Netns, kubectl, "--kubeconfig", c.Kubeconfig,
		"apply", "--dry-run=server", "--validate=strict"}
	for _, f := range files {
		abs, err := filepath.Abs(f)
		if err != nil {
			t.Fatal(err)
		}
		args = append(args, "-f", abs)
	}
	out, err := exec.CommandContext(t.Context(), "ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl apply --dry-run=server of %s: %v\n%s", strings.Join(files, " "), err, out)
	}
	t.Logf("server-side dry run accepted:\n%s", out)
}
