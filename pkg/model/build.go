package model

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// Config is what Build needs to know about the node it builds for.
type Config struct {
	// NodeName is this node's name: endpoints with this nodeName are local,
	// and node topology hints naming it apply.
	NodeName string `json:"nodeName,omitempty"`
	// NodeZone is this node's topology.kubernetes.io/zone label; empty means
	// zone hints never apply.
	NodeZone string `json:"nodeZone,omitempty"`
	// NodeAddresses are the node's own addresses NodePorts may open on.
	NodeAddresses []netip.Addr `json:"nodeAddresses,omitempty"`
	// NodePortAddresses restricts NodePort frontends to NodeAddresses inside
	// these prefixes, per family as kube-proxy's --nodeport-addresses: a
	// family with no prefix here (and, with NodePortPrimary, no primary
	// address) keeps every NodeAddress of that family.
	NodePortAddresses []netip.Prefix `json:"nodePortAddresses,omitempty"`
	// NodePortPrimary adds the node's PrimaryAddresses to NodePortAddresses
	// (kube-proxy's keyword "primary").
	NodePortPrimary bool `json:"nodePortPrimary,omitempty"`
	// PrimaryAddresses are the node's primary addresses (PrimaryAddresses of
	// its Node object); used only with NodePortPrimary.
	PrimaryAddresses []netip.Addr `json:"primaryAddresses,omitempty"`
	// ClusterCIDRs are copied, masked and sorted, into State.ClusterCIDRs.
	ClusterCIDRs []netip.Prefix `json:"clusterCIDRs,omitempty"`
}

// defaultAffinity is the sessionAffinity ClientIP timeout when the Service
// does not set one (the API server's default).
const defaultAffinity = time.Duration(corev1.DefaultClientIPServiceAffinitySeconds) * time.Second

// maxAffinity is the longest ClientIP timeout the API allows.
const maxAffinity = 86400 * time.Second

// Build returns the desired state of the node described by cfg for the given
// Services and EndpointSlices (in any order; cfg, svcs and slices are not
// modified; a nil cfg is an empty Config). Slices are matched to Services by namespace and the
// kubernetes.io/service-name label; slices of no given Service are unused.
// Build does not look at the labels that hand an object to another proxy
// (service.kubernetes.io/service-proxy-name, .../headless): the caller
// leaves such objects out, as pkg/watch does with a label selector on the
// apiserver.
//
// Invalid input is skipped, and each skipped piece yields an error naming the
// object and field; everything else is built. Frontends two Services claim
// are resolved by ResolveConflicts, whose errors come last. The result is canonical: equal
// input (in any order) gives an equal State.
func Build(cfg *Config, svcs []*corev1.Service, endpointSlices []*discoveryv1.EndpointSlice) (*State, []error) {
	if cfg == nil {
		cfg = &Config{}
	}
	var errs []error
	type serviceKey struct{ namespace, name string }
	byService := make(map[serviceKey][]*discoveryv1.EndpointSlice, len(svcs))
	for _, es := range endpointSlices {
		if es == nil {
			continue
		}
		name := es.Labels[discoveryv1.LabelServiceName]
		if name == "" {
			errs = append(errs, sliceErrorf(es, "no %s label", discoveryv1.LabelServiceName))
			continue
		}
		k := serviceKey{es.Namespace, name}
		byService[k] = append(byService[k], es)
	}

	state := &State{
		ClusterCIDRs: canonicalPrefixes(cfg.ClusterCIDRs),
		ServicePorts: make(map[ServicePortName]*ServicePort, len(svcs)),
	}
	// Visit Services in name order so that the order of errors, and which
	// of two Services with one name wins (the lower UID), do not depend on
	// the input order.
	ordered := make([]*corev1.Service, 0, len(svcs))
	for _, svc := range svcs {
		if svc != nil {
			ordered = append(ordered, svc)
		}
	}
	slices.SortFunc(ordered, func(a, b *corev1.Service) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name), cmp.Compare(a.UID, b.UID))
	})
	for i, svc := range ordered {
		if i > 0 && ordered[i-1].Namespace == svc.Namespace && ordered[i-1].Name == svc.Name {
			errs = append(errs, &InvalidError{Kind: KindService, Namespace: svc.Namespace, Name: svc.Name,
				Err: errors.New("duplicate service, using the one with the lowest uid")})
			continue
		}
		sps, serrs := BuildService(cfg, svc, byService[serviceKey{svc.Namespace, svc.Name}])
		errs = append(errs, serrs...)
		for _, sp := range sps {
			state.ServicePorts[sp.Name] = sp
		}
	}
	errs = append(errs, ResolveConflicts(state)...)
	return state, errs
}

