//go:build linux

package testbed

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/svcnat/svcnat/test/imagebuild"
)

// Image names as upstream's e2e framework expects them
// (k8s.io/kubernetes/test/utils/image/manifest.go of K8sVersion).
const (
	BusyboxImage = "registry.k8s.io/e2e-test-images/busybox:1.37.0-2"
	AgnhostImage = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
)

// BuildImages writes the images every node of the cluster mode needs into
// dir and returns their tar files: pause (PauseImage, the test bed's own
// static binary) and busybox (BusyboxImage, from Debian's busybox-static).
func BuildImages(dir string) ([]string, error) {
	root, err := sourceRoot()
	if err != nil {
		return nil, err
	}
	pause := filepath.Join(dir, "pause")
	cmd := exec.Command("go", "build", "-trimpath", "-o", pause, "./test/imagebuild/pause")
	cmd.Dir, cmd.Env = root, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build the pause binary: %w: %s", err, out)
	}
	busybox, err := busyboxSpec(BusyboxImage)
	if err != nil {
		return nil, err
	}
	specs := map[string]imagebuild.Spec{
		"pause.tar":   {Tags: []string{PauseImage}, Files: map[string]string{"/pause": pause}, Entrypoint: []string{"/pause"}},
		"busybox.tar": busybox,
	}
	var tars []string
	for name, s := range specs {
		tar := filepath.Join(dir, name)
		if err := imagebuild.WriteFile(tar, s); err != nil {
			return nil, err
		}
		tars = append(tars, tar)
	}
	return tars, nil
}

// busyboxSpec is an image of Debian's static busybox with a link per applet
// in /bin.
func busyboxSpec(tag string) (imagebuild.Spec, error) {
	const bin = "/bin/busybox"
	out, err := exec.Command(bin, "--list").Output()
	if err != nil {
		return imagebuild.Spec{}, fmt.Errorf("list busybox applets (Debian package busybox-static): %w", err)
	}
	s := imagebuild.Spec{Tags: []string{tag}, Files: map[string]string{"/bin/busybox": bin},
		Links: map[string]string{}, Cmd: []string{"sh"}}
	for a := range strings.FieldsSeq(string(out)) {
		if a != "busybox" {
			s.Links["/bin/"+a] = "busybox"
		}
	}
	return s, nil
}

// SvcnatImage is the image name of deploy/daemonset.yaml.
const SvcnatImage = "svcnat:latest"

// BuildSvcnatImage writes svcnat's image as `make image` does (a root from
// this machine's Debian iptables packages, the agent at
// /usr/local/bin/svcnat) into dir, under the given tags, and returns the tar
// file.
func BuildSvcnatImage(dir, svcnat string, tags ...string) (string, error) {
	root, err := debianRoot(filepath.Join(dir, "svcnat-root"), "iptables")
	if err != nil {
		return "", err
	}
	tar := filepath.Join(dir, "svcnat-image.tar")
	return tar, imagebuild.WriteFile(tar, imagebuild.Spec{
		Tags: tags, Root: root, Files: map[string]string{"/usr/local/bin/svcnat": svcnat},
		Entrypoint: []string{"/usr/local/bin/svcnat"}, Cmd: []string{"run"},
	})
}

// BuildAgnhostImage writes upstream's test image (AgnhostImage) into dir
// and returns the tar file (see agnhostSpec).
func BuildAgnhostImage(dir, agnhost string) (string, error) {
	s, err := agnhostSpec(dir, agnhost)
	if err != nil {
		return "", err
	}
	tar := filepath.Join(dir, "agnhost.tar")
	return tar, imagebuild.WriteFile(tar, s)
}

// agnhostSpec is upstream's test image: the agnhost binary (built from
// k8s.io/kubernetes/test/images/agnhost) as its entrypoint; dash, curl,
// OpenBSD netcat and GNU wget from this machine's Debian packages, as
// upstream's image has them for the commands tests run in it; and busybox's
// other applets. Its root is made in dir.
func agnhostSpec(dir, agnhost string) (imagebuild.Spec, error) {
	// dash as /bin/sh: Debian's busybox shell runs its own applets before
	// the programs in $PATH, so curl and nc would be busybox's. GNU wget:
	// Debian's static busybox 1.35 wget dies of SIGSEGV with -T, which
	// upstream's checks that a Service is up use ("wget -q -O - -T 1").
	root, err := debianRoot(filepath.Join(dir, "agnhost-root"), "dash", "curl", "netcat-openbsd", "wget")
	if err != nil {
		return imagebuild.Spec{}, err
	}
	s, err := busyboxSpec(AgnhostImage)
	if err != nil {
		return imagebuild.Spec{}, err
	}
	for link := range s.Links {
		if _, err := os.Lstat(filepath.Join(root, link)); err == nil {
			delete(s.Links, link) // the Debian program, not busybox's
		}
	}
	s.Root = root
	s.Files["/agnhost"] = agnhost
	s.Entrypoint, s.Cmd = []string{"/agnhost"}, nil
	return s, nil
}

// debianRoot makes an image root in dir from the installed Debian packages
// (scripts/image-root.sh) and returns dir.
func debianRoot(dir string, packages ...string) (string, error) {
	src, err := sourceRoot()
	if err != nil {
		return "", err
	}
	if out, err := exec.Command(filepath.Join(src, "scripts", "image-root.sh"), append([]string{dir}, packages...)...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("make an image root of %v: %w: %s", packages, err, out)
	}
	return dir, nil
}
