//go:build linux

package testbed

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Result is one probe attempt, as the echo server's probe mode prints it.
type Result struct {
	// Pod is the pod that answered, Client the source address it saw.
	Pod    string `json:"pod"`
	Client string `json:"client"`
	Port   int    `json:"port"`
	// Err is empty on success; Refused marks "connection refused".
	Err     string `json:"err,omitempty"`
	Refused bool   `json:"refused,omitempty"`
	// Status is the HTTP status of http probes.
	Status int `json:"status,omitempty"`
	// Sent counts lines echoed back on a stream.
	Sent int `json:"sent,omitempty"`
	// From is where the answer appeared to come from (udp-socket probes).
	From string `json:"from,omitempty"`
}

// OK reports whether the attempt reached an echo server.
func (r Result) OK() bool { return r.Err == "" && r.Pod != "" }

// ClientIP returns the source address the server saw.
func (r Result) ClientIP() netip.Addr {
	ap, err := netip.ParseAddrPort(r.Client)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr()
}

// Origin is where traffic starts: a pod, a node or the external client.
type Origin struct {
	Name  string
	Netns string
	// Cgroup is the cgroup the probe process runs in (a node's, for pods
	// and nodes), so that an eBPF proxy's socket hooks see it.
	Cgroup string
	IP     netip.Addr
}

// Origin returns the pod as a traffic source.
func (p *Pod) Origin() Origin {
	return Origin{Name: p.Name, Netns: p.Netns, Cgroup: p.Node.Cgroup, IP: p.IP}
}

// Origin returns the node itself (a host-network process) as a traffic source.
func (n *Node) Origin() Origin {
	return Origin{Name: n.Name, Netns: n.Netns, Cgroup: n.Cgroup, IP: n.IP}
}

// ClientOrigin returns the external client on the LAN as a traffic source.
func (c *Cluster) ClientOrigin() Origin {
	return Origin{Name: "client", Netns: c.Client, IP: ClientIP}
}

// ProbeSpec describes a probe run.
type ProbeSpec struct {
	Proto string // tcp, udp, udp-socket or http
	Addr  netip.AddrPort
	// More are further addresses a udp-socket probe sends to in turn, from
	// the same unconnected socket.
	More []netip.AddrPort
	// N attempts, one connection or datagram each (default 1).
	N int
	// Timeout per attempt (default 2s).
	Timeout time.Duration
	// SourcePort pins the local port (0 picks one).
	SourcePort int
}

func (s ProbeSpec) args() []string {
	if s.N == 0 {
		s.N = 1
	}
	if s.Timeout == 0 {
		s.Timeout = 2 * time.Second
	}
	addrs := s.Addr.String()
	for _, a := range s.More {
		addrs += "," + a.String()
	}
	return []string{"probe", "-proto", s.Proto, "-addr", addrs,
		"-n", fmt.Sprint(s.N), "-timeout", s.Timeout.String(), "-sport", fmt.Sprint(s.SourcePort)}
}

func (c *Cluster) probeCmd(ctx context.Context, from Origin, args []string) (*exec.Cmd, func(), error) {
	full := append([]string{"netns", "exec", from.Netns, c.Binaries.EchoServer}, args...)
	cmd := exec.CommandContext(ctx, "ip", full...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	closeFD := func() {}
	if from.Cgroup != "" {
		fd, err := syscall.Open(from.Cgroup, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("probe from %s: open cgroup: %w", from.Name, err)
		}
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
		closeFD = func() { syscall.Close(fd) }
	}
	return cmd, closeFD, nil
}

// Probe runs the echo server's probe mode from an origin and returns one
// Result per attempt. An error means the probe itself could not run; failed
// attempts are Results with Err set.
func (c *Cluster) Probe(ctx context.Context, from Origin, s ProbeSpec) ([]Result, error) {
	limit := time.Duration(max(s.N, 1))*max(s.Timeout, 2*time.Second) + 10*time.Second
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	cmd, closeFD, err := c.probeCmd(ctx, from, s.args())
	if err != nil {
		return nil, err
	}
	defer closeFD()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("probe %s %s from %s: %w: %s", s.Proto, s.Addr, from.Name, err, stderr.String())
	}
	return parseResults(string(out))
}

func parseResults(out string) ([]Result, error) {
	var rs []Result
	for line := range strings.SplitSeq(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		var r Result
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			return nil, fmt.Errorf("decode probe output %q: %w", line, err)
		}
		rs = append(rs, r)
	}
	return rs, nil
}

// Stream is a long-lived TCP connection held open by a probe process.
type Stream struct {
	// First is the result of connecting.
	First Result
	cmd   *exec.Cmd
	out   *bufio.Scanner
	done  func()
}

// StartStream opens a TCP connection from an origin and keeps sending a line
// every interval for d, checking each is echoed. It returns once the
// connection is up (or failed).
func (c *Cluster) StartStream(ctx context.Context, from Origin, addr netip.AddrPort, d, interval time.Duration) (*Stream, error) {
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	cmd, closeFD, err := c.probeCmd(ctx, from, []string{"probe", "-addr", addr.String(),
		"-stream", d.String(), "-interval", interval.String(), "-timeout", "3s"})
	if err != nil {
		cancel()
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		cancel()
		closeFD()
		return nil, fmt.Errorf("stream from %s: %w", from.Name, err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		closeFD()
		return nil, fmt.Errorf("stream from %s: %w", from.Name, err)
	}
	closeFD()
	s := &Stream{cmd: cmd, out: bufio.NewScanner(stdout), done: cancel}
	if !s.out.Scan() {
		cancel()
		_ = cmd.Wait()
		return nil, fmt.Errorf("stream from %s to %s: no first result", from.Name, addr)
	}
	if err := json.Unmarshal(s.out.Bytes(), &s.First); err != nil {
		return nil, fmt.Errorf("decode stream output: %w", err)
	}
	return s, nil
}

// Wait waits for the stream to end and returns its final result.
func (s *Stream) Wait() (Result, error) {
	defer s.done()
	var r Result
	if !s.out.Scan() {
		_ = s.cmd.Wait()
		return r, fmt.Errorf("stream ended without a final result")
	}
	err := json.Unmarshal(s.out.Bytes(), &r)
	if werr := s.cmd.Wait(); werr != nil && err == nil {
		err = fmt.Errorf("stream probe: %w", werr)
	}
	return r, err
}
