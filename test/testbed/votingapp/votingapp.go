//go:build linux

// Package votingapp runs the voting app of examples/voting-app on the test
// bed, for the demo and the end-to-end test: the example's five Pods, each
// played by a pod namespace running the real program (Debian's redis-server
// and postgres, and the example's vote, worker and result), and its four
// Services with the EndpointSlices the EndpointSlice controller would write.
//
// The programs find each other by the Services' names, `redis` and `db`,
// as in the example. The test bed has no cluster DNS, so each pod gets an
// /etc/hosts naming every Service's ClusterIP (testbed.SetHosts), written
// after the Services are created, as DNS would answer.
package votingapp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes/scheme"
)

// Binaries are the programs of the app's Pods.
type Binaries struct {
	// Vote, Worker and Result are the app's programs, and Browser the
	// headless Chromium check; all built from examples/voting-app.
	Vote, Worker, Result, Browser string
	// RedisServer is Debian's redis-server.
	RedisServer string
	// PostgresDir holds Debian's initdb and postgres.
	PostgresDir string
}

// AppPrograms are the programs built from examples/voting-app.
var AppPrograms = []string{"vote", "worker", "result", "browser"}

// Locate finds the programs: the app's in dir (built there from
// examples/voting-app when dir lacks them and build is set), redis-server
// in $PATH, and the newest postgres under /usr/lib/postgresql.
func Locate(dir string, build bool) (Binaries, error) {
	var b Binaries
	missing := false
	for _, p := range AppPrograms {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			missing = true
		}
	}
	if missing && build {
		if err := Build(dir); err != nil {
			return b, err
		}
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return b, fmt.Errorf("locate voting app programs: %w", err)
	}
	for _, f := range []struct {
		name string
		path *string
	}{{"vote", &b.Vote}, {"worker", &b.Worker}, {"result", &b.Result}, {"browser", &b.Browser}} {
		*f.path = filepath.Join(abs, f.name)
		if _, err := os.Stat(*f.path); err != nil {
			return b, fmt.Errorf("locate voting app program %s (make votingapp builds it): %w", f.name, err)
		}
	}
	if b.RedisServer, err = exec.LookPath("redis-server"); err != nil {
		return b, fmt.Errorf("find redis-server (Debian package redis-server): %w", err)
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/postgres")
	if len(dirs) == 0 {
		return b, fmt.Errorf("find postgres (Debian package postgresql): no /usr/lib/postgresql/*/bin/postgres")
	}
	slices.SortFunc(dirs, func(x, y string) int { return versionOf(x) - versionOf(y) })
	b.PostgresDir = filepath.Dir(dirs[len(dirs)-1])
	if _, err := user.Lookup("postgres"); err != nil {
		return b, fmt.Errorf("find the postgres user (Debian package postgresql): %w", err)
	}
	return b, nil
}

// versionOf reads N of /usr/lib/postgresql/N/bin/postgres.
func versionOf(path string) int {
	var n int
	fmt.Sscanf(filepath.Base(filepath.Dir(filepath.Dir(path))), "%d", &n)
	return n
}

// Build builds the app's programs into dir from the examples/voting-app
// module of this source tree.
func Build(dir string) error {
	root, err := testbed.SourceRoot()
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("build voting app: %w", err)
	}
	args := []string{"build", "-o", abs + "/"}
	for _, p := range AppPrograms {
		args = append(args, "./"+p)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = filepath.Join(root, "examples", "voting-app")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build voting app programs into %s: %w: %s", dir, err, out)
	}
	return nil
}

// App is the example: its Pods, where they run, and its Services.
type App struct {
	Pods     []*corev1.Pod
	Services []*corev1.Service
	// Where maps a Pod's name to the pod namespace that plays it.
	Where map[string]*testbed.Pod
	// Program maps a Pod's name to the program it runs.
	Program map[string]string

	c    *testbed.Cluster
	b    Binaries
	dir  string // data of redis and postgres
	proc map[string]*testbed.Process
}

// The example's Pods, in the order they are placed and started: servers
// before their clients.
var podOrder = []string{"redis-pod", "postgres-pod", "voting-app-pod", "worker-app-pod", "result-app-pod"}

