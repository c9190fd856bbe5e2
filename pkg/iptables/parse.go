package iptables

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/svcnat/svcnat/pkg/model"
)

// ParseSave reads iptables-save output of one family and returns svcnat's
// chains in it (those named SVCNAT-*); everything else is ignored.
func ParseSave(family model.Family, text string) (*Ruleset, error) {
	rs := newRuleset(family)
	if err := scanSave(family, strings.NewReader(text), rs.add); err != nil {
		return nil, err
	}
	return rs, nil
}

// add records one line scanSave reports when it is of an svcnat chain in
// a table svcnat uses.
func (rs *Ruleset) add(table, chain, rule string, declared bool) error {
	t := rs.Tables[table]
	switch {
	case t == nil || !strings.HasPrefix(chain, chainPrefix):
	case declared:
		if _, ok := t[chain]; !ok {
			t[chain] = nil
		}
	case rule == "":
		return fmt.Errorf("parse %s iptables-save: rule of chain %s without matches or target", rs.Family, chain)
	default:
		t[chain] = append(t[chain], rule)
	}
	return nil
}

// scanSave reads iptables-save output line by line, without holding it
// whole, and calls fn for every chain declared (declared set, rule empty)
// and every rule ("-A chain rule"; rule is empty for a rule without
// matches or target), of every chain, with the table it is in. It stops
// at the first error fn returns.
func scanSave(family model.Family, r io.Reader, fn func(table, chain, rule string, declared bool) error) error {
	var table string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		var err error
		switch {
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case table == "":
			// A comment before any table.
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			err = fn(table, name, "", true)
		case strings.HasPrefix(line, "-A "):
			chain, rule, _ := strings.Cut(line[3:], " ")
			err = fn(table, chain, rule, false)
		}
		if err != nil {
			return fmt.Errorf("%w (line %d: %q)", err, n, line)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s iptables-save output: %w", family, err)
	}
	return nil
}

// addrMatch is an -s or -d match: an address under a mask, maybe negated.
type addrMatch struct {
	addr, mask netip.Addr
	neg        bool
}

func (m *addrMatch) set() bool { return m.addr.IsValid() }

// prefix returns the match as a prefix when the mask is contiguous.
func (m *addrMatch) prefix() (netip.Prefix, bool) {
	bits := 0
	seenZero := false
	for _, b := range m.mask.AsSlice() {
		for i := 7; i >= 0; i-- {
			if b&(1<<i) != 0 {
				if seenZero {
					return netip.Prefix{}, false
				}
				bits++
			} else {
				seenZero = true
			}
		}
	}
	return netip.PrefixFrom(m.addr, bits), true
}

// rule is one parsed rule of an svcnat chain: the matches and targets
// svcnat renders, nothing else.
type rule struct {
	src, dst         addrMatch
	proto            string
	dportLo, dportHi uint16
	hasDport         bool
	srcType, dstType string // addrtype
	ctstate          string
	mark, markMask   uint32
	markNeg, hasMark bool
	probability      float64 // 0 when there is no statistic match
	rcheck           bool
	seconds          int
	rcheckName       string
	rset             bool
	rsetName         string
	comment          string
	// text is the rule as iptables-save printed it (for traces).
	text string

	target       string
	toDest       netip.AddrPort
	setMark      uint32
	setMarkMask  uint32
	rejectWith   string
	randomFully  bool
	jumpsToChain bool
}

// tokenize splits a rule the way iptables-save quotes it: words separated
// by spaces; a word in double quotes may hold spaces and backslash escapes.
func tokenize(s string) ([]string, error) {
	out := make([]string, 0, 24)
	for i := 0; i < len(s); {
		switch {
		case s[i] == ' ':
			i++
		case s[i] == '"':
			end := i + 1
			escaped := false
			for ; end < len(s) && s[end] != '"'; end++ {
				if s[end] == '\\' {
					escaped = true
					end++
				}
			}
			if end >= len(s) {
				return nil, errors.New("unterminated quote")
			}
			word := s[i+1 : end]
			if escaped {
				var b strings.Builder
				for k := 0; k < len(word); k++ {
					if word[k] == '\\' && k+1 < len(word) {
						k++
					}
					b.WriteByte(word[k])
				}
				word = b.String()
			}
			out = append(out, word)
			i = end + 1
		default:
			end := strings.IndexAny(s[i:], " \"")
			if end < 0 {
				end = len(s) - i
			}
			out = append(out, s[i:i+end])
			i += end
		}
	}
	return out, nil
}

