//go:build linux

package testbed

import (
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

// K8sVersion is the upstream Kubernetes release the test bed runs.
const K8sVersion = "v1.37.2"

// Binaries are the programs the test bed runs.
type Binaries struct {
	// EchoServer is the pod stand-in (test/echoserver).
	EchoServer string
	// Svcnat is the agent; needed only to run svcnat proxies.
	Svcnat string
	// K8sDir holds kube-apiserver, kube-proxy and kubectl.
	K8sDir string
	// Etcd is the etcd server binary.
	Etcd string
}

func (b Binaries) check() error {
	need := map[string]string{
		"echo server":    b.EchoServer,
		"etcd":           b.Etcd,
		"kube-apiserver": filepath.Join(b.K8sDir, "kube-apiserver"),
	}
	for what, path := range need {
		if path == "" {
			return fmt.Errorf("no %s binary given", what)
		}
		if _, err := os.Stat(path); err != nil {
			return fmt.Errorf("find %s binary: %w", what, err)
		}
	}
	return nil
}

// DefaultK8sDir is where kube-apiserver and kube-proxy are cached:
// $SVCNAT_K8S_BIN_DIR, or $HOME/.cache/svcnat/k8s-v1.37.2.
func DefaultK8sDir() string {
	if d := os.Getenv("SVCNAT_K8S_BIN_DIR"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = "/root"
	}
	return filepath.Join(home, ".cache", "svcnat", "k8s-"+K8sVersion)
}

// sourceRoot is the module root of this source tree.
func sourceRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("locate source tree: no caller information")
	}
	root := filepath.Join(filepath.Dir(file), "..", "..")
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		return "", fmt.Errorf("locate source tree: %w", err)
	}
	return root, nil
}

// BuildK8s builds kube-apiserver, kube-proxy and kubectl into dir from the tools
// module test/tools (about 10 minutes on 2 cores with a cold cache).
func BuildK8s(dir string) error {
	root, err := sourceRoot()
	if err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-o", dir+"/", "k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes/cmd/kube-proxy", "k8s.io/kubernetes/cmd/kubectl")
	cmd.Dir = filepath.Join(root, "test", "tools")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build kube-apiserver, kube-proxy and kubectl into %s: %w: %s", dir, err, out)
	}
	return nil
}

// LocateBinaries finds or builds what the test bed needs, for tests run
// from the source tree: the echo server (and svcnat, when withSvcnat) are
// taken from $SVCNAT_ECHOSERVER_BIN and $SVCNAT_BIN or built into buildDir;
// kube-apiserver, kube-proxy and kubectl come from DefaultK8sDir and are built there
// when missing; etcd is looked up in $PATH.
func LocateBinaries(buildDir string, withSvcnat bool) (Binaries, error) {
	b := Binaries{K8sDir: DefaultK8sDir()}
	var err error
	if b.Etcd, err = exec.LookPath("etcd"); err != nil {
		return b, fmt.Errorf("find etcd (Debian package etcd-server): %w", err)
	}
	if _, err := os.Stat(filepath.Join(b.K8sDir, "kubectl")); err != nil {
		if err := BuildK8s(b.K8sDir); err != nil {
			return b, err
		}
	}
	if b.EchoServer, err = buildFromSource("SVCNAT_ECHOSERVER_BIN", "./test/echoserver", buildDir, "echoserver"); err != nil {
		return b, err
	}
	if withSvcnat {
		if b.Svcnat, err = BuildSvcnat(buildDir); err != nil {
			return b, err
		}
	}
	return b, nil
}

// BuildSvcnat returns $SVCNAT_BIN, or builds ./cmd/svcnat into buildDir.
func BuildSvcnat(buildDir string) (string, error) {
	return buildFromSource("SVCNAT_BIN", "./cmd/svcnat", buildDir, "svcnat")
}

// buildFromSource returns the absolute path in $env, or builds pkg of this
// source tree into buildDir/name.
func buildFromSource(env, pkg, buildDir, name string) (string, error) {
	if p := os.Getenv(env); p != "" {
		return filepath.Abs(p)
	}
	root, err := sourceRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(buildDir, name)
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = root
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s (or set %s): %w: %s", pkg, env, err, strings.TrimSpace(string(msg)))
	}
	return out, nil
}

func insecureTLS() *tls.Config {
	return &tls.Config{InsecureSkipVerify: true} //nolint:gosec // self-signed apiserver of the test bed
}
