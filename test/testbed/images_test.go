//go:build linux

package testbed

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// The agnhost image's wget, run as upstream's "service is up" checks run it
// (wget -q -O - -T 1 URL), reports a failed connection instead of crashing.
// It runs in a network namespace of its own, where nothing listens.
func TestAgnhostImageWget(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (chroot and a network namespace of its own)")
	}
	for _, bin := range []string{"unshare", "chroot", "/bin/busybox"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("needs %s: %v", bin, err)
		}
	}
	s, err := agnhostSpec(t.TempDir(), "/bin/true")
	if err != nil {
		t.Fatal(err)
	}
	// What PATH finds in the image: the root's program, or busybox's link.
	args := []string{"chroot", s.Root, "/usr/bin/wget"}
	if _, ok := s.Links["/bin/wget"]; ok {
		args = []string{s.Files["/bin/busybox"], "wget"}
	}
	cmd := exec.Command("unshare", append(append([]string{"-n", "--"}, args...), "-q", "-O", "-", "-T", "1", "http://127.0.0.1:1/")...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || !exit.Exited() || exit.ExitCode() == 0 {
		t.Fatalf("%v: want a failed connection reported by an exit status, got %v: %s", args, err, out)
	}
	if _, err := os.Stat(filepath.Join(s.Root, "usr/bin/wget")); err != nil {
		t.Errorf("the image has no GNU wget: %v", err)
	}
}
