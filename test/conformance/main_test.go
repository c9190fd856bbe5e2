//go:build linux

package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/svcnat/svcnat/test/testbed"
)

// A JUnit report as ginkgo writes it: the focused tests in, others out,
// failures and skips with their messages.
const junitReport = `<?xml version="1.0" encoding="UTF-8"?>
<testsuites>
  <testsuite name="Kubernetes e2e suite">
    <testcase name="[It] [sig-network] Services should serve a basic endpoint from pods [Conformance]" status="passed"></testcase>
    <testcase name="[It] [sig-network] Services should be rejected when no endpoints exist" status="failed">
      <failure message="timed out&#xA;waiting for reject">details</failure>
    </testcase>
    <testcase name="[It] [sig-network] Traffic Distribution should route traffic correctly" status="skipped">
      <skipped message="skipped - need at least 3 zones"></skipped>
    </testcase>
    <testcase name="[It] [sig-storage] unrelated" status="passed"></testcase>
  </testsuite>
</testsuites>`

func TestReadJUnitAndReport(t *testing.T) {
	file := filepath.Join(t.TempDir(), "report.xml")
	if err := os.WriteFile(file, []byte(junitReport), 0o644); err != nil {
		t.Fatal(err)
	}
	rs, err := readJUnit(file, regexp.MustCompile(`\[sig-network\]`))
	if err != nil {
		t.Fatal(err)
	}
	basic := "[sig-network] Services should serve a basic endpoint from pods [Conformance]"
	reject := "[sig-network] Services should be rejected when no endpoints exist"
	traffic := "[sig-network] Traffic Distribution should route traffic correctly"
	want := map[string]result{
		basic:   {Status: "passed"},
		reject:  {Status: "failed", Message: "timed out\nwaiting for reject"},
		traffic: {Status: "skipped", Message: "skipped - need at least 3 zones"},
	}
	if len(rs) != len(want) {
		t.Fatalf("read %d tests, want %d: %v", len(rs), len(want), rs)
	}
	for name, w := range want {
		if rs[name] != w {
			t.Errorf("%s: got %+v, want %+v", name, rs[name], w)
		}
	}

	// kube-proxy passes the reject test, svcnat-ebpf fails it: a difference;
	// both skip the traffic test with one message: one shared note.
	kp, ebpf := testbed.KubeProxyNftables, testbed.SvcnatEBPF
	table := map[string]map[testbed.ProxyKind]result{
		basic:   {kp: rs[basic], ebpf: rs[basic]},
		reject:  {kp: {Status: "passed"}, ebpf: rs[reject]},
		traffic: {kp: rs[traffic], ebpf: rs[traffic]},
	}
	md := report([]testbed.ProxyKind{ebpf, kp}, table, nil, suites["full"], 2)
	for _, line := range []string{
		"| svcnat-ebpf | 1 | 1 | 1 |",
		"| kube-proxy-nftables | 2 | 0 | 1 |",
		"| " + reject + " | fail [1] | pass |",
		"| " + traffic + " | skip [2] | skip [2] |",
		"1. " + reject + ": timed out",
		"2. " + traffic + ": skipped - need at least 3 zones",
		"- " + reject + " (svcnat-ebpf): not explained yet",
	} {
		if !strings.Contains(md, line+"\n") {
			t.Errorf("report lacks the line %q:\n%s", line, md)
		}
	}
	if strings.Contains(md, "- "+basic) || strings.Contains(md, "- "+traffic) {
		t.Errorf("report lists a test as a difference where svcnat does as kube-proxy:\n%s", md)
	}
}

// -from: the results a child wrote with -json read back, the tests the suite
// leaves out marked skipped with the reason, whatever their outcome was.
func TestReadRuns(t *testing.T) {
	dir := t.TempDir()
	sctp := "[sig-network] Networking Granular Checks: Services should function for pod-Service: sctp [Feature:SCTPConnectivity]"
	udp := "[sig-network] Networking Granular Checks: Services should function for pod-Service: udp"
	b := []byte(`{"svcnat-ebpf":{"Results":{"` + sctp + `":{"Status":"failed","Message":"timed out"},"` + udp + `":{"Status":"passed"}},"Took":60000000000}}`)
	if err := os.WriteFile(filepath.Join(dir, "svcnat-ebpf.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	runs, err := readRuns(dir, []testbed.ProxyKind{testbed.SvcnatEBPF}, suites["full"])
	if err != nil {
		t.Fatal(err)
	}
	r := runs[testbed.SvcnatEBPF]
	if r.Took.Seconds() != 60 || r.Results[udp].Status != "passed" {
		t.Errorf("read %+v", r)
	}
	if got := r.Results[sctp]; got.Status != "skipped" || !strings.Contains(got.Message, "no SCTP") {
		t.Errorf("the SCTP test: got %+v, want skipped for the kernel's lack of SCTP", got)
	}
	if _, err := readRuns(dir, []testbed.ProxyKind{testbed.KubeProxyIptables}, suites["full"]); err == nil {
		t.Error("read the results of a proxy that has no file")
	}
}