// BuildService returns the ServicePorts of one Service: one per entry of
// spec.ports and IP family of spec.clusterIPs, in name order. endpointSlices
// should be the Service's EndpointSlices; slices of other Services (by
// namespace and kubernetes.io/service-name label) are skipped silently. A nil cfg is an empty Config.
//
// ServicePorts carry the node's view: which endpoints are local, which node
// addresses NodePorts open on. Frontends and endpoints are sorted and
// deduplicated, so equal input gives equal output.
//
// A Service that svcnat does not proxy (headless, ExternalName, no cluster IP
// yet) yields nothing and no error. Invalid parts are skipped with
// an error naming the object and field; the rest is built.
func BuildService(cfg *Config, svc *corev1.Service, endpointSlices []*discoveryv1.EndpointSlice) ([]*ServicePort, []error) {
	if svc == nil || svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil, nil
	}
	if cfg == nil {
		cfg = &Config{}
	}
	b := serviceBuilder{cfg: cfg, svc: svc, nodePortAddresses: nodePortAddresses(cfg)}
	clusterIPs := svc.Spec.ClusterIPs
	if len(clusterIPs) == 0 && svc.Spec.ClusterIP != "" {
		clusterIPs = []string{svc.Spec.ClusterIP}
	}
	if len(clusterIPs) == 0 || clusterIPs[0] == corev1.ClusterIPNone {
		return nil, nil
	}
	var families []familyIP
	for i, s := range clusterIPs {
		ip, err := parseAddr(s)
		if err != nil {
			b.errorf("spec.clusterIPs[%d]: %w", i, err)
			continue
		}
		f := FamilyOf(ip)
		if slices.ContainsFunc(families, func(x familyIP) bool { return x.family == f }) {
			b.errorf("spec.clusterIPs[%d]: second %s address %s", i, f, ip)
			continue
		}
		families = append(families, familyIP{f, ip})
	}
	if len(families) == 0 {
		return nil, b.errs
	}

	b.parseSlices(endpointSlices)
	b.parseService()
	b.noteUnusedSlices(families)

	var out []*ServicePort
	seen := make(map[string]bool, len(svc.Spec.Ports))
	for i := range svc.Spec.Ports {
		port, ok := b.parsePort(i)
		if !ok {
			continue
		}
		if seen[port.name] {
			b.errorf("spec.ports[%d]: duplicate port name %q", i, port.name)
			continue
		}
		seen[port.name] = true
		for _, fam := range families {
			out = append(out, b.servicePort(port, fam))
		}
	}
	slices.SortFunc(out, func(x, y *ServicePort) int { return x.Name.Compare(y.Name) })
	return out, b.errs
}

// familyIP is a Service's cluster IP in one family.
type familyIP struct {
	family Family
	ip     netip.Addr
}

// servicePortSpec is a validated entry of spec.ports.
type servicePortSpec struct {
	name     string
	protocol Protocol
	port     uint16
	nodePort uint16
}

// sliceEndpoint is one validated endpoint of an EndpointSlice.
type sliceEndpoint struct {
	ip                          netip.Addr
	local                       bool
	ready, serving, terminating bool
	forNodeHint, hasNodeHints   bool
	forZoneHint, hasZoneHints   bool
}

