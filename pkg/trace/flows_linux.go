//go:build linux

package trace

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/model"
)

// maxFlows bounds the conntrack entries a trace shows.
const maxFlows = 10

// tcpStates names conntrack's TCP states (enum tcp_conntrack).
var tcpStates = []string{"NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2"}

var protoNumbers = map[model.Protocol]uint8{model.TCP: unix.IPPROTO_TCP, model.UDP: unix.IPPROTO_UDP, model.SCTP: unix.IPPROTO_SCTP}

// Flows returns the conntrack entries of this network namespace whose
// original direction goes from q.From (any port when it has none) to q.To,
// at most maxFlows of them.
func Flows(q Query) ([]Flow, error) {
	family := netlink.InetFamily(unix.AF_INET)
	if q.To.Addr().Is6() {
		family = unix.AF_INET6
	}
	all, err := netlink.ConntrackTableList(netlink.ConntrackTable, family)
	if err != nil {
		return nil, fmt.Errorf("trace: read conntrack table: %w", err)
	}
	var out []Flow
	for _, f := range all {
		src, _ := netip.AddrFromSlice(f.Forward.SrcIP)
		dst, _ := netip.AddrFromSlice(f.Forward.DstIP)
		if f.Forward.Protocol != protoNumbers[q.Protocol] || src.Unmap() != q.From.Addr() || dst.Unmap() != q.To.Addr() ||
			f.Forward.DstPort != q.To.Port() || (q.From.Port() != 0 && f.Forward.SrcPort != q.From.Port()) {
			continue
		}
		fl := Flow{
			Original: fmt.Sprintf("%s -> %s", netip.AddrPortFrom(src.Unmap(), f.Forward.SrcPort), q.To),
			Reply:    fmt.Sprintf("%s -> %s", addrPort(f.Reverse.SrcIP, f.Reverse.SrcPort), addrPort(f.Reverse.DstIP, f.Reverse.DstPort)),
			Mark:     f.Mark,
		}
		if tcp, ok := f.ProtoInfo.(*netlink.ProtoInfoTCP); ok && int(tcp.State) < len(tcpStates) {
			fl.State = tcpStates[tcp.State]
		}
		out = append(out, fl)
		if len(out) == maxFlows {
			break
		}
	}
	return out, nil
}

func addrPort(ip []byte, port uint16) netip.AddrPort {
	a, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(a.Unmap(), port)
}
