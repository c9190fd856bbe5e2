//go:build linux

package netnstest

import (
	"os"
	"strings"
	"testing"
)

// TestInNetnsIsolates checks that the child really runs in another network
// namespace than the parent: a link created in the child is absent outside.
func TestInNetnsIsolates(t *testing.T) {
	if !InNetns(t) {
		return
	}
	parent := os.Getenv(envParentNetns)
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if parent == "" || parent == self {
		t.Fatalf("test body runs in its parent's network namespace (%s)", self)
	}
	peer := NewNamespace(t, "sn-p")
	Run(t, "", "ip", "link", "add", "sn-a", "type", "veth", "peer", "name", "sn-b", "netns", peer)
	if out := Run(t, peer, "ip", "-o", "link", "show"); !strings.Contains(out, "sn-b") {
		t.Fatalf("veth peer not in namespace %s:\n%s", peer, out)
	}
}
