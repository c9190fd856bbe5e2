//go:build linux

package iptables

import (
	"cmp"
	"context"
	"errors"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/dataplane/conformance"
	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

// testKernel is what a backend test runs on: the in-memory fake, or the
// real iptables of one variant inside a network namespace made for the
// test.
type testKernel struct {
	mode string
	host host
}

// Kernels to run tests on: the fake (anywhere, without root) and the real
// variants (as root, each in its own network namespace).
const kernelFake = "fake"

var allKernels = []string{kernelFake, ModeNFT, ModeLegacy}

// onKernels runs fn as a subtest per kernel named.
func onKernels(t *testing.T, kernels []string, fn func(t *testing.T, k *testKernel)) {
	for _, name := range kernels {
		t.Run(name, func(t *testing.T) {
			k := &testKernel{mode: name, host: execHost{}}
			if name == kernelFake {
				k.mode, k.host = ModeNFT, newFakeHost()
			} else if !netnstest.InNetns(t) {
				return
			}
			fn(t, k)
		})
	}
}

// backend returns a backend on k, of k's variant unless opts names one.
func (k *testKernel) backend(t *testing.T, opts Options) *Backend {
	t.Helper()
	opts.Mode = cmp.Or(opts.Mode, k.mode)
	b, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	b.host = k.host
	return b
}

// initBackend returns a backend on k after Init, and cleans up after it.
func (k *testKernel) initBackend(t *testing.T, opts Options) *Backend {
	t.Helper()
	b := k.backend(t, opts)
	if err := b.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Cleanup(context.Background()); err != nil {
			t.Error(err)
		}
	})
	return b
}

// outside applies iptables-restore input to a family's tables, as another
// program changing them behind svcnat's back.
func (k *testKernel) outside(t *testing.T, f model.Family, payload string) {
	t.Helper()
	r, err := k.host.runner(f, k.mode)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.restore(t.Context(), payload); err != nil {
		t.Fatal(err)
	}
}

