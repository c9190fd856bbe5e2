package iptables

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/svcnat/svcnat/pkg/model"
)

const hexDigits = "0123456789ABCDEF"

// addrNibbles returns the dispatch path of an address: its addrLevels least
// significant 4-bit groups, least significant first.
func addrNibbles(a netip.Addr) []byte {
	b := a.AsSlice()
	path := make([]byte, addrLevels)
	for i := range path {
		v := b[len(b)-1-i/2]
		if i%2 == 1 {
			v >>= 4
		}
		path[i] = v & 0xf
	}
	return path
}

func hexPath(path []byte) string {
	var b strings.Builder
	for _, n := range path {
		b.WriteByte(hexDigits[n])
	}
	return b.String()
}

func addrLeaf(a netip.Addr) string { return prefixAddrTree + hexPath(addrNibbles(a)) }

// portNibbles returns the dispatch path of a port: its portLevels most
// significant 4-bit groups.
func portNibbles(port uint16) []byte {
	path := make([]byte, portLevels)
	for i := range path {
		path[i] = byte(port>>(12-4*i)) & 0xf
	}
	return path
}

func portLeaf(p model.Protocol, port uint16) string {
	return prefixPortTree + string(p) + "-" + hexPath(portNibbles(port))
}

// addrDispatch is the match of an address tree chain at the given path:
// the path's last nibble, under a mask of that nibble alone.
func addrDispatch(f model.Family, path []byte) string {
	level := len(path) - 1
	var value, mask [16]byte
	byteIdx := 15 - level/2
	shift := 4 * (level % 2)
	value[byteIdx] = path[level] << shift
	mask[byteIdx] = 0xf << shift
	v, m := netip.AddrFrom16(value), netip.AddrFrom16(mask)
	if f == model.IPv4 {
		v = netip.AddrFrom4([4]byte(value[12:]))
		m = netip.AddrFrom4([4]byte(mask[12:]))
	}
	return fmt.Sprintf("-d %s/%s", v, m)
}

// portDispatch is the match of a port tree chain at the given path: the
// range of ports that share the path.
func portDispatch(p model.Protocol, path []byte) string {
	var lo uint16
	for i, n := range path {
		lo |= uint16(n) << (12 - 4*i)
	}
	hi := lo | (uint16(1)<<(12-4*(len(path)-1)) - 1)
	return portMatch(p, fmt.Sprintf("%d:%d", lo, hi))
}

// trees renders the dirty leaf chains of table from p's entries, and every
// dispatch chain above p's leaves, noting those in p.always.
func (r *renderer) trees(p *programmed, table string, dirty map[tableChain]bool) {
	root := chainServices
	if table == tableFilter {
		root = chainFilter
	}
	children := map[string][]string{}
	for leaf, entries := range p.leaves {
		if leaf.table != table {
			continue
		}
		if dirty[leaf] {
			slices.SortFunc(entries, func(a, b leafEntry) int {
				return cmp.Or(a.ip.Compare(b.ip), cmp.Compare(a.proto, b.proto), cmp.Compare(a.port, b.port),
					a.name.Compare(b.name), cmp.Compare(a.seq, b.seq))
			})
			for _, e := range entries {
				r.add(table, leaf.chain, e.rule)
			}
		}
		// Link the leaf to the root through its ancestors.
		chain := leaf.chain
		for {
			parent := treeParent(chain, root)
			if !slices.Contains(children[parent], chain) {
				children[parent] = append(children[parent], chain)
			}
			if parent == root {
				break
			}
			chain = parent
		}
	}
	for _, parent := range sortedKeys(children) {
		p.always[tableChain{table, parent}] = true
		kids := children[parent]
		slices.Sort(kids)
		for _, child := range kids {
			if child == chainNodePorts {
				continue // last in the root, below
			}
			r.add(table, parent, r.dispatchMatch(child)+" -j "+child)
		}
	}
	if slices.Contains(children[root], chainNodePorts) {
		r.add(table, root, "-m addrtype --dst-type LOCAL -j "+chainNodePorts)
	}
}

// treeParent returns the chain that dispatches to chain.
func treeParent(chain, root string) string {
	if chain == chainNodePorts {
		return root
	}
	if path, ok := strings.CutPrefix(chain, prefixAddrTree); ok {
		if len(path) == 1 {
			return root
		}
		return chain[:len(chain)-1]
	}
	rest := strings.TrimPrefix(chain, prefixPortTree)
	_, path, _ := strings.Cut(rest, "-")
	if len(path) == 1 {
		return chainNodePorts
	}
	return chain[:len(chain)-1]
}

