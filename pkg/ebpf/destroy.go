//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/model"
)

// socketDestroyer destroys the connected UDP sockets the socket hooks
// pointed at endpoints that no Service has any more (bpf/destroy.c).
type socketDestroyer struct {
	objs destroyObjects
	iter *link.Iter
}

// newSocketDestroyer loads the UDP socket iterator against the hooks'
// per-socket storage in pins. It needs kernel BTF and bpf_sock_destroy
// (Linux 6.5); the error says what failed.
func newSocketDestroyer(pins *mapPins) (*socketDestroyer, error) {
	spec, err := loadDestroy()
	if err != nil {
		return nil, err
	}
	repl, err := pins.open(spec)
	if err != nil {
		return nil, err
	}
	d := &socketDestroyer{}
	if err := spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		return nil, fmt.Errorf("load UDP socket iterator (needs kernel BTF and the bpf_sock_destroy kfunc): %w", err)
	}
	if d.iter, err = link.AttachIter(link.IterOptions{Program: d.objs.SvcnatDestroyUdp}); err != nil {
		d.objs.Close()
		return nil, fmt.Errorf("attach UDP socket iterator: %w", err)
	}
	return d, nil
}

func (d *socketDestroyer) Close() error {
	return errors.Join(d.iter.Close(), d.objs.Close())
}

// destroy destroys, in every network namespace a thread on the node is
// in, the UDP sockets the hooks connected to one of endpoints.
func (d *socketDestroyer) destroy(endpoints []svcnatBackend) error {
	if len(endpoints) == 0 {
		return nil
	}
	var keys []svcnatSvcKey
	for _, b := range endpoints {
		k := svcnatSvcKey{Addr: b.Addr, Port: b.Port, Proto: protoUDP}
		if err := d.objs.SvcnatDestroy.Put(k, uint8(1)); err != nil {
			return fmt.Errorf("mark endpoint %s port %d: %w", addrString(b.Addr), ntohs(b.Port), err)
		}
		keys = append(keys, k)
	}
	defer func() {
		for _, k := range keys {
			d.objs.SvcnatDestroy.Delete(k)
		}
	}()
	var errs []error
	for _, path := range namespaces() {
		if err := d.runIn(path); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// namespaces returns one /proc path per network namespace any thread on
// the node is in, the calling thread's first. Threads, not processes: a
// process's threads may be in different namespaces (the agent's own, when
// a helper thread switched namespace).
func namespaces() []string {
	paths := []string{"/proc/thread-self/ns/net"}
	seen := map[uint64]bool{}
	var st unix.Stat_t
	if unix.Stat(paths[0], &st) == nil {
		seen[st.Ino] = true
	}
	tasks, _ := filepath.Glob("/proc/[0-9]*/task/[0-9]*/ns/net")
	for _, p := range tasks {
		if unix.Stat(p, &st) != nil || seen[st.Ino] {
			continue // gone, or a namespace seen already
		}
		seen[st.Ino] = true
		paths = append(paths, p)
	}
	return paths
}

// runIn runs the iterator in the network namespace at path: the iterator
// walks the sockets of the namespace its reader is in.
func (d *socketDestroyer) runIn(path string) error {
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		var target, home netns.NsHandle
		if home, err = netns.Get(); err != nil {
			return
		}
		defer home.Close()
		if target, err = netns.GetFromPath(path); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				err = nil // the process is gone
			}
			return
		}
		defer target.Close()
		if err = netns.Set(target); err != nil {
			return
		}
		var r io.ReadCloser
		if r, err = d.iter.Open(); err == nil {
			_, err = io.Copy(io.Discard, r)
			r.Close()
		}
		if netns.Set(home) == nil {
			runtime.UnlockOSThread()
		} // else the thread stays locked and ends with the goroutine
	}()
	<-done
	if err != nil {
		return fmt.Errorf("destroy UDP sockets in network namespace %s: %w", path, err)
	}
	return nil
}

// destroyGone destroys the connected UDP sockets aimed at endpoints the
// last sync removed from the maps, or that drained since, once no UDP
// ServicePort of s has them serving: as kube-proxy keeps the conntrack
// entries of flows to a terminating endpoint, a socket talking to one goes
// on until the endpoint stops serving. Which endpoints serve changes only
// with a ServicePort, so a sync that changes none and removed nothing
// looks at nothing.
func (b *Backend) destroyGone(s *model.State) {
	if len(b.rec.removedUDP) == 0 && (len(b.draining) == 0 || s.Change != nil && s.Change.Empty()) {
		return
	}
	serving := map[svcnatBackend]bool{}
	for _, sp := range s.ServicePorts {
		if sp.Protocol != model.UDP {
			continue
		}
		for _, e := range sp.ServingEndpoints {
			serving[svcnatBackend{Addr: addr16(e.IP), Port: htons(e.Port)}] = true
		}
	}
	var gone []svcnatBackend
	for _, e := range slices.Concat(b.rec.removedUDP, slices.Collect(maps.Keys(b.draining))) {
		e.Flags, e.Pad = 0, 0
		if serving[e] {
			if b.draining == nil {
				b.draining = map[svcnatBackend]bool{}
			}
			b.draining[e] = true
			continue
		}
		delete(b.draining, e)
		gone = append(gone, e)
	}
	// Best effort: the maps are right; a socket left behind only delays its
	// client until it reconnects by itself.
	if err := b.destroyer.destroy(gone); err != nil {
		b.log.Warn("destroy UDP sockets aimed at removed endpoints", "error", err)
	}
}
