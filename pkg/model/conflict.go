package model

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
)

// ConflictError reports a frontend that two ServicePorts claim (the same
// address, protocol and port): Loser's claim is dropped from the State and
// Winner's is programmed.
type ConflictError struct {
	Protocol Protocol
	Loser    ServicePortName
	Lost     Frontend
	Winner   ServicePortName
	Won      FrontendKind
}

func (e *ConflictError) Error() string {
	return fmt.Sprintf("service port %s: %s/%s is also the %s of service port %s, which takes precedence; not programmed",
		e.Loser, e.Lost, e.Protocol, e.Won, e.Winner)
}

// precedence orders the claims of one address, protocol and port (lower
// wins). ClusterIPs and NodePorts are allocated uniquely by the apiserver;
// LoadBalancer ingress IPs are written by a controller with status rights;
// externalIPs by anyone who may write a Service. So an externalIP never
// takes another Service's ClusterIP, NodePort or LoadBalancer traffic
// (CVE-2020-8554), where kube-proxy lets the first rule written win.
func precedence(k FrontendKind) int {
	switch k {
	case ClusterIP:
		return 0
	case NodePort:
		return 1
	case LoadBalancer:
		return 2
	}
	return 3
}

// claim is one frontend of one ServicePort.
type claim struct {
	sp *ServicePort
	fe Frontend
}

func (c claim) compare(o claim) int {
	return cmp.Or(cmp.Compare(precedence(c.fe.Kind), precedence(o.fe.Kind)), c.sp.Name.Compare(o.sp.Name),
		c.fe.Compare(o.fe))
}

type frontendKey struct {
	ip    netip.Addr
	port  uint16
	proto Protocol
}

// ResolveConflicts makes every frontend of s belong to one ServicePort: of
// the claims on one address, protocol and port, the one of the highest
// precedence kind (ClusterIP, NodePort, LoadBalancer, ExternalIP) wins, and
// among claims of one kind the ServicePort whose name sorts first. Each
// dropped claim yields a *ConflictError; the result is the same whatever
// the order of the input. ServicePorts that lose a frontend are replaced in
// s.ServicePorts by pruned copies (see ServicePort.prune), or removed when
// no frontend is left; the others, and the ServicePorts themselves, are not
// modified. It is Conflicts applied to the whole State at once.
func ResolveConflicts(s *State) []error {
	c := NewConflicts()
	for _, sp := range s.ServicePorts {
		c.Set(sp.Name, sp)
	}
	for name := range c.lossy() {
		if sp := c.Resolved(name); sp != nil {
			s.ServicePorts[name] = sp
		} else {
			delete(s.ServicePorts, name)
		}
	}
	return c.Errors()
}

// Conflicts resolves frontend conflicts incrementally, with the result of
// ResolveConflicts: Set changes one ServicePort at a cost that follows its
// frontends and their claims, not the number of ServicePorts.
type Conflicts struct {
	sps    map[ServicePortName]*ServicePort
	claims map[frontendKey][]claim
	// contested are the keys with more than one claim.
	contested map[frontendKey]bool
}

// NewConflicts returns an empty Conflicts.
func NewConflicts() *Conflicts {
	return &Conflicts{sps: map[ServicePortName]*ServicePort{}, claims: map[frontendKey][]claim{}, contested: map[frontendKey]bool{}}
}

func keyOf(sp *ServicePort, fe Frontend) frontendKey { return frontendKey{fe.IP, fe.Port, sp.Protocol} }

// Set replaces the ServicePort called name with sp (nil removes it), and
// returns the names of the ServicePorts whose Resolved form may have
// changed: name itself and those sharing a frontend with its old or new
// version. sp is not modified and must not be modified while it is set.
func (c *Conflicts) Set(name ServicePortName, sp *ServicePort) []ServicePortName {
	affected := []ServicePortName{name}
	touch := func(k frontendKey) {
		for _, cl := range c.claims[k] {
			if cl.sp.Name != name {
				affected = append(affected, cl.sp.Name)
			}
		}
		if len(c.claims[k]) > 1 {
			c.contested[k] = true
		} else {
			delete(c.contested, k)
		}
	}
	if old := c.sps[name]; old != nil {
		for _, fe := range old.Frontends {
			k := keyOf(old, fe)
			c.claims[k] = slices.DeleteFunc(c.claims[k], func(cl claim) bool { return cl.sp == old })
			if len(c.claims[k]) == 0 {
				delete(c.claims, k)
			}
			touch(k)
		}
		delete(c.sps, name)
	}
	if sp != nil {
		c.sps[name] = sp
		for _, fe := range sp.Frontends {
			k := keyOf(sp, fe)
			c.claims[k] = append(c.claims[k], claim{sp, fe})
			touch(k)
		}
	}
	slices.SortFunc(affected, ServicePortName.Compare)
	return slices.Compact(affected)
}

func (c *Conflicts) winner(k frontendKey) claim {
	return slices.MinFunc(c.claims[k], claim.compare)
}

// Resolved returns the ServicePort called name without the frontends it
// loses: the one Set, a pruned copy, or nil when it loses every frontend
// or is not set.
func (c *Conflicts) Resolved(name ServicePortName) *ServicePort {
	sp := c.sps[name]
	if sp == nil {
		return nil
	}
	var lost []Frontend
	for _, fe := range sp.Frontends {
		k := keyOf(sp, fe)
		if c.contested[k] {
			if w := c.winner(k); w.sp != sp || w.fe != fe {
				lost = append(lost, fe)
			}
		}
	}
	if len(lost) == 0 {
		return sp
	}
	out := sp.Clone()
	out.Frontends = slices.DeleteFunc(out.Frontends, func(f Frontend) bool { return slices.Contains(lost, f) })
	if len(out.Frontends) == 0 {
		return nil
	}
	out.prune()
	return out
}

// lossy returns the names of the ServicePorts that lose a frontend.
func (c *Conflicts) lossy() map[ServicePortName]bool {
	out := map[ServicePortName]bool{}
	for k := range c.contested {
		w := c.winner(k)
		for _, cl := range c.claims[k] {
			if cl != w {
				out[cl.sp.Name] = true
			}
		}
	}
	return out
}

// Errors returns a *ConflictError for each claim dropped in favour of
// another ServicePort's, in precedence and name order. Its cost follows the
// contested frontends.
func (c *Conflicts) Errors() []error {
	var losers []claim
	for k := range c.contested {
		w := c.winner(k)
		for _, cl := range c.claims[k] {
			if cl != w {
				losers = append(losers, cl)
			}
		}
	}
	if len(losers) == 0 {
		return nil
	}
	slices.SortFunc(losers, claim.compare)
	var errs []error
	for _, l := range losers {
		w := c.winner(keyOf(l.sp, l.fe))
		if w.sp.Name == l.sp.Name {
			// One Service listing its own ClusterIP as an externalIP, say:
			// nothing is lost, the traffic goes to the same place.
			continue
		}
		errs = append(errs, &ConflictError{Protocol: l.sp.Protocol, Loser: l.sp.Name, Lost: l.fe, Winner: w.sp.Name, Won: w.fe.Kind})
	}
	return errs
}
