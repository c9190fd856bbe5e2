package ebpf

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// The datapath's values, generated from the enums of bpf/svcnat.h. The map
// fields that hold them are bytes: a value that does not fit one fails to
// compile here.
const (
	kindClusterIP    = uint8(svcnatFrontendKindSVCNAT_KIND_CLUSTER_IP)
	kindNodePort     = uint8(svcnatFrontendKindSVCNAT_KIND_NODE_PORT)
	kindExternalIP   = uint8(svcnatFrontendKindSVCNAT_KIND_EXTERNAL_IP)
	kindLoadBalancer = uint8(svcnatFrontendKindSVCNAT_KIND_LOAD_BALANCER)

	flagInternalLocal = uint8(svcnatSvcFlagSVCNAT_F_INTERNAL_LOCAL)
	flagExternalLocal = uint8(svcnatSvcFlagSVCNAT_F_EXTERNAL_LOCAL)
	flagSourceRanges  = uint8(svcnatSvcFlagSVCNAT_F_SOURCE_RANGES)

	setCluster = uint8(svcnatEndpointSetSVCNAT_SET_CLUSTER)
	setLocal   = uint8(svcnatEndpointSetSVCNAT_SET_LOCAL)
	setServing = uint8(svcnatEndpointSetSVCNAT_SET_SERVING)

	backendLocal = uint8(svcnatBackendFlagSVCNAT_BACKEND_LOCAL)
)

// IP protocol numbers (IANA; IPPROTO_* in C), as svc_key.proto holds them.
const (
	protoTCP  = 6
	protoUDP  = 17
	protoSCTP = 132
)

var kinds = map[model.FrontendKind]uint8{
	model.ClusterIP:    kindClusterIP,
	model.NodePort:     kindNodePort,
	model.ExternalIP:   kindExternalIP,
	model.LoadBalancer: kindLoadBalancer,
}

var protocols = map[model.Protocol]uint8{
	model.TCP:  protoTCP,
	model.UDP:  protoUDP,
	model.SCTP: protoSCTP,
}

// table is the content of the maps that hold the desired state (not the
// LRU maps the datapath writes itself), one Go map per BPF map.
type table struct {
	services     map[svcnatSvcKey]svcnatSvcValue
	info         map[uint32]svcnatSvcInfo
	slots        map[svcnatSlotKey]uint32
	members      map[svcnatMemberKey]uint8
	backends     map[uint32]svcnatBackend
	sourceRanges map[svcnatSourceRangeKey]uint8
	clusterCIDRs map[svcnatCidrKey]uint8
}

func newTable() *table {
	return &table{
		services:     map[svcnatSvcKey]svcnatSvcValue{},
		info:         map[uint32]svcnatSvcInfo{},
		slots:        map[svcnatSlotKey]uint32{},
		members:      map[svcnatMemberKey]uint8{},
		backends:     map[uint32]svcnatBackend{},
		sourceRanges: map[svcnatSourceRangeKey]uint8{},
		clusterCIDRs: map[svcnatCidrKey]uint8{},
	}
}

// ids hands out the numbers that name ServicePorts and endpoints in the maps.
// A number stays with its ServicePort or endpoint while it exists, and a
// released number is not handed out again until the counter wraps, so a slot
// that still names an endpoint removed by the write in progress never sees
// another endpoint under that number. Endpoints are keyed by their map
// value: 20 bytes without pointers, which the garbage collector need not
// scan, where a model.Endpoint has 32 with one.
//
// ids keeps one index, key to number. The other way, the tables are the
// index: once the counter wraps, a number is free when neither the table
// the maps hold nor the one being encoded uses it. A second map here was a
// tenth of the reconciler's heap.
type ids struct {
	services numbering[model.ServicePortName]
	backends numbering[svcnatBackend]
}

type numbering[K comparable] struct {
	byKey map[K]uint32
	next  uint32
}

