package main

import (
	"io"
	"log/slog"
	"strings"
	"testing"
)

// Bad input is refused with an error naming the flag, before any backend
// is opened.
func TestTraceFlags(t *testing.T) {
	for _, c := range []struct {
		f    traceFlags
		want string
	}{
		{traceFlags{from: "10.0.0.1", to: "10.96.0.1:80", output: "yaml"}, `output format "yaml"`},
		{traceFlags{from: "10.0.0.1:x", to: "10.96.0.1:80", output: "text"}, `--from "10.0.0.1:x"`},
		{traceFlags{from: "10.0.0.1", to: "10.96.0.1", output: "text"}, `--to "10.96.0.1"`},
	} {
		err := runTrace(t.Context(), &c.f, io.Discard, slog.New(slog.DiscardHandler))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want an error with %q", c.f, err, c.want)
		}
	}
	for in, want := range map[string]string{"10.0.0.1": "10.0.0.1:0", "10.0.0.1:5": "10.0.0.1:5", "[fd00::1]:5": "[fd00::1]:5", "fd00::1": "[fd00::1]:0"} {
		got, err := parseFrom(in)
		if err != nil || got.String() != want {
			t.Errorf("parseFrom(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
}
