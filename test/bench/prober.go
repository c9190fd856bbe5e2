//go:build linux

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
)

// The benchmark re-executes itself as a prober: a long-lived process inside
// a pod namespace and its node's cgroup (so an eBPF proxy's socket hooks see
// its connects), taking one JSON request per line on standard input and
// answering one JSON response per line on standard output. Keeping one
// process per origin avoids a process start per connection, which would
// dwarf the latencies being measured.

// roleEnv selects the prober role when set to "prober".
const roleEnv = "SVCNAT_BENCH_ROLE"

// proberRequest is one job for the prober.
type proberRequest struct {
	// Op is "watch" (connect to each of Targets repeatedly until it shows
	// the change it waits for) or "ab" (Pairs pairs of new connections,
	// alternating Addr and Direct).
	Op      string        `json:"op"`
	Targets []watchTarget `json:"targets,omitempty"`
	Addr    string        `json:"addr,omitempty"`
	Direct  string        `json:"direct,omitempty"`
	// Want is the pod that must answer ("ab"); empty accepts any.
	Want string `json:"want,omitempty"`
	// Timeout bounds the whole job.
	Timeout time.Duration `json:"timeout"`
	// Interval is the pause between the starts of two "watch" attempts
	// on one target. Attempts overlap: one that hangs (a SYN dropped
	// or rejected before the Service is programmed waits for its
	// retransmission) does not delay the next.
	Interval time.Duration `json:"interval,omitempty"`
	Pairs    int           `json:"pairs,omitempty"`
}

// watchTarget is one Service address a "watch" connects to, and what it
// waits for there: Want answering once (empty: any pod), and, when Gone is
// set, Gone no longer answering (no answer from it for goneQuiet). Fanout
// attempts start together each interval (at least 1, at most maxFanout):
// where Want is one of several endpoints, one attempt reaches it only by
// chance, and the time until it answers would measure the odds, not the
// datapath.
type watchTarget struct {
	Addr   string `json:"addr"`
	Want   string `json:"want,omitempty"`
	Gone   string `json:"gone,omitempty"`
	Fanout int    `json:"fanout,omitempty"`
}

// watchResult is what a "watch" saw at one target, as wall-clock Unix
// nanoseconds.
type watchResult struct {
	// OKAt: the earliest attempt Want answered started. Every attempt
	// ends within maxAttemptTimeout, sooner than a SYN is retransmitted
	// (1 s), so that attempt's connect() (eBPF) or SYN (iptables, nftables)
	// was translated as it started: the change was programmed by then.
	// Its end would add the connection's own time, about 0.2 ms at rest and
	// 1.2 ms at the median right after a change at 10,000 Services, when
	// the apiserver, the proxy and the echo server share the cores.
	OKAt int64 `json:"okAt,omitempty"`
	// GoneAt: the first attempt started after the last one Gone answered
	// (the first attempt when Gone never answered).
	GoneAt   int64  `json:"goneAt,omitempty"`
	Attempts int    `json:"attempts"`
	Err      string `json:"err,omitempty"`
}

// proberResponse is the prober's answer to one request.
type proberResponse struct {
	Err string `json:"err,omitempty"`
	// Targets are the "watch" results, in the order of the request.
	Targets  []watchResult `json:"targets,omitempty"`
	Attempts int           `json:"attempts"`
	// Service and Direct are the durations of the "ab" connections, from
	// connect() to the server's first line, in nanoseconds.
	Service []int64 `json:"service,omitempty"`
	Direct  []int64 `json:"direct,omitempty"`
	// Failed counts "ab" connections that failed or reached another pod.
	Failed int `json:"failed,omitempty"`
}

// Attempts are bounded even when a request asks for more.
const (
	maxAttemptTimeout = 200 * time.Millisecond
	// abAttemptTimeout bounds one connection of the latency comparison:
	// long enough for a SYN retransmit (1 s), which a loaded machine
	// causes and users see, to count as a slow sample, not a failure.
	abAttemptTimeout = 3 * time.Second
	minInterval      = 2 * time.Millisecond
	maxPairs         = 20000
	maxJob           = 15 * time.Minute
	maxTargets       = 64
	// goneQuiet is how long Gone must stay silent; longer than an attempt
	// lasts, so no attempt started before it can still be answered by Gone.
	goneQuiet = 300 * time.Millisecond
	// maxInflight bounds the overlapping attempts of one target.
	maxInflight = 128
	maxFanout   = 8
)