// Load reads the example's Pods and Services from dir.
func Load(dir string) (*App, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("read the voting app from %s: no *.yaml files (%v)", dir, err)
	}
	a := &App{Where: map[string]*testbed.Pod{}, Program: map[string]string{}, proc: map[string]*testbed.Process{}}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("read the voting app: %w", err)
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(data, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("decode %s: %w", f, err)
		}
		switch o := obj.(type) {
		case *corev1.Pod:
			if !slices.Contains(podOrder, o.Name) {
				return nil, fmt.Errorf("decode %s: pod %s is not one of the example's %v", f, o.Name, podOrder)
			}
			a.Pods = append(a.Pods, o)
		case *corev1.Service:
			a.Services = append(a.Services, o)
		default:
			return nil, fmt.Errorf("decode %s: unexpected kind %T", f, obj)
		}
	}
	slices.SortFunc(a.Pods, func(x, y *corev1.Pod) int {
		return slices.Index(podOrder, x.Name) - slices.Index(podOrder, y.Name)
	})
	return a, nil
}

// Service returns the Service named name, or nil.
func (a *App) Service(name string) *corev1.Service {
	for _, s := range a.Services {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// Deploy runs the app on the test bed, whose proxies should be running:
// it places each Pod on a pod namespace (alternating nodes), creates the
// Services, writes each pod's /etc/hosts from their ClusterIPs, starts the
// programs, creates the EndpointSlices, and waits until the worker has
// reached postgres through `db` and both pages answer through their
// NodePorts on every node. Everything it starts stops when the test bed
// closes.
func (a *App) Deploy(ctx context.Context, c *testbed.Cluster, b Binaries) error {
	a.c, a.b = c, b
	if err := a.place(); err != nil {
		return err
	}
	for i, s := range a.Services {
		s = s.DeepCopy()
		s.Namespace = metav1.NamespaceDefault
		got, err := c.Kube.CoreV1().Services(s.Namespace).Create(ctx, s, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create service %s: %w", s.Name, err)
		}
		a.Services[i] = got
	}
	hosts := map[string]netip.Addr{}
	for _, s := range a.Services {
		ip, err := netip.ParseAddr(s.Spec.ClusterIP)
		if err != nil {
			return fmt.Errorf("service %s: clusterIP %q: %w", s.Name, s.Spec.ClusterIP, err)
		}
		// The names cluster DNS would answer for the Service.
		for _, n := range []string{s.Name, s.Name + "." + s.Namespace, s.Name + "." + s.Namespace + ".svc", s.Name + "." + s.Namespace + ".svc.cluster.local"} {
			hosts[n] = ip
		}
	}
	a.dir = filepath.Join(c.Dir, "voting-app")
	if err := os.Mkdir(a.dir, 0o755); err != nil {
		return fmt.Errorf("make voting app directory: %w", err)
	}
	// postgres runs as the postgres user: let it through the run directory.
	if err := os.Chmod(c.Dir, 0o711); err != nil {
		return fmt.Errorf("open run directory to postgres: %w", err)
	}
	for _, p := range a.Pods {
		if err := c.SetHosts(a.Where[p.Name], hosts); err != nil {
			return err
		}
		if err := a.start(ctx, p); err != nil {
			return fmt.Errorf("start pod %s: %w", p.Name, err)
		}
	}
	for _, s := range a.Services {
		if _, err := c.Kube.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, a.SliceFor(s), metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create endpointslice for %s: %w", s.Name, err)
		}
	}
	if w := a.proc["worker-app-pod"]; w != nil {
		if err := w.WaitLog("votes table ready", 60*time.Second); err != nil {
			return fmt.Errorf("worker to reach postgres through service db: %w", err)
		}
	}
	for _, svc := range []string{"voting-service", "result-service"} {
		for _, n := range c.Nodes {
			if err := a.waitPage(ctx, n, svc); err != nil {
				return err
			}
		}
	}
	return nil
}

// place assigns each Pod to a pod namespace, alternating nodes.
func (a *App) place() error {
	for i, p := range a.Pods {
		n := a.c.Nodes[i%len(a.c.Nodes)]
		j := i / len(a.c.Nodes)
		if j >= len(n.Pods) {
			return fmt.Errorf("place pod %s: %s has only %d pod namespaces", p.Name, n.Name, len(n.Pods))
		}
		a.Where[p.Name] = n.Pods[j]
	}
	return nil
}

// containerPort returns the Pod's first container port (the example's
// Pods have at most one).
func containerPort(p *corev1.Pod) int32 {
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			return cp.ContainerPort
		}
	}
	return 0
}

// env returns the value of the Pod's environment variable name, or def.
func env(p *corev1.Pod, name, def string) string {
	for _, c := range p.Spec.Containers {
		for _, e := range c.Env {
			if e.Name == name {
				return e.Value
			}
		}
	}
	return def
}