// rank orders duplicates of one address and port (an endpoint moving between
// slices, or a Pod IP reused while the old Pod terminates): a
// non-terminating copy beats a terminating one, as in kube-proxy, which
// prefers the running Pod that reuses an IP over the terminating one even
// while the new one is not ready yet; on a tie the slice first in name
// order wins (kube-proxy keeps the last non-terminating one in map order,
// which is not deterministic).
func (e *sliceEndpoint) rank() int {
	if e.terminating {
		return 0
	}
	return 1
}

// slicePort is one validated port of an EndpointSlice.
type slicePort struct {
	name     string
	protocol Protocol
	port     uint16
}

// parsedSlice is the usable content of one EndpointSlice.
type parsedSlice struct {
	name      string
	family    Family
	ports     []slicePort
	endpoints []sliceEndpoint
}

// serviceBuilder holds what is parsed once per Service and shared by its
// ServicePorts.
type serviceBuilder struct {
	cfg               *Config
	nodePortAddresses []netip.Prefix
	svc               *corev1.Service
	errs              []error

	slices []parsedSlice

	internalLocal  bool
	externalLocal  bool // the policy; applies only with external frontends
	affinity       time.Duration
	externalIPs    []netip.Addr
	ingressIPs     []netip.Addr
	sourceRanges   []netip.Prefix
	healthCheck    uint16
	nodePortsOpen  bool // type NodePort or LoadBalancer
	loadBalancerOK bool // false when source ranges were unusable
}

// The kinds of object an InvalidError is about.
const (
	KindService       = "Service"
	KindEndpointSlice = "EndpointSlice"
)

// InvalidError is the error Build and BuildService return for a piece of
// input they skipped: which object (Kind is KindService or
// KindEndpointSlice) and why.
type InvalidError struct {
	Kind            string
	Namespace, Name string
	Err             error
}

// Error is "<kind in lower case> namespace/name: reason".
func (e *InvalidError) Error() string {
	return fmt.Sprintf("%s %s/%s: %v", strings.ToLower(e.Kind), e.Namespace, e.Name, e.Err)
}

func (e *InvalidError) Unwrap() error { return e.Err }

// IgnoredError is what Build and BuildService return for a valid piece of
// input svcnat leaves alone on purpose, as kube-proxy does (an FQDN
// EndpointSlice, a hostname-only load balancer ingress, ...): not an error
// in the object, but the reason a Service may have fewer frontends or
// endpoints than its user expects.
type IgnoredError struct {
	Kind            string // KindService or KindEndpointSlice
	Namespace, Name string
	Reason          string
}

// Error is "<kind in lower case> namespace/name: ignored: reason".
func (e *IgnoredError) Error() string {
	return fmt.Sprintf("%s %s/%s: ignored: %s", strings.ToLower(e.Kind), e.Namespace, e.Name, e.Reason)
}

func (b *serviceBuilder) ignore(kind, name, format string, args ...any) {
	b.errs = append(b.errs, &IgnoredError{Kind: kind, Namespace: b.svc.Namespace, Name: name, Reason: fmt.Sprintf(format, args...)})
}

// noteUnusedSlices notes the slices (and slice ports) no ServicePort uses:
// slices of a family the Service has no cluster IP of, and ports that
// match no port of the Service by name and protocol.
func (b *serviceBuilder) noteUnusedSlices(families []familyIP) {
	for _, ps := range b.slices {
		if !slices.ContainsFunc(families, func(f familyIP) bool { return f.family == ps.family }) {
			b.ignore(KindEndpointSlice, ps.name, "addressType %s: the service has no %s cluster IP", ps.family, ps.family)
			continue
		}
		for _, p := range ps.ports {
			if !slices.ContainsFunc(b.svc.Spec.Ports, func(sp corev1.ServicePort) bool {
				// An invalid Service port is reported already.
				proto, err := parseProtocol(sp.Protocol)
				return sp.Name == p.name && (err != nil || proto == p.protocol)
			}) {
				b.ignore(KindEndpointSlice, ps.name, "port %q (%s): the service has no port of that name and protocol", p.name, p.protocol)
			}
		}
	}
}