// runProber serves requests from stdin until it is closed.
func runProber() error {
	in := bufio.NewScanner(os.Stdin)
	enc := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var req proberRequest
		var resp proberResponse
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			resp.Err = fmt.Sprintf("decode request: %v", err)
		} else {
			resp = serveRequest(req)
		}
		if err := enc.Encode(resp); err != nil {
			return fmt.Errorf("write response: %w", err)
		}
	}
	return in.Err()
}

func serveRequest(req proberRequest) proberResponse {
	timeout := min(max(req.Timeout, time.Second), maxJob)
	deadline := time.Now().Add(timeout)
	switch req.Op {
	case "watch":
		if len(req.Targets) == 0 || len(req.Targets) > maxTargets {
			return proberResponse{Err: fmt.Sprintf("watch: %d targets, want 1 to %d", len(req.Targets), maxTargets)}
		}
		resp := proberResponse{Targets: make([]watchResult, len(req.Targets))}
		var wg sync.WaitGroup
		for i, t := range req.Targets {
			wg.Go(func() { resp.Targets[i] = watch(t, max(req.Interval, minInterval), deadline, connectOnce) })
		}
		wg.Wait()
		var errs []string
		for _, r := range resp.Targets {
			resp.Attempts += r.Attempts
			if r.Err != "" {
				errs = append(errs, r.Err)
			}
		}
		if len(errs) > 0 {
			resp.Err = strings.Join(errs, "; ")
		}
		return resp
	case "ab":
		var resp proberResponse
		pairs := min(req.Pairs, maxPairs)
		for range pairs {
			if time.Now().After(deadline) {
				resp.Err = fmt.Sprintf("%d of %d pairs done within %v", len(resp.Direct), pairs, timeout)
				return resp
			}
			for _, target := range []struct {
				addr string
				out  *[]int64
			}{{req.Addr, &resp.Service}, {req.Direct, &resp.Direct}} {
				resp.Attempts++
				start := time.Now()
				pod, err := connectOnce(target.addr, abAttemptTimeout)
				d := time.Since(start)
				if err != nil || (req.Want != "" && pod != req.Want) {
					resp.Failed++
					continue
				}
				*target.out = append(*target.out, d.Nanoseconds())
			}
		}
		return resp
	default:
		return proberResponse{Err: fmt.Sprintf("unknown op %q", req.Op)}
	}
}

