// Package trace holds what `svcnat trace` asks a backend and what it
// answers: which frontend a connection's first packet meets, the policy
// that applies, and what the packet becomes, with every way it can go and
// its probability. Each backend computes the outcomes from what the kernel
// holds (the iptables backend walks the rules iptables-save returns, the
// eBPF backend runs its loaded programs); the frontend and policy come from
// the backend's Dump, also read from the kernel. Never the agent's memory.
package trace

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/svcnat/svcnat/pkg/model"
)

// Origin is where the traced connection starts.
type Origin string

// The origins.
const (
	// FromPod is a process in a pod on this node.
	FromPod Origin = "pod"
	// FromNode is a process on the node itself (host network).
	FromNode Origin = "node"
	// FromOutside is a packet that arrives on one of the node's interfaces.
	FromOutside Origin = "outside"
)

// Query is the connection to trace.
type Query struct {
	// From is the client; port 0 means any (SourcePort is used on the
	// synthesized packet).
	From     netip.AddrPort `json:"from"`
	To       netip.AddrPort `json:"to"`
	Protocol model.Protocol `json:"protocol"`
	Origin   Origin         `json:"origin"`
	// Interface is where a packet from outside arrives (eBPF: the tc
	// program on it runs); empty means the first with svcnat's program.
	Interface string `json:"interface,omitempty"`
}

// SourcePort is the client port a synthesized packet carries when the
// query names none.
const SourcePort = 40000

// Validate checks q: addresses of one family, not IPv4-mapped, a port to
// trace to, a protocol and an origin svcnat knows.
func (q *Query) Validate() error {
	switch {
	case !q.From.Addr().IsValid() || !q.To.Addr().IsValid():
		return fmt.Errorf("trace: --from and --to need an address")
	case q.From.Addr().Is4In6() || q.To.Addr().Is4In6():
		return fmt.Errorf("trace: IPv4-mapped IPv6 addresses are never Service traffic: write %s as IPv4", q.To.Addr())
	case q.From.Addr().Is4() != q.To.Addr().Is4():
		return fmt.Errorf("trace: --from %s and --to %s are of different address families", q.From.Addr(), q.To.Addr())
	case q.To.Port() == 0:
		return fmt.Errorf("trace: --to %s needs a port", q.To)
	}
	switch q.Protocol {
	case model.TCP, model.UDP, model.SCTP:
	default:
		return fmt.Errorf("trace: protocol %q: want tcp, udp or sctp", q.Protocol)
	}
	switch q.Origin {
	case FromPod, FromNode, FromOutside:
	default:
		return fmt.Errorf("trace: origin %q: want pod, node or outside", q.Origin)
	}
	return nil
}

// SourceAddrPort is the client address and port of the synthesized packet.
func (q *Query) SourceAddrPort() netip.AddrPort {
	if q.From.Port() != 0 {
		return q.From
	}
	return netip.AddrPortFrom(q.From.Addr(), SourcePort)
}

// Verdict is what happens to the packet.
type Verdict string

// The verdicts.
const (
	// Forward: translated to Outcome.Endpoint.
	Forward Verdict = "forward"
	// Reject: refused (ICMP port unreachable, or ECONNREFUSED at connect).
	Reject Verdict = "reject"
	// Drop: dropped (or EHOSTUNREACH at connect, eBPF).
	Drop Verdict = "drop"
	// Untouched: no Service translation applies; the packet goes on as
	// addressed.
	Untouched Verdict = "untouched"
	// Existing: the flow exists; the kernel translates it as before (see
	// Result.Flows).
	Existing Verdict = "existing"
)

// Outcome is one way the packet can go.
type Outcome struct {
	Probability float64        `json:"probability"`
	Verdict     Verdict        `json:"verdict"`
	Endpoint    netip.AddrPort `json:"endpoint,omitzero"`
	Masquerade  bool           `json:"masquerade,omitempty"`
	// MasqueradeAddress is the source the node masquerades with, when the
	// backend knows it (eBPF, IPv4).
	MasqueradeAddress netip.Addr `json:"masqueradeAddress,omitzero"`
	// Pinned: session affinity chose the endpoint.
	Pinned bool `json:"pinned,omitempty"`
	// Slot is the endpoint's slot in its set (eBPF); -1 when not known.
	Slot int `json:"slot"`
}