func (b *serviceBuilder) errorf(format string, args ...any) {
	b.errs = append(b.errs, &InvalidError{Kind: KindService, Namespace: b.svc.Namespace, Name: b.svc.Name,
		Err: fmt.Errorf(format, args...)})
}

func sliceErrorf(es *discoveryv1.EndpointSlice, format string, args ...any) error {
	return &InvalidError{Kind: KindEndpointSlice, Namespace: es.Namespace, Name: es.Name, Err: fmt.Errorf(format, args...)}
}

// parseAddr parses a plain IP address: no zone, IPv4-mapped IPv6 unmapped.
func parseAddr(s string) (netip.Addr, error) {
	ip, err := netip.ParseAddr(strings.TrimSpace(s))
	if err != nil {
		return netip.Addr{}, err
	}
	if ip.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("address %s has a zone", s)
	}
	return ip.Unmap(), nil
}

func parseProtocol(p corev1.Protocol) (Protocol, error) {
	switch p {
	case "", corev1.ProtocolTCP: // "" is the API default, TCP
		return TCP, nil
	case corev1.ProtocolUDP:
		return UDP, nil
	case corev1.ProtocolSCTP:
		return SCTP, nil
	}
	return "", fmt.Errorf("unknown protocol %q", p)
}

func validPort(p int32) bool { return p > 0 && p <= 65535 }

// parseService reads the Service-wide settings shared by all its ports.
func (b *serviceBuilder) parseService() {
	spec := &b.svc.Spec
	b.nodePortsOpen = spec.Type == corev1.ServiceTypeNodePort || spec.Type == corev1.ServiceTypeLoadBalancer
	b.internalLocal = spec.InternalTrafficPolicy != nil && *spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	b.externalLocal = b.nodePortsOpen && spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal

	if spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		b.affinity = defaultAffinity
		if c := spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			t := time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
			if t <= 0 || t > maxAffinity {
				b.errorf("spec.sessionAffinityConfig.clientIP.timeoutSeconds %d: not in 1..86400, using %d",
					*c.ClientIP.TimeoutSeconds, corev1.DefaultClientIPServiceAffinitySeconds)
			} else {
				b.affinity = t
			}
		}
	}

	for i, s := range spec.ExternalIPs {
		ip, err := parseAddr(s)
		if err != nil {
			b.errorf("spec.externalIPs[%d]: %w", i, err)
			continue
		}
		b.externalIPs = append(b.externalIPs, ip)
	}

	if spec.Type != corev1.ServiceTypeLoadBalancer {
		// A lingering status after a type change must not expose the Service.
		return
	}
	b.loadBalancerOK = true
	for i, ing := range b.svc.Status.LoadBalancer.Ingress {
		if ing.IP == "" {
			b.ignore(KindService, b.svc.Name, "status.loadBalancer.ingress[%d]: hostname only, no IP to serve", i)
			continue
		}
		if ing.IPMode != nil && *ing.IPMode == corev1.LoadBalancerIPModeProxy {
			// A proxying load balancer delivers to the node itself, not
			// to the VIP.
			b.ignore(KindService, b.svc.Name, "status.loadBalancer.ingress[%d] %s: ipMode Proxy, the load balancer delivers to the node", i, ing.IP)
			continue
		}
		ip, err := parseAddr(ing.IP)
		if err != nil {
			b.errorf("status.loadBalancer.ingress[%d].ip: %w", i, err)
			continue
		}
		b.ingressIPs = append(b.ingressIPs, ip)
	}
	for i, s := range spec.LoadBalancerSourceRanges {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			// Fail closed: without the range we cannot tell who may connect.
			b.errorf("spec.loadBalancerSourceRanges[%d]: %w; leaving out the load balancer frontends", i, err)
			b.loadBalancerOK = false
			continue
		}
		b.sourceRanges = append(b.sourceRanges, p)
	}
	// Only type LoadBalancer gets here: NodePort Services have no health check.
	if b.externalLocal && spec.HealthCheckNodePort != 0 {
		if validPort(spec.HealthCheckNodePort) {
			b.healthCheck = uint16(spec.HealthCheckNodePort)
		} else {
			b.errorf("spec.healthCheckNodePort %d: out of range", spec.HealthCheckNodePort)
		}
	}
}