func parseAddrMask(s string) (addrMatch, error) {
	a, m, ok := strings.Cut(s, "/")
	addr, err := netip.ParseAddr(a)
	if err != nil {
		return addrMatch{}, err
	}
	if !ok {
		return addrMatch{}, fmt.Errorf("address %s without mask", s)
	}
	if bits, err := strconv.Atoi(m); err == nil {
		p, err := addr.Prefix(bits)
		if err != nil {
			return addrMatch{}, err
		}
		var mask [16]byte
		for i := range bits {
			mask[i/8] |= 0x80 >> (i % 8)
		}
		mk := netip.AddrFrom16(mask)
		if addr.Is4() {
			mk = netip.AddrFrom4([4]byte(mask[:4]))
		}
		return addrMatch{addr: p.Addr(), mask: mk}, nil
	}
	mask, err := netip.ParseAddr(m)
	if err != nil {
		return addrMatch{}, err
	}
	if mask.BitLen() != addr.BitLen() {
		return addrMatch{}, fmt.Errorf("mask %s of another family than %s", m, a)
	}
	return addrMatch{addr: addr, mask: mask}, nil
}

func parseUint32(s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 0, 32)
	return uint32(v), err
}

func parseMark(s string) (uint32, uint32, error) {
	v, m, ok := strings.Cut(s, "/")
	val, err := parseUint32(v)
	if err != nil {
		return 0, 0, err
	}
	mask := uint32(0xffffffff)
	if ok {
		if mask, err = parseUint32(m); err != nil {
			return 0, 0, err
		}
	}
	return val, mask, nil
}

// parseRule parses one rule of an svcnat chain (the text after "-A chain ").
func parseRule(s string) (*rule, error) {
	toks, err := tokenize(s)
	if err != nil {
		return nil, err
	}
	r := &rule{text: s}
	neg := false
	i := 0
	next := func() (string, error) {
		if i+1 >= len(toks) {
			return "", fmt.Errorf("%s without a value", toks[i])
		}
		i++
		return toks[i], nil
	}
	// module is the -m module whose options follow; recent options are
	// attached to the check or the set depending on which comes first.
	module := ""
	recentSet := false
	for ; i < len(toks); i++ {
		t := toks[i]
		if t == "!" {
			neg = true
			continue
		}
		var v string
		switch t {
		case "--reap", "--rsource", "--rcheck", "--set", "--random-fully":
		default:
			if v, err = next(); err != nil {
				return nil, err
			}
		}
		switch t {
		case "-s", "-d":
			m, err := parseAddrMask(v)
			if err != nil {
				return nil, fmt.Errorf("%s %s: %w", t, v, err)
			}
			m.neg = neg
			if t == "-s" {
				r.src = m
			} else {
				r.dst = m
			}
		case "-p":
			r.proto = v
		case "-m":
			module = v
			if v == "recent" {
				recentSet = false
			}
		case "--dport":
			lo, hi, isRange := strings.Cut(v, ":")
			l, err := strconv.ParseUint(lo, 10, 16)
			if err != nil {
				return nil, fmt.Errorf("--dport %s: %w", v, err)
			}
			h := l
			if isRange {
				if h, err = strconv.ParseUint(hi, 10, 16); err != nil {
					return nil, fmt.Errorf("--dport %s: %w", v, err)
				}
			}
			r.dportLo, r.dportHi, r.hasDport = uint16(l), uint16(h), true
		case "--src-type":
			r.srcType = v
		case "--dst-type":
			r.dstType = v
		case "--ctstate":
			r.ctstate = v
		case "--mark":
			if r.mark, r.markMask, err = parseMark(v); err != nil {
				return nil, fmt.Errorf("--mark %s: %w", v, err)
			}
			r.markNeg, r.hasMark = neg, true
		case "--mode":
			if v != "random" {
				return nil, fmt.Errorf("statistic mode %s", v)
			}
		case "--probability":
			if r.probability, err = strconv.ParseFloat(v, 64); err != nil {
				return nil, fmt.Errorf("--probability %s: %w", v, err)
			}
			if r.probability <= 0 || r.probability > 1 {
				return nil, fmt.Errorf("--probability %s out of range", v)
			}
		case "--rcheck":
			r.rcheck = true
		case "--set":
			r.rset, recentSet = true, true
		case "--seconds":
			if r.seconds, err = strconv.Atoi(v); err != nil {
				return nil, fmt.Errorf("--seconds %s: %w", v, err)
			}
		case "--name":
			if recentSet {
				r.rsetName = v
			} else {
				r.rcheckName = v
			}
		case "--reap", "--rsource", "--mask":
		case "--comment":
			r.comment = v
		case "-j":
			r.target = v
			r.jumpsToChain = strings.HasPrefix(v, chainPrefix)
		case "--to-destination":
			if r.toDest, err = netip.ParseAddrPort(v); err != nil {
				return nil, fmt.Errorf("--to-destination %s: %w", v, err)
			}
		case "--set-xmark":
			if r.setMark, r.setMarkMask, err = parseMark(v); err != nil {
				return nil, fmt.Errorf("--set-xmark %s: %w", v, err)
			}
		case "--reject-with":
			r.rejectWith = v
		case "--random-fully":
			r.randomFully = true
		default:
			return nil, fmt.Errorf("option %s (module %q) is not one svcnat writes", t, module)
		}
		if neg && t != "-s" && t != "-d" && t != "--mark" {
			return nil, fmt.Errorf("negated %s is not one svcnat writes", t)
		}
		neg = false
	}
	if r.target == "" {
		return nil, errors.New("rule without target")
	}
	return r, nil
}

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
