//go:build linux

package ebpf

import (
	"regexp"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
)

// maxVerifierInsns bounds the instructions the kernel's verifier processes
// for any one of svcnat's programs. Verification is CPU the agent spends at
// every start before it programs anything: at 690,000 instructions each, the
// four connect and sendmsg programs took ~4 s of the 10k-Service initial
// programming; checked once as global functions, the loops of xlate stay near
// 30,000. The limit also keeps a margin below the kernel's 1,000,000.
const maxVerifierInsns = 100_000

var processedInsns = regexp.MustCompile(`processed (\d+) insns`)

// TestVerifierComplexity loads every object's programs with the verifier's
// statistics and fails for a program above maxVerifierInsns.
func TestVerifierComplexity(t *testing.T) {
	if !netnstest.InNetns(t) {
		return
	}
	for _, load := range []func() (*ebpf.CollectionSpec, error){loadSvcnat, loadTc, loadDestroy, loadTrace} {
		spec, err := load()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone // loaded to be verified, not to be used
		}
		coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
			Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats},
		})
		if err != nil {
			t.Fatalf("load programs: %v", err)
		}
		for name, p := range coll.Programs {
			m := processedInsns.FindStringSubmatch(p.VerifierLog)
			if m == nil {
				t.Errorf("program %s: no instruction count in the verifier's log %q", name, p.VerifierLog)
				continue
			}
			n, _ := strconv.Atoi(m[1])
			t.Logf("program %s: the verifier processed %d instructions", name, n)
			if n > maxVerifierInsns {
				t.Errorf("program %s: the verifier processed %d instructions, want at most %d", name, n, maxVerifierInsns)
			}
		}
		coll.Close()
	}
}
