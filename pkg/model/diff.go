package model

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
)

// Diff returns the differences between want and got, one human-readable line
// each, in a fixed order (ClusterCIDRs, then ServicePorts by name); empty when
// they program the same dataplane. A nil State is an empty one. Lines read
// like "default/web:http (IPv4): missing" or
// "default/web:http (IPv4): cluster endpoint 10.244.1.5:8080 unexpected".
func Diff(want, got *State) []string {
	if want == nil {
		want = &State{}
	}
	if got == nil {
		got = &State{}
	}
	var out []string
	out = append(out, diffSets("cluster CIDR", canonicalPrefixes(want.ClusterCIDRs), canonicalPrefixes(got.ClusterCIDRs), ComparePrefixes)...)

	w, g := want.Sorted(), got.Sorted()
	for len(w) > 0 || len(g) > 0 {
		var c int
		switch {
		case len(w) == 0:
			c = 1
		case len(g) == 0:
			c = -1
		default:
			c = w[0].Name.Compare(g[0].Name)
		}
		switch {
		case c < 0:
			out = append(out, diffName(w[0].Name)+": missing")
			w = w[1:]
		case c > 0:
			out = append(out, diffName(g[0].Name)+": extra")
			g = g[1:]
		default:
			out = append(out, diffServicePort(w[0], g[0])...)
			w, g = w[1:], g[1:]
		}
	}
	return out
}

// diffName is the ServicePortName with its family always spelled out.
func diffName(n ServicePortName) string {
	s := n.Namespace + "/" + n.Name
	if n.Port != "" {
		s += ":" + n.Port
	}
	return fmt.Sprintf("%s (%s)", s, n.Family)
}

func diffServicePort(want, got *ServicePort) []string {
	var lines []string
	add := func(format string, args ...any) { lines = append(lines, fmt.Sprintf(format, args...)) }
	if want.Protocol != got.Protocol {
		add("protocol %s, want %s", got.Protocol, want.Protocol)
	}
	lines = append(lines, diffSets("frontend", want.Frontends, got.Frontends, Frontend.Compare)...)
	lines = append(lines, diffEndpoints("cluster endpoint", want.ClusterEndpoints, got.ClusterEndpoints)...)
	lines = append(lines, diffEndpoints("local endpoint", want.LocalEndpoints, got.LocalEndpoints)...)
	if want.InternalTrafficLocal != got.InternalTrafficLocal {
		add("internalTrafficLocal %t, want %t", got.InternalTrafficLocal, want.InternalTrafficLocal)
	}
	if want.ExternalTrafficLocal != got.ExternalTrafficLocal {
		add("externalTrafficLocal %t, want %t", got.ExternalTrafficLocal, want.ExternalTrafficLocal)
	}
	if want.AffinityTimeout != got.AffinityTimeout {
		add("affinity timeout %s, want %s", got.AffinityTimeout, want.AffinityTimeout)
	}
	lines = append(lines, diffSets("source range", want.SourceRanges, got.SourceRanges, ComparePrefixes)...)
	if want.HealthCheckNodePort != got.HealthCheckNodePort {
		add("health check node port %d, want %d", got.HealthCheckNodePort, want.HealthCheckNodePort)
	}
	prefix := diffName(want.Name) + ": "
	for i := range lines {
		lines[i] = prefix + lines[i]
	}
	return lines
}

// diffSets reports the elements of want missing from got and the elements of
// got not in want, in the order of compare.
func diffSets[T fmt.Stringer](what string, want, got []T, compare func(a, b T) int) []string {
	want = slices.SortedFunc(slices.Values(want), compare)
	got = slices.SortedFunc(slices.Values(got), compare)
	var out []string
	for len(want) > 0 || len(got) > 0 {
		var c int
		switch {
		case len(want) == 0:
			c = 1
		case len(got) == 0:
			c = -1
		default:
			c = compare(want[0], got[0])
		}
		switch {
		case c < 0:
			out = append(out, fmt.Sprintf("%s %s missing", what, want[0]))
			want = want[1:]
		case c > 0:
			out = append(out, fmt.Sprintf("%s %s unexpected", what, got[0]))
			got = got[1:]
		default:
			want, got = want[1:], got[1:]
		}
	}
	return out
}

// diffEndpoints is diffSets for endpoints, plus a line for an endpoint
// present in both whose Local flag differs.
func diffEndpoints(what string, want, got []Endpoint) []string {
	byAddr := func(a, b Endpoint) int {
		return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
	}
	out := diffSets(what, want, got, byAddr)
	local := make(map[netip.AddrPort]bool, len(got))
	for _, e := range got {
		local[netip.AddrPortFrom(e.IP, e.Port)] = e.Local
	}
	for _, e := range slices.SortedFunc(slices.Values(want), byAddr) {
		if l, ok := local[netip.AddrPortFrom(e.IP, e.Port)]; ok && l != e.Local {
			out = append(out, fmt.Sprintf("%s %s local %t, want %t", what, e, l, e.Local))
		}
	}
	return out
}