func newNumbering[K comparable]() numbering[K] {
	return numbering[K]{byKey: map[K]uint32{}, next: 1}
}

func (n *numbering[K]) set(k K, id uint32) {
	n.next = max(n.next, id+1)
	if old, ok := n.byKey[k]; !ok || id < old {
		n.byKey[k] = id
	}
}

// get returns k's number, giving it the next one used says is free if it
// has none.
func (n *numbering[K]) get(k K, used func(uint32) bool) uint32 {
	if id, ok := n.byKey[k]; ok {
		return id
	}
	for {
		id := n.next
		n.next++
		if id != 0 && !used(id) {
			n.byKey[k] = id
			return id
		}
	}
}

// reserve makes room for size keys when n holds fewer than half as many:
// growing the map key by key was a tenth of the first sync at 10,000
// Services.
func (n *numbering[K]) reserve(size int) {
	if len(n.byKey) >= size/2 {
		return
	}
	byKey := make(map[K]uint32, size)
	maps.Copy(byKey, n.byKey)
	n.byKey = byKey
}

// keep forgets the numbers for which live is false.
func (n *numbering[K]) keep(live func(uint32) bool) {
	maps.DeleteFunc(n.byKey, func(_ K, id uint32) bool { return !live(id) })
}

// forget drops k's number, if it is id.
func (n *numbering[K]) forget(k K, id uint32) {
	if n.byKey[k] == id {
		delete(n.byKey, k)
	}
}

func newIDs() *ids {
	return &ids{services: newNumbering[model.ServicePortName](), backends: newNumbering[svcnatBackend]()}
}

// service returns name's number; a new one is one neither held, the table
// the maps hold, nor t uses.
func (n *ids) service(name model.ServicePortName, held, t *table) uint32 {
	return n.services.get(name, func(id uint32) bool { return hasKey(held.info, id) || hasKey(t.info, id) })
}

// backend returns b's number, as service does.
func (n *ids) backend(b svcnatBackend, held, t *table) uint32 {
	return n.backends.get(b, func(id uint32) bool { return hasKey(held.backends, id) || hasKey(t.backends, id) })
}

func hasKey[K comparable, V any](m map[K]V, k K) bool {
	_, ok := m[k]
	return ok
}

// adoptIDs continues the numbering found in t, as written by an earlier
// run. The counter starts after every number any entry uses, also one a
// failed write left without Service info or slot, or whose Service info
// does not decode, so that no number is reused while an entry still holds
// it.
func adoptIDs(t *table) *ids {
	n := newIDs()
	for id, info := range t.info {
		name, _, err := decodeInfo(info)
		if err != nil {
			// Garbage (written by hand?): its number stays unused, and
			// the sync deletes the entry as nothing wants it.
			n.services.next = max(n.services.next, id+1)
			continue
		}
		n.services.set(name, id)
	}
	for id, b := range t.backends {
		n.backends.set(b, id)
	}
	for _, v := range t.services {
		n.services.next = max(n.services.next, v.Id+1)
	}
	for k, bid := range t.slots {
		n.services.next = max(n.services.next, k.Id+1)
		n.backends.next = max(n.backends.next, bid+1)
	}
	for k := range t.members {
		n.services.next = max(n.services.next, k.Id+1)
		n.backends.next = max(n.backends.next, k.BackendId+1)
	}
	for k := range t.sourceRanges {
		n.services.next = max(n.services.next, k.Id+1)
	}
	return n
}

// release forgets the numbers t does not use, once t is all the kernel
// holds.
func (n *ids) release(t *table) {
	n.services.keep(func(id uint32) bool { return hasKey(t.info, id) })
	n.backends.keep(func(id uint32) bool { return hasKey(t.backends, id) })
}

