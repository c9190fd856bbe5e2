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
// modified. Cost: one map entry per
// frontend.
func ResolveConflicts(s *State) []error {
	winners := make(map[frontendKey]claim)
	var losers []claim
	for _, sp := range s.ServicePorts {
		for _, fe := range sp.Frontends {
			k := frontendKey{fe.IP, fe.Port, sp.Protocol}
			c := claim{sp, fe}
			w, taken := winners[k]
			switch {
			case !taken:
				winners[k] = c
			case c.compare(w) < 0:
				winners[k] = c
				losers = append(losers, w)
			default:
				losers = append(losers, c)
			}
		}
	}
	if len(losers) == 0 {
		return nil
	}
	slices.SortFunc(losers, claim.compare)
	errs := make([]error, 0, len(losers))
	dropped := map[ServicePortName][]Frontend{}
	for _, l := range losers {
		w := winners[frontendKey{l.fe.IP, l.fe.Port, l.sp.Protocol}]
		dropped[l.sp.Name] = append(dropped[l.sp.Name], l.fe)
		if w.sp.Name == l.sp.Name {
			// One Service listing its own ClusterIP as an externalIP, say:
			// nothing is lost, the traffic goes to the same place.
			continue
		}
		errs = append(errs, &ConflictError{Protocol: l.sp.Protocol, Loser: l.sp.Name, Lost: l.fe, Winner: w.sp.Name, Won: w.fe.Kind})
	}
	for name, fes := range dropped {
		sp := s.ServicePorts[name].Clone()
		sp.Frontends = slices.DeleteFunc(sp.Frontends, func(f Frontend) bool { return slices.Contains(fes, f) })
		if len(sp.Frontends) == 0 {
			delete(s.ServicePorts, name)
			continue
		}
		sp.prune()
		s.ServicePorts[name] = sp
	}
	return errs
}
