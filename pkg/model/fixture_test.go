package model

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// fixture is the content of a testdata/*.yaml file: a multi-document YAML
// stream of one Config document (kind: Config, fields as Config's JSON) and
// any number of Services and EndpointSlices.
type fixture struct {
	config   *Config
	services []*corev1.Service
	slices   []*discoveryv1.EndpointSlice
}

// parseFixture decodes a fixture; unknown fields and kinds are errors, so a
// typo cannot silently drop part of a test.
func parseFixture(data []byte) (*fixture, error) {
	f := &fixture{config: &Config{}}
	for i, doc := range splitYAML(data) {
		var meta struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		var err error
		switch meta.Kind {
		case "":
			continue // empty document
		case "Config":
			var c struct {
				Kind string `json:"kind"`
				Config
			}
			err = yaml.UnmarshalStrict(doc, &c)
			f.config = &c.Config
		case "Service":
			svc := &corev1.Service{}
			err = yaml.UnmarshalStrict(doc, svc)
			f.services = append(f.services, svc)
		case "EndpointSlice":
			es := &discoveryv1.EndpointSlice{}
			err = yaml.UnmarshalStrict(doc, es)
			f.slices = append(f.slices, es)
		default:
			err = fmt.Errorf("unknown kind %q", meta.Kind)
		}
		if err != nil {
			return nil, fmt.Errorf("document %d (%s): %w", i, meta.Kind, err)
		}
	}
	return f, nil
}

// splitYAML splits a YAML stream at "---" lines.
func splitYAML(data []byte) [][]byte {
	var docs [][]byte
	var cur []byte
	for line := range bytes.Lines(data) {
		if strings.TrimRight(string(line), " \t\r\n") == "---" {
			docs = append(docs, cur)
			cur = nil
			continue
		}
		cur = append(cur, line...)
	}
	return append(docs, cur)
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
