// Package model turns Kubernetes API objects into the desired dataplane state of
// one node. It is pure: no kernel, no client-go, no clock. Every semantic
// decision (which frontends a Service has, which endpoints each frontend may
// reach, masquerading, what happens without endpoints) is made here, once, for
// every backend.
package model

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// Family is an IP address family.
type Family string

// The address families.
const (
	IPv4 Family = "IPv4"
	IPv6 Family = "IPv6"
)

// FamilyOf returns the family of a valid address.
func FamilyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// Protocol is a transport protocol a Service port can use.
type Protocol string

// The protocols a Service port can use.
const (
	TCP  Protocol = "TCP"
	UDP  Protocol = "UDP"
	SCTP Protocol = "SCTP"
)

// FrontendKind says how traffic addressed a Service.
type FrontendKind string

// The frontend kinds. ClusterIP is internal traffic; the others are external
// traffic in the sense of externalTrafficPolicy.
const (
	ClusterIP    FrontendKind = "ClusterIP"
	NodePort     FrontendKind = "NodePort"
	ExternalIP   FrontendKind = "ExternalIP"
	LoadBalancer FrontendKind = "LoadBalancer"
)

// External reports whether traffic to this kind of frontend is governed by
// externalTrafficPolicy.
func (k FrontendKind) External() bool { return k != ClusterIP }

// Frontend is one address and port at which a Service port is reachable.
// NodePort frontends are expanded to one per node address.
type Frontend struct {
	Kind FrontendKind `json:"kind"`
	IP   netip.Addr   `json:"ip"`
	Port uint16       `json:"port"`
}

func (f Frontend) String() string {
	return fmt.Sprintf("%s %s", f.Kind, netip.AddrPortFrom(f.IP, f.Port))
}

// Endpoint is one backend address a frontend may be DNATed to.
type Endpoint struct {
	IP   netip.Addr `json:"ip"`
	Port uint16     `json:"port"`
	// Local is true when the endpoint runs on this node.
	Local bool `json:"local,omitempty"`
}

func (e Endpoint) String() string { return netip.AddrPortFrom(e.IP, e.Port).String() }

// ServicePortName names one port of one Service in one address family.
type ServicePortName struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Port is the Service port's name; empty for a Service's only, unnamed port.
	Port   string `json:"port,omitempty"`
	Family Family `json:"family"`
}

// String is "namespace/name:port" (":port" omitted when unnamed) with
// " (IPv6)" appended for IPv6, the form used in rule comments and logs.
func (n ServicePortName) String() string {
	s := n.Namespace + "/" + n.Name
	if n.Port != "" {
		s += ":" + n.Port
	}
	if n.Family == IPv6 {
		s += " (IPv6)"
	}
	return s
}

// Compare orders names by namespace, name, port and family.
func (n ServicePortName) Compare(o ServicePortName) int {
	return cmp.Or(cmp.Compare(n.Namespace, o.Namespace), cmp.Compare(n.Name, o.Name),
		cmp.Compare(n.Port, o.Port), cmp.Compare(n.Family, o.Family))
}

