package iptables

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/svcnat/svcnat/pkg/model"
)

// frontendRule is what a frontend rule's comment says.
type frontendRule struct {
	name     model.ServicePortName
	kind     model.FrontendKind
	local    bool
	affinity time.Duration
	health   bool
}

func parseServicePortName(s string, f model.Family) (model.ServicePortName, error) {
	ns, rest, ok := strings.Cut(s, "/")
	if !ok || ns == "" || rest == "" {
		return model.ServicePortName{}, fmt.Errorf("%q is not namespace/name[:port]", s)
	}
	name, port, _ := strings.Cut(rest, ":")
	if name == "" {
		return model.ServicePortName{}, fmt.Errorf("%q has no name", s)
	}
	return model.ServicePortName{Namespace: ns, Name: name, Port: port, Family: f}, nil
}

func parseFrontendComment(c string, f model.Family) (frontendRule, error) {
	words := strings.Fields(c)
	if len(words) < 2 {
		return frontendRule{}, fmt.Errorf("comment %q names no frontend", c)
	}
	name, err := parseServicePortName(words[0], f)
	if err != nil {
		return frontendRule{}, err
	}
	fr := frontendRule{name: name, kind: model.FrontendKind(words[1])}
	switch fr.kind {
	case model.ClusterIP, model.NodePort, model.ExternalIP, model.LoadBalancer:
	case roleHealthCheck:
		fr.health = true
	default:
		return frontendRule{}, fmt.Errorf("comment %q: unknown frontend kind %q", c, words[1])
	}
	for _, w := range words[2:] {
		switch {
		case w == flagLocal:
			fr.local = true
		case strings.HasPrefix(w, flagAffinity):
			secs, err := strconv.ParseUint(w[len(flagAffinity):], 10, 31)
			if err != nil || secs == 0 {
				return frontendRule{}, fmt.Errorf("comment %q: bad affinity %q", c, w)
			}
			fr.affinity = time.Duration(secs) * time.Second
		default:
			return frontendRule{}, fmt.Errorf("comment %q: unknown word %q", c, w)
		}
	}
	return fr, nil
}

// parsedRules parses every rule of a ruleset, keyed like its Tables. A
// rule svcnat does not write (another tool's, or edited by hand) is left
// out and described in the problems returned.
func parsedRules(rs *Ruleset) (map[string]map[string][]*rule, []string) {
	out := map[string]map[string][]*rule{}
	var problems []string
	for table, chains := range rs.Tables {
		out[table] = map[string][]*rule{}
		for chain, rules := range chains {
			parsed := make([]*rule, 0, len(rules))
			for _, text := range rules {
				r, err := parseRule(text)
				if err != nil {
					problems = append(problems, fmt.Sprintf("%s %s chain %s: rule %q is not one svcnat writes: %v", rs.Family, table, chain, text, err))
					continue
				}
				parsed = append(parsed, r)
			}
			out[table][chain] = parsed
		}
	}
	slices.Sort(problems)
	return out, problems
}

func isTreeChain(c string) bool {
	return strings.HasPrefix(c, prefixAddrTree) || strings.HasPrefix(c, prefixPortTree)
}

// StateOf decodes rulesets (one per family) that Render produced back into
// the state they program: the exact inverse of Render. Any rule it cannot
// decode is an error.
func StateOf(rulesets ...*Ruleset) (*model.State, error) {
	s, problems := decodeState(rulesets...)
	if len(problems) > 0 {
		return nil, errors.New(problems[0])
	}
	return s, nil
}

// decodeState is StateOf that never gives up: what it cannot decode (a
// rule svcnat does not write, a ServicePort with contradicting rules) is
// left out of the state and described in the problems returned.
func decodeState(rulesets ...*Ruleset) (*model.State, []string) {
	s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	var problems []string
	for _, rs := range rulesets {
		problems = append(problems, decode(s, rs)...)
	}
	return s, problems
}

type decoder struct {
	family model.Family
	ports  map[model.ServicePortName]*model.ServicePort
}

func (d *decoder) servicePort(n model.ServicePortName, proto string) (*model.ServicePort, error) {
	sp := d.ports[n]
	if sp == nil {
		sp = &model.ServicePort{Name: n}
		d.ports[n] = sp
	}
	if proto != "" {
		p := model.Protocol(strings.ToUpper(proto))
		if sp.Protocol != "" && sp.Protocol != p {
			return nil, fmt.Errorf("service port %s has rules for %s and %s", n, sp.Protocol, p)
		}
		sp.Protocol = p
	}
	return sp, nil
}