// fragment is what the reconciler remembers of one ServicePort: the keys
// of its entries in a table, which holds the values. Its slots are
// [0, cluster) and [0, local) of its two sets, and its members the
// backends those slots name plus serving. It holds no maps: at 10,000
// Services, a copy of the entries per ServicePort beside the table was half
// the agent's heap.
type fragment struct {
	id             uint32
	udp            bool   // the ServicePort's protocol is UDP
	cluster, local uint16 // how many slots each set has
	frontends      []svcnatSvcKey
	serving        []uint32 // the backends of the serving set (UDP only)
	sourceRanges   []svcnatSourceRangeKey
}

// slotSets are a fragment's slot sets with their sizes.
func (f *fragment) slotSets() [2]struct {
	set uint8
	n   uint16
} {
	return [2]struct {
		set uint8
		n   uint16
	}{{setCluster, f.cluster}, {setLocal, f.local}}
}

// copyTo copies f's entries, the backends it names included, from src to
// dst.
func (f *fragment) copyTo(dst, src *table) {
	dst.info[f.id] = src.info[f.id]
	for _, k := range f.frontends {
		dst.services[k] = src.services[k]
	}
	member := func(bid uint32, set uint8) {
		k := svcnatMemberKey{Id: f.id, BackendId: bid, Set: set}
		dst.members[k] = src.members[k]
		dst.backends[bid] = src.backends[bid]
	}
	for _, s := range f.slotSets() {
		for i := range s.n {
			k := svcnatSlotKey{Id: f.id, Slot: i, Set: s.set}
			bid := src.slots[k]
			dst.slots[k] = bid
			member(bid, s.set)
		}
	}
	for _, bid := range f.serving {
		member(bid, setServing)
	}
	for _, k := range f.sourceRanges {
		dst.sourceRanges[k] = src.sourceRanges[k]
	}
}

// appendBackendIDs appends the backends f names in t, each once, to buf.
func (f *fragment) appendBackendIDs(buf []uint32, t *table) []uint32 {
	start := len(buf)
	buf = append(buf, f.serving...)
	for _, s := range f.slotSets() {
		for i := range s.n {
			buf = append(buf, t.slots[svcnatSlotKey{Id: f.id, Slot: i, Set: s.set}])
		}
	}
	slices.Sort(buf[start:])
	return buf[:start+len(slices.Compact(buf[start:]))]
}

// encode turns s into map entries, numbering ServicePorts and endpoints with
// n (new numbers are ones held, what the maps hold, does not use), and
// returns them, with the fragment of each ServicePort. A ServicePort
// that cannot be encoded, or that claims a frontend a ServicePort before it
// in name order has, fails alone: it is in failed, with no entries.
func encode(s *model.State, n *ids, held *table) (*table, map[model.ServicePortName]fragment, dataplane.PortErrors) {
	sorted := s.Sorted()
	// Sized from the start: growing the maps entry by entry cost a quarter
	// of the first sync at 10,000 Services.
	var frontends, endpoints, slots int
	for _, sp := range sorted {
		frontends += len(sp.Frontends)
		endpoints += len(sp.ClusterEndpoints)
		slots += len(sp.ClusterEndpoints) + len(sp.LocalEndpoints)
	}
	n.services.reserve(len(sorted))
	n.backends.reserve(endpoints)
	t := &table{
		services:     make(map[svcnatSvcKey]svcnatSvcValue, frontends),
		info:         make(map[uint32]svcnatSvcInfo, len(sorted)),
		slots:        make(map[svcnatSlotKey]uint32, slots),
		members:      make(map[svcnatMemberKey]uint8, slots),
		backends:     make(map[uint32]svcnatBackend, endpoints),
		sourceRanges: map[svcnatSourceRangeKey]uint8{},
		clusterCIDRs: encodeClusterCIDRs(s.ClusterCIDRs),
	}
	frags := make(map[model.ServicePortName]fragment, len(sorted))
	failed := dataplane.PortErrors{}
	for _, sp := range sorted {
		f, err := encodeServicePort(sp, n, held, t)
		if err != nil {
			failed[sp.Name] = err
			continue
		}
		frags[sp.Name] = f
	}
	return t, frags, failed
}