// ServicePort is everything a backend programs for one port of one Service in
// one address family.
//
// Traffic rules, which every backend implements from this data:
//   - Internal traffic (ClusterIP frontends) goes to InternalEndpoints().
//   - External traffic (other frontends) goes to ExternalEndpoints(), except
//     that with ExternalTrafficLocal, traffic whose source is in the State's
//     ClusterCIDRs or is this node itself goes to ClusterEndpoints (as
//     kube-proxy short-circuits it). The eBPF backend short-circuits only
//     this node and its pods (its socket hooks): a pod of another node
//     reaching this node's frontend is external there, where the
//     short-circuit would send it to an endpoint that answers it past
//     this node's NAT.
//   - When the chosen set is empty, the packet is rejected (ICMP port
//     unreachable) if ClusterEndpoints is empty too, and dropped otherwise
//     (a Local policy with no local endpoint): see NoEndpoints.
//   - External traffic to LoadBalancer frontends from a source outside a
//     non-empty SourceRanges is dropped.
//   - Masquerade: internal traffic from outside the State's ClusterCIDRs (when
//     any are set); external traffic when ExternalTrafficLocal is false;
//     external traffic from this node itself; and hairpin traffic (a source
//     reaching itself through the Service). Not masqueraded: external traffic
//     from outside sent to local endpoints (its source is preserved), and,
//     with ExternalTrafficLocal, traffic from the ClusterCIDRs short-circuited
//     to ClusterEndpoints (as kube-proxy does).
//   - With a non-zero AffinityTimeout, a client IP keeps its endpoint for that
//     long after its last new connection (sessionAffinity: ClientIP).
//
// Fields no frontend uses are left empty (except ClusterEndpoints, see
// there), so that everything in a ServicePort can be read back from the
// kernel.
//
// A built ServicePort is read-only: its endpoint lists may share one array
// (ServingEndpoints is commonly ClusterEndpoints). Clone copies them apart.
type ServicePort struct {
	Name     ServicePortName `json:"name"`
	Protocol Protocol        `json:"protocol"`
	// Frontends, sorted by kind, IP and port.
	Frontends []Frontend `json:"frontends"`
	// ClusterEndpoints are the usable endpoints cluster-wide: ready ones, or
	// serving-and-terminating ones when none is ready; filtered by topology
	// hints. Sorted by IP and port, no duplicates.
	//
	// When InternalTrafficLocal holds and there is no external frontend, no
	// frontend uses them: they are then set only while LocalEndpoints is
	// empty, so that NoEndpoints tells Drop (endpoints exist on other nodes)
	// from Reject (none anywhere). A backend records them in that case so
	// that Dump returns them.
	ClusterEndpoints []Endpoint `json:"clusterEndpoints,omitempty"`
	// LocalEndpoints are the usable endpoints on this node, with the same
	// fallback. Set only when a traffic policy is Local.
	LocalEndpoints       []Endpoint     `json:"localEndpoints,omitempty"`
	InternalTrafficLocal bool           `json:"internalTrafficLocal,omitempty"`
	ExternalTrafficLocal bool           `json:"externalTrafficLocal,omitempty"`
	AffinityTimeout      time.Duration  `json:"affinityTimeout,omitempty"`
	SourceRanges         []netip.Prefix `json:"sourceRanges,omitempty"`
	// HealthCheckNodePort is served by the agent for externalTrafficPolicy
	// Local LoadBalancer Services; zero when there is none.
	HealthCheckNodePort uint16 `json:"healthCheckNodePort,omitempty"`

	// The fields below are for the agent, not the dataplane: backends do
	// not program them, Dump does not return them, Equal ignores them.

	// ServingEndpoints are every endpoint whose serving condition holds,
	// whatever its readiness, terminating state, node, topology hints or
	// the traffic policies: existing flows to them are kept (as kube-proxy
	// keeps their conntrack entries), so that a terminating endpoint
	// drains. Sorted.
	ServingEndpoints []Endpoint `json:"-"`
	// LocalReadyEndpoints are, when HealthCheckNodePort is set, the ready
	// endpoints on this node, without the serving-and-terminating fallback:
	// the health check fails on a node whose only endpoints terminate, so
	// that load balancers drain it (KEP-1669). Sorted.
	LocalReadyEndpoints []Endpoint `json:"-"`
}

// InternalEndpoints returns the endpoints ClusterIP traffic may reach.
func (sp *ServicePort) InternalEndpoints() []Endpoint {
	if sp.InternalTrafficLocal {
		return sp.LocalEndpoints
	}
	return sp.ClusterEndpoints
}

// ExternalEndpoints returns the endpoints external traffic from outside the
// cluster may reach.
func (sp *ServicePort) ExternalEndpoints() []Endpoint {
	if sp.ExternalTrafficLocal {
		return sp.LocalEndpoints
	}
	return sp.ClusterEndpoints
}

// NoEndpointsAction says what happens to a packet whose endpoint set is empty.
type NoEndpointsAction string

// The actions for packets that have no endpoint to go to.
const (
	Reject NoEndpointsAction = "reject"
	Drop   NoEndpointsAction = "drop"
)

// NoEndpoints returns the action for traffic whose endpoint set is empty.
func (sp *ServicePort) NoEndpoints() NoEndpointsAction {
	if len(sp.ClusterEndpoints) == 0 {
		return Reject
	}
	return Drop
}

