package model

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/svcnat/svcnat/pkg/model/modeltest"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// fixture is a parsed testdata/*.yaml file (see modeltest.Fixture).
type fixture struct {
	config   *Config
	services []*corev1.Service
	slices   []*discoveryv1.EndpointSlice
}

// parseFixture decodes a fixture and its Config.
func parseFixture(data []byte) (*fixture, error) {
	mf, err := modeltest.Parse(data)
	if err != nil {
		return nil, err
	}
	f := &fixture{config: &Config{}, services: mf.Services, slices: mf.Slices}
	return f, mf.DecodeConfig(f.config)
}

// golden is what a golden file holds: the built State and the error texts.
type golden struct {
	Errors []string `json:"errors"`
	State  *State   `json:"state"`
}

func buildGolden(t *testing.T, f *fixture) []byte {
	t.Helper()
	s, errs := Build(f.config, f.services, f.slices)
	g := golden{Errors: []string{}, State: s}
	for _, err := range errs {
		g.Errors = append(g.Errors, err.Error())
	}
	out, err := json.MarshalIndent(g, "", "  ")
	if err != nil {
		t.Fatalf("encode golden: %v", err)
	}
	return append(out, '\n')
}

// TestGolden builds every testdata/*.yaml fixture and compares the State and
// errors with testdata/*.golden; -update rewrites the golden files.
func TestGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no fixtures: %v", err)
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), ".yaml")
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			f, err := parseFixture(data)
			if err != nil {
				t.Fatalf("parse %s: %v", file, err)
			}
			got := buildGolden(t, f)
			goldenFile := strings.TrimSuffix(file, ".yaml") + ".golden"
			if *update {
				if err := os.WriteFile(goldenFile, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(goldenFile)
			if err != nil {
				t.Fatalf("read golden (run with -update to create): %v", err)
			}
			if diff := cmp.Diff(string(want), string(got)); diff != "" {
				t.Errorf("%s differs from %s (-want +got; -update rewrites):\n%s", file, goldenFile, diff)
			}
			// The golden State decodes back to what Build returned.
			var g golden
			if err := json.Unmarshal(want, &g); err != nil {
				t.Fatalf("decode golden: %v", err)
			}
			s, _ := Build(f.config, f.services, f.slices)
			if d := Diff(s, g.State); len(d) > 0 {
				t.Errorf("golden State decodes differently:\n%s", strings.Join(d, "\n"))
			}
		})
	}
}
