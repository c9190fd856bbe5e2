package main

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
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

// --min-sync-period defaults by backend (1 s for iptables, 10 ms for eBPF);
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
		{nil, "", backendIptables, time.Second},
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
