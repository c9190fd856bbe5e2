package ebpf

import (
	"cmp"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/svcnat/svcnat/pkg/model"
)

// randomState builds a State exercising every field the maps carry: both
// families, every frontend kind and protocol, Local endpoints and policies,
// affinity, source ranges, health check ports, cluster CIDRs.
func randomState(r *rand.Rand, services int) *model.State {
	s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
	if r.IntN(2) == 0 {
		s.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:244::/48")}
	}
	kinds := []model.FrontendKind{model.ClusterIP, model.NodePort, model.ExternalIP, model.LoadBalancer}
	protos := []model.Protocol{model.TCP, model.UDP, model.SCTP}
	for i := range services {
		fam := model.IPv4
		if r.IntN(3) == 0 {
			fam = model.IPv6
		}
		ip := func(net, host int) netip.Addr {
			if fam == model.IPv4 {
				return netip.AddrFrom4([4]byte{10, byte(net), byte(host >> 8), byte(host)})
			}
			return netip.AddrFrom16([16]byte{0xfd, 0, byte(net), 14: byte(host >> 8), 15: byte(host)})
		}
		sp := &model.ServicePort{
			Name:     model.ServicePortName{Namespace: fmt.Sprintf("ns%d", r.IntN(3)), Name: fmt.Sprintf("svc-%d", i), Family: fam},
			Protocol: protos[r.IntN(len(protos))],
		}
		switch r.IntN(4) {
		case 0:
			sp.Name.Port = "http"
		case 1:
			// The API's longest names: every one is a DNS label of 63 bytes.
			sp.Name.Port = strings.Repeat("p", 63)
			sp.Name.Namespace = strings.Repeat("n", 63)
			sp.Name.Name += strings.Repeat("s", 63-len(sp.Name.Name))
		}
		for j := range 1 + r.IntN(3) {
			k := kinds[r.IntN(len(kinds))]
			if j == 0 {
				k = model.ClusterIP
			}
			sp.Frontends = append(sp.Frontends, model.Frontend{Kind: k, IP: ip(96+j, i), Port: uint16(80 + j)})
		}
		slices.SortFunc(sp.Frontends, func(a, b model.Frontend) int {
			return cmp.Or(cmp.Compare(a.Kind, b.Kind), a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
		})
		for j := range r.IntN(5) {
			e := model.Endpoint{IP: ip(244, 256*j+i%256), Port: 8080, Local: j%2 == 0}
			sp.ClusterEndpoints = append(sp.ClusterEndpoints, e)
			if e.Local && r.IntN(3) > 0 {
				sp.LocalEndpoints = append(sp.LocalEndpoints, e)
			}
		}
		sp.InternalTrafficLocal = r.IntN(4) == 0
		sp.ExternalTrafficLocal = r.IntN(4) == 0
		if r.IntN(3) == 0 {
			sp.AffinityTimeout = time.Duration(1+r.IntN(10800)) * time.Second
		}
		if r.IntN(4) == 0 {
			sp.SourceRanges = []netip.Prefix{netip.PrefixFrom(ip(0, 0), 8)}
			if fam == model.IPv6 {
				sp.SourceRanges = []netip.Prefix{netip.MustParsePrefix("2001:db8::/32")}
			}
			sp.HealthCheckNodePort = uint16(30000 + i)
		}
		s.ServicePorts[sp.Name] = sp
	}
	return s
}

func statesEqual(t *testing.T, want, got *model.State) {
	t.Helper()
	if !slices.Equal(want.ClusterCIDRs, got.ClusterCIDRs) {
		t.Errorf("cluster CIDRs: want %v, got %v", want.ClusterCIDRs, got.ClusterCIDRs)
	}
	for n, w := range want.ServicePorts {
		g, ok := got.ServicePorts[n]
		if !ok {
			t.Errorf("%s: missing", n)
			continue
		}
		if !w.Equal(g) {
			t.Errorf("%s: want %+v, got %+v", n, *w, *g)
		}
	}
	for n := range got.ServicePorts {
		if _, ok := want.ServicePorts[n]; !ok {
			t.Errorf("%s: unexpected", n)
		}
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	for seed := range uint64(50) {
		r := rand.New(rand.NewPCG(seed, 1))
		want := randomState(r, 1+r.IntN(40))
		tab, _, failed := encode(want, newIDs(), newTable())
		if len(failed) > 0 {
			t.Fatalf("seed %d: encode: %v", seed, failed)
		}
		got, _, err := decode(tab)
		if err != nil {
			t.Fatalf("seed %d: decode: %v", seed, err)
		}
		statesEqual(t, want, got)
	}
}

func TestEncodeSharesEndpointsAndKeepsNumbers(t *testing.T) {
	s := randomState(rand.New(rand.NewPCG(7, 7)), 30)
	n := newIDs()
	first, _, failed := encode(s, n, newTable())
	if len(failed) > 0 {
		t.Fatal(failed)
	}
	eps := map[model.Endpoint]bool{}
	for _, sp := range s.ServicePorts {
		for _, e := range slices.Concat(sp.ClusterEndpoints, sp.LocalEndpoints) {
			eps[e] = true
		}
	}
	if len(first.backends) != len(eps) {
		t.Errorf("backends: %d entries for %d distinct endpoints", len(first.backends), len(eps))
	}
	again, _, failed := encode(s, n, first)
	if len(failed) > 0 {
		t.Fatal(failed)
	}
	if !again.equal(first) {
		t.Error("encoding the same state twice gave different entries")
	}
	// Numbers adopted from the kernel's entries give the same encoding.
	third, _, failed := encode(s, adoptIDs(first), first)
	if len(failed) > 0 {
		t.Fatal(failed)
	}
	if !third.equal(first) {
		t.Error("encoding with adopted numbers gave different entries")
	}
}

// The numbering keeps one index, key to number: the tables are the other.
// With a second map, number to key, it held 122 bytes per endpoint at
// 2,000 Services of 10 endpoints; 62 without.
func TestIDsHeap(t *testing.T) {
	const services, endpoints = 2000, 20000
	s := benchState(services)
	var with, without runtime.MemStats
	n := newIDs()
	tab, _, failed := encode(s, n, newTable())
	if len(failed) > 0 {
		t.Fatal(failed)
	}
	runtime.GC()
	runtime.ReadMemStats(&with)
	runtime.KeepAlive(n)
	runtime.GC()
	runtime.ReadMemStats(&without)
	runtime.KeepAlive(tab)
	per := float64(int64(with.HeapAlloc)-int64(without.HeapAlloc)) / endpoints
	t.Logf("numbering: %.0f bytes per endpoint", per)
	if per > 80 {
		t.Errorf("numbering holds %.0f bytes per endpoint, want at most 80", per)
	}
}

// Once the counter wraps, a new number is one neither the maps' table nor
// the one being encoded uses.
func TestIDsAfterWrap(t *testing.T) {
	held, next := newTable(), newTable()
	n := newIDs()
	n.backends.next = math.MaxUint32
	held.backends[1] = svcnatBackend{Port: 1}
	next.backends[2] = svcnatBackend{Port: 2}
	var got []uint32
	for port := range uint16(3) {
		b := svcnatBackend{Port: 10 + port}
		id := n.backend(b, held, next)
		next.backends[id] = b
		got = append(got, id)
	}
	if want := []uint32{math.MaxUint32, 3, 4}; !slices.Equal(got, want) {
		t.Errorf("numbers after the wrap: %v, want %v (0 is no number; 1 and 2 are used)", got, want)
	}
	if again := n.backend(svcnatBackend{Port: 10}, held, next); again != math.MaxUint32 {
		t.Errorf("a numbered backend got %d, want its number %d", again, uint32(math.MaxUint32))
	}
}

func TestEncodeRejects(t *testing.T) {
	base := func() *model.ServicePort {
		return &model.ServicePort{
			Name:      model.ServicePortName{Namespace: "default", Name: "web", Family: model.IPv4},
			Protocol:  model.TCP,
			Frontends: []model.Frontend{{Kind: model.ClusterIP, IP: netip.MustParseAddr("10.96.0.10"), Port: 80}},
		}
	}
	for _, tc := range []struct {
		name   string
		mutate func(sp *model.ServicePort, s *model.State)
		want   string
	}{
		{"long namespace", func(sp *model.ServicePort, _ *model.State) { sp.Name.Namespace = strings.Repeat("a", 64) }, "namespace"},
		{"long port name", func(sp *model.ServicePort, _ *model.State) { sp.Name.Port = strings.Repeat("p", 64) }, "port name"},
		{"protocol", func(sp *model.ServicePort, _ *model.State) { sp.Protocol = "ICMP" }, "unknown protocol"},
		{"affinity", func(sp *model.ServicePort, _ *model.State) { sp.AffinityTimeout = 1500 * time.Millisecond }, "affinity timeout"},
		{"shared frontend", func(sp *model.ServicePort, s *model.State) {
			other := base()
			other.Name.Name = "api"
			s.ServicePorts[other.Name] = other
		}, "also a frontend of"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sp := base()
			s := &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{}}
			tc.mutate(sp, s)
			s.ServicePorts[sp.Name] = sp
			// A valid ServicePort beside it is encoded all the same.
			valid := base()
			valid.Name.Name = "valid"
			valid.Frontends[0].IP = netip.MustParseAddr("10.96.0.99")
			s.ServicePorts[valid.Name] = valid
			tab, frags, failed := encode(s, newIDs(), newTable())
			if err := failed[sp.Name]; err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("encode: got error %v, want one containing %q", err, tc.want)
			}
			_, validOK := frags[valid.Name]
			_, spOK := frags[sp.Name]
			if len(failed) != 1 || !validOK || spOK {
				t.Fatalf("encode: failed %v, encoded %d ServicePorts; want only %s failed", failed, len(frags), sp.Name)
			}
			if n := len(s.ServicePorts) - 1; len(tab.services) != n || len(tab.info) != n {
				t.Fatalf("encode: %d frontends and %d service infos, want %d: all but the failed one's", len(tab.services), len(tab.info), n)
			}
		})
	}
}