// parsePort validates spec.ports[i].
func (b *serviceBuilder) parsePort(i int) (servicePortSpec, bool) {
	p := &b.svc.Spec.Ports[i]
	proto, err := parseProtocol(p.Protocol)
	if err != nil {
		b.errorf("spec.ports[%d].protocol: %w", i, err)
		return servicePortSpec{}, false
	}
	if !validPort(p.Port) {
		b.errorf("spec.ports[%d].port %d: out of range", i, p.Port)
		return servicePortSpec{}, false
	}
	if p.NodePort != 0 && !validPort(p.NodePort) {
		b.errorf("spec.ports[%d].nodePort %d: out of range", i, p.NodePort)
		return servicePortSpec{}, false
	}
	return servicePortSpec{name: p.Name, protocol: proto, port: uint16(p.Port), nodePort: uint16(p.NodePort)}, true
}

// parseSlices validates the Service's EndpointSlices once for all its ports.
func (b *serviceBuilder) parseSlices(in []*discoveryv1.EndpointSlice) {
	// Name order makes the choice among duplicate endpoints independent of
	// the input order.
	ordered := make([]*discoveryv1.EndpointSlice, 0, len(in))
	for _, es := range in {
		if es != nil && es.Namespace == b.svc.Namespace &&
			es.Labels[discoveryv1.LabelServiceName] == b.svc.Name {
			ordered = append(ordered, es)
		}
	}
	slices.SortStableFunc(ordered, func(x, y *discoveryv1.EndpointSlice) int { return cmp.Compare(x.Name, y.Name) })
	b.slices = make([]parsedSlice, 0, len(ordered))
	for _, es := range ordered {
		if ps, ok := b.parseSlice(es); ok {
			b.slices = append(b.slices, ps)
		}
	}
}