// start starts the Pod's program and waits until it serves.
func (a *App) start(ctx context.Context, p *corev1.Pod) error {
	ns := a.Where[p.Name]
	port := fmt.Sprint(containerPort(p))
	var args []string
	ready := "msg=serving"
	program := ""
	switch p.Name {
	case "redis-pod":
		dir := filepath.Join(a.dir, "redis")
		if err := os.Mkdir(dir, 0o755); err != nil {
			return err
		}
		args = []string{a.b.RedisServer, "--bind", ns.IP.String(), "--port", port, "--protected-mode", "no",
			"--save", "", "--appendonly", "no", "--dir", dir, "--logfile", ""}
		ready, program = "Ready to accept connections", "redis-server"
	case "postgres-pod":
		var err error
		if args, err = a.initdb(ctx, p); err != nil {
			return err
		}
		ready, program = "database system is ready to accept connections", "postgres"
	case "voting-app-pod":
		args = []string{a.b.Vote, "-pod", p.Name, "-listen", ":" + port}
	case "worker-app-pod":
		// It needs both Services programmed; Deploy waits for it later.
		args, ready = []string{a.b.Worker}, ""
	case "result-app-pod":
		args = []string{a.b.Result, "-pod", p.Name, "-listen", ":" + port}
	}
	a.Program[p.Name] = cmpOr(program, filepath.Base(args[0]))
	proc, err := a.c.StartInPod(ns, strings.TrimSuffix(p.Name, "-pod"), args...)
	if err != nil {
		return err
	}
	a.proc[p.Name] = proc
	if ready == "" {
		return nil
	}
	return proc.WaitLog(ready, 30*time.Second)
}