func (o Outcome) String() string {
	s := fmt.Sprintf("%5.1f%%  %s", 100*o.Probability, o.Verdict)
	if o.Endpoint.IsValid() {
		s += " to " + o.Endpoint.String()
	}
	if o.Masquerade {
		s += ", masqueraded"
		if o.MasqueradeAddress.IsValid() {
			s += " from " + o.MasqueradeAddress.String()
		}
	}
	if o.Pinned {
		s += " (pinned by session affinity)"
	}
	if o.Slot >= 0 {
		s += fmt.Sprintf(" [slot %d]", o.Slot)
	}
	return s
}

// Policy is what of the ServicePort decides this packet's fate.
type Policy struct {
	// EndpointSet is the set the packet's endpoints come from: "cluster"
	// or "local" (a Local traffic policy).
	EndpointSet          string         `json:"endpointSet,omitempty"`
	InternalTrafficLocal bool           `json:"internalTrafficLocal,omitempty"`
	ExternalTrafficLocal bool           `json:"externalTrafficLocal,omitempty"`
	SourceRanges         []netip.Prefix `json:"sourceRanges,omitempty"`
	// SourceAllowed is set when SourceRanges apply to this packet.
	SourceAllowed   *bool         `json:"sourceAllowed,omitempty"`
	AffinityTimeout time.Duration `json:"affinityTimeout,omitempty"`
	// PinnedTo is the endpoint the client's affinity entry names, when
	// the kernel holds one for it.
	PinnedTo netip.AddrPort `json:"pinnedTo,omitzero"`
}

// Flow is a conntrack entry of the traced tuple.
type Flow struct {
	Original string `json:"original"`
	Reply    string `json:"reply"`
	Mark     uint32 `json:"mark"`
	// State is the TCP state, when TCP.
	State string `json:"state,omitempty"`
}

// Result is a backend's answer.
type Result struct {
	Backend string `json:"backend"`
	Query   Query  `json:"query"`
	// Service and Frontend are the ServicePort and frontend the packet
	// met; nil when none.
	Service  *model.ServicePortName `json:"service,omitempty"`
	Frontend *model.Frontend        `json:"frontend,omitempty"`
	// Reason says why no frontend matched, or why the packet is dropped or
	// rejected.
	Reason   string    `json:"reason,omitempty"`
	Policy   *Policy   `json:"policy,omitempty"`
	Outcomes []Outcome `json:"outcomes"`
	// Steps is the backend's own account: the rules the packet matched
	// (iptables) or what the programs decided (eBPF).
	Steps []string `json:"steps"`
	// Flows are the conntrack entries of the tuple, when any.
	Flows []Flow `json:"flows,omitempty"`
}

// Describe fills r's frontend, Service and policy from s, the state the
// backend read back from the kernel, and says why none matched.
func Describe(r *Result, s *model.State) {
	q := r.Query
	var near []string
	for _, sp := range s.Sorted() {
		for _, fe := range sp.Frontends {
			if fe.IP != q.To.Addr() {
				continue
			}
			if fe.Port != q.To.Port() || sp.Protocol != q.Protocol {
				near = append(near, fmt.Sprintf("%s %d/%s (%s)", fe.Kind, fe.Port, sp.Protocol, sp.Name))
				continue
			}
			fe, name := fe, sp.Name
			r.Frontend, r.Service = &fe, &name
			r.Policy = policyOf(sp, fe, q, s)
			return
		}
	}
	r.Reason = fmt.Sprintf("no Service frontend is %s/%s in the kernel", q.To, q.Protocol)
	if len(near) > 0 {
		r.Reason += "; " + q.To.Addr().String() + " has " + strings.Join(near, ", ")
	}
}

// policyOf says which of sp's rules apply to q, as the model's
// ServicePort documents them.
func policyOf(sp *model.ServicePort, fe model.Frontend, q Query, s *model.State) *Policy {
	p := &Policy{
		InternalTrafficLocal: sp.InternalTrafficLocal,
		ExternalTrafficLocal: sp.ExternalTrafficLocal,
		SourceRanges:         sp.SourceRanges,
		AffinityTimeout:      sp.AffinityTimeout,
		EndpointSet:          "cluster",
	}
	inCluster := slices.ContainsFunc(s.ClusterCIDRs, func(c netip.Prefix) bool { return c.Contains(q.From.Addr()) })
	switch {
	case !fe.Kind.External():
		if sp.InternalTrafficLocal {
			p.EndpointSet = "local"
		}
	case sp.ExternalTrafficLocal && q.Origin == FromOutside && !inCluster:
		p.EndpointSet = "local"
	}
	if fe.Kind == model.LoadBalancer && len(sp.SourceRanges) > 0 {
		allowed := slices.ContainsFunc(sp.SourceRanges, func(c netip.Prefix) bool { return c.Contains(q.From.Addr()) })
		p.SourceAllowed = &allowed
	}
	return p
}

