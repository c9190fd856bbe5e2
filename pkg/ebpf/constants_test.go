package ebpf

import (
	"os"
	"regexp"
	"strconv"
	"testing"
)

// TestCTMarkMaskMatchesC checks the one value Go copies from bpf/svcnat.h by
// hand, SVCNAT_CT_MARK_MASK (a #define: above the range of an enum), and
// that the generated mark lies under it. Every other shared value is
// generated from an enum.
func TestCTMarkMaskMatchesC(t *testing.T) {
	src, err := os.ReadFile("../../bpf/svcnat.h")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^#define SVCNAT_CT_MARK_MASK (0x[0-9a-fA-F]+)\s*$`).FindSubmatch(src)
	if m == nil {
		t.Fatal("bpf/svcnat.h defines no SVCNAT_CT_MARK_MASK")
	}
	mask, err := strconv.ParseUint(string(m[1]), 0, 32)
	if err != nil {
		t.Fatalf("SVCNAT_CT_MARK_MASK %s: %v", m[1], err)
	}
	if mask != ctMarkMask {
		t.Errorf("ctMarkMask = %#x, bpf/svcnat.h says %#x", ctMarkMask, mask)
	}
	if ctMark&^ctMarkMask != 0 {
		t.Errorf("ctMark %#x has bits outside ctMarkMask %#x", ctMark, ctMarkMask)
	}
}
