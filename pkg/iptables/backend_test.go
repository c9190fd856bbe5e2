//go:build linux

package iptables

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/dataplane/conformance"
	"github.com/svcnat/svcnat/pkg/internal/netnstest"
	"github.com/svcnat/svcnat/pkg/model"
)

func newTestBackend(t *testing.T, mode string) *Backend {
	t.Helper()
	b, err := New(Options{Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestConformance(t *testing.T) {
	for _, mode := range []string{ModeNFT, ModeLegacy} {
		t.Run(mode, func(t *testing.T) {
			if !netnstest.InNetns(t) {
				return
			}
			conformance.Run(t, func(t *testing.T) dataplane.Backend { return newTestBackend(t, mode) })
		})
	}
}

func allCase() *model.State {
	cases := conformance.Cases()
	return cases[len(cases)-1].State
}

func initBackend(t *testing.T, mode string) *Backend {
	t.Helper()
	b := newTestBackend(t, mode)
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

// TestKernelHoldsRenderedText checks that iptables-save prints svcnat's
// rules exactly as Render writes them, in both modes: the partial sync and
// the interference check compare the two texts.
func TestKernelHoldsRenderedText(t *testing.T) {
	for _, mode := range []string{ModeNFT, ModeLegacy} {
		t.Run(mode, func(t *testing.T) {
			if !netnstest.InNetns(t) {
				return
			}
			b := initBackend(t, mode)
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
}

func TestPartialSync(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	b := initBackend(t, ModeAuto)
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
}

// TestOutsideInterference changes svcnat's rules by hand, as an operator or
// another tool might. CheckDrift must notice, and the next Sync, though its
// Change names nothing, restore exactly what was changed; a Sync without a
// Change must notice and restore it by itself.
func TestOutsideInterference(t *testing.T) {
	for _, c := range []struct {
		name string
		args []string
	}{
		{"FlushServices", []string{"-t", "nat", "-F", chainServices}},
		{"FlushFilter", []string{"-t", "filter", "-F", chainFilter}},
		{"DeleteJump", []string{"-t", "nat", "-D", "PREROUTING", "-m", "comment", "--comment", "svcnat services", "-j", chainServices}},
		{"DeleteFilterJump", []string{"-t", "filter", "-D", "FORWARD", "-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "svcnat services", "-j", chainFilter}},
		{"DeletePostroutingRule", []string{"-t", "nat", "-D", chainPostrouting, "1"}},
		{"FlushLeaf", []string{"-t", "nat", "-F", addrLeaf(netip.MustParseAddr("10.96.0.10"))}},
		{"FlushEndpoints", []string{"-t", "nat", "-F", prefixCluster + chainHash("default/web:http")}},
		{"ForeignChain", []string{"-t", "nat", "-N", chainPrefix + "STRAY"}},
	} {
		for _, mode := range []string{ModeNFT, ModeLegacy} {
			t.Run(c.name+"/"+mode, func(t *testing.T) {
				if !netnstest.InNetns(t) {
					return
				}
				b := initBackend(t, mode)
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
					netnstest.Run(t, "", "iptables-"+b.Mode(), c.args...)
					if how == "CheckDrift then a sync with an empty change" {
						if drift, err := b.CheckDrift(ctx); err != nil || !drift {
							t.Fatalf("CheckDrift after %v = %v, %v; want drift", c.args, drift, err)
						}
						if err := b.Sync(ctx, &periodic); err != nil {
							t.Fatal(err)
						}
					} else if err := b.Sync(ctx, s); err != nil {
						t.Fatal(err)
					}
					if b.lastWrite.full || b.lastWrite.written+b.lastWrite.deleted > 1 {
						t.Errorf("%s after %v wrote %+v, want at most the one chain changed", how, c.args, b.lastWrite)
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
							if ok, err := ft.ipt.Exists(j.table, j.chain, j.spec...); err != nil || !ok {
								t.Errorf("%s: %s jump in %s/%s not restored (%v)", how, ft.family, j.table, j.chain, err)
							}
						}
					}
					if drift, err := b.CheckDrift(ctx); err != nil || drift {
						t.Errorf("%s: CheckDrift after the repair = %v, %v; want no drift", how, drift, err)
					}
				}
			})
		}
	}
}

// TestCleanupLeavesOthersAlone checks that Cleanup removes svcnat's chains
// and jumps and nothing else.
func TestCleanupLeavesOthersAlone(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	ctx := t.Context()
	ipt := "iptables-" + detectMode(ctx)
	netnstest.Run(t, "", ipt, "-t", "nat", "-N", "OTHER")
	netnstest.Run(t, "", ipt, "-t", "nat", "-A", "PREROUTING", "-j", "OTHER")
	netnstest.Run(t, "", ipt, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
	before := netnstest.Run(t, "", ipt+"-save")
	b := initBackend(t, ModeAuto)
	if err := b.Sync(ctx, allCase()); err != nil {
		t.Fatal(err)
	}
	if err := b.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	after := netnstest.Run(t, "", ipt+"-save")
	if strip(before) != strip(after) {
		t.Errorf("cleanup changed more than svcnat's rules:\nbefore\n%s\nafter\n%s", before, after)
	}
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
	if !netnstest.InNetns(t) {
		return
	}
	reg := prometheus.NewRegistry()
	b, err := New(Options{Families: []model.Family{model.IPv4}, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Cleanup(context.Background()) })
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
	ft := b.families[0]
	restore := ft.restore
	ft.restore = "/bin/false"
	web := model.ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: model.IPv4}
	s.ServicePorts[web].ClusterEndpoints = s.ServicePorts[web].ClusterEndpoints[:1]
	if err := b.Sync(ctx, s); err == nil {
		t.Fatal("sync with a failing iptables-restore succeeded")
	}
	ft.restore = restore
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

// TestDetectMode: auto picks the variant holding the host's rules.
func TestDetectMode(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	ctx := t.Context()
	if got := detectMode(ctx); got != ModeNFT {
		t.Errorf("empty tables: mode %s, want nft", got)
	}
	netnstest.Run(t, "", "iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
	netnstest.Run(t, "", "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "23", "-j", "RETURN")
	if got := detectMode(ctx); got != ModeLegacy {
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
// that write for outside interference. An iptables-save that sleeps
// before it reads stands in for a large ruleset.
func TestSyncDoesNotWaitForComparison(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	b := initBackend(t, ModeNFT)
	ctx := t.Context()
	s := allCase()
	if err := b.Sync(ctx, s); err != nil {
		t.Fatal(err)
	}
	const slow = 2 * time.Second
	reading := filepath.Join(t.TempDir(), "reading")
	wrapper := filepath.Join(t.TempDir(), "iptables-nft-save")
	ft := b.families[0]
	script := fmt.Sprintf("#!/bin/sh\ntouch %s\nsleep %g\nexec %s \"$@\"\n", reading, slow.Seconds(), ft.save)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	real := ft.save
	ft.save = wrapper
	web := model.ServicePortName{Namespace: "default", Name: "web", Port: "http", Family: model.IPv4}
	addEndpoint := func(ip string) {
		t.Helper()
		sp := *s.ServicePorts[web]
		sp.ClusterEndpoints = append(slices.Clone(sp.ClusterEndpoints), model.Endpoint{IP: netip.MustParseAddr(ip), Port: 8080})
		s.ServicePorts[web] = &sp
		s.Change = &model.Change{Updated: []model.ServicePortName{web}}
		start := time.Now()
		if err := b.Sync(ctx, s); err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took >= slow/2 {
			t.Errorf("sync of one changed ServicePort took %v: it waited for iptables-save", took)
		} else {
			t.Logf("sync of one changed ServicePort took %v", took)
		}
	}

	// Alone: a Sync with a change reads nothing back.
	addEndpoint("10.244.9.9")

	// Beside a comparison that reads the tables before and after the write.
	type result struct {
		drift bool
		err   error
	}
	checked := make(chan result, 1)
	go func() {
		drift, err := b.CheckDrift(ctx)
		checked <- result{drift, err}
	}()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(reading); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatal("CheckDrift never ran iptables-save")
		}
	}
	addEndpoint("10.244.9.10")
	select {
	case r := <-checked:
		t.Fatalf("CheckDrift (%v, %v) ended before the sync it ran beside: the test proves nothing", r.drift, r.err)
	default:
	}
	if r := <-checked; r.err != nil || r.drift {
		t.Errorf("CheckDrift beside a sync = %v, %v; want no drift (the sync's own write is not interference)", r.drift, r.err)
	}
	ft.save = real
	got, err := b.Dump(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range conformance.Diff(s, got) {
		t.Error(d)
	}
}