// saveAll returns the family's filter and nat tables in iptables-save form.
func (k *testKernel) saveAll(t *testing.T, f model.Family) string {
	t.Helper()
	r, err := k.host.runner(f, k.mode)
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	for _, table := range []string{tableFilter, tableNAT} {
		err := r.save(t.Context(), table, false, func(r io.Reader) error {
			_, err := io.Copy(&out, r)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out.String()
}

// fake returns the fake runner of a family.
func (k *testKernel) fake(t *testing.T, f model.Family) *fakeRunner {
	t.Helper()
	h, ok := k.host.(*fakeHost)
	if !ok {
		t.Fatal("not the fake kernel")
	}
	return h.fake(f, k.mode)
}

// TestConformance runs the dataplane suite on the fake kernel, without
// root, and on both real variants.
func TestConformance(t *testing.T) {
	onKernels(t, allKernels, func(t *testing.T, k *testKernel) {
		conformance.Run(t, func(t *testing.T) dataplane.Backend { return k.backend(t, Options{}) })
	})
}

func allCase() *model.State {
	cases := conformance.Cases()
	return cases[len(cases)-1].State
}

// initBackend returns a backend on the real kernel (the test runs in its
// own network namespace) after Init, and cleans up after it.
func initBackend(t *testing.T, mode string) *Backend {
	t.Helper()
	return (&testKernel{mode: mode, host: execHost{}}).initBackend(t, Options{})
}

// TestKernelHoldsRenderedText checks that iptables-save prints svcnat's
// rules exactly as Render writes them, in both modes: the partial sync and
// the interference check compare the two texts, and the fake kernel keeps
// rules as written.
func TestKernelHoldsRenderedText(t *testing.T) {
	onKernels(t, []string{ModeNFT, ModeLegacy}, func(t *testing.T, k *testKernel) {
		b := k.initBackend(t, Options{})
		s := allCase()
		if err := b.Sync(t.Context(), s); err != nil {
			t.Fatal(err)
		}
		for _, ft := range b.families {
			got, err := ft.read(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			want := Render(s, ft.family, DefaultMasqueradeBit)
			if got.Text() != want.Text() {
				t.Errorf("%s: kernel holds\n%s\nrendered\n%s", ft.family, got.Text(), want.Text())
			}
		}
	})
}

func TestPartialSync(t *testing.T) {
	onKernels(t, []string{kernelFake, ModeNFT}, func(t *testing.T, k *testKernel) {
		b := k.initBackend(t, Options{})
		ctx := t.Context()
		s := allCase()
		if err := b.Sync(ctx, s); err != nil {
			t.Fatal(err)
		}
		if !b.lastWrite.full {
			t.Error("first sync after Init was not a full one")
		}
		if err := b.Sync(ctx, s); err != nil {
			t.Fatal(err)
		}
		if b.lastWrite.full || b.lastWrite.written+b.lastWrite.deleted != 0 {
			t.Errorf("unchanged state: sync wrote %+v, want nothing", b.lastWrite)
		}
		// One more endpoint for one ServicePort: only its cluster chain changes.
		web := model.ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: model.IPv4}
		s.ServicePorts[web].ClusterEndpoints = append(s.ServicePorts[web].ClusterEndpoints,
			model.Endpoint{IP: netip.MustParseAddr("10.244.9.9"), Port: 8080})
		if err := b.Sync(ctx, s); err != nil {
			t.Fatal(err)
		}
		if b.lastWrite.full || b.lastWrite.written != 1 || b.lastWrite.deleted != 0 {
			t.Errorf("one endpoint added: sync wrote %+v, want one chain", b.lastWrite)
		}
		got, err := b.Dump(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range conformance.Diff(s, got) {
			t.Error(d)
		}
	})
}

// TestOutsideInterference changes svcnat's rules by hand, as an operator or
// another tool might. CheckDrift must notice, and the next Sync, though its
// Change names nothing, restore exactly what was changed; a Sync without a
// Change must notice and restore it by itself.
func TestOutsideInterference(t *testing.T) {
	for _, c := range []struct {
		name, edit string // edit is iptables-restore input
	}{
		{"FlushServices", "*nat\n-F " + chainServices + "\nCOMMIT\n"},
		{"FlushFilter", "*filter\n-F " + chainFilter + "\nCOMMIT\n"},
		{"DeleteJump", "*nat\n-D PREROUTING -m comment --comment \"svcnat services\" -j " + chainServices + "\nCOMMIT\n"},
		{"DeleteFilterJump", "*filter\n-D FORWARD -m conntrack --ctstate NEW -m comment --comment \"svcnat services\" -j " + chainFilter + "\nCOMMIT\n"},
		{"DeletePostroutingRule", "*nat\n-D " + chainPostrouting + " 1\nCOMMIT\n"},
		{"FlushLeaf", "*nat\n-F " + addrLeaf(netip.MustParseAddr("10.96.0.10")) + "\nCOMMIT\n"},
		{"FlushEndpoints", "*nat\n-F " + prefixCluster + chainHash("default/web:http") + "\nCOMMIT\n"},
		{"ForeignChain", "*nat\n-N " + chainPrefix + "STRAY\nCOMMIT\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			onKernels(t, allKernels, func(t *testing.T, k *testKernel) {
				b := k.initBackend(t, Options{})
				ctx := t.Context()
				s := allCase()
				if err := b.Sync(ctx, s); err != nil {
					t.Fatal(err)
				}
				if drift, err := b.CheckDrift(ctx); err != nil || drift {
					t.Fatalf("CheckDrift right after a sync = %v, %v; want no drift", drift, err)
				}
				periodic := *s
				periodic.Change = &model.Change{}
				for _, how := range []string{"CheckDrift then a sync with an empty change", "a sync without a change"} {
					k.outside(t, model.IPv4, c.edit)
					if how == "CheckDrift then a sync with an empty change" {
						if drift, err := b.CheckDrift(ctx); err != nil || !drift {
							t.Fatalf("CheckDrift after %q = %v, %v; want drift", c.edit, drift, err)
						}
						if err := b.Sync(ctx, &periodic); err != nil {
							t.Fatal(err)
						}
					} else if err := b.Sync(ctx, s); err != nil {
						t.Fatal(err)
					}
					if b.lastWrite.full || b.lastWrite.written+b.lastWrite.deleted > 1 {
						t.Errorf("%s after %q wrote %+v, want at most the one chain changed", how, c.edit, b.lastWrite)
					}
					for _, ft := range b.families {
						got, err := ft.read(ctx)
						if err != nil {
							t.Fatal(err)
						}
						if want := Render(s, ft.family, DefaultMasqueradeBit); got.Text() != want.Text() {
							t.Errorf("%s: %s rules not restored:\n%s", how, ft.family, got.Text())
						}
						for _, j := range jumps {
							if ok, err := ft.run.ruleExists(j.table, j.chain, j.spec()); err != nil || !ok {
								t.Errorf("%s: %s jump in %s/%s not restored (%v)", how, ft.family, j.table, j.chain, err)
							}
						}
					}
					if drift, err := b.CheckDrift(ctx); err != nil || drift {
						t.Errorf("%s: CheckDrift after the repair = %v, %v; want no drift", how, drift, err)
					}
				}
			})
		})
	}
}

// TestCleanupLeavesOthersAlone checks that Cleanup removes svcnat's chains
// and jumps and nothing else.
func TestCleanupLeavesOthersAlone(t *testing.T) {
	onKernels(t, []string{kernelFake, ModeNFT}, func(t *testing.T, k *testKernel) {
		ctx := t.Context()
		k.outside(t, model.IPv4, "*nat\n-N OTHER\n-A PREROUTING -j OTHER\nCOMMIT\n"+
			"*filter\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n")
		before := k.saveAll(t, model.IPv4)
		b := k.initBackend(t, Options{})
		if err := b.Sync(ctx, allCase()); err != nil {
			t.Fatal(err)
		}
		if after := k.saveAll(t, model.IPv4); !strings.Contains(after, chainServices) {
			t.Fatalf("sync programmed nothing:\n%s", after)
		}
		if err := b.Cleanup(ctx); err != nil {
			t.Fatal(err)
		}
		after := k.saveAll(t, model.IPv4)
		if strip(before) != strip(after) {
			t.Errorf("cleanup changed more than svcnat's rules:\nbefore\n%s\nafter\n%s", before, after)
		}
	})
}

// strip drops iptables-save's comment lines (timestamps).
func strip(save string) string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		if !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestMissingBinaryIsNamed(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	b, err := New(Options{Mode: ModeLegacy})
	if err != nil {
		t.Fatal(err)
	}
	err = b.Init(t.Context())
	if err == nil || !strings.Contains(err.Error(), "iptables-legacy") {
		t.Errorf("Init without iptables binaries: %v, want an error naming iptables-legacy", err)
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	for _, o := range []Options{{Mode: "ipvs"}, {MasqueradeBit: 32}, {Families: []model.Family{"IPX"}}} {
		if _, err := New(o); err == nil {
			t.Errorf("New(%+v) accepted", o)
		}
	}
}

// TestFailedSyncRewritesAll makes one iptables-restore fail; the next Sync
// must rewrite everything, not only what changed.
func TestFailedSyncRewritesAll(t *testing.T) {
	k := &testKernel{mode: ModeNFT, host: newFakeHost()}
	reg := prometheus.NewRegistry()
	b := k.initBackend(t, Options{Families: []model.Family{model.IPv4}, Registerer: reg})
	ctx := t.Context()
	s := allCase()
	if err := b.Sync(ctx, s); err != nil {
		t.Fatal(err)
	}
	rs := Render(s, model.IPv4, DefaultMasqueradeBit)
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	gauges := map[string]float64{}
	for _, mf := range families {
		for _, m := range mf.GetMetric() {
			labels := mf.GetName()
			for _, l := range m.GetLabel() {
				labels += " " + l.GetValue()
			}
			gauges[labels] = m.GetGauge().GetValue()
		}
	}
	want := map[string]float64{
		"svcnat_iptables_rules IPv4 nat":    float64(rs.Rules(tableNAT)),
		"svcnat_iptables_rules IPv4 filter": float64(rs.Rules(tableFilter)),
	}
	if !maps.Equal(gauges, want) {
		t.Errorf("metrics %v, want %v", gauges, want)
	}
	fake := k.fake(t, model.IPv4)
	fake.failRestore = errors.New("iptables-restore cannot run")
	web := model.ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: model.IPv4}
	s.ServicePorts[web].ClusterEndpoints = s.ServicePorts[web].ClusterEndpoints[:1]
	if err := b.Sync(ctx, s); err == nil {
		t.Fatal("sync with a failing iptables-restore succeeded")
	}
	fake.failRestore = nil
	if err := b.Sync(ctx, s); err != nil {
		t.Fatal(err)
	}
	if !b.lastWrite.full {
		t.Errorf("sync after a failure wrote %+v, want a full rewrite", b.lastWrite)
	}
	got, err := b.Dump(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The backend programs IPv4 only.
	v4 := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for _, c := range s.ClusterCIDRs {
		if c.Addr().Is4() {
			v4.ClusterCIDRs = append(v4.ClusterCIDRs, c)
		}
	}
	for n, sp := range s.ServicePorts {
		if n.Family == model.IPv4 {
			v4.ServicePorts[n] = sp
		}
	}
	for _, d := range conformance.Diff(v4, got) {
		t.Error(d)
	}
}

// TestFailedFamilyRewritesAll: when one family's restore fails, Sync
// reports that family's ServicePorts as failed and the agent goes on with
// Changes; the next Sync, though its Change names one ServicePort, must
// rewrite the failed family whole and leave the other family's rules be.
func TestFailedFamilyRewritesAll(t *testing.T) {
	k := &testKernel{mode: ModeNFT, host: newFakeHost()}
	b := k.initBackend(t, Options{Families: []model.Family{model.IPv4, model.IPv6}})
	ctx := t.Context()
	s := allCase()
	// Without cluster CIDRs: a change of them alone makes a sync render
	// everything.
	s.ClusterCIDRs = nil
	s.ServicePorts = maps.Clone(s.ServicePorts)
	for name, sp := range s.ServicePorts {
		if name.Family == model.IPv6 {
			// A second IPv6 ServicePort, which no Change names below.
			sp = sp.Clone()
			sp.Name.Name += "-other"
			sp.Frontends = sp.Frontends[:1]
			sp.Frontends[0].IP = netip.MustParseAddr("fd00:96::11")
			s.ServicePorts[sp.Name] = sp
			break
		}
	}
	if err := b.Sync(ctx, s); err != nil {
		t.Fatal(err)
	}
	fake := k.fake(t, model.IPv6)
	fake.failRestore = errors.New("ip6tables-restore cannot run")
	next := &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: maps.Clone(s.ServicePorts)}
	var changed model.ServicePortName
	for _, sp := range next.Sorted() {
		if sp.Name.Family == model.IPv6 && sp.Name.Name == "web" {
			sp = sp.Clone()
			sp.ClusterEndpoints = sp.ClusterEndpoints[1:]
			next.ServicePorts[sp.Name], changed = sp, sp.Name
			break
		}
	}
	if changed.Name == "" {
		t.Fatal("no IPv6 service port with endpoints in the conformance cases")
	}
	next = conformance.WithChange(s, next)
	var perPort dataplane.PortErrors
	if err := b.Sync(ctx, next); !errors.As(err, &perPort) || perPort[changed] == nil {
		t.Fatalf("sync with a failing IPv6 restore = %v, want the IPv6 service ports failed alone", err)
	}
	fake.failRestore = nil
	again := &model.State{ClusterCIDRs: next.ClusterCIDRs, ServicePorts: next.ServicePorts,
		Change: &model.Change{Updated: []model.ServicePortName{changed}}}
	if err := b.Sync(ctx, again); err != nil {
		t.Fatal(err)
	}
	got, err := b.Dump(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range conformance.Diff(next, got) {
		t.Error(d)
	}
}

// TestDetectMode: auto picks the variant holding the host's rules.
func TestDetectMode(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	ctx := t.Context()
	if got := (execHost{}).detectMode(ctx); got != ModeNFT {
		t.Errorf("empty tables: mode %s, want nft", got)
	}
	netnstest.Run(t, "", "iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
	netnstest.Run(t, "", "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "23", "-j", "RETURN")
	if got := (execHost{}).detectMode(ctx); got != ModeLegacy {
		t.Errorf("rules in legacy tables only: mode %s, want legacy", got)
	}
	b := initBackend(t, ModeAuto)
	if b.Mode() != ModeLegacy {
		t.Errorf("backend mode %s, want legacy", b.Mode())
	}
}

// TestSyncDoesNotWaitForComparison: the comparison of the kernel with what
// was written reads every rule (a ~24 MB iptables-save at 10,000
// Services), so it must never hold up a Sync that carries a change; and a
// comparison that reads the kernel while such a Sync writes must not take
// that write for outside interference. The fake kernel's save blocks the
// comparison while the Sync runs.
func TestSyncDoesNotWaitForComparison(t *testing.T) {
	k := &testKernel{mode: ModeNFT, host: newFakeHost()}
	b := k.initBackend(t, Options{})
	ctx := t.Context()
	s := allCase()
	if err := b.Sync(ctx, s); err != nil {
		t.Fatal(err)
	}
	fake := k.fake(t, model.IPv4)
	web := model.ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: model.IPv4}
	addEndpoint := func(ip string) {
		t.Helper()
		sp := *s.ServicePorts[web]
		sp.ClusterEndpoints = append(slices.Clone(sp.ClusterEndpoints), model.Endpoint{IP: netip.MustParseAddr(ip), Port: 8080})
		s.ServicePorts[web] = &sp
		s.Change = &model.Change{Updated: []model.ServicePortName{web}}
		if err := b.Sync(ctx, s); err != nil {
			t.Fatal(err)
		}
	}

	// Alone: a Sync with a change reads nothing back.
	fake.beforeSave = func() { t.Error("a sync with a change read the kernel") }
	addEndpoint("10.244.9.9")

	// Beside a comparison held up in its first read, of the filter table,
	// before the write; it reads the nat table, which the write changes,
	// after it.
	reading, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	fake.beforeSave = func() {
		once.Do(func() {
			close(reading)
			<-release
		})
	}
	type result struct {
		drift bool
		err   error
	}
	checked := make(chan result, 1)
	go func() {
		drift, err := b.CheckDrift(ctx)
		checked <- result{drift, err}
	}()
	<-reading
	addEndpoint("10.244.9.10")
	close(release)
	if r := <-checked; r.err != nil || r.drift {
		t.Errorf("CheckDrift beside a sync = %v, %v; want no drift (the sync's own write is not interference)", r.drift, r.err)
	}
	got, err := b.Dump(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range conformance.Diff(s, got) {
		t.Error(d)
	}
}
