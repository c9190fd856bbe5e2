package main

import (
	"net/netip"
	"slices"
	"testing"
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
