package model

import (
	"cmp"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// FuzzBuild decodes arbitrary fixture bytes (YAML or JSON documents) into
// objects and checks that Build does not panic and that its output is
// canonical: two builds are equal, everything is sorted and deduplicated,
// and the JSON form round-trips.
func FuzzBuild(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.yaml")
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(`{"kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"::ffff:10.0.0.1","ports":[{"port":1}]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		fx, err := parseFixture(data)
		if err != nil {
			return
		}
		s1, errs1 := Build(fx.config, fx.services, fx.slices)
		s2, errs2 := Build(fx.config, fx.services, fx.slices)
		j1, err := json.Marshal(s1)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		j2, _ := json.Marshal(s2)
		if string(j1) != string(j2) || fmt.Sprint(errs1) != fmt.Sprint(errs2) {
			t.Fatalf("two builds differ:\n%s\n%s", j1, j2)
		}
		if err := checkCanonical(s1); err != nil {
			t.Fatalf("%v in %s", err, j1)
		}
		var back State
		if err := json.Unmarshal(j1, &back); err != nil {
			t.Fatalf("unmarshal: %v", err)
		}
		if d := Diff(s1, &back); len(d) > 0 {
			t.Fatalf("JSON round trip differs: %s", strings.Join(d, "\n"))
		}
	})
}

// checkCanonical checks the invariants Build promises about its output.
func checkCanonical(s *State) error {
	if !strictlySorted(s.ClusterCIDRs, ComparePrefixes) {
		return fmt.Errorf("cluster CIDRs %v not sorted and unique", s.ClusterCIDRs)
	}
	for name, sp := range s.ServicePorts {
		switch {
		case sp.Name != name:
			return fmt.Errorf("%s keyed as %s", sp.Name, name)
		case len(sp.Frontends) == 0 || sp.Frontends[0].Kind != ClusterIP:
			return fmt.Errorf("%s: no ClusterIP frontend", name)
		case !strictlySorted(sp.Frontends, Frontend.Compare):
			return fmt.Errorf("%s: frontends %v not sorted and unique", name, sp.Frontends)
		case !strictlySorted(sp.ClusterEndpoints, compareAddrPort):
			return fmt.Errorf("%s: cluster endpoints %v not sorted and unique", name, sp.ClusterEndpoints)
		case !strictlySorted(sp.LocalEndpoints, compareAddrPort):
			return fmt.Errorf("%s: local endpoints %v not sorted and unique", name, sp.LocalEndpoints)
		case !strictlySorted(sp.SourceRanges, ComparePrefixes):
			return fmt.Errorf("%s: source ranges %v not sorted and unique", name, sp.SourceRanges)
		case sp.LocalEndpoints != nil && !sp.InternalTrafficLocal && !sp.ExternalTrafficLocal:
			return fmt.Errorf("%s: local endpoints without a Local policy", name)
		case slices.ContainsFunc(sp.LocalEndpoints, func(e Endpoint) bool { return !e.Local }):
			return fmt.Errorf("%s: non-local endpoint among local ones", name)
		}
		for _, f := range sp.Frontends {
			if FamilyOf(f.IP) != name.Family || f.IP.Zone() != "" || f.IP.Is4In6() {
				return fmt.Errorf("%s: frontend %s not a plain %s address", name, f, name.Family)
			}
		}
		for _, e := range slices.Concat(sp.ClusterEndpoints, sp.LocalEndpoints) {
			if FamilyOf(e.IP) != name.Family || e.Port == 0 {
				return fmt.Errorf("%s: endpoint %s not usable in %s", name, e, name.Family)
			}
		}
	}
	return nil
}

// compareAddrPort orders endpoints by address and port only, so that one
// address and port twice (local and not) counts as a duplicate.
func compareAddrPort(a, b Endpoint) int {
	return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
}

// strictlySorted reports whether s is sorted by compare without equal
// neighbours.
func strictlySorted[T any](s []T, compare func(a, b T) int) bool {
	for i := 1; i < len(s); i++ {
		if compare(s[i-1], s[i]) >= 0 {
			return false
		}
	}
	return true
}
