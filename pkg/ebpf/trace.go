//go:build linux

package ebpf

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/trace"
)

// The trace protocol of the tc program (bpf/trace.h), generated from its
// enums.
const (
	traceMark           = uint32(traceTraceMarkSVCNAT_TRACE_MARK)
	traceMagic          = uint32(traceTraceMarkSVCNAT_TRACE_MAGIC)
	traceFlagPinned     = uint32(traceTraceFlagTRACE_F_PINNED)
	traceFlagMasquerade = uint32(traceTraceFlagTRACE_F_MASQUERADE)
	// maxTraceSlots bounds the test runs of one trace (one per slot).
	maxTraceSlots = 4096
)

// traceSkb is struct __sk_buff up to cb[], what a test run of a tc
// program may set and returns.
type traceSkb struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority, IngressIfindex, Ifindex, TCIndex uint32
	CB                                                                                                                      [5]uint32
}

// traceSkbOut is room for the whole struct __sk_buff a test run returns:
// the kernel refuses (ENOSPC) a smaller buffer, and its struct grows.
type traceSkbOut struct {
	traceSkb
	_ [256]byte
}

var traceVerdicts = map[traceTraceVerdict]string{
	traceTraceVerdictTRACE_NOT_SERVICE:  "no frontend in svcnat_services",
	traceTraceVerdictTRACE_FLOW_EXISTS:  "conntrack already tracks the flow: the kernel translates it as before",
	traceTraceVerdictTRACE_NOT_SYN:      "TCP without SYN and no flow: passed to the stack",
	traceTraceVerdictTRACE_SOURCE_RANGE: "source outside loadBalancerSourceRanges: dropped",
	traceTraceVerdictTRACE_REJECT:       "no endpoint: rejected",
	traceTraceVerdictTRACE_NO_LOCAL:     "Local policy without a local endpoint: dropped",
	traceTraceVerdictTRACE_NO_ROUTE:     "no route to masquerade toward the endpoint: dropped",
	traceTraceVerdictTRACE_FORWARD:      "translated",
}

func verdictOf(v traceTraceVerdict) trace.Verdict {
	switch v {
	case traceTraceVerdictTRACE_FORWARD:
		return trace.Forward
	case traceTraceVerdictTRACE_REJECT:
		return trace.Reject
	case traceTraceVerdictTRACE_SOURCE_RANGE, traceTraceVerdictTRACE_NO_LOCAL, traceTraceVerdictTRACE_NO_ROUTE:
		return trace.Drop
	case traceTraceVerdictTRACE_FLOW_EXISTS:
		return trace.Existing
	}
	return trace.Untouched
}

// Trace runs the datapath itself on q's first packet and decodes its
// answer. From outside: the tc ingress program attached to q.Interface
// (the first attached one when empty) runs on a synthesized packet, once per
// slot of the endpoint set it picks (BPF_PROG_TEST_RUN; bpf/trace.h says
// why nothing is written). From a pod or the node: trace.c's program, made
// of the connect hooks' own functions, runs against the pinned maps. The
// frontend and policy come from the pinned maps (Dump). It needs no Init
// and changes no kernel state.
func (b *Backend) Trace(ctx context.Context, q trace.Query) (*trace.Result, error) {
	ms, closeAll, err := b.pinnedMaps()
	if err != nil {
		return nil, fmt.Errorf("trace: %w", err)
	}
	defer closeAll()
	if ms == nil {
		return nil, fmt.Errorf("trace: no svcnat maps pinned under %s: is the eBPF backend running here?", b.opts.BPFFSPath)
	}
	t, err := readTable(ms)
	if err != nil {
		return nil, fmt.Errorf("trace: %w", err)
	}
	s, _, err := decode(t)
	if err != nil {
		return nil, fmt.Errorf("trace: %w", err)
	}
	res := &trace.Result{Backend: "ebpf", Query: q}
	trace.Describe(res, s)
	if q.Origin == trace.FromOutside {
		err = b.traceTC(res, t, q.Interface)
	} else {
		err = b.traceConnect(res, t)
	}
	if err != nil {
		return nil, err
	}
	trace.Finish(res)
	return res, nil
}

// endpointOf returns the endpoint of backend id in t.
func endpointOf(t *table, id uint32) (netip.AddrPort, error) {
	be, ok := t.backends[id]
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("trace: the program chose backend %d, which svcnat_backends no longer holds (a sync in progress?)", id)
	}
	ep, err := decodeBackend(be)
	return netip.AddrPortFrom(ep.IP, ep.Port), err
}

