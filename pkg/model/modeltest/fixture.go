// Package modeltest reads the YAML fixtures in pkg/model/testdata, for the
// tests of pkg/model and of the packages that feed it.
package modeltest

import (
	"bytes"
	"fmt"
	"path/filepath"
	"runtime"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"sigs.k8s.io/yaml"
)

// Fixture is the content of a fixture file: a multi-document YAML stream of
// at most one Config document (kind: Config, fields as model.Config's JSON)
// and any number of Services and EndpointSlices.
type Fixture struct {
	config   []byte // the Config document, nil when there is none
	Services []*corev1.Service
	Slices   []*discoveryv1.EndpointSlice
}

// DecodeConfig decodes the Config document, strictly, into cfg (a
// *model.Config: this package does not import pkg/model, whose own tests
// use it). Without a Config document it leaves cfg alone.
func (f *Fixture) DecodeConfig(cfg any) error {
	if f.config == nil {
		return nil
	}
	var doc map[string]any
	if err := yaml.Unmarshal(f.config, &doc); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	delete(doc, "kind")
	b, err := yaml.Marshal(doc)
	if err == nil {
		err = yaml.UnmarshalStrict(b, cfg)
	}
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	return nil
}

// Parse decodes a fixture; unknown fields and kinds are errors, so a typo
// cannot silently drop part of a test.
func Parse(data []byte) (*Fixture, error) {
	f := &Fixture{}
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
			f.config = doc
		case "Service":
			svc := &corev1.Service{}
			err = yaml.UnmarshalStrict(doc, svc)
			f.Services = append(f.Services, svc)
		case "EndpointSlice":
			es := &discoveryv1.EndpointSlice{}
			err = yaml.UnmarshalStrict(doc, es)
			f.Slices = append(f.Slices, es)
		default:
			err = fmt.Errorf("unknown kind %q", meta.Kind)
		}
		if err != nil {
			return nil, fmt.Errorf("document %d (%s): %w", i, meta.Kind, err)
		}
	}
	return f, nil
}

// Files returns the paths of the fixture files in pkg/model/testdata.
func Files() ([]string, error) {
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		return nil, fmt.Errorf("find pkg/model/testdata: no caller information")
	}
	return filepath.Glob(filepath.Join(filepath.Dir(self), "..", "testdata", "*.yaml"))
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