func encodeClusterCIDRs(cidrs []netip.Prefix) map[svcnatCidrKey]uint8 {
	out := make(map[svcnatCidrKey]uint8, len(cidrs))
	for _, p := range cidrs {
		out[svcnatCidrKey{Prefixlen: uint32(mappedBits(p)), Addr: addr16(p.Addr())}] = 1
	}
	return out
}

func encodeBackend(ep model.Endpoint) svcnatBackend {
	b := svcnatBackend{Addr: addr16(ep.IP), Port: htons(ep.Port)}
	if ep.Local {
		b.Flags |= backendLocal
	}
	return b
}

// encodeServicePort adds the entries of one ServicePort to t and returns
// its fragment, numbered as encode does. It fails, adding nothing, when sp
// cannot be encoded or one of its frontends is one of another ServicePort
// in t.
func encodeServicePort(sp *model.ServicePort, n *ids, held, t *table) (fragment, error) {
	proto, ok := protocols[sp.Protocol]
	if !ok {
		return fragment{}, fmt.Errorf("encode service port %s: unknown protocol %q", sp.Name, sp.Protocol)
	}
	info, err := encodeInfo(sp, proto)
	if err != nil {
		return fragment{}, err
	}
	if len(sp.ClusterEndpoints) > 0xffff || len(sp.LocalEndpoints) > 0xffff {
		return fragment{}, fmt.Errorf("encode service port %s: more than 65535 endpoints", sp.Name)
	}
	if sp.AffinityTimeout%time.Second != 0 || sp.AffinityTimeout < 0 || sp.AffinityTimeout/time.Second > 1<<32-1 {
		return fragment{}, fmt.Errorf("encode service port %s: affinity timeout %s is not a whole number of seconds that fits 32 bits", sp.Name, sp.AffinityTimeout)
	}
	f := fragment{
		udp:       proto == protoUDP,
		cluster:   uint16(len(sp.ClusterEndpoints)),
		local:     uint16(len(sp.LocalEndpoints)),
		frontends: make([]svcnatSvcKey, len(sp.Frontends)),
	}
	for i, fe := range sp.Frontends {
		if _, ok := kinds[fe.Kind]; !ok {
			return fragment{}, fmt.Errorf("encode service port %s: unknown frontend kind %q", sp.Name, fe.Kind)
		}
		key := svcnatSvcKey{Addr: addr16(fe.IP), Port: htons(fe.Port), Proto: proto}
		if other, dup := t.services[key]; dup {
			owner, _, _ := decodeInfo(t.info[other.Id])
			return fragment{}, fmt.Errorf("encode service port %s: frontend %s port %d is also a frontend of %s", sp.Name, fe.IP, fe.Port, owner)
		}
		f.frontends[i] = key
	}
	id := n.service(sp.Name, held, t)
	f.id = id
	t.info[id] = info
	backend := func(ep model.Endpoint) uint32 {
		b := encodeBackend(ep)
		bid := n.backend(b, held, t)
		t.backends[bid] = b
		return bid
	}
	for set, eps := range [][]model.Endpoint{setCluster: sp.ClusterEndpoints, setLocal: sp.LocalEndpoints} {
		for i, ep := range eps {
			bid := backend(ep)
			t.slots[svcnatSlotKey{Id: id, Slot: uint16(i), Set: uint8(set)}] = bid
			t.members[svcnatMemberKey{Id: id, BackendId: bid, Set: uint8(set)}] = 1
		}
	}
	if proto == protoUDP && len(sp.ServingEndpoints) > 0 {
		f.serving = make([]uint32, 0, len(sp.ServingEndpoints))
		for _, ep := range sp.ServingEndpoints {
			bid := backend(ep)
			f.serving = append(f.serving, bid)
			t.members[svcnatMemberKey{Id: id, BackendId: bid, Set: setServing}] = 1
		}
	}
	value := svcnatSvcValue{
		Id:              id,
		ClusterCount:    f.cluster,
		LocalCount:      f.local,
		AffinityTimeout: uint32(sp.AffinityTimeout / time.Second),
	}
	if sp.InternalTrafficLocal {
		value.Flags |= flagInternalLocal
	}
	if sp.ExternalTrafficLocal {
		value.Flags |= flagExternalLocal
	}
	if len(sp.SourceRanges) > 0 {
		value.Flags |= flagSourceRanges
		f.sourceRanges = make([]svcnatSourceRangeKey, len(sp.SourceRanges))
	}
	for i, p := range sp.SourceRanges {
		f.sourceRanges[i] = svcnatSourceRangeKey{Prefixlen: 32 + uint32(mappedBits(p)), Id: id, Addr: addr16(p.Addr())}
		t.sourceRanges[f.sourceRanges[i]] = 1
	}
	for i, key := range f.frontends {
		v := value
		v.Kind = kinds[sp.Frontends[i].Kind]
		t.services[key] = v
	}
	return f, nil
}

