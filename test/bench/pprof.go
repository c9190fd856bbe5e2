//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/svcnat/svcnat/test/testbed"
)

// metricsAddr is where the test bed tells every proxy to serve metrics;
// an svcnat agent that serves net/http/pprof there is profiled.
const metricsAddr = "127.0.0.1:10249"

// profile saves a pprof profile ("heap", or "profile" for CPU over
// seconds) of an svcnat agent into dir/pprof and returns the file's path
// relative to dir. It returns "" without error when the agent serves no
// profiles; kube-proxy is not profiled.
func profile(ctx context.Context, proxy *testbed.Proxy, dir, name, kind string, seconds int) (string, error) {
	if !proxy.Kind.IsSvcnat() {
		return "", nil
	}
	url := fmt.Sprintf("http://%s/debug/pprof/%s", metricsAddr, kind)
	if seconds > 0 {
		url += fmt.Sprintf("?seconds=%d", seconds)
	}
	client := testbed.HTTPClientIn(proxy.Node.Netns, time.Duration(seconds)*time.Second+30*time.Second)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("fetch %s profile of %s: %w", kind, proxy.Kind, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return "", nil
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("fetch %s profile of %s: %s", kind, proxy.Kind, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return "", fmt.Errorf("fetch %s profile of %s: %w", kind, proxy.Kind, err)
	}
	if !isProfile(body) {
		return "", nil // a server that answers every path (metrics), not pprof
	}
	rel := filepath.Join("pprof", name)
	if err := os.MkdirAll(filepath.Join(dir, "pprof"), 0o755); err != nil {
		return "", fmt.Errorf("save profile: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, rel), body, 0o644); err != nil {
		return "", fmt.Errorf("save %s profile of %s: %w", kind, proxy.Kind, err)
	}
	return rel, nil
}

// isProfile reports whether b looks like a pprof profile (gzipped protobuf).
func isProfile(b []byte) bool { return len(b) > 2 && b[0] == 0x1f && b[1] == 0x8b }
