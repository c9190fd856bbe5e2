//go:build linux

package ebpf

import (
	"errors"
	"fmt"
	"os/exec"

	goipt "github.com/coreos/go-iptables/iptables"
)

// The flows the tc programs DNAT toward endpoints on other nodes are
// forwarded through netfilter, where a FORWARD policy of DROP (Docker sets
// one) would drop them; an nftables accept elsewhere cannot override that
// policy. As kube-proxy's KUBE-FORWARD accepts its marked traffic, svcnat
// puts one rule at the head of the filter FORWARD chain of each family that
// has iptables, accepting the flows that carry its conntrack mark.

const forwardComment = "svcnat: accept flows the eBPF backend translated"

func forwardRule() []string {
	return []string{"-m", "connmark", "--mark", fmt.Sprintf("%#x/%#x", uint32(ctMark), uint32(ctMarkMask)),
		"-m", "comment", "--comment", forwardComment, "-j", "ACCEPT"}
}

// forwardTable is one family's iptables, named by its binary.
type forwardTable struct {
	*goipt.IPTables
	binary string
}

// forwardTables returns the families whose iptables binary is installed; a
// node without one has no FORWARD policy for svcnat to get past.
func forwardTables() ([]forwardTable, error) {
	var out []forwardTable
	for _, p := range []struct {
		proto  goipt.Protocol
		binary string
	}{{goipt.ProtocolIPv4, "iptables"}, {goipt.ProtocolIPv6, "ip6tables"}} {
		if _, err := exec.LookPath(p.binary); err != nil {
			continue
		}
		ipt, err := goipt.New(goipt.IPFamily(p.proto), goipt.Timeout(10))
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", p.binary, err)
		}
		out = append(out, forwardTable{ipt, p.binary})
	}
	return out, nil
}

// ensureForwardAccept puts svcnat's accept rule at the head of each
// family's filter FORWARD chain, unless it is there already. Idempotent.
func ensureForwardAccept() error {
	tables, err := forwardTables()
	if err != nil {
		return err
	}
	for _, ipt := range tables {
		ok, err := ipt.Exists("filter", "FORWARD", forwardRule()...)
		if err == nil && !ok {
			err = ipt.Insert("filter", "FORWARD", 1, forwardRule()...)
		}
		if err != nil {
			return fmt.Errorf("accept svcnat's flows in the filter FORWARD chain (%s): %w", ipt.binary, err)
		}
	}
	return nil
}

// deleteForwardAccept removes svcnat's FORWARD rule; a missing one is not
// an error.
func deleteForwardAccept() error {
	tables, err := forwardTables()
	if err != nil {
		return err
	}
	var errs []error
	for _, ipt := range tables {
		if err := ipt.DeleteIfExists("filter", "FORWARD", forwardRule()...); err != nil {
			errs = append(errs, fmt.Errorf("delete svcnat's rule from the filter FORWARD chain (%s): %w", ipt.binary, err))
		}
	}
	return errors.Join(errs...)
}
