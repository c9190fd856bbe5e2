//go:build linux

package ebpf

import (
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// ErrNotSupported is in the chain of New's error when the kernel lacks a
// feature the backend needs; any other error of New says nothing about
// the kernel.
var ErrNotSupported = ebpf.ErrNotSupported

// probe names the first kernel feature the backend needs that is missing;
// tc says whether the tc programs are needed too.
func probe(tc bool) error {
	for _, mt := range []ebpf.MapType{ebpf.Hash, ebpf.LRUHash, ebpf.LPMTrie, ebpf.SkStorage} {
		if err := features.HaveMapType(mt); err != nil {
			return fmt.Errorf("kernel feature: map type %s: %w", mt, err)
		}
	}
	if err := features.HaveProgramType(ebpf.CGroupSockAddr); err != nil {
		return fmt.Errorf("kernel feature: program type %s: %w", ebpf.CGroupSockAddr, err)
	}
	for _, fn := range []asm.BuiltinFunc{asm.FnGetNetnsCookie, asm.FnSetRetval, asm.FnGetPrandomU32, asm.FnSkStorageGet} {
		if err := features.HaveProgramHelper(ebpf.CGroupSockAddr, fn); err != nil {
			return fmt.Errorf("kernel feature: helper %s in %s programs: %w", fn, ebpf.CGroupSockAddr, err)
		}
	}
	if !tc {
		return nil
	}
	if err := features.HaveProgramType(ebpf.SchedCLS); err != nil {
		return fmt.Errorf("kernel feature: program type %s: %w", ebpf.SchedCLS, err)
	}
	for _, fn := range []asm.BuiltinFunc{asm.FnCsumDiff, asm.FnSkbStoreBytes, asm.FnFibLookup, asm.FnRedirect} {
		if err := features.HaveProgramHelper(ebpf.SchedCLS, fn); err != nil {
			return fmt.Errorf("kernel feature: helper %s in %s programs: %w", fn, ebpf.SchedCLS, err)
		}
	}
	return nil
}

// checkBPFFS fails unless the parent of dir is a mounted bpffs.
func checkBPFFS(dir string) error {
	parent := filepath.Dir(filepath.Clean(dir))
	var st unix.Statfs_t
	if err := unix.Statfs(parent, &st); err != nil {
		return fmt.Errorf("check bpffs at %s: %w", parent, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("check bpffs: %s is not a bpffs mount (mount -t bpf bpf %s)", parent, parent)
	}
	return nil
}
