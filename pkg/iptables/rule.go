package iptables

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

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
