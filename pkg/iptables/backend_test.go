//go:build linux

package iptables

import (
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/dataplane/conformance"
	"github.com/svcnat/svcnat/pkg/internal/netnstest"
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