func (b *serviceBuilder) parseSlice(es *discoveryv1.EndpointSlice) (parsedSlice, bool) {
	ps := parsedSlice{name: es.Name}
	switch es.AddressType {
	case discoveryv1.AddressTypeIPv4:
		ps.family = IPv4
	case discoveryv1.AddressTypeIPv6:
		ps.family = IPv6
	case discoveryv1.AddressTypeFQDN:
		b.ignore(KindEndpointSlice, es.Name, "addressType FQDN: only IP endpoints are proxied (as kube-proxy)")
		return ps, false
	default:
		b.errs = append(b.errs, sliceErrorf(es, "addressType %q: unknown", es.AddressType))
		return ps, false
	}
	for i, p := range es.Ports {
		var sp slicePort
		if p.Name != nil {
			sp.name = *p.Name
		}
		proto := corev1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		var err error
		if sp.protocol, err = parseProtocol(proto); err != nil {
			b.errs = append(b.errs, sliceErrorf(es, "ports[%d].protocol: %w", i, err))
			continue
		}
		if p.Port == nil || !validPort(*p.Port) {
			port := "nil"
			if p.Port != nil {
				port = fmt.Sprint(*p.Port)
			}
			b.errs = append(b.errs, sliceErrorf(es, "ports[%d].port %s: out of range", i, port))
			continue
		}
		sp.port = uint16(*p.Port)
		ps.ports = append(ps.ports, sp)
	}
	ps.endpoints = make([]sliceEndpoint, 0, len(es.Endpoints))
	for i := range es.Endpoints {
		ep := &es.Endpoints[i]
		if len(ep.Addresses) == 0 {
			b.errs = append(b.errs, sliceErrorf(es, "endpoints[%d]: no address", i))
			continue
		}
		// Like kube-proxy, use the first address: the others are the same
		// Pod's and not to be balanced over separately.
		ip, err := parseAddr(ep.Addresses[0])
		if err != nil {
			b.errs = append(b.errs, sliceErrorf(es, "endpoints[%d].addresses[0]: %w", i, err))
			continue
		}
		if FamilyOf(ip) != ps.family {
			b.errs = append(b.errs, sliceErrorf(es, "endpoints[%d].addresses[0] %s: not of addressType %s", i, ip, es.AddressType))
			continue
		}
		se := sliceEndpoint{
			ip:    ip,
			local: b.cfg.NodeName != "" && ep.NodeName != nil && *ep.NodeName == b.cfg.NodeName,
			// nil means true, true and false (the API's and kube-proxy's reading).
			ready:       ep.Conditions.Ready == nil || *ep.Conditions.Ready,
			serving:     ep.Conditions.Serving == nil || *ep.Conditions.Serving,
			terminating: ep.Conditions.Terminating != nil && *ep.Conditions.Terminating,
		}
		if h := ep.Hints; h != nil {
			se.hasNodeHints = len(h.ForNodes) > 0
			se.forNodeHint = b.cfg.NodeName != "" && slices.ContainsFunc(h.ForNodes, func(n discoveryv1.ForNode) bool { return n.Name == b.cfg.NodeName })
			se.hasZoneHints = len(h.ForZones) > 0
			se.forZoneHint = b.cfg.NodeZone != "" && slices.ContainsFunc(h.ForZones, func(z discoveryv1.ForZone) bool { return z.Name == b.cfg.NodeZone })
		}
		ps.endpoints = append(ps.endpoints, se)
	}
	return ps, true
}

// endpointsFor returns the deduplicated endpoints of one Service port in one
// family, sorted by address and port.
func (b *serviceBuilder) endpointsFor(port servicePortSpec, family Family) []candidate {
	var byAddr map[netip.AddrPort]int
	var out []candidate
	for i := range b.slices {
		ps := &b.slices[i]
		if ps.family != family {
			continue
		}
		j := slices.IndexFunc(ps.ports, func(p slicePort) bool { return p.name == port.name && p.protocol == port.protocol })
		if j < 0 {
			continue
		}
		if byAddr == nil {
			byAddr = make(map[netip.AddrPort]int, len(ps.endpoints))
			out = make([]candidate, 0, len(ps.endpoints))
		}
		for k := range ps.endpoints {
			se := &ps.endpoints[k]
			ap := netip.AddrPortFrom(se.ip, ps.ports[j].port)
			if at, dup := byAddr[ap]; dup {
				if se.rank() > out[at].rank() {
					out[at].sliceEndpoint = se
				}
				continue
			}
			byAddr[ap] = len(out)
			out = append(out, candidate{sliceEndpoint: se, port: ps.ports[j].port})
		}
	}
	slices.SortFunc(out, func(x, y candidate) int {
		return cmp.Or(x.ip.Compare(y.ip), cmp.Compare(x.port, y.port))
	})
	return out
}

// candidate is an endpoint of one Service port before categorization.
type candidate struct {
	*sliceEndpoint
	port uint16
}

func (c candidate) endpoint() Endpoint { return Endpoint{IP: c.ip, Port: c.port, Local: c.local} }

// topology says which hints restrict the cluster endpoints.
type topology int

const (
	noTopology topology = iota
	sameNode
	sameZone
)

// topologyOf decides, as kube-proxy does, from the ready endpoints: node
// hints when every one has some and one names this node; else zone hints
// likewise; else none.
func topologyOf(cands []candidate) topology {
	anyReady, allNode, forNode, allZone, forZone := false, true, false, true, false
	for _, c := range cands {
		if !c.ready {
			continue
		}
		anyReady = true
		allNode = allNode && c.hasNodeHints
		forNode = forNode || c.forNodeHint
		allZone = allZone && c.hasZoneHints
		forZone = forZone || c.forZoneHint
	}
	switch {
	case !anyReady:
		return noTopology
	case allNode && forNode:
		return sameNode
	case allZone && forZone:
		return sameZone
	}
	return noTopology
}