func TestPortByteOrder(t *testing.T) {
	if got := ntohs(htons(0x1f90)); got != 0x1f90 {
		t.Fatalf("ntohs(htons(8080)) = %d", got)
	}
	b := svcnatBackend{Port: htons(8080)}
	// In memory the port must read big-endian, as the kernel compares it.
	raw := (*[2]byte)(unsafe.Pointer(&b.Port))
	if raw[0] != 0x1f || raw[1] != 0x90 {
		t.Fatalf("port 8080 stored as %x, want 1f90", raw[:])
	}
}

// TestDecodeChecksMembers: a membership missing (deleted by hand) makes
// decode fail naming the ServicePort, so dump --check reports it.
func TestDecodeChecksMembers(t *testing.T) {
	s := stateWithEndpoints()
	tab, _, failed := encode(s, newIDs(), newTable())
	if len(failed) > 0 {
		t.Fatal(failed)
	}
	var some svcnatMemberKey
	for k := range tab.members {
		some = k
		break
	}
	delete(tab.members, some)
	if _, _, err := decode(tab); err == nil || !strings.Contains(err.Error(), "no membership") {
		t.Errorf("decode without a membership: %v", err)
	}
}

func stateWithEndpoints() *model.State {
	sp := &model.ServicePort{
		Name:             model.ServicePortName{Namespace: "default", Name: "web", Family: model.IPv4},
		Protocol:         model.TCP,
		Frontends:        []model.Frontend{{Kind: model.ClusterIP, IP: netip.MustParseAddr("10.96.0.10"), Port: 80}},
		ClusterEndpoints: []model.Endpoint{{IP: netip.MustParseAddr("10.244.1.2"), Port: 8080}, {IP: netip.MustParseAddr("10.244.1.3"), Port: 8080}},
	}
	return &model.State{ServicePorts: map[model.ServicePortName]*model.ServicePort{sp.Name: sp}}
}
