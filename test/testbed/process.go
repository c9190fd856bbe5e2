//go:build linux

package testbed

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Process is a command the test bed started and will stop. It is always
// ended by its own PID, never by name.
type Process struct {
	Name string
	// Log holds the process's standard output and error.
	Log  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// procSpec says how to start a process.
type procSpec struct {
	name   string   // for logs and errors
	netns  string   // run under `ip netns exec` when set
	cgroup string   // a cgroup v2 directory to start the process in, when set
	args   []string // command and arguments
	log    string   // file for stdout and stderr
}

// start starts the process. The kernel kills it if the test bed process dies
// (Pdeathsig), so nothing outlives a crashed test.
func start(s procSpec) (*Process, error) {
	args := s.args
	if s.netns != "" {
		args = append([]string{"ip", "netns", "exec", s.netns}, args...)
	}
	logf, err := os.OpenFile(s.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: open log: %w", s.name, err)
	}
	defer logf.Close()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if s.cgroup != "" {
		fd, err := syscall.Open(s.cgroup, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("start %s: open cgroup %s: %w", s.name, s.cgroup, err)
		}
		defer syscall.Close(fd)
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", s.name, err)
	}
	p := &Process{Name: s.name, Log: s.log, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// PID returns the process id.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM, waits up to grace, then SIGKILL. Stopping an ended
// process is not an error.
func (p *Process) Stop(grace time.Duration) {
	if p.Exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.Kill()
	}
}

// Kill sends SIGKILL and waits for the process to end.
func (p *Process) Kill() {
	if p.Exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// Tail returns the last n lines of the process's log.
func (p *Process) Tail(n int) string {
	b, err := os.ReadFile(p.Log)
	if err != nil {
		return fmt.Sprintf("(read log %s: %v)", p.Log, err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// run runs a short command (optionally inside netns) and returns its combined
// output, with the command line in the error.
func run(netns string, args ...string) (string, error) {
	if netns != "" {
		args = append([]string{"ip", "netns", "exec", netns}, args...)
	}
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// waitHTTPOK polls GET url (with a bearer token unless empty) every interval
// until it answers 200 (nil), proc exits, or ctx ends; the error says what
// was awaited, the last answer and the end of proc's log.
func waitHTTPOK(ctx context.Context, client *http.Client, url, token string, proc *Process, what string, every time.Duration) error {
	last := "no answer"
	for {
		if proc.Exited() {
			return fmt.Errorf("wait for %s: the process exited; log:\n%s", what, proc.Tail(30))
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if resp, err := client.Do(req); err != nil {
			last = err.Error()
		} else {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w (last answer: %s); log:\n%s", what, ctx.Err(), last, proc.Tail(30))
		case <-time.After(every):
		}
	}
}
