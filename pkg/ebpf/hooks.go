//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Attaching the programs: the cgroup socket hooks, which translate a
// connect() or a sendmsg() to a Service, and the tc programs (attach.go)
// attach through links pinned under the bpffs directory, which a restarted
// agent points at its new programs in place.

// hook is one cgroup socket hook: the program and where it attaches.
type hook struct {
	prog   string
	attach ebpf.AttachType
}

var hooks = []hook{
	{svcnatProgSvcnatConnect4, ebpf.AttachCGroupInet4Connect},
	{svcnatProgSvcnatConnect6, ebpf.AttachCGroupInet6Connect},
	{svcnatProgSvcnatSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
	{svcnatProgSvcnatSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
	{svcnatProgSvcnatRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
	{svcnatProgSvcnatRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
	{svcnatProgSvcnatGetpeername4, ebpf.AttachCgroupInet4GetPeername},
	{svcnatProgSvcnatGetpeername6, ebpf.AttachCgroupInet6GetPeername},
}

// attach attaches the socket hooks and tc programs, updating the links an
// earlier run pinned in place, and then pins the maps made at Init.
func (b *Backend) attach() error {
	progs := map[string]*ebpf.Program{
		svcnatProgSvcnatConnect4: b.objs.SvcnatConnect4, svcnatProgSvcnatConnect6: b.objs.SvcnatConnect6,
		svcnatProgSvcnatSendmsg4: b.objs.SvcnatSendmsg4, svcnatProgSvcnatSendmsg6: b.objs.SvcnatSendmsg6,
		svcnatProgSvcnatRecvmsg4: b.objs.SvcnatRecvmsg4, svcnatProgSvcnatRecvmsg6: b.objs.SvcnatRecvmsg6,
		svcnatProgSvcnatGetpeername4: b.objs.SvcnatGetpeername4, svcnatProgSvcnatGetpeername6: b.objs.SvcnatGetpeername6,
	}
	for _, l := range b.links {
		l.Close()
	}
	b.links = nil
	cgroup, err := cgroupID(b.opts.CgroupPath)
	if err != nil {
		return fmt.Errorf("init ebpf backend: %w", err)
	}
	onCgroup := func(info link.Info) bool { return info.Cgroup() != nil && info.Cgroup().CgroupId == cgroup }
	for _, h := range hooks {
		pin := filepath.Join(b.opts.BPFFSPath, "links", h.prog)
		l, err := attachPinned(pin, progs[h.prog], onCgroup, func() (link.Link, error) {
			l, err := link.AttachCgroup(link.CgroupOptions{Path: b.opts.CgroupPath, Attach: h.attach, Program: progs[h.prog]})
			if err != nil {
				return nil, fmt.Errorf("attach %s to cgroup %s: %w", h.prog, b.opts.CgroupPath, err)
			}
			return l, nil
		})
		if err != nil {
			return fmt.Errorf("init ebpf backend: %w", err)
		}
		b.links = append(b.links, l)
	}
	for _, name := range b.opts.Interfaces {
		if err := b.attachInterface(name); err != nil {
			return fmt.Errorf("init ebpf backend: interface %s: %w", name, err)
		}
	}
	if err := b.detachOtherInterfaces(); err != nil {
		return fmt.Errorf("init ebpf backend: %w", err)
	}
	if err := b.pins.pinNew(); err != nil {
		return fmt.Errorf("init ebpf backend: %w", err)
	}
	b.log.Info("ebpf backend ready", "bpffs", b.opts.BPFFSPath, "cgroup", b.opts.CgroupPath)
	return nil
}

// attachPinned adopts the link pinned at pin, pointing it at prog, when
// onTarget says it is attached where it should be; otherwise (nothing
// pinned, or pinned for another cgroup or interface, or defunct) it
// detaches what is pinned, makes a new link with attach and pins it.
func attachPinned(pin string, prog *ebpf.Program, onTarget func(link.Info) bool, attach func() (link.Link, error)) (link.Link, error) {
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		if info, ierr := l.Info(); ierr == nil && onTarget(*info) {
			if err := l.Update(prog); err != nil {
				l.Close()
				return nil, fmt.Errorf("update pinned link %s: %w", pin, err)
			}
			return l, nil
		}
		if err := errors.Join(l.Unpin(), l.Close()); err != nil {
			return nil, fmt.Errorf("detach pinned link %s, attached elsewhere: %w", pin, err)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	if l, err = attach(); err != nil {
		return nil, err
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin link %s: %w", pin, err)
	}
	return l, nil
}

// cgroupID is the id the kernel gives the cgroup v2 directory path: its
// inode number.
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}