// initdb makes postgres' data directory as the postgres user, with the
// Pod's POSTGRES_USER and POSTGRES_PASSWORD and password logins from any
// address, and returns the command that serves it on the pod's address.
func (a *App) initdb(ctx context.Context, p *corev1.Pod) ([]string, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("find the postgres user: %w", err)
	}
	var uid, gid int
	fmt.Sscan(u.Uid, &uid)
	fmt.Sscan(u.Gid, &gid)
	dir := filepath.Join(a.dir, "postgres")
	data := filepath.Join(dir, "data")
	pwfile := filepath.Join(dir, "password")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(pwfile, []byte(env(p, "POSTGRES_PASSWORD", "postgres")+"\n"), 0o600); err != nil {
		return nil, err
	}
	for _, f := range []string{dir, pwfile} {
		if err := os.Chown(f, uid, gid); err != nil {
			return nil, fmt.Errorf("give %s to postgres: %w", f, err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "runuser", "-u", "postgres", "--", filepath.Join(a.b.PostgresDir, "initdb"),
		"-D", data, "-U", env(p, "POSTGRES_USER", "postgres"), "--pwfile", pwfile,
		"--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("initdb %s: %w: %s", data, err, out)
	}
	hba, err := os.OpenFile(filepath.Join(data, "pg_hba.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("allow logins from pods: %w", err)
	}
	_, err = hba.WriteString("host all all 0.0.0.0/0 scram-sha-256\n")
	if err := errors.Join(err, hba.Close()); err != nil {
		return nil, fmt.Errorf("allow logins from pods: %w", err)
	}
	return []string{"runuser", "-u", "postgres", "--", filepath.Join(a.b.PostgresDir, "postgres"), "-D", data,
		"-p", fmt.Sprint(containerPort(p)), "-c", "listen_addresses=" + a.Where[p.Name].IP.String(),
		"-c", "unix_socket_directories=" + dir, "-c", "fsync=off"}, nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// SliceFor returns the EndpointSlice the EndpointSlice controller would
// write for s: the pod addresses of the Pods its selector matches, all
// ready, with the Service's (numeric) target ports.
func (a *App) SliceFor(s *corev1.Service) *discoveryv1.EndpointSlice {
	sel := labels.SelectorFromSet(s.Spec.Selector)
	var eps []discoveryv1.Endpoint
	for _, p := range a.Pods {
		if len(s.Spec.Selector) == 0 || !sel.Matches(labels.Set(p.Labels)) {
			continue
		}
		ep := a.Where[p.Name].Endpoint(testbed.Ready)
		ep.TargetRef.Name = p.Name
		eps = append(eps, ep)
	}
	var ports []discoveryv1.EndpointPort
	for _, sp := range s.Spec.Ports {
		ports = append(ports, testbed.SlicePort(sp.Name, sp.Protocol, sp.TargetPort.IntVal))
	}
	return testbed.EndpointSlice(s.Namespace, s.Name, s.Name+"-testbed", ports, eps...)
}

// URL returns the address of a NodePort Service's page on node n, as the
// external client reaches it.
func (a *App) URL(n *testbed.Node, service, path string) string {
	s := a.Service(service)
	if s == nil || len(s.Spec.Ports) == 0 {
		return ""
	}
	return fmt.Sprintf("http://%s%s", netip.AddrPortFrom(n.IP, uint16(s.Spec.Ports[0].NodePort)), path)
}

// client is an HTTP client in the external client's namespace.
func (a *App) client() *http.Client { return testbed.HTTPClientIn(a.c.Client, 3*time.Second) }

// waitPage waits until a NodePort Service's page answers 200 on node n
// from the external client (the proxies have programmed it).
func (a *App) waitPage(ctx context.Context, n *testbed.Node, service string) error {
	u := a.URL(n, service, "/")
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	last := "no answer"
	for {
		if resp, err := a.get(ctx, u); err != nil {
			last = err.Error()
		} else if resp.StatusCode == http.StatusOK {
			return nil
		} else {
			last = resp.Status
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s at %s from the client: %w (last: %s)", service, u, ctx.Err(), last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (a *App) get(ctx context.Context, u string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := a.client().Do(req)
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	return resp, nil
}

// Vote casts a vote for option (a or b) from the external client through
// voting-service's NodePort on node n, as a new voter (no cookie), and
// checks the page thanks for it.
func (a *App) Vote(ctx context.Context, n *testbed.Node, option string) error {
	u := a.URL(n, "voting-service", "/")
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, strings.NewReader(url.Values{"vote": {option}}.Encode()))
	if err != nil {
		return fmt.Errorf("vote %s at %s: %w", option, u, err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := a.client().Do(req)
	if err != nil {
		return fmt.Errorf("vote %s at %s: %w", option, u, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("vote %s at %s: read answer: %w", option, u, err)
	}
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `id="voted"`) {
		return fmt.Errorf("vote %s at %s: %s, no thanks on the page:\n%s", option, u, resp.Status, body)
	}
	return nil
}

// Tally is the count of votes result-service shows.
type Tally struct {
	A     int `json:"a"`
	B     int `json:"b"`
	Total int `json:"total"`
}

// Tally reads the counts from result-service's /results.json, through its
// NodePort on node n, from the external client.
func (a *App) Tally(ctx context.Context, n *testbed.Node) (Tally, error) {
	var t Tally
	u := a.URL(n, "result-service", "/results.json")
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return t, fmt.Errorf("read results at %s: %w", u, err)
	}
	resp, err := a.client().Do(req)
	if err != nil {
		return t, fmt.Errorf("read results at %s: %w", u, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return t, fmt.Errorf("read results at %s: %s: %s", u, resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(&t); err != nil {
		return t, fmt.Errorf("read results at %s: %w", u, err)
	}
	return t, nil
}

// WaitTally reads the counts until they total at least want or limit
// passes, and returns the last counts read.
func (a *App) WaitTally(ctx context.Context, n *testbed.Node, want int, limit time.Duration) (Tally, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for {
		t, err := a.Tally(ctx, n)
		if err == nil && t.Total >= want {
			return t, nil
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return t, err
			}
			return t, fmt.Errorf("result-service shows %d votes after %v, want %d", t.Total, limit, want)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// BrowserReport is what headless Chromium saw on the pages.
type BrowserReport struct {
	Voted string `json:"voted"`
	Tally
}

// Browse runs the Chromium check (examples/voting-app/browser) in the
// external client's namespace: it votes for option on voting-service's
// page through node voteNode's NodePort, then reads result-service's page
// through resultNode's until it shows at least wantTotal votes, saving
// vote.png and result.png in outDir.
func (a *App) Browse(ctx context.Context, voteNode, resultNode *testbed.Node, option string, wantTotal int, outDir string) (BrowserReport, error) {
	var r BrowserReport
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", a.c.Client, a.b.Browser,
		"-vote", a.URL(voteNode, "voting-service", "/"), "-result", a.URL(resultNode, "result-service", "/"),
		"-choice", option, "-want-total", fmt.Sprint(wantTotal), "-out", outDir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return r, fmt.Errorf("chromium check from the client: %w: %s", err, stderr.String())
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return r, fmt.Errorf("chromium check: decode %q: %w", out, err)
	}
	return r, nil
}

// Log returns the end of the log of the Pod's program.
func (a *App) Log(pod string, lines int) string {
	if p := a.proc[pod]; p != nil {
		return p.Tail(lines)
	}
	return ""
}