func encodeInfo(sp *model.ServicePort, proto uint8) (svcnatSvcInfo, error) {
	info := svcnatSvcInfo{Proto: proto, HealthCheckNodePort: sp.HealthCheckNodePort}
	switch sp.Name.Family {
	case model.IPv4:
		info.Family = 4
	case model.IPv6:
		info.Family = 6
	default:
		return info, fmt.Errorf("encode service port %s: unknown family %q", sp.Name, sp.Name.Family)
	}
	for _, f := range []struct {
		dst   []int8
		value string
		what  string
	}{
		{info.Namespace[:], sp.Name.Namespace, "namespace"},
		{info.Name[:], sp.Name.Name, "name"},
		{info.PortName[:], sp.Name.Port, "port name"},
	} {
		if len(f.value) >= len(f.dst) || bytes.IndexByte([]byte(f.value), 0) >= 0 {
			return info, fmt.Errorf("encode service port %s: %s %q longer than %d bytes or holds NUL", sp.Name, f.what, f.value, len(f.dst)-1)
		}
		for i := range len(f.value) {
			f.dst[i] = int8(f.value[i])
		}
	}
	return info, nil
}

func cString(b []int8) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		out = append(out, byte(c))
	}
	return string(out)
}

func decodeInfo(info svcnatSvcInfo) (model.ServicePortName, model.Protocol, error) {
	name := model.ServicePortName{
		Namespace: cString(info.Namespace[:]),
		Name:      cString(info.Name[:]),
		Port:      cString(info.PortName[:]),
	}
	switch info.Family {
	case 4:
		name.Family = model.IPv4
	case 6:
		name.Family = model.IPv6
	default:
		return name, "", fmt.Errorf("decode service port %s: unknown family %d", name, info.Family)
	}
	for p, n := range protocols {
		if n == info.Proto {
			return name, p, nil
		}
	}
	return name, "", fmt.Errorf("decode service port %s: unknown protocol %d", name, info.Proto)
}

func decodeBackend(b svcnatBackend) (model.Endpoint, error) {
	ip, ok := netip.AddrFromSlice(b.Addr[:])
	if !ok {
		return model.Endpoint{}, fmt.Errorf("decode backend address %x", b.Addr)
	}
	return model.Endpoint{IP: ip.Unmap(), Port: ntohs(b.Port), Local: b.Flags&backendLocal != 0}, nil
}

// tornSet is an endpoint set that a write in progress has torn, as a
// reader racing it meets the maps: the set's count covers slots that are
// missing or that name a missing backend.
type tornSet struct {
	name  model.ServicePortName
	set   uint8
	count uint16
	slots []uint16 // the slots below count without an endpoint
}

func (ts tornSet) String() string {
	return fmt.Sprintf("%s %s set: slots %v of %d missing or naming a missing backend; the datapath takes slot 0 for them, and refuses when slot 0 is one",
		ts.name, setNames[ts.set], ts.slots, ts.count)
}

