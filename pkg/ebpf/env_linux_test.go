//go:build linux

package ebpf

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
)

// testEnv is what a privileged test of the backend runs in: a bpffs of its
// own and a child cgroup of its own, both removed when the test ends. It is
// made inside the namespace netnstest.InNetns runs the test in, whose mount
// namespace is private: the bpffs and cgroup2 mounts below vanish with it.
type testEnv struct {
	bpffs      string // the pin directory for Options.BPFFSPath
	cgroupRoot string // the cgroup v2 hierarchy's root
	cgroup     string // the test's child cgroup
}

func newTestEnv(t testing.TB) *testEnv {
	t.Helper()
	bpffs := t.TempDir()
	if err := unix.Mount("bpf", bpffs, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs at %s: %v", bpffs, err)
	}
	t.Cleanup(func() { unix.Unmount(bpffs, unix.MNT_DETACH) })

	// `ip netns exec` remounted /sys, hiding /sys/fs/cgroup/unified; mount
	// the same cgroup v2 hierarchy again to reach it.
	root := t.TempDir()
	if err := unix.Mount("cgroup2", root, "cgroup2", 0, ""); err != nil {
		t.Fatalf("mount cgroup2 at %s: %v", root, err)
	}
	t.Cleanup(func() { unix.Unmount(root, unix.MNT_DETACH) })
	cg := filepath.Join(root, netnstest.Name("svcnat-test-"))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		// The cgroup can be busy for a moment after its last process left.
		var err error
		for range 50 {
			if err = os.Remove(cg); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: %v", cg, err)
	})
	return &testEnv{bpffs: filepath.Join(bpffs, "svcnat"), cgroupRoot: root, cgroup: cg}
}

// backend returns an initialised backend on env, closed (not cleaned up) at
// the end of the test.
func (env *testEnv) backend(t testing.TB) *Backend {
	t.Helper()
	b, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup})
	if err != nil {
		t.Fatalf("new backend: %v", err)
	}
	if err := b.Init(t.Context()); err != nil {
		t.Fatalf("init backend: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// enterCgroup moves the test process into the test cgroup, so that the
// sockets it creates from now on get the hooks, and moves it back to
// where it was when the test ends.
func (env *testEnv) enterCgroup(t *testing.T) {
	t.Helper()
	back := env.cgroupRoot
	if path, err := ownCgroup(); err == nil {
		back = filepath.Join(env.cgroupRoot, path)
	}
	move := func(dir string) error {
		return os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
	}
	if err := move(env.cgroup); err != nil {
		t.Fatalf("move test process into cgroup %s: %v", env.cgroup, err)
	}
	t.Cleanup(func() {
		if err := move(back); err != nil {
			t.Errorf("move test process back to cgroup %s: %v", back, err)
		}
	})
}

func ownCgroup() (string, error) {
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if path, ok := strings.CutPrefix(sc.Text(), "0::"); ok {
			return path, nil
		}
	}
	return "", errors.New("no cgroup v2 line in /proc/self/cgroup")
}

// pod is a network namespace joined to the test's namespace by a veth, with
// the given addresses on its end.
type pod struct {
	ns string
}

var vethCount int

// newPod creates a pod namespace with addrs (prefixes, e.g. 10.244.1.2/24),
// routed from the test namespace, whose end of the veth has 10.244.0.1
// and fd00:244::1.
func newPod(t *testing.T, addrs ...string) *pod {
	t.Helper()
	ns := netnstest.NewNamespace(t, "sn-p")
	vethCount++
	host, peer := fmt.Sprintf("vh%d", vethCount), fmt.Sprintf("vp%d", vethCount)
	netnstest.Run(t, "", "ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns)
	netnstest.Run(t, "", "ip", "link", "set", host, "up")
	netnstest.Run(t, ns, "ip", "link", "set", peer, "up")
	// The test namespace's own address toward its pods.
	netnstest.Run(t, "", "ip", "addr", "add", "10.244.0.1/32", "dev", host)
	netnstest.Run(t, "", "ip", "-6", "addr", "add", "fd00:244::1/128", "dev", host, "nodad")
	for _, a := range addrs {
		ip, _, _ := strings.Cut(a, "/")
		parsed := net.ParseIP(ip)
		if parsed.To4() != nil {
			netnstest.Run(t, ns, "ip", "addr", "add", a, "dev", peer)
			netnstest.Run(t, "", "ip", "route", "replace", ip+"/32", "dev", host)
		} else {
			netnstest.Run(t, ns, "ip", "-6", "addr", "add", a, "dev", peer, "nodad")
			netnstest.Run(t, "", "ip", "-6", "route", "replace", ip+"/128", "dev", host)
		}
	}
	netnstest.Run(t, ns, "ip", "route", "add", "default", "via", "10.244.0.1", "dev", peer, "onlink")
	netnstest.Run(t, ns, "ip", "-6", "route", "add", "default", "via", "fd00:244::1", "dev", peer, "onlink")
	return &pod{ns: ns}
}

// inNamespace runs fn on a thread switched to namespace ns; sockets fn
// creates stay in ns.
func inNamespace(t *testing.T, ns string, fn func()) {
	t.Helper()
	var wg sync.WaitGroup
	wg.Add(1)
	var err error
	go func() {
		defer wg.Done()
		runtime.LockOSThread()
		// The thread is left locked, so Go discards it when it ends rather
		// than reuse it in the wrong namespace.
		var target netns.NsHandle
		if target, err = netns.GetFromName(ns); err != nil {
			return
		}
		defer target.Close()
		if err = netns.Set(target); err != nil {
			return
		}
		fn()
	}()
	wg.Wait()
	if err != nil {
		t.Fatalf("enter namespace %s: %v", ns, err)
	}
}

// serveTCP answers every connection on addr in the pod with addr itself,
// then closes it.
func (p *pod) serveTCP(t *testing.T, addr string) {
	t.Helper()
	p.serveConns(t, addr, func(c net.Conn) { c.Write([]byte(addr)) })
}

// servePeer answers every connection on addr in the pod with the address
// it came from, then closes it.
func (p *pod) servePeer(t *testing.T, addr string) {
	t.Helper()
	p.serveConns(t, addr, func(c net.Conn) { c.Write([]byte(c.RemoteAddr().String())) })
}

// serveUDP answers every datagram on addr in the pod with addr itself.
func (p *pod) serveUDP(t *testing.T, addr string) {
	t.Helper()
	p.serveDatagrams(t, addr, func([]byte, net.Addr) []byte { return []byte(addr) })
}