// usable returns the endpoints among cands that keep is true for: the ready
// ones, or when none is ready, the serving-and-terminating ones.
func usable(cands []candidate, keep func(candidate) bool) []Endpoint {
	if out := endpoints(cands, func(c candidate) bool { return c.ready && keep(c) }); out != nil {
		return out
	}
	return endpoints(cands, func(c candidate) bool { return c.serving && c.terminating && keep(c) })
}

// endpoints returns the endpoints among cands that keep is true for, in an
// array of their number (a ServicePort lives as long as its Service);
// nil when there is none.
func endpoints(cands []candidate, keep func(candidate) bool) []Endpoint {
	n := 0
	for _, c := range cands {
		if keep(c) {
			n++
		}
	}
	if n == 0 {
		return nil
	}
	out := make([]Endpoint, 0, n)
	for _, c := range cands {
		if keep(c) {
			out = append(out, c.endpoint())
		}
	}
	return out
}

// reuse returns the first of built that equals eps, else eps: a ServicePort's
// endpoint lists share one array when they are equal (commonly every
// serving endpoint is a cluster endpoint).
func reuse(eps []Endpoint, built ...[]Endpoint) []Endpoint {
	for _, b := range built {
		if len(b) > 0 && slices.Equal(eps, b) {
			return b
		}
	}
	return eps
}

func (b *serviceBuilder) servicePort(port servicePortSpec, fam familyIP) *ServicePort {
	sp := &ServicePort{
		Name: ServicePortName{
			Namespace: b.svc.Namespace, Name: b.svc.Name, Port: port.name, Family: fam.family,
		},
		Protocol:        port.protocol,
		AffinityTimeout: b.affinity,
	}
	sp.Frontends = append(sp.Frontends, Frontend{Kind: ClusterIP, IP: fam.ip, Port: port.port})
	if b.nodePortsOpen && port.nodePort != 0 {
		for _, a := range b.cfg.NodeAddresses {
			a = a.Unmap()
			if a.IsValid() && FamilyOf(a) == fam.family && nodePortAddress(a, b.nodePortAddresses) {
				sp.Frontends = append(sp.Frontends, Frontend{Kind: NodePort, IP: a, Port: port.nodePort})
			}
		}
	}
	for _, ip := range b.externalIPs {
		if FamilyOf(ip) == fam.family {
			sp.Frontends = append(sp.Frontends, Frontend{Kind: ExternalIP, IP: ip, Port: port.port})
		}
	}
	if b.loadBalancerOK {
		for _, ip := range b.ingressIPs {
			if FamilyOf(ip) == fam.family {
				sp.Frontends = append(sp.Frontends, Frontend{Kind: LoadBalancer, IP: ip, Port: port.port})
			}
		}
	}
	slices.SortFunc(sp.Frontends, Frontend.Compare)
	sp.Frontends = slices.Compact(sp.Frontends)

	sp.InternalTrafficLocal = b.internalLocal
	sp.ExternalTrafficLocal = b.externalLocal
	sp.SourceRanges = b.withNode(familyRanges(b.sourceRanges, fam.family), sp.Frontends)
	if b.externalLocal {
		sp.HealthCheckNodePort = b.healthCheck
	}

	cands := b.endpointsFor(port, fam.family)
	topo := topologyOf(cands)
	sp.ClusterEndpoints = usable(cands, func(c candidate) bool {
		switch topo {
		case sameNode:
			return c.forNodeHint
		case sameZone:
			return c.forZoneHint
		}
		return true
	})
	if b.internalLocal || b.externalLocal {
		sp.LocalEndpoints = usable(cands, func(c candidate) bool { return c.local })
	}
	sp.ServingEndpoints = reuse(endpoints(cands, func(c candidate) bool { return c.serving }),
		sp.ClusterEndpoints, sp.LocalEndpoints)
	if sp.HealthCheckNodePort != 0 {
		sp.LocalReadyEndpoints = reuse(endpoints(cands, func(c candidate) bool { return c.ready && c.local }),
			sp.LocalEndpoints)
	}
	sp.prune()
	return sp
}

