//go:build linux && e2e

package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
	"github.com/svcnat/svcnat/test/testbed/votingapp"
)

// screenshotDir is where the Chromium check saves the pages the README shows.
const screenshotDir = "../../docs/voting-app"

// TestVotingApp runs the voting app of examples/voting-app (Debian's
// redis-server and postgres, the example's vote, worker and result) behind
// each svcnat backend named in SVCNAT_E2E_PROXIES: every vote cast through
// voting-service's NodePort from the external client must be counted by
// result-service, read through its NodePort. The first backend also runs
// headless Chromium in the client's namespace: it clicks an option on the
// vote page, reads the result page, and saves both in docs/voting-app.
//
// The app's programs come from $SVCNAT_VOTINGAPP_BIN_DIR (make votingapp)
// or are built.
func TestVotingApp(t *testing.T) {
	all, err := testbed.ParseProxyKinds(cmpOr(os.Getenv("SVCNAT_E2E_PROXIES"), string(testbed.SvcnatIptables)))
	if err != nil {
		t.Fatal(err)
	}
	var kinds []testbed.ProxyKind
	for _, k := range all {
		if k.IsSvcnat() {
			kinds = append(kinds, k)
		}
	}
	if len(kinds) == 0 {
		t.Skip("no svcnat backend in SVCNAT_E2E_PROXIES")
	}
	b := binaries(t)
	if b.Svcnat, err = testbed.BuildSvcnat(t.TempDir()); err != nil {
		t.Fatalf("svcnat binary: %v", err)
	}
	dir, build := os.Getenv("SVCNAT_VOTINGAPP_BIN_DIR"), false
	if dir == "" {
		dir, build = t.TempDir(), true
	}
	vb, err := votingapp.Locate(dir, build)
	if err != nil {
		t.Fatalf("voting app programs (scripts/setup.sh installs redis-server, postgresql and chromium): %v", err)
	}
	for i, kind := range kinds {
		t.Run(string(kind), func(t *testing.T) { runVotingApp(t, b, vb, kind, i == 0) })
	}
}

func runVotingApp(t *testing.T, b testbed.Binaries, vb votingapp.Binaries, kind testbed.ProxyKind, browse bool) {
	ctx := t.Context()
	began := time.Now()
	c := startCluster(t, ctx, b, testbed.Options{Nodes: 2, PodsPerNode: 3})
	if err := c.StartProxies(ctx, kind); err != nil {
		t.Fatalf("start proxies: %v", err)
	}
	a, err := votingapp.Load("../../examples/voting-app")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			for _, p := range a.Pods {
				t.Logf("log of %s (last lines):\n%s", p.Name, a.Log(p.Name, 15))
			}
		}
	}()
	if err := a.Deploy(ctx, c, vb); err != nil {
		t.Fatalf("deploy the voting app: %v", err)
	}
	t.Logf("test bed, %s and the voting app up in %v", kind, time.Since(began).Round(time.Millisecond))

	// N votes, 3 of every 5 for a, through both nodes' NodePorts.
	const n = 20
	want := votingapp.Tally{}
	cast := time.Now()
	for i := range n {
		option := "a"
		if i%5 >= 3 {
			option = "b"
		}
		if err := a.Vote(ctx, c.Nodes[i%2], option); err != nil {
			t.Fatalf("vote %d: %v", i, err)
		}
		if option == "a" {
			want.A++
		} else {
			want.B++
		}
		want.Total++
	}
	for _, node := range c.Nodes {
		got, err := a.WaitTally(ctx, node, n, 30*time.Second)
		if err != nil {
			t.Fatalf("result-service through %s: %v", node.Name, err)
		}
		if got != want {
			t.Fatalf("result-service through %s shows %+v, want %+v", node.Name, got, want)
		}
	}
	t.Logf("%d votes cast through voting-service and read back from result-service in %v", n, time.Since(cast).Round(time.Millisecond))

	if browse {
		browseVotingApp(t, a, c, want)
	}
	(&env{c: c, kind: kind}).checkDump(t)
}

// browseVotingApp votes once for a in headless Chromium and checks the
// result page it then shows.
func browseVotingApp(t *testing.T, a *votingapp.App, c *testbed.Cluster, before votingapp.Tally) {
	if _, err := exec.LookPath("chromium"); err != nil {
		t.Fatalf("chromium (Debian package chromium, installed by scripts/setup.sh): %v", err)
	}
	if err := os.MkdirAll(screenshotDir, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := filepath.Abs(screenshotDir)
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	r, err := a.Browse(t.Context(), c.Nodes[0], c.Nodes[1], "a", before.Total+1, out)
	if err != nil {
		t.Fatal(err)
	}
	want := votingapp.BrowserReport{Voted: "Thank you for voting: Cats",
		Tally: votingapp.Tally{A: before.A + 1, B: before.B, Total: before.Total + 1}}
	if r != want {
		t.Fatalf("chromium saw %+v, want %+v", r, want)
	}
	for _, f := range []string{"vote.png", "result.png"} {
		b, err := os.ReadFile(filepath.Join(out, f))
		if err != nil || !bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) {
			t.Fatalf("screenshot %s: not a PNG (%v)", f, err)
		}
	}
	t.Logf("chromium voted and read the result in %v; screenshots in %s", time.Since(began).Round(time.Millisecond), out)
}
