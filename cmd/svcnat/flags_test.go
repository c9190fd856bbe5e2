package main

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"

	"github.com/svcnat/svcnat/pkg/ebpf"
	"github.com/svcnat/svcnat/pkg/iptables"
)

// --nodeport-addresses takes kube-proxy's keyword "primary" beside CIDRs.
func TestNodePortAddressesPrimary(t *testing.T) {
	f := nodeFlags{nodeName: "node1", nodePortAddresses: []string{"primary", "fd00::/8"}}
	cfg, err := f.config()
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.NodePortPrimary || !slices.Equal(cfg.NodePortAddresses, []netip.Prefix{netip.MustParsePrefix("fd00::/8")}) {
		t.Errorf("config %+v: want primary and fd00::/8", cfg)
	}
	f.nodePortAddresses = []string{"primary-ish"}
	if _, err := f.config(); err == nil {
		t.Error("a bad --nodeport-addresses value was accepted")
	}
}

// --masquerade-bit 0 is refused rather than silently becoming 13.
func TestMasqueradeBitZeroRefused(t *testing.T) {
	f := backendFlags{name: backendIptables, masqueradeBit: 0}
	if _, err := f.iptables(nil, nil); err == nil {
		t.Error("--masquerade-bit 0 accepted")
	}
}

// --bpf-map-max-nat sizes nothing since the tc path's flows live in
// conntrack: it is accepted, whatever its value, with a warning naming it.
func TestMaxNATDeprecated(t *testing.T) {
	var f backendFlags
	fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
	var out strings.Builder
	fs.SetOutput(&out)
	f.register(fs, backendEBPF)
	if err := fs.Parse([]string{"--bpf-map-max-nat=1"}); err != nil {
		t.Fatalf("--bpf-map-max-nat=1 refused: %v", err)
	}
	if !strings.Contains(out.String(), "--bpf-map-max-nat has been deprecated") {
		t.Errorf("no warning naming --bpf-map-max-nat; output %q", out.String())
	}
}

// --backend auto falls back to iptables only when the kernel lacks a
// feature: an unrelated failure of the eBPF backend (here its metrics
// clash with ones registered already) is an error, not a silent switch.
func TestBackendAutoFallsBackOnlyWhenNotSupported(t *testing.T) {
	if _, err := ebpf.New(ebpf.Options{}); err != nil {
		t.Skipf("the eBPF backend cannot be created here: %v", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "svcnat_ebpf_map_entries", Help: "clash"}, []string{"other"}))
	f := backendFlags{name: backendAuto, cgroupPath: "/sys/fs/cgroup", masqueradeBit: iptables.DefaultMasqueradeBit}
	b, name, err := f.forRun(reg, slog.New(slog.DiscardHandler))
	if err == nil {
		t.Fatalf("auto chose %s (%T) despite an error unrelated to kernel support", name, b)
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		t.Fatalf("a metrics clash reported as not supported: %v", err)
	}
}

// --min-sync-period defaults by backend (250 ms for iptables, 10 ms for eBPF);
// a value on the command line or in the config file wins for both.
func TestMinSyncPeriodDefault(t *testing.T) {
	cfgFile := filepath.Join(t.TempDir(), "svcnat.yaml")
	if err := os.WriteFile(cfgFile, []byte("min-sync-period: 250ms\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args    []string
		file    string
		backend string
		want    time.Duration
	}{
		{nil, "", backendIptables, 250 * time.Millisecond},
		{nil, "", backendEBPF, 10 * time.Millisecond},
		{[]string{"--min-sync-period=2s"}, "", backendEBPF, 2 * time.Second},
		{[]string{"--min-sync-period=5ms"}, "", backendIptables, 5 * time.Millisecond},
		{nil, cfgFile, backendEBPF, 250 * time.Millisecond},
		{nil, cfgFile, backendIptables, 250 * time.Millisecond},
	} {
		run, _, err := newRootCommand().Find([]string{"run"})
		if err != nil {
			t.Fatal(err)
		}
		if err := run.ParseFlags(c.args); err != nil {
			t.Fatal(err)
		}
		if err := applyConfigFile(run.Flags(), c.file); err != nil {
			t.Fatal(err)
		}
		given, err := run.Flags().GetDuration("min-sync-period")
		if err != nil {
			t.Fatal(err)
		}
		if got := minSyncPeriod(given, run.Flags().Changed("min-sync-period"), c.backend); got != c.want {
			t.Errorf("args %v, config file %q, backend %s: min sync period %v, want %v", c.args, c.file, c.backend, got, c.want)
		}
	}
}
