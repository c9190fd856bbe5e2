//go:build linux

package ebpf

import (
	"context"
	"fmt"
	"sort"
	"strings"
)

// Raw prints the entries of the pinned desired-state maps, one per line
// and sorted, as the kernel holds them (ports in host order). It needs no
// Init.
func (b *Backend) Raw(ctx context.Context) (string, error) {
	ms, closeAll, err := b.pinnedMaps()
	if err != nil {
		return "", fmt.Errorf("print ebpf maps: %w", err)
	}
	defer closeAll()
	if ms == nil {
		return "", nil
	}
	t, err := readTable(ms)
	if err != nil {
		return "", fmt.Errorf("print ebpf maps: %w", err)
	}
	return formatTable(t), nil
}

func formatTable(t *table) string {
	var lines []string
	for k, v := range t.services {
		lines = append(lines, fmt.Sprintf("%s %s port=%d proto=%d -> id=%d kind=%d flags=%#x cluster=%d local=%d affinity=%ds",
			svcnatMapSvcnatServices, addrString(k.Addr), ntohs(k.Port), k.Proto, v.Id, v.Kind, v.Flags, v.ClusterCount, v.LocalCount, v.AffinityTimeout))
	}
	for id, v := range t.info {
		name, proto, _ := decodeInfo(v)
		lines = append(lines, fmt.Sprintf("%s id=%d -> %s %s healthCheckNodePort=%d", svcnatMapSvcnatSvcInfo, id, name, proto, v.HealthCheckNodePort))
	}
	for k, v := range t.slots {
		lines = append(lines, fmt.Sprintf("%s id=%d set=%d slot=%d -> backend=%d", svcnatMapSvcnatSlots, k.Id, k.Set, k.Slot, v))
	}
	for k := range t.members {
		lines = append(lines, fmt.Sprintf("%s id=%d set=%d backend=%d", svcnatMapSvcnatMembers, k.Id, k.Set, k.BackendId))
	}
	for id, v := range t.backends {
		lines = append(lines, fmt.Sprintf("%s id=%d -> %s port=%d flags=%#x", svcnatMapSvcnatBackends, id, addrString(v.Addr), ntohs(v.Port), v.Flags))
	}
	for k := range t.sourceRanges {
		p, _ := decodePrefix(k.Addr, k.Prefixlen-32)
		lines = append(lines, fmt.Sprintf("%s id=%d %s", svcnatMapSvcnatSourceRanges, k.Id, p))
	}
	for k := range t.clusterCIDRs {
		p, _ := decodePrefix(k.Addr, k.Prefixlen)
		lines = append(lines, fmt.Sprintf("%s %s", svcnatMapSvcnatClusterCidrs, p))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}