// slotAnswer is the datapath's answer to a trace of one slot: the
// verdict, the endpoint set, the number of endpoints in it, the
// ServicePort id, the backend id and the outcome's extra fields.
type slotAnswer struct {
	verdict        traceTraceVerdict
	set            uint8
	count, id, bid uint32
	outcome        trace.Outcome
}

// slotRuns runs once per slot of the set the first run names, through run,
// and adds every outcome to res. A slot that t shows missing or naming a
// missing backend (a write in progress) is said to take slot 0's endpoint,
// as lb_slot does.
func slotRuns(res *trace.Result, t *table, run func(slot uint32) (slotAnswer, error)) error {
	a, err := run(0)
	if err != nil {
		return err
	}
	o := a.outcome
	o.Verdict = verdictOf(a.verdict)
	o.Probability, o.Slot = 1, -1
	// A reject with endpoints counted is a slot's miss: the other slots
	// may still forward.
	if a.verdict != traceTraceVerdictTRACE_FORWARD && (a.verdict != traceTraceVerdictTRACE_REJECT || a.count == 0) {
		res.Steps = append(res.Steps, traceVerdicts[a.verdict])
		res.Outcomes = append(res.Outcomes, o)
		return nil
	}
	set, count := a.set, a.count
	if int(set) < len(setNames) && res.Policy != nil {
		res.Policy.EndpointSet = setNames[set]
	}
	if o.Pinned {
		ep, err := endpointOf(t, a.bid)
		if err != nil {
			return err
		}
		o.Endpoint = ep
		if res.Policy != nil {
			res.Policy.PinnedTo = ep
		}
		res.Steps = append(res.Steps, fmt.Sprintf("session affinity entry of the client names %s (a member of the %s set): chosen", ep, setNames[set]))
		res.Outcomes = append(res.Outcomes, o)
		return nil
	}
	if count > maxTraceSlots {
		return fmt.Errorf("trace: %d endpoints in the set: more than the %d slots a trace runs", count, maxTraceSlots)
	}
	res.Steps = append(res.Steps, fmt.Sprintf("%s set: %d slots, each chosen with probability 1/%d (bpf_get_prandom_u32() %% %d)", setNames[min(int(set), 1)], count, count, count))
	for slot := range count {
		if slot > 0 {
			if a, err = run(slot); err != nil {
				return err
			}
			o = a.outcome
			o.Verdict = verdictOf(a.verdict)
		}
		o.Probability, o.Slot = 1/float64(count), int(slot)
		step := fmt.Sprintf("slot %d: ", slot)
		if _, _, ok := t.slotBackend(a.id, set, slot); !ok {
			step += "missing or naming a missing backend (a write in progress), "
			if slot > 0 {
				step += "slot 0 taken instead, "
				o.Slot = 0
			}
		}
		step += traceVerdicts[a.verdict]
		if a.verdict == traceTraceVerdictTRACE_FORWARD {
			if o.Endpoint, err = endpointOf(t, a.bid); err != nil {
				return err
			}
			step += " to " + o.Endpoint.String()
		}
		if o.Masquerade {
			step += ", masqueraded"
			if o.MasqueradeAddress.IsValid() {
				step += " from " + o.MasqueradeAddress.String()
			}
		}
		res.Steps = append(res.Steps, step)
		res.Outcomes = append(res.Outcomes, o)
	}
	return nil
}

