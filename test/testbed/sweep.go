//go:build linux

package testbed

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// runLockDir holds one lock file per live test bed. A run holds an flock on
// its file for its whole life; the kernel drops it when the process dies,
// however it dies, so a lock that can be taken marks a dead run whose
// leftovers (namespaces, cgroups, pins, files) are swept by the next Start.
// Processes of a dead run are already gone: they are started with
// Pdeathsig.
const runLockDir = "/run/svcnat-testbed"

// lockRun creates and locks the run's lock file, recording its directory.
func (c *Cluster) lockRun() error {
	if err := os.MkdirAll(runLockDir, 0o755); err != nil {
		return fmt.Errorf("make run lock directory: %w", err)
	}
	path := filepath.Join(runLockDir, c.Prefix)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("create run lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return fmt.Errorf("lock run %s: %w", c.Prefix, err)
	}
	if _, err := f.WriteString(c.Dir); err != nil {
		f.Close()
		return fmt.Errorf("write run lock: %w", err)
	}
	c.onClose(func() error {
		err := os.Remove(path)
		return errors.Join(err, f.Close())
	})
	return nil
}

// sweep removes what dead runs left behind. Live runs hold their lock and
// are left alone.
func sweep() error {
	entries, err := os.ReadDir(runLockDir)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("sweep dead test beds: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if err := sweepRun(e.Name()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func sweepRun(prefix string) error {
	path := filepath.Join(runLockDir, prefix)
	f, err := os.Open(path)
	if err != nil {
		return nil // another Start swept it
	}
	defer f.Close()
	if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		return nil // alive
	}
	var errs []error
	out, err := run("", "ip", "netns", "list")
	if err != nil {
		return fmt.Errorf("sweep %s: %w", prefix, err)
	}
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], prefix+"-") {
			if _, err := run("", "ip", "netns", "del", f[0]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	roots := []string{"/sys/fs/bpf", netnsEtc}
	if r, err := cgroupRoot(); err == nil {
		roots = append(roots, r)
	}
	for _, root := range roots {
		matches, _ := filepath.Glob(filepath.Join(root, prefix+"-*"))
		for _, m := range matches {
			if strings.HasPrefix(root, "/sys/fs/bpf") || root == netnsEtc {
				errs = append(errs, os.RemoveAll(m))
			} else {
				// Pod processes that drop privileges (postgres) lose
				// Pdeathsig and outlive a dead run: end them first.
				_ = os.WriteFile(filepath.Join(m, "cgroup.kill"), []byte("1"), 0)
				errs = append(errs, removeCgroup(m))
			}
		}
	}
	dir, err := os.ReadFile(path)
	if err == nil && len(dir) > 0 {
		if err := removeRunDir(string(dir)); err != nil {
			// Keep the lock file so the next run tries again.
			return fmt.Errorf("sweep dead test bed %s: %w", prefix, errors.Join(append(errs, err)...))
		}
	}
	errs = append(errs, os.Remove(path))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("sweep dead test bed %s: %w", prefix, err)
	}
	return nil
}

// removeRunDir removes a run directory. Filesystems mounted below it (the
// bpffs and cgroup2 views of eBPF proxies) are detached first, and nothing
// is removed while one stays mounted: a recursive removal must never walk
// into a cgroup hierarchy, where it would delete the machine's empty cgroups.
func removeRunDir(dir string) error {
	if dir == "" || dir == "/" || !strings.HasPrefix(dir, os.TempDir()) {
		return fmt.Errorf("remove run directory %q: not under %s", dir, os.TempDir())
	}
	mounts, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	// Deepest first.
	for i := len(mounts) - 1; i >= 0; i-- {
		if err := syscall.Unmount(mounts[i], syscall.MNT_DETACH); err != nil {
			return fmt.Errorf("remove run directory: unmount %s: %w", mounts[i], err)
		}
	}
	if mounts, err = mountsUnder(dir); err != nil {
		return err
	}
	if len(mounts) > 0 {
		return fmt.Errorf("remove run directory %s: still mounted: %v", dir, mounts)
	}
	return os.RemoveAll(dir)
}

// mountsUnder lists the mount points at or below dir, in mount order.
func mountsUnder(dir string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out, nil
}

// unescapeMount undoes the octal escapes of /proc/self/mountinfo.
func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}