func parseHexPath(s string) []byte {
	path := make([]byte, len(s))
	for i := range s {
		path[i] = byte(strings.IndexByte(hexDigits, s[i]))
	}
	return path
}

// dispatchMatch is the match of the rule that jumps to a tree chain.
func (r *renderer) dispatchMatch(child string) string {
	if path, ok := strings.CutPrefix(child, prefixAddrTree); ok {
		return addrDispatch(r.family, parseHexPath(path))
	}
	p, path, _ := strings.Cut(strings.TrimPrefix(child, prefixPortTree), "-")
	return portDispatch(model.Protocol(p), parseHexPath(path))
}

// hairpinBucket is the hairpin chain of a local endpoint address: its
// lowest 4 bits.
func hairpinBucket(a netip.Addr) byte { return addrNibbles(a)[0] }

// shared renders the chains that do not belong to one ServicePort: the
// hairpin chains of the dirty buckets from p's local addresses (a bucket
// left empty is gone), and every other, noting those in p.always.
func (r *renderer) shared(p *programmed, dirty [16]bool, gone map[tableChain]bool) {
	nat := r.rs.Tables[tableNAT]
	nat[chainServices] = nil
	r.rs.Tables[tableFilter][chainFilter] = nil
	var buckets [16][]netip.Addr
	if slices.Contains(dirty[:], true) {
		for a := range p.locals {
			if b := hairpinBucket(a); dirty[b] {
				buckets[b] = append(buckets[b], a)
			}
		}
	}
	// Hairpin: a DNATed connection from a local endpoint to itself. The
	// rules are dispatched on the source's lowest 4 bits, so a connection
	// walks at most 16 rules plus a sixteenth of the node's endpoints.
	for b := range byte(16) {
		chain := prefixHairpin + hexPath([]byte{b})
		if p.hairpin[b] > 0 {
			r.add(tableNAT, chainPostrouting, strings.Replace(addrDispatch(r.family, []byte{b}), "-d", "-s", 1)+
				" -m conntrack --ctstate DNAT -j "+chain)
		}
		if !dirty[b] {
			continue
		}
		if len(buckets[b]) == 0 {
			gone[tableChain{tableNAT, chain}] = true
		}
		slices.SortFunc(buckets[b], netip.Addr.Compare)
		for _, a := range buckets[b] {
			r.add(tableNAT, chain, fmt.Sprintf("-s %s -d %s %s -j MASQUERADE --random-fully", hostPrefix(a), hostPrefix(a), comment(commentHairpin)))
		}
	}
	mark := r.masqMark + "/" + r.masqMark
	filter := r.rs.Tables[tableFilter]
	filter[chainForward] = nil
	if !r.keepInvalid {
		// An out-of-window segment is not de-NATed; passed on, it reaches
		// the client from the endpoint's address and draws a RST.
		r.add(tableFilter, chainForward, "-m conntrack --ctstate INVALID "+comment(commentForward)+" -j DROP")
	}
	r.add(tableFilter, chainForward, "-m mark --mark "+mark+" "+comment(commentForward)+" -j ACCEPT")
	r.add(tableFilter, chainForward, "-m conntrack --ctstate RELATED,ESTABLISHED "+comment(commentForward)+" -j ACCEPT")
	r.add(tableNAT, chainPostrouting, "-m mark ! --mark "+mark+" "+comment(commentMasq)+" -j RETURN")
	r.add(tableNAT, chainPostrouting, comment(commentMasq)+" -j MARK --set-xmark "+r.masqMark+"/0x0")
	r.add(tableNAT, chainPostrouting, comment(commentMasq)+" -j MASQUERADE --random-fully")
	r.add(tableNAT, chainMarkMasq, comment(commentMasq)+" -j MARK --set-xmark "+mark)
	if len(r.cidrs) > 0 {
		for _, c := range r.cidrs {
			r.add(tableNAT, chainOffCluster, "-s "+c.String()+" "+comment(commentCIDR)+" -j RETURN")
		}
		r.add(tableNAT, chainOffCluster, comment(commentMasq)+" -j MARK --set-xmark "+mark)
	}
	for _, c := range []tableChain{{tableNAT, chainServices}, {tableFilter, chainFilter}, {tableFilter, chainForward},
		{tableNAT, chainPostrouting}, {tableNAT, chainMarkMasq}, {tableNAT, chainOffCluster}} {
		p.always[c] = true
	}
}