// traceTC runs the tc ingress program attached to iface.
func (b *Backend) traceTC(res *trace.Result, t *table, iface string) error {
	q := res.Query
	pin, err := b.tcLinkPin(iface)
	if err != nil {
		return err
	}
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return fmt.Errorf("trace: open tc link %s: %w", pin, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil || info.TCX() == nil {
		return fmt.Errorf("trace: tc link %s: not a TCX link (%v)", pin, err)
	}
	prog, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		return fmt.Errorf("trace: open the loaded tc program (id %d): %w", info.Program, err)
	}
	defer prog.Close()
	dev, err := netlink.LinkByIndex(int(info.TCX().Ifindex))
	if err != nil {
		return fmt.Errorf("trace: interface %d of tc link %s: %w", info.TCX().Ifindex, pin, err)
	}
	if q.Protocol == model.SCTP {
		res.Steps = append(res.Steps, fmt.Sprintf("tc program on %s: SCTP is passed on untranslated (the conntrack kfuncs take TCP and UDP)", dev.Attrs().Name))
		res.Outcomes = append(res.Outcomes, trace.Outcome{Probability: 1, Verdict: trace.Untouched, Slot: -1})
		return nil
	}
	frame := synthesize(q, dev.Attrs().HardwareAddr, dev.Attrs().EncapType == "ether")
	pinfo, _ := prog.Info()
	res.Steps = append(res.Steps, fmt.Sprintf("tc ingress program %s (id %d) attached to %s, test run of a synthesized first packet %s -> %s",
		pinfo.Name, info.Program, dev.Attrs().Name, q.SourceAddrPort(), q.To))
	index := uint32(dev.Attrs().Index)
	err = slotRuns(res, t, func(slot uint32) (slotAnswer, error) {
		in := traceSkb{Mark: traceMark, Ifindex: index, IngressIfindex: index, CB: [5]uint32{traceMagic, slot}}
		var out traceSkbOut
		if _, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256), Context: in, ContextOut: &out}); err != nil {
			return slotAnswer{}, fmt.Errorf("trace: test run of the tc program: %w", err)
		}
		if out.CB[0] == traceMagic {
			return slotAnswer{}, errors.New("trace: the tc program gave no trace answer (a program built before svcnat trace existed? restart the agent)")
		}
		o := trace.Outcome{Pinned: out.CB[0]>>16&traceFlagPinned != 0, Masquerade: out.CB[0]>>16&traceFlagMasquerade != 0}
		if o.Masquerade && out.CB[4] != 0 {
			o.MasqueradeAddress = netip.AddrFrom4([4]byte(binary.NativeEndian.AppendUint32(nil, out.CB[4])))
		}
		return slotAnswer{verdict: traceTraceVerdict(out.CB[0] & 0xff), set: uint8(out.CB[0] >> 8), count: out.CB[2], id: out.CB[3], bid: out.CB[1], outcome: o}, nil
	})
	if err != nil {
		return err
	}
	if res.Outcomes[0].Verdict == trace.Existing {
		res.Flows, err = trace.Flows(trace.Query{From: q.SourceAddrPort(), To: q.To, Protocol: q.Protocol})
	} else {
		res.Flows, err = trace.Flows(q)
	}
	return err
}

// tcLinkPin returns the pinned tc link of iface, or of the first
// interface with one.
func (b *Backend) tcLinkPin(iface string) (string, error) {
	dir := filepath.Join(b.opts.BPFFSPath, "links")
	if iface != "" {
		pin := filepath.Join(dir, "tc-"+iface+"-ingress")
		if _, err := os.Stat(pin); err != nil {
			return "", fmt.Errorf("trace: no svcnat tc program on interface %s (svcnat run --bpf-interfaces): %w", iface, err)
		}
		return pin, nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("trace: %w", err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "tc-") && strings.HasSuffix(e.Name(), "-ingress") {
			return filepath.Join(dir, e.Name()), nil
		}
	}
	return "", errors.New("trace: no svcnat tc program on any interface (svcnat run --bpf-interfaces): traffic from outside is not translated by svcnat on this node")
}

// synthesize builds the first packet of q's connection (a TCP SYN or a UDP
// datagram) addressed to mac, with an Ethernet header when ether. The
// checksums are left zero: the program does not check them.
func synthesize(q trace.Query, mac net.HardwareAddr, ether bool) []byte {
	src := q.SourceAddrPort()
	l4 := make([]byte, 8)
	proto := byte(unix.IPPROTO_UDP)
	if q.Protocol == model.TCP {
		proto = unix.IPPROTO_TCP
		l4 = make([]byte, 20)
		l4[12] = 5 << 4
		l4[13] = 0x02 // SYN
	} else {
		binary.BigEndian.PutUint16(l4[4:], 8)
	}
	binary.BigEndian.PutUint16(l4[0:], src.Port())
	binary.BigEndian.PutUint16(l4[2:], q.To.Port())
	var l3 []byte
	ethType := uint16(unix.ETH_P_IP)
	if src.Addr().Is4() {
		l3 = make([]byte, 20)
		l3[0] = 0x45
		binary.BigEndian.PutUint16(l3[2:], uint16(20+len(l4)))
		l3[8], l3[9] = 64, proto
		s, d := src.Addr().As4(), q.To.Addr().As4()
		copy(l3[12:], s[:])
		copy(l3[16:], d[:])
	} else {
		ethType = unix.ETH_P_IPV6
		l3 = make([]byte, 40)
		l3[0] = 0x60
		binary.BigEndian.PutUint16(l3[4:], uint16(len(l4)))
		l3[6], l3[7] = proto, 64
		s, d := src.Addr().As16(), q.To.Addr().As16()
		copy(l3[8:], s[:])
		copy(l3[24:], d[:])
	}
	var frame []byte
	if ether {
		eth := make([]byte, 14)
		copy(eth, mac)
		eth[6] = 0x02 // a locally administered source address
		binary.BigEndian.PutUint16(eth[12:], ethType)
		frame = eth
	}
	return slices.Concat(frame, l3, l4)
}