// nodePortAddress reports whether NodePorts open on node address a: it is
// in one of the allowed prefixes of its family, or there is none of its
// family (kube-proxy's reading of --nodeport-addresses).
func nodePortAddress(a netip.Addr, allowed []netip.Prefix) bool {
	if a.IsLoopback() || a.IsUnspecified() || (a.Is6() && a.IsLinkLocalUnicast()) {
		return false
	}
	family := false
	for _, p := range allowed {
		if p.Addr().Is4() == a.Is4() {
			if p.Contains(a) {
				return true
			}
			family = true
		}
	}
	return !family
}

// nodePortAddresses returns cfg.NodePortAddresses with the primary
// addresses added when cfg asks for them.
func nodePortAddresses(cfg *Config) []netip.Prefix {
	if !cfg.NodePortPrimary {
		return cfg.NodePortAddresses
	}
	out := slices.Clone(cfg.NodePortAddresses)
	for _, a := range cfg.PrimaryAddresses {
		if a = a.Unmap(); a.IsValid() {
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return out
}

// PrimaryAddresses returns a Node's primary addresses as kube-proxy picks
// them: the first IPv4 and the first IPv6 address among its InternalIP,
// then its ExternalIP addresses. Nil for a nil Node.
func PrimaryAddresses(node *corev1.Node) []netip.Addr {
	if node == nil {
		return nil
	}
	var out []netip.Addr
	for _, kind := range []corev1.NodeAddressType{corev1.NodeInternalIP, corev1.NodeExternalIP} {
		for _, na := range node.Status.Addresses {
			if na.Type != kind {
				continue
			}
			a, err := parseAddr(na.Address)
			if err == nil && !slices.ContainsFunc(out, func(o netip.Addr) bool { return o.Is4() == a.Is4() }) {
				out = append(out, a)
			}
		}
	}
	return out
}

// withNode returns ranges plus the LoadBalancer frontends' own addresses
// when ranges restrict sources and one of them holds a node address, as
// kube-proxy allows: where the cloud installs the VIP as a local address,
// a node reaching its own load balancer arrives with the VIP as source.
func (b *serviceBuilder) withNode(ranges []netip.Prefix, frontends []Frontend) []netip.Prefix {
	node := slices.Concat(b.cfg.PrimaryAddresses, b.cfg.NodeAddresses)
	if len(ranges) == 0 || !slices.ContainsFunc(ranges, func(p netip.Prefix) bool {
		return slices.ContainsFunc(node, func(a netip.Addr) bool { return p.Contains(a.Unmap()) })
	}) {
		return ranges
	}
	for _, f := range frontends {
		if f.Kind == LoadBalancer {
			ranges = append(ranges, netip.PrefixFrom(f.IP, f.IP.BitLen()))
		}
	}
	return canonicalPrefixes(ranges)
}

// familyRanges returns the ranges of one family, masked, sorted and without
// duplicates; nil when one of them allows every address (as kube-proxy
// treats a zero-length prefix).
func familyRanges(ranges []netip.Prefix, f Family) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ranges {
		if FamilyOf(p.Addr()) != f {
			continue
		}
		if p.Bits() == 0 {
			return nil
		}
		out = append(out, p.Masked())
	}
	return canonicalPrefixes(out)
}

// canonicalPrefixes returns valid prefixes masked, sorted and deduplicated.
func canonicalPrefixes(in []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range in {
		if p.IsValid() {
			out = append(out, p.Masked())
		}
	}
	slices.SortFunc(out, ComparePrefixes)
	return slices.Compact(out)
}