// Finish sorts and merges r's outcomes (equal ones add their
// probabilities) and says why a packet is refused or dropped when the
// backend did not.
func Finish(r *Result) {
	slices.SortFunc(r.Outcomes, func(a, b Outcome) int {
		return strings.Compare(a.Endpoint.String()+string(a.Verdict), b.Endpoint.String()+string(b.Verdict))
	})
	var merged []Outcome
	for _, o := range r.Outcomes {
		if o.Probability < 1e-9 {
			continue
		}
		if n := len(merged); n > 0 && merged[n-1].Verdict == o.Verdict && merged[n-1].Endpoint == o.Endpoint &&
			merged[n-1].Masquerade == o.Masquerade && merged[n-1].Pinned == o.Pinned {
			merged[n-1].Probability += o.Probability
			merged[n-1].Slot = -1
			continue
		}
		merged = append(merged, o)
	}
	r.Outcomes = merged
	if r.Reason != "" || r.Frontend == nil || len(merged) != 1 {
		return
	}
	switch merged[0].Verdict {
	case Reject:
		r.Reason = "the Service has no endpoint: refused"
	case Drop:
		switch {
		case r.Policy != nil && r.Policy.SourceAllowed != nil && !*r.Policy.SourceAllowed:
			r.Reason = "the source is outside loadBalancerSourceRanges: dropped"
		case r.Policy != nil && r.Policy.EndpointSet == "local":
			r.Reason = "traffic policy Local and no endpoint on this node: dropped"
		}
	}
}

// Text writes r for people.
func (r *Result) Text() string {
	var b strings.Builder
	q := r.Query
	fmt.Fprintf(&b, "trace %s %s -> %s from %s (%s backend)\n", q.Protocol, q.SourceAddrPort(), q.To, q.Origin, r.Backend)
	if r.Frontend != nil {
		fmt.Fprintf(&b, "frontend:  %s of %s\n", r.Frontend, r.Service)
	} else {
		b.WriteString("frontend:  none\n")
	}
	if p := r.Policy; p != nil {
		var parts []string
		parts = append(parts, p.EndpointSet+" endpoints")
		if p.InternalTrafficLocal {
			parts = append(parts, "internalTrafficPolicy=Local")
		}
		if p.ExternalTrafficLocal {
			parts = append(parts, "externalTrafficPolicy=Local")
		}
		if len(p.SourceRanges) > 0 {
			rs := make([]string, len(p.SourceRanges))
			for i, x := range p.SourceRanges {
				rs[i] = x.String()
			}
			s := "sourceRanges=" + strings.Join(rs, ",")
			if p.SourceAllowed != nil {
				s += fmt.Sprintf(" (source allowed: %v)", *p.SourceAllowed)
			}
			parts = append(parts, s)
		}
		if p.AffinityTimeout > 0 {
			s := "affinity=ClientIP " + p.AffinityTimeout.String()
			if p.PinnedTo.IsValid() {
				s += ", client pinned to " + p.PinnedTo.String()
			} else {
				s += ", client not pinned"
			}
			parts = append(parts, s)
		}
		fmt.Fprintf(&b, "policy:    %s\n", strings.Join(parts, "; "))
	}
	if r.Reason != "" {
		fmt.Fprintf(&b, "why:       %s\n", r.Reason)
	}
	b.WriteString("outcomes:\n")
	for _, o := range r.Outcomes {
		fmt.Fprintf(&b, "  %s\n", o)
	}
	if len(r.Flows) > 0 {
		b.WriteString("conntrack:\n")
		for _, f := range r.Flows {
			fmt.Fprintf(&b, "  %s | reply %s mark=%#x %s\n", f.Original, f.Reply, f.Mark, f.State)
		}
	}
	b.WriteString("steps:\n")
	for _, s := range r.Steps {
		fmt.Fprintf(&b, "  %s\n", s)
	}
	return b.String()
}
