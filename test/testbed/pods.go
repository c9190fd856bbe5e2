//go:build linux

package testbed

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// StartInPod starts a program of a Pod, as its container would run: in the
// pod's network namespace and its node's cgroup (so an eBPF proxy's socket
// hooks see it), logging to <Dir>/<name>.log. Close stops it (SIGTERM,
// then SIGKILL after 5 s), in reverse order of starting, so clients
// started after their servers stop first.
func (c *Cluster) StartInPod(p *Pod, name string, args ...string) (*Process, error) {
	proc, err := start(procSpec{name: name + " in " + p.Name, netns: p.Netns, cgroup: p.Node.Cgroup, args: args, log: c.logPath(name)})
	if err != nil {
		return nil, err
	}
	c.onClose(func() error { proc.Stop(stopGrace); return nil })
	return proc, nil
}

// WaitLog waits until the process's log holds s. It fails if the process
// ends first or limit passes, with the end of the log.
func (p *Process) WaitLog(s string, limit time.Duration) error {
	for deadline := time.Now().Add(limit); ; time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(p.Log)
		if strings.Contains(string(b), s) {
			return nil
		}
		if p.Exited() || time.Now().After(deadline) {
			return fmt.Errorf("wait for %s to log %q: not within %v (exited: %v); log:\n%s", p.Name, s, limit, p.Exited(), p.Tail(20))
		}
	}
}

// netnsEtc is where `ip netns exec NAME` finds files to mount over /etc
// for the processes it starts (see ip-netns(8)).
const netnsEtc = "/etc/netns"

// SetHosts gives the processes later started in the pod (StartInPod) an
// /etc/hosts with localhost, the pod's own name and the given names, the
// way a cluster's DNS would answer them: the test bed has no DNS. It is
// written to /etc/netns/<pod namespace>/hosts, which `ip netns exec` mounts
// over /etc/hosts; Close removes it.
func (c *Cluster) SetHosts(p *Pod, names map[string]netip.Addr) error {
	dir := filepath.Join(netnsEtc, p.Netns)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("set hosts of %s: %w", p.Name, err)
	}
	c.onClose(func() error { return os.RemoveAll(dir) })
	lines := []string{"127.0.0.1\tlocalhost", fmt.Sprintf("%s\t%s", p.IP, p.Name)}
	for name, addr := range names {
		lines = append(lines, fmt.Sprintf("%s\t%s", addr, name))
	}
	sort.Strings(lines[2:])
	if err := os.WriteFile(filepath.Join(dir, "hosts"), []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		return fmt.Errorf("set hosts of %s: %w", p.Name, err)
	}
	return nil
}

// SourceRoot is the root of this source tree (for building its programs).
func SourceRoot() (string, error) { return sourceRoot() }
