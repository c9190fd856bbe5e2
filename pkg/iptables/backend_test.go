//go:build linux

package iptables

import (
	"context"
	"net/netip"
	"strings"
	"testing"

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
// another tool might; the next Sync must notice and restore them.
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
	} {
		t.Run(c.name, func(t *testing.T) {
			if !netnstest.InNetns(t) {
				return
			}
			b := initBackend(t, ModeAuto)
			ctx := t.Context()
			s := allCase()
			if err := b.Sync(ctx, s); err != nil {
				t.Fatal(err)
			}
			netnstest.Run(t, "", "iptables-"+b.Mode(), c.args...)
			if err := b.Sync(ctx, s); err != nil {
				t.Fatal(err)
			}
			if !b.lastWrite.full {
				t.Errorf("sync after %v was not a full rewrite", c.args)
			}
			for _, ft := range b.families {
				got, err := ft.read(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if want := Render(s, ft.family, DefaultMasqueradeBit); got.Text() != want.Text() {
					t.Errorf("%s rules not restored:\n%s", ft.family, got.Text())
				}
				for _, j := range jumps {
					if ok, err := ft.ipt.Exists(j.table, j.chain, j.spec...); err != nil || !ok {
						t.Errorf("%s jump in %s/%s not restored (%v)", ft.family, j.table, j.chain, err)
					}
				}
			}
		})
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