func decode(s *model.State, rs *Ruleset) []string {
	parsed, problems := parsedRules(rs)
	d := &decoder{family: rs.Family, ports: map[model.ServicePortName]*model.ServicePort{}}
	nat := parsed[tableNAT]
	for _, r := range nat[chainOffCluster] {
		if r.target == "RETURN" {
			p, ok := r.src.prefix()
			if !ok || r.src.neg {
				problems = append(problems, fmt.Sprintf("%s chain %s: source %v is not a CIDR", rs.Family, chainOffCluster, r.src.addr))
				continue
			}
			s.ClusterCIDRs = append(s.ClusterCIDRs, p)
		}
	}
	for _, table := range []string{tableNAT, tableFilter} {
		for _, chain := range sortedKeys(parsed[table]) {
			for _, r := range parsed[table][chain] {
				var err error
				switch {
				case isTreeChain(chain) && r.comment != "":
					err = d.frontend(r)
				case table == tableNAT && (strings.HasPrefix(chain, prefixCluster) || strings.HasPrefix(chain, prefixLocal)):
					err = d.endpoint(r, strings.HasPrefix(chain, prefixLocal))
				}
				if err != nil {
					problems = append(problems, fmt.Sprintf("%s %s chain %s: %v", rs.Family, table, chain, err))
				}
			}
		}
	}
	for _, sp := range d.ports {
		if sp.Protocol == "" {
			problems = append(problems, fmt.Sprintf("%s service port %s: no rule names its protocol", rs.Family, sp.Name))
			continue
		}
		slices.SortFunc(sp.Frontends, func(a, b model.Frontend) int {
			return cmp.Or(cmp.Compare(a.Kind, b.Kind), a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
		})
		if _, dup := s.ServicePorts[sp.Name]; dup {
			problems = append(problems, fmt.Sprintf("service port %s appears twice", sp.Name))
			continue
		}
		s.ServicePorts[sp.Name] = sp
	}
	return problems
}

// frontend decodes a rule in a dispatch tree leaf.
func (d *decoder) frontend(r *rule) error {
	fr, err := parseFrontendComment(r.comment, d.family)
	if err != nil {
		return err
	}
	proto := r.proto
	if fr.health {
		proto = ""
	}
	sp, err := d.servicePort(fr.name, proto)
	if err != nil {
		return err
	}
	if !r.hasDport || r.dportLo != r.dportHi {
		return fmt.Errorf("%s: frontend rule without one destination port", fr.name)
	}
	if fr.health {
		// Always a TCP rule, whatever the ServicePort's protocol.
		sp.HealthCheckNodePort = r.dportLo
		return nil
	}
	p, ok := r.dst.prefix()
	if !ok || p.Bits() != p.Addr().BitLen() || r.dst.neg {
		return fmt.Errorf("%s: frontend rule without one destination address", fr.name)
	}
	f := model.Frontend{Kind: fr.kind, IP: p.Addr(), Port: r.dportLo}
	if !slices.Contains(sp.Frontends, f) {
		sp.Frontends = append(sp.Frontends, f)
	}
	if fr.kind.External() {
		sp.ExternalTrafficLocal = sp.ExternalTrafficLocal || fr.local
	} else {
		sp.InternalTrafficLocal = sp.InternalTrafficLocal || fr.local
	}
	if fr.affinity > 0 {
		sp.AffinityTimeout = fr.affinity
	}
	if r.src.set() {
		src, ok := r.src.prefix()
		if !ok || r.src.neg {
			return fmt.Errorf("%s: source match %v is not a CIDR", fr.name, r.src.addr)
		}
		if !slices.Contains(sp.SourceRanges, src) {
			sp.SourceRanges = append(sp.SourceRanges, src)
		}
	}
	return nil
}

// endpoint decodes a rule of a ServicePort's endpoint chain.
func (d *decoder) endpoint(r *rule, local bool) error {
	if r.target != "DNAT" || r.rcheck {
		return nil
	}
	spc, flag, _ := strings.Cut(r.comment, " ")
	if flag != "" && flag != flagLocal {
		return fmt.Errorf("endpoint comment %q: unknown word %q", r.comment, flag)
	}
	n, err := parseServicePortName(spc, d.family)
	if err != nil {
		return err
	}
	sp, err := d.servicePort(n, r.proto)
	if err != nil {
		return err
	}
	if !r.toDest.IsValid() {
		return fmt.Errorf("%s: DNAT without --to-destination", n)
	}
	e := model.Endpoint{IP: r.toDest.Addr(), Port: r.toDest.Port(), Local: flag == flagLocal}
	if local {
		sp.LocalEndpoints = append(sp.LocalEndpoints, e)
	} else {
		sp.ClusterEndpoints = append(sp.ClusterEndpoints, e)
	}
	return nil
}