// setNames names the endpoint sets (SVCNAT_SET_*).
var setNames = []string{setCluster: "cluster", setLocal: "local", setServing: "serving"}

// decode turns map entries back into the State they program. It reports
// entries that no ServicePort explains, so that Dump shows leftovers as
// errors rather than hiding them. A set torn by a write in progress is
// read as the datapath reads it (decodeSet) and listed in torn.
func decode(t *table) (s *model.State, torn []tornSet, err error) {
	s = &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	for k := range t.clusterCIDRs {
		p, err := decodePrefix(k.Addr, k.Prefixlen)
		if err != nil {
			return nil, nil, fmt.Errorf("decode cluster CIDR: %w", err)
		}
		s.ClusterCIDRs = append(s.ClusterCIDRs, p)
	}
	slices.SortFunc(s.ClusterCIDRs, comparePrefix)

	byID := map[uint32]*model.ServicePort{}
	for id, info := range t.info {
		name, proto, err := decodeInfo(info)
		if err != nil {
			return nil, nil, err
		}
		if _, dup := s.ServicePorts[name]; dup {
			return nil, nil, fmt.Errorf("decode service port %s: programmed twice", name)
		}
		sp := &model.ServicePort{Name: name, Protocol: proto, HealthCheckNodePort: info.HealthCheckNodePort}
		s.ServicePorts[name] = sp
		byID[id] = sp
	}

	values := map[uint32]svcnatSvcValue{}
	for k, v := range t.services {
		sp := byID[v.Id]
		if sp == nil {
			return nil, nil, fmt.Errorf("decode frontend %x port %d: unknown service port %d", k.Addr, ntohs(k.Port), v.Id)
		}
		if k.Proto != protocols[sp.Protocol] {
			return nil, nil, fmt.Errorf("decode service port %s: frontend protocol %d", sp.Name, k.Proto)
		}
		var kind model.FrontendKind
		for fk, n := range kinds {
			if n == v.Kind {
				kind = fk
			}
		}
		if kind == "" {
			return nil, nil, fmt.Errorf("decode service port %s: unknown frontend kind %d", sp.Name, v.Kind)
		}
		ip, _ := netip.AddrFromSlice(k.Addr[:])
		sp.Frontends = append(sp.Frontends, model.Frontend{Kind: kind, IP: ip.Unmap(), Port: ntohs(k.Port)})
		common := v
		common.Kind = 0
		if prev, seen := values[v.Id]; seen && prev != common {
			return nil, nil, fmt.Errorf("decode service port %s: frontends disagree on counts or flags", sp.Name)
		}
		values[v.Id] = common
	}

	for id, sp := range byID {
		slices.SortFunc(sp.Frontends, func(a, b model.Frontend) int {
			return cmp.Or(cmp.Compare(a.Kind, b.Kind), a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
		})
		v, hasFrontend := values[id]
		for i, count := range [...]uint16{setCluster: v.ClusterCount, setLocal: v.LocalCount} {
			set := uint8(i)
			eps, missing, err := decodeSet(t, id, set, count, hasFrontend)
			if err != nil {
				return nil, nil, fmt.Errorf("decode service port %s: %w", sp.Name, err)
			}
			if len(missing) > 0 {
				torn = append(torn, tornSet{name: sp.Name, set: set, count: count, slots: missing})
			}
			if set == setCluster {
				sp.ClusterEndpoints = eps
			} else {
				sp.LocalEndpoints = eps
			}
		}
		sp.InternalTrafficLocal = v.Flags&flagInternalLocal != 0
		sp.ExternalTrafficLocal = v.Flags&flagExternalLocal != 0
		sp.AffinityTimeout = time.Duration(v.AffinityTimeout) * time.Second
	}
	slices.SortFunc(torn, func(a, b tornSet) int { return cmp.Or(a.name.Compare(b.name), cmp.Compare(a.set, b.set)) })

	for k := range t.sourceRanges {
		sp := byID[k.Id]
		if sp == nil {
			return nil, nil, fmt.Errorf("decode source range: unknown service port %d", k.Id)
		}
		p, err := decodePrefix(k.Addr, k.Prefixlen-32)
		if err != nil {
			return nil, nil, fmt.Errorf("decode service port %s: source range: %w", sp.Name, err)
		}
		sp.SourceRanges = append(sp.SourceRanges, p)
	}
	for _, sp := range byID {
		slices.SortFunc(sp.SourceRanges, comparePrefix)
	}
	return s, torn, nil
}

// slotBackend returns the backend in slot of set of ServicePort id and its
// id; false when the slot is missing or names a missing backend.
func (t *table) slotBackend(id uint32, set uint8, slot uint32) (uint32, svcnatBackend, bool) {
	bid, ok := t.slots[svcnatSlotKey{Id: id, Slot: uint16(slot), Set: set}]
	b, found := t.backends[bid]
	return bid, b, ok && found
}

// decodeSet reads the endpoints in slots [0, count) of one set as the
// datapath reads them (lb_slot, bpf/lb.h): a slot a write in progress has
// deleted, or whose backend it has deleted, takes slot 0's endpoint (or
// none, with slot 0 gone too), so it adds no endpoint of its own and is
// listed in missing. Every endpoint read must have its membership entry:
// without it affinity and stickiness are lost. (An extra membership is not
// checked: writes put memberships before slots and delete them after, so
// one shows for a moment during every change; CheckDrift finds drift.) Without a frontend there is no count; then the slots present
// from 0 on are read.
func decodeSet(t *table, id uint32, set uint8, count uint16, counted bool) (eps []model.Endpoint, missing []uint16, err error) {
	for i := uint32(0); i <= 0xffff; i++ {
		if counted && i >= uint32(count) {
			break
		}
		bid, b, ok := t.slotBackend(id, set, i)
		if !ok {
			// Without a count, the first missing slot ends the set.
			if _, slot := t.slots[svcnatSlotKey{Id: id, Slot: uint16(i), Set: set}]; !counted && !slot {
				break
			}
			missing = append(missing, uint16(i))
			continue
		}
		if _, ok := t.members[svcnatMemberKey{Id: id, BackendId: bid, Set: set}]; !ok {
			return nil, nil, fmt.Errorf("backend %d in slot %d of set %d has no membership entry", bid, i, set)
		}
		ep, err := decodeBackend(b)
		if err != nil {
			return nil, nil, err
		}
		eps = append(eps, ep)
	}
	return eps, missing, nil
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// addr16 is a's 16-byte form: IPv4 as ::ffff:a.b.c.d.
func addr16(a netip.Addr) [16]byte { return a.As16() }

// mappedBits is p's length in the 16-byte form of its address.
func mappedBits(p netip.Prefix) int {
	if p.Addr().Is4() {
		return 96 + p.Bits()
	}
	return p.Bits()
}

func decodePrefix(a [16]byte, bits uint32) (netip.Prefix, error) {
	ip := netip.AddrFrom16(a)
	if ip.Is4In6() {
		if bits < 96 || bits > 128 {
			return netip.Prefix{}, fmt.Errorf("IPv4 prefix %s with %d mapped bits", ip.Unmap(), bits)
		}
		return netip.PrefixFrom(ip.Unmap(), int(bits)-96), nil
	}
	if bits > 128 {
		return netip.Prefix{}, fmt.Errorf("IPv6 prefix %s/%d", ip, bits)
	}
	return netip.PrefixFrom(ip, int(bits)), nil
}

// htons converts a port to the network byte order the maps hold, as stored
// in a native little- or big-endian uint16.
func htons(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func ntohs(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

func addrString(a [16]byte) string { return netip.AddrFrom16(a).Unmap().String() }