// watch starts t.Fanout attempts on t every interval, overlapping, each a
// connect (connectOnce, but for tests), until t shows what it waits for or
// the deadline passes.
func watch(t watchTarget, interval time.Duration, deadline time.Time, connect func(addr string, timeout time.Duration) (string, error)) watchResult {
	var (
		mu       sync.Mutex
		res      watchResult
		okAt     time.Time
		starts   []time.Time // of every attempt, ascending
		lastGone time.Time   // start of the latest attempt Gone answered
		inflight sync.WaitGroup
	)
	slots := make(chan struct{}, maxInflight)
	done := func(now time.Time) bool {
		mu.Lock()
		defer mu.Unlock()
		if okAt.IsZero() {
			return false
		}
		if t.Gone == "" {
			return true
		}
		// Every attempt started within goneQuiet has had the time to be
		// answered by Gone, and none was.
		return len(starts) > 0 && now.Sub(starts[0]) >= goneQuiet && now.Sub(lastGone) >= goneQuiet
	}
	// attempt starts one connection, unless maxInflight hang already.
	attempt := func() {
		select {
		case slots <- struct{}{}:
		default:
			return
		}
		start := time.Now()
		mu.Lock()
		starts = append(starts, start)
		mu.Unlock()
		inflight.Go(func() {
			defer func() { <-slots }()
			pod, err := connect(t.Addr, min(maxAttemptTimeout, max(time.Until(deadline), time.Millisecond)))
			if err != nil {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if (t.Want == "" || pod == t.Want) && (okAt.IsZero() || start.Before(okAt)) {
				okAt = start
			}
			if t.Gone != "" && pod == t.Gone && start.After(lastGone) {
				lastGone = start
			}
		})
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for now := time.Now(); now.Before(deadline) && !done(now); now = <-tick.C {
		for range min(max(t.Fanout, 1), maxFanout) {
			attempt()
		}
	}
	inflight.Wait()
	res.Attempts = len(starts)
	if !okAt.IsZero() {
		res.OKAt = okAt.UnixNano()
	}
	if i, _ := slices.BinarySearchFunc(starts, lastGone, func(s, g time.Time) int { return s.Compare(g) }); t.Gone != "" && i < len(starts) {
		if starts[i].Equal(lastGone) {
			i++
		}
		if i < len(starts) {
			res.GoneAt = starts[i].UnixNano()
		}
	}
	if !done(time.Now()) {
		res.Err = fmt.Sprintf("%s: within the deadline, %q did not answer or %q still answered (%d attempts)", t.Addr, t.Want, t.Gone, res.Attempts)
	}
	return res
}

// connectOnce opens a TCP connection, reads the echo server's greeting and
// returns the pod that sent it. The connection is closed with a reset so no
// TIME_WAIT state piles up over thousands of attempts.
func connectOnce(addr string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", err
	}
	tc := c.(*net.TCPConn)
	defer func() {
		_ = tc.SetLinger(0)
		tc.Close()
	}()
	_ = tc.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(tc).ReadBytes('\n')
	if err != nil {
		return "", fmt.Errorf("read greeting from %s: %w", addr, err)
	}
	var reply struct {
		Pod string `json:"pod"`
	}
	if err := json.Unmarshal(line, &reply); err != nil {
		return "", fmt.Errorf("decode greeting from %s: %w", addr, err)
	}
	return reply.Pod, nil
}

// prober is the benchmark's handle on a prober process.
type prober struct {
	origin testbed.Origin
	cmd    *exec.Cmd
	in     io.WriteCloser
	out    *bufio.Scanner
	mu     sync.Mutex
	done   chan struct{}
}

// startProber starts a prober in the origin's namespace and cgroup. The
// kernel kills it if the benchmark dies.
func startProber(from testbed.Origin) (*prober, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("start prober in %s: find own executable: %w", from.Name, err)
	}
	cmd := exec.Command("ip", "netns", "exec", from.Netns, self)
	cmd.Env = append(os.Environ(), roleEnv+"=prober")
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if from.Cgroup != "" {
		fd, err := syscall.Open(from.Cgroup, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("start prober in %s: open cgroup: %w", from.Name, err)
		}
		defer syscall.Close(fd)
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
	}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("start prober in %s: %w", from.Name, err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("start prober in %s: %w", from.Name, err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start prober in %s: %w", from.Name, err)
	}
	p := &prober{origin: from, cmd: cmd, in: in, out: bufio.NewScanner(out), done: make(chan struct{})}
	p.out.Buffer(make([]byte, 1<<20), 64<<20)
	go func() { _ = cmd.Wait(); close(p.done) }()
	return p, nil
}

// do sends one request and waits for its response, at most the request's
// timeout plus a margin; a prober that overruns is killed.
func (p *prober) do(ctx context.Context, req proberRequest) (proberResponse, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var resp proberResponse
	b, _ := json.Marshal(req)
	if _, err := p.in.Write(append(b, '\n')); err != nil {
		return resp, fmt.Errorf("prober in %s: send request: %w", p.origin.Name, err)
	}
	got := make(chan error, 1)
	go func() {
		if !p.out.Scan() {
			got <- fmt.Errorf("prober in %s ended: %v", p.origin.Name, p.out.Err())
			return
		}
		got <- json.Unmarshal(p.out.Bytes(), &resp)
	}()
	limit := min(max(req.Timeout, time.Second), maxJob) + 30*time.Second
	select {
	case err := <-got:
		if err == nil && resp.Err != "" {
			err = errors.New(resp.Err)
		}
		return resp, err
	case <-ctx.Done():
		p.stop()
		return resp, ctx.Err()
	case <-time.After(limit):
		p.stop()
		return resp, fmt.Errorf("prober in %s: no answer to %s within %v; killed", p.origin.Name, req.Op, limit)
	}
}

// stop ends the prober (by its own PID) and waits for it.
func (p *prober) stop() {
	_ = p.in.Close()
	select {
	case <-p.done:
	case <-time.After(2 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}