// traceConnect runs trace.c's program, the connect hooks' choice for a new
// socket, against the pinned maps.
func (b *Backend) traceConnect(res *trace.Result, t *table) error {
	q := res.Query
	hook := svcnatProgSvcnatConnect4
	if q.To.Addr().Is6() {
		hook = svcnatProgSvcnatConnect6
	}
	if _, err := os.Stat(filepath.Join(b.opts.BPFFSPath, "links", hook)); err != nil {
		res.Steps = append(res.Steps, fmt.Sprintf("warning: no pinned %s link: the hooks may not be attached", hook))
	}
	prog, closeMaps, err := b.loadTraceProgram()
	if err != nil {
		return err
	}
	defer closeMaps()
	proto, ok := protocols[q.Protocol]
	if !ok {
		return fmt.Errorf("trace: protocol %q", q.Protocol)
	}
	var in traceTraceConnect
	in.Key.Addr, in.Key.Port, in.Key.Proto = addr16(q.To.Addr()), htons(q.To.Port()), proto
	if q.Origin == trace.FromNode {
		if in.NetnsCookie, err = netnsCookie(); err != nil {
			return err
		}
		res.Steps = append(res.Steps, fmt.Sprintf("client: this network namespace (cookie %d), the key of its session affinity entries", in.NetnsCookie))
	} else {
		res.Steps = append(res.Steps, "client: a pod; its session affinity entry (keyed by its network namespace, which an address does not name) is not looked up")
	}
	res.Steps = append(res.Steps, fmt.Sprintf("connect hook %s: program %s (lb.h, as the hook chooses for a new socket), test run against the pinned maps", hook, traceProgSvcnatTraceConnect))
	return slotRuns(res, t, func(slot uint32) (slotAnswer, error) {
		in.Slot = slot
		var out traceTraceConnect
		if _, err := prog.Run(&ebpf.RunOptions{Context: in, ContextOut: &out}); err != nil {
			return slotAnswer{}, fmt.Errorf("trace: test run of %s: %w", traceProgSvcnatTraceConnect, err)
		}
		return slotAnswer{verdict: out.Verdict, set: out.Set, count: uint32(out.Count), id: out.Id, bid: out.BackendId, outcome: trace.Outcome{Pinned: out.Pinned != 0}}, nil
	})
}

// loadTraceProgram loads trace.c's program against the pinned maps it
// reads.
func (b *Backend) loadTraceProgram() (*ebpf.Program, func(), error) {
	spec, err := loadTrace()
	if err != nil {
		return nil, nil, err
	}
	layouts, err := loadSvcnat()
	if err != nil {
		return nil, nil, err
	}
	repl := map[string]*ebpf.Map{}
	closeMaps := func() {
		for _, m := range repl {
			m.Close()
		}
	}
	for _, name := range []string{svcnatMapSvcnatServices, svcnatMapSvcnatSlots, svcnatMapSvcnatMembers, svcnatMapSvcnatBackends, svcnatMapSvcnatAffinity} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(b.opts.BPFFSPath, pinName(name, layouts.Maps[name])), nil)
		if err != nil {
			closeMaps()
			return nil, nil, fmt.Errorf("trace: open pinned map %s: %w", name, err)
		}
		repl[name] = m
		spec.Maps[name].MaxEntries = m.MaxEntries()
		spec.Maps[name].Pinning = ebpf.PinNone
	}
	var objs struct {
		Prog *ebpf.Program `ebpf:"svcnat_trace_connect"`
	}
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		closeMaps()
		return nil, nil, fmt.Errorf("trace: load %s: %w", traceProgSvcnatTraceConnect, err)
	}
	return objs.Prog, func() { objs.Prog.Close(); closeMaps() }, nil
}

// netnsCookie returns the cookie of this network namespace, the client
// key of its sockets' session affinity entries.
func netnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("trace: network namespace cookie: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("trace: network namespace cookie (Linux 5.14): %w", err)
	}
	return c, nil
}
