package iptables

import (
	"bufio"
	"fmt"
	"io"
	"strings"

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
