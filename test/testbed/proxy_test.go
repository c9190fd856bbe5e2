//go:build linux

package testbed

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// cgroupCPUSeconds reads the test's own cgroup: at least the CPU this test
// burns, and an error naming the directory where there is no cpu.stat.
func TestCgroupCPUSeconds(t *testing.T) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	var own string
	for line := range strings.SplitSeq(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			own = p
		}
	}
	root, err := cgroupRoot()
	if own == "" || err != nil {
		t.Skipf("no cgroup v2 hierarchy: %v", err)
	}
	const burn = 50 * time.Millisecond
	for start := time.Now(); time.Since(start) < burn; {
	}
	if cpu, err := cgroupCPUSeconds(filepath.Join(root, own)); err != nil || cpu < burn.Seconds() {
		t.Errorf("cgroupCPUSeconds(own cgroup) = %v, %v; want at least %v", cpu, err, burn.Seconds())
	}
	dir := t.TempDir()
	if _, err := cgroupCPUSeconds(dir); err == nil || !strings.Contains(err.Error(), dir) {
		t.Errorf("cgroupCPUSeconds(a directory without cpu.stat): error %v, want one naming it", err)
	}
}
