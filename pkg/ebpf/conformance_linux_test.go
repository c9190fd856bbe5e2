//go:build linux

package ebpf

import (
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/dataplane/conformance"
	"github.com/svcnat/svcnat/pkg/internal/netnstest"
)

func TestConformance(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	env := newTestEnv(t)
	conformance.Run(t, func(t *testing.T) dataplane.Backend {
		b, err := New(Options{BPFFSPath: env.bpffs, CgroupPath: env.cgroup})
		if err != nil {
			t.Fatalf("new backend: %v", err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	})
}
