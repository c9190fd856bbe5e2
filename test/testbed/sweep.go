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
	roots := []string{"/sys/fs/bpf"}
	if r, err := cgroupRoot(); err == nil {
		roots = append(roots, r)
	}
	for _, root := range roots {
		matches, _ := filepath.Glob(filepath.Join(root, prefix+"-*"))
		for _, m := range matches {
			if strings.HasPrefix(root, "/sys/fs/bpf") {
				errs = append(errs, os.RemoveAll(m))
			} else {
				errs = append(errs, os.Remove(m))
			}
		}
	}
	if dir, err := os.ReadFile(path); err == nil && strings.HasPrefix(string(dir), os.TempDir()) {
		errs = append(errs, os.RemoveAll(string(dir)))
	}
	errs = append(errs, os.Remove(path))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("sweep dead test bed %s: %w", prefix, err)
	}
	return nil
}
