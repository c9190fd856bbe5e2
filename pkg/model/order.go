package model

import (
	"cmp"
	"net/netip"
)

// Compare orders frontends by kind (by name), IP and port: the order of
// ServicePort.Frontends.
func (f Frontend) Compare(o Frontend) int {
	return cmp.Or(cmp.Compare(f.Kind, o.Kind), f.IP.Compare(o.IP), cmp.Compare(f.Port, o.Port))
}

// Compare orders endpoints by IP and port, then non-local before local: the
// order of ServicePort.ClusterEndpoints and LocalEndpoints.
func (e Endpoint) Compare(o Endpoint) int {
	return cmp.Or(e.IP.Compare(o.IP), cmp.Compare(e.Port, o.Port), compareBool(e.Local, o.Local))
}

func compareBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case !a:
		return -1
	}
	return 1
}

// ComparePrefixes orders prefixes by address, then length: the order of
// State.ClusterCIDRs and ServicePort.SourceRanges.
func ComparePrefixes(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}