// prune empties the fields no frontend of sp uses, as the ServicePort doc
// comment requires: SourceRanges without a LoadBalancer frontend,
// ExternalTrafficLocal without an external frontend, LocalEndpoints without
// a Local policy in effect, and ClusterEndpoints when only
// internalTrafficPolicy Local is in effect and local endpoints exist.
func (sp *ServicePort) prune() {
	external := slices.ContainsFunc(sp.Frontends, func(f Frontend) bool { return f.Kind.External() })
	if !slices.ContainsFunc(sp.Frontends, func(f Frontend) bool { return f.Kind == LoadBalancer }) {
		sp.SourceRanges = nil
	}
	sp.ExternalTrafficLocal = sp.ExternalTrafficLocal && external
	if !sp.InternalTrafficLocal && !sp.ExternalTrafficLocal {
		sp.LocalEndpoints = nil
	}
	if sp.InternalTrafficLocal && !external && len(sp.LocalEndpoints) > 0 {
		sp.ClusterEndpoints = nil
	}
}

// Clone returns a deep copy of sp: changing one never changes the other.
func (sp *ServicePort) Clone() *ServicePort {
	c := *sp
	c.Frontends = slices.Clone(sp.Frontends)
	c.ClusterEndpoints = slices.Clone(sp.ClusterEndpoints)
	c.LocalEndpoints = slices.Clone(sp.LocalEndpoints)
	c.SourceRanges = slices.Clone(sp.SourceRanges)
	c.ServingEndpoints = slices.Clone(sp.ServingEndpoints)
	c.LocalReadyEndpoints = slices.Clone(sp.LocalReadyEndpoints)
	return &c
}

// Equal reports whether two ServicePorts program the same dataplane (the
// agent-only fields are not compared).
func (sp *ServicePort) Equal(o *ServicePort) bool {
	return sp.Name == o.Name && sp.Protocol == o.Protocol &&
		slices.Equal(sp.Frontends, o.Frontends) &&
		slices.Equal(sp.ClusterEndpoints, o.ClusterEndpoints) &&
		slices.Equal(sp.LocalEndpoints, o.LocalEndpoints) &&
		sp.InternalTrafficLocal == o.InternalTrafficLocal &&
		sp.ExternalTrafficLocal == o.ExternalTrafficLocal &&
		sp.AffinityTimeout == o.AffinityTimeout &&
		slices.Equal(sp.SourceRanges, o.SourceRanges) &&
		sp.HealthCheckNodePort == o.HealthCheckNodePort
}

// Identical reports whether two ServicePorts are equal in every field,
// the agent-only ones included.
func (sp *ServicePort) Identical(o *ServicePort) bool {
	return sp.Equal(o) && slices.Equal(sp.ServingEndpoints, o.ServingEndpoints) &&
		slices.Equal(sp.LocalReadyEndpoints, o.LocalReadyEndpoints)
}

// State is the desired dataplane of one node.
type State struct {
	// ClusterCIDRs are the pod CIDRs; internal traffic from outside them is
	// masqueraded. Empty means no such masquerading.
	ClusterCIDRs []netip.Prefix `json:"clusterCIDRs,omitempty"`
	// ServicePorts, keyed by name.
	ServicePorts map[ServicePortName]*ServicePort `json:"-"`
	// Change, when set, says which ServicePorts differ from the State of
	// the previous successful sync, so that a backend looks at those only
	// (ClusterCIDRs, always whole, it compares itself); nil means any
	// ServicePort may differ (a full reconcile). The agent computes it
	// once, for every backend.
	Change *Change `json:"-"`
}

// Change lists the ServicePorts of a State that differ from the previous
// one.
type Change struct {
	// Revision numbers the agent's syncs, for logs.
	Revision uint64
	// Updated are added or changed: State.ServicePorts holds their value.
	// Removed are gone from State.ServicePorts.
	Updated, Removed []ServicePortName
}

// Empty reports whether c changes no ServicePort.
func (c *Change) Empty() bool { return len(c.Updated) == 0 && len(c.Removed) == 0 }

// Sorted returns the ServicePorts ordered by name.
func (s *State) Sorted() []*ServicePort {
	out := make([]*ServicePort, 0, len(s.ServicePorts))
	for _, sp := range s.ServicePorts {
		out = append(out, sp)
	}
	slices.SortFunc(out, func(a, b *ServicePort) int { return a.Name.Compare(b.Name) })
	return out
}
