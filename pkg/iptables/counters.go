package iptables

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// Counters reads the packet counters of svcnat's DNAT rules with
// iptables-save -c. Only the first packet of a connection traverses the
// nat table, so a DNAT rule's packet count is the number of new
// connections (flows, for UDP) it sent to its endpoint; its byte count is
// that of those first packets alone and is not reported. Rules of a
// Service port's endpoint chain start from zero when svcnat rewrites the
// chain (its endpoints changed, or a full rewrite at start or after a
// failure). It needs no Init.
func (b *Backend) Counters(ctx context.Context) (map[model.ServicePortName]*dataplane.PortCounters, error) {
	if err := b.resolve(ctx); err != nil {
		return nil, err
	}
	out := map[model.ServicePortName]*dataplane.PortCounters{}
	for _, ft := range b.families {
		err := ft.run.save(ctx, tableNAT, true, func(r io.Reader) error { return countDNAT(ft.family, r, out) })
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

var _ dataplane.CounterReader = (*Backend)(nil)

// countDNAT adds the packet counters of the DNAT rules in svcnat's
// endpoint chains, in iptables-save -c output of one family's nat table,
// to out: per Service port and per endpoint. A DNAT rule of session
// affinity (recent --rcheck) counts for its endpoint like the random
// choice does.
func countDNAT(family model.Family, save io.Reader, out map[model.ServicePortName]*dataplane.PortCounters) error {
	sc := bufio.NewScanner(save)
	sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		counts, rest, ok := strings.Cut(strings.TrimPrefix(line, "["), "] -A ")
		if !ok || !strings.HasPrefix(line, "[") ||
			!(strings.HasPrefix(rest, prefixCluster) || strings.HasPrefix(rest, prefixLocal)) {
			continue
		}
		_, text, _ := strings.Cut(rest, " ")
		r, err := parseRule(text)
		if err != nil {
			return fmt.Errorf("read %s rule counters, iptables-save line %d: %w", family, n, err)
		}
		if r.target != "DNAT" {
			continue
		}
		pkts, _, _ := strings.Cut(counts, ":")
		count, err := strconv.ParseUint(pkts, 10, 64)
		if err != nil {
			return fmt.Errorf("read %s rule counters, iptables-save line %d: counter %q: %w", family, n, counts, err)
		}
		spc, _, _ := strings.Cut(r.comment, " ")
		name, err := parseServicePortName(spc, family)
		if err != nil {
			return fmt.Errorf("read %s rule counters, iptables-save line %d: %w", family, n, err)
		}
		pc := out[name]
		if pc == nil {
			pc = &dataplane.PortCounters{Endpoints: map[string]uint64{}}
			out[name] = pc
		}
		pc.Connections += count
		pc.Endpoints[r.toDest.String()] += count
	}
	return sc.Err()
}
