package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// fakeSources serves Services and slices from maps, counts reads per
// Service, and reports its caches synced only once synced is closed.
type fakeSources struct {
	synced chan struct{}

	mu     sync.Mutex
	svcs   map[types.NamespacedName]*corev1.Service
	slices map[types.NamespacedName][]*discoveryv1.EndpointSlice
	node   *corev1.Node
	reads  map[types.NamespacedName]int
}

func newFakeSources() *fakeSources {
	return &fakeSources{
		synced: make(chan struct{}),
		svcs:   map[types.NamespacedName]*corev1.Service{},
		slices: map[types.NamespacedName][]*discoveryv1.EndpointSlice{},
		reads:  map[types.NamespacedName]int{},
	}
}

func (f *fakeSources) WaitForCacheSync(ctx context.Context) bool {
	select {
	case <-f.synced:
		return true
	case <-ctx.Done():
		return false
	}
}

func (f *fakeSources) Service(k types.NamespacedName) (*corev1.Service, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reads[k]++
	return f.svcs[k], nil
}

func (f *fakeSources) EndpointSlices(k types.NamespacedName) ([]*discoveryv1.EndpointSlice, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.slices[k], nil
}

func (f *fakeSources) ServiceKeys() ([]types.NamespacedName, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Collect(maps.Keys(f.svcs)), nil
}

func (f *fakeSources) Node() *corev1.Node {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.node
}

func (f *fakeSources) put(svc *corev1.Service, sl ...*discoveryv1.EndpointSlice) types.NamespacedName {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	f.svcs[k] = svc
	f.slices[k] = sl
	return k
}

func (f *fakeSources) remove(k types.NamespacedName) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.svcs, k)
	delete(f.slices, k)
}

func (f *fakeSources) takeReads() map[types.NamespacedName]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	r := f.reads
	f.reads = map[types.NamespacedName]int{}
	return r
}

// fakeBackend records every state it is asked to program and fails while
// it has errors queued.
type fakeBackend struct {
	synced chan *model.State
	mu     sync.Mutex
	errs   []error
}

func (b *fakeBackend) Init(context.Context) error { return nil }

func (b *fakeBackend) Sync(_ context.Context, s *model.State) error {
	cp := &model.State{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: maps.Clone(s.ServicePorts)}
	if s.Change != nil {
		c := *s.Change
		cp.Change = &c
	}
	b.mu.Lock()
	var err error
	if len(b.errs) > 0 {
		err, b.errs = b.errs[0], b.errs[1:]
	}
	b.mu.Unlock()
	b.synced <- cp
	return err
}

func (b *fakeBackend) Dump(context.Context) (*model.State, error) { return nil, errors.New("not used") }
func (b *fakeBackend) Cleanup(context.Context) error              { return nil }

func (b *fakeBackend) failNext(n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for range n {
		b.errs = append(b.errs, errors.New("injected"))
	}
}

type harness struct {
	t     *testing.T
	clock *clocktesting.FakeClock
	src   *fakeSources
	be    *fakeBackend
	a     *Agent
	m     *Metrics
	done  chan error
}

var t0 = time.Date(2026, 11, 26, 1, 0, 0, 0, time.UTC)

// newHarness starts an agent whose caches are not synced yet: tests set up
// their objects, then call cachesSynced, so the first sync sees them all.
func newHarness(t *testing.T, tweaks ...func(*Options)) *harness {
	t.Helper()
	return newHarnessWith(t, nil, tweaks...)
}

// newHarnessWith is newHarness with the fake backend wrapped by wrap.
func newHarnessWith(t *testing.T, wrap func(*fakeBackend) dataplane.Backend, tweaks ...func(*Options)) *harness {
	t.Helper()
	h := &harness{
		t:     t,
		clock: clocktesting.NewFakeClock(t0),
		src:   newFakeSources(),
		be:    &fakeBackend{synced: make(chan *model.State, 100)},
		m:     NewMetrics(prometheus.NewRegistry()),
		done:  make(chan error, 1),
	}
	opts := Options{
		NodeName:        "node1",
		MinSyncInterval: time.Second,
		SyncPeriod:      30 * time.Second,
		RetryBackoff:    time.Second,
		BackendName:     "fake",
		HealthCheckHost: "127.0.0.1",
		Clock:           h.clock,
		Metrics:         h.m,
		Logger:          slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	for _, tweak := range tweaks {
		tweak(&opts)
	}
	var backend dataplane.Backend = h.be
	if wrap != nil {
		backend = wrap(h.be)
	}
	h.a = New(backend, h.src, opts)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { h.done <- h.a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-h.done:
			if err != nil {
				t.Errorf("Run returned %v, want nil after cancel", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return h
}

// cachesSynced lets the agent's first sync run.
func (h *harness) cachesSynced() { close(h.src.synced) }

// waitSync returns the next state the backend was asked to program.
func (h *harness) waitSync() *model.State {
	h.t.Helper()
	select {
	case s := <-h.be.synced:
		return s
	case <-time.After(5 * time.Second):
		h.t.Fatalf("no sync at %v", h.clock.Now().Sub(t0))
		return nil
	}
}

// noSync fails if the backend is asked to program anything soon.
func (h *harness) noSync() {
	h.t.Helper()
	select {
	case s := <-h.be.synced:
		h.t.Fatalf("unexpected sync at %v with %d service ports", h.clock.Now().Sub(t0), len(s.ServicePorts))
	case <-time.After(100 * time.Millisecond):
	}
}

// waitArmed waits until the loop sleeps until t0+d.
func (h *harness) waitArmed(d time.Duration) {
	h.t.Helper()
	want := t0.Add(d)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		h.a.mu.Lock()
		armed := h.a.armedFor
		h.a.mu.Unlock()
		if armed.Equal(want) && h.clock.HasWaiters() {
			return
		}
		time.Sleep(time.Millisecond)
	}
	h.a.mu.Lock()
	defer h.a.mu.Unlock()
	h.t.Fatalf("loop armed for %v, want %v", h.a.armedFor.Sub(t0), d)
}

// advanceTo moves the fake clock to t0+d.
func (h *harness) advanceTo(d time.Duration) { h.clock.SetTime(t0.Add(d)) }

func service(name string, ip string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  ip,
			ClusterIPs: []string{ip},
			Ports:      []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
}

func endpointSlice(svc, name string, ips ...string) *discoveryv1.EndpointSlice {
	port := int32(8080)
	proto := corev1.ProtocolTCP
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: &port, Protocol: &proto, Name: new("")}},
	}
	for _, ip := range ips {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}})
	}
	return s
}

func names(s *model.State) []string {
	var out []string
	for _, sp := range s.Sorted() {
		out = append(out, fmt.Sprintf("%s=%d", sp.Name, len(sp.ClusterEndpoints)))
	}
	return out
}

// change describes what a synced state says changed: "full", or the
// updated and removed ServicePorts.
func change(s *model.State) string {
	if s.Change == nil {
		return "full"
	}
	return fmt.Sprintf("updated %v removed %v", s.Change.Updated, s.Change.Removed)
}

func TestNoSyncBeforeCachesSynced(t *testing.T) {
	h := newHarness(t)
	k := h.src.put(service("web", "10.96.0.10"), endpointSlice("web", "web-1", "10.244.0.5"))
	h.a.ServiceChanged(k)
	h.advanceTo(time.Minute)
	h.noSync()
	h.cachesSynced()
	s := h.waitSync()
	if got, want := names(s), []string{"ns/web=1"}; !slices.Equal(got, want) {
		t.Errorf("first sync programmed %v, want %v", got, want)
	}
}

func TestCoalescesAndRebuildsOnlyDirtyServices(t *testing.T) {
	h := newHarness(t)
	web := h.src.put(service("web", "10.96.0.10"), endpointSlice("web", "web-1", "10.244.0.5"))
	h.cachesSynced()
	first := h.waitSync()
	if got := names(first); !slices.Equal(got, []string{"ns/web=1"}) {
		t.Fatalf("first sync programmed %v", got)
	}
	if got := change(first); got != "full" {
		t.Errorf("first sync's change: %s, want full", got)
	}
	h.waitArmed(30 * time.Second) // the periodic reconcile
	h.src.takeReads()

	var keys []types.NamespacedName
	for i := range 3 {
		name := fmt.Sprintf("api%d", i)
		keys = append(keys, h.src.put(service(name, fmt.Sprintf("10.96.1.%d", i)), endpointSlice(name, name+"-1", "10.244.1.1", "10.244.1.2")))
	}
	// After a quiet spell a change is programmed at once: the first sync
	// and this one are the burst the rate limit allows ...
	h.a.ServiceChanged(keys[0])
	if got, want := change(h.waitSync()), "updated [ns/api0] removed []"; got != want {
		t.Errorf("first change's sync: %s, want %s", got, want)
	}
	h.src.takeReads()
	// ... and a burst of changes right after it waits for the minimum
	// interval and is programmed in one sync.
	h.a.ServiceChanged(keys[1])
	h.a.ServiceChanged(keys[2])
	h.a.ServiceChanged(keys[0])
	h.waitArmed(time.Second)
	h.advanceTo(999 * time.Millisecond)
	h.noSync()
	h.advanceTo(time.Second)
	coalesced := h.waitSync()
	got := names(coalesced)
	if want := []string{"ns/api0=2", "ns/api1=2", "ns/api2=2", "ns/web=1"}; !slices.Equal(got, want) {
		t.Errorf("coalesced sync programmed %v, want %v", got, want)
	}
	if got, want := change(coalesced), "updated [ns/api1 ns/api2] removed []"; got != want {
		t.Errorf("coalesced sync's change: %s, want %s", got, want)
	}
	h.noSync()
	reads := h.src.takeReads()
	want := map[types.NamespacedName]int{keys[0]: 1, keys[1]: 1, keys[2]: 1}
	if !maps.Equal(reads, want) {
		t.Errorf("services rebuilt: %v, want each dirty one once and not %v", reads, web)
	}

	// A deleted Service disappears; the others are not rebuilt.
	h.waitArmed(31 * time.Second)
	h.src.remove(keys[1])
	h.a.ServiceChanged(keys[1])
	h.waitArmed(2 * time.Second)
	h.advanceTo(2 * time.Second)
	deleted := h.waitSync()
	if got, want := names(deleted), []string{"ns/api0=2", "ns/api2=2", "ns/web=1"}; !slices.Equal(got, want) {
		t.Errorf("after delete programmed %v, want %v", got, want)
	}
	if got, want := change(deleted), "updated [] removed [ns/api1]"; got != want {
		t.Errorf("delete sync's change: %s, want %s", got, want)
	}
	if reads := h.src.takeReads(); !maps.Equal(reads, map[types.NamespacedName]int{keys[1]: 1}) {
		t.Errorf("services rebuilt after delete: %v, want only %v", reads, keys[1])
	}

	// The periodic reconcile programs everything again without rebuilding.
	h.waitArmed(32 * time.Second)
	h.advanceTo(32 * time.Second)
	periodic := h.waitSync()
	if got := names(periodic); len(got) != 3 {
		t.Errorf("periodic sync programmed %v", got)
	}
	if got, want := change(periodic), "updated [] removed []"; got != want {
		t.Errorf("periodic sync's change: %s, want %s", got, want)
	}
	if reads := h.src.takeReads(); len(reads) != 0 {
		t.Errorf("periodic sync rebuilt %v, want nothing", reads)
	}

	// AllChanged rebuilds every Service (at once: the periodic sync came
	// after a quiet spell).
	h.waitArmed(62 * time.Second)
	h.a.AllChanged()
	if got, want := change(h.waitSync()), "updated [] removed []"; got != want {
		t.Errorf("AllChanged sync's change: %s, want %s (nothing differs)", got, want)
	}
	if reads := h.src.takeReads(); len(reads) != 3 {
		t.Errorf("AllChanged rebuilt %v, want every Service", reads)
	}
}

// TestSecondChangeAfterQuietSpellNotDelayed: after a quiet spell, a change
// and the one that follows it (a Service, then its EndpointSlice) are both
// programmed at once, without waiting for the minimum interval; changes
// after those are paced, one sync per interval, however many arrive.
func TestSecondChangeAfterQuietSpellNotDelayed(t *testing.T) {
	var logs syncBuffer
	h := newHarness(t, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	h.src.put(service("web", "10.96.0.10"), endpointSlice("web", "web-1", "10.244.0.5"))
	h.cachesSynced()
	h.waitSync()
	h.waitArmed(30 * time.Second)
	h.advanceTo(10 * time.Second)

	k := h.src.put(service("api", "10.96.0.11"))
	h.a.ServiceChanged(k)
	if got, want := names(h.waitSync()), []string{"ns/api=0", "ns/web=1"}; !slices.Equal(got, want) {
		t.Fatalf("new Service's sync: %v, want %v", got, want)
	}
	h.src.put(service("api", "10.96.0.11"), endpointSlice("api", "api-1", "10.244.0.6"))
	h.a.ServiceChanged(k)
	// No clock advance: synced at 10 s, not a minimum interval later.
	if got, want := names(h.waitSync()), []string{"ns/api=1", "ns/web=1"}; !slices.Equal(got, want) {
		t.Fatalf("its EndpointSlice's sync: %v, want %v", got, want)
	}

	// The burst is spent: further changes wait for the interval and are
	// programmed together.
	for i := range 3 {
		name := fmt.Sprintf("more%d", i)
		h.a.ServiceChanged(h.src.put(service(name, fmt.Sprintf("10.96.1.%d", i)), endpointSlice(name, name+"-1", "10.244.1.1")))
	}
	h.waitArmed(11 * time.Second)
	h.noSync()
	h.advanceTo(11 * time.Second)
	if got, want := change(h.waitSync()), "updated [ns/more0 ns/more1 ns/more2] removed []"; got != want {
		t.Errorf("paced sync: %s, want %s", got, want)
	}
	h.a.ServiceChanged(k)
	h.waitArmed(12 * time.Second)
	h.noSync()
	// Each sync's log line says how long its oldest change waited in the
	// agent: the first sync since the agent started, the two of the burst
	// not at all, the paced one the interval.
	var queued []string
	for line := range strings.Lines(logs.String()) {
		if strings.Contains(line, "msg=synced") {
			_, q, _ := strings.Cut(line, " queued=")
			queued = append(queued, strings.Fields(q + " ")[0])
		}
	}
	if want := []string{"0s", "0s", "0s", "1s"}; !slices.Equal(queued, want) {
		t.Errorf("queued in the synced lines: %q, want %q:\n%s", queued, want, logs.String())
	}
}

// driftBackend is a fakeBackend whose CheckDrift waits for the test to
// answer.
type driftBackend struct {
	*fakeBackend
	checks  chan struct{}
	answers chan bool
}

func (b *driftBackend) CheckDrift(ctx context.Context) (bool, error) {
	b.checks <- struct{}{}
	select {
	case d := <-b.answers:
		return d, nil
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// TestDriftCheckBesideTheLoop: a backend's comparison of the kernel with
// what it wrote runs every SyncPeriod beside the sync loop, never holding
// up a change, and drift it finds is repaired by a sync as soon as the rate
// limit allows, not at the next periodic one.
func TestDriftCheckBesideTheLoop(t *testing.T) {
	db := &driftBackend{checks: make(chan struct{}, 1), answers: make(chan bool)}
	h := newHarnessWith(t, func(fb *fakeBackend) dataplane.Backend { db.fakeBackend = fb; return db })
	web := h.src.put(service("web", "10.96.0.10"), endpointSlice("web", "web-1", "10.244.0.5"))
	h.cachesSynced()
	h.waitSync()
	h.waitArmed(30 * time.Second)
	h.advanceTo(30 * time.Second)
	if got, want := change(h.waitSync()), "updated [] removed []"; got != want {
		t.Errorf("periodic sync's change: %s, want %s", got, want)
	}
	select {
	case <-db.checks:
	case <-time.After(5 * time.Second):
		t.Fatal("no drift check after SyncPeriod")
	}
	// The comparison is still reading: a change is programmed meanwhile
	// (at once: the periodic sync and this one are the burst).
	h.src.put(service("web", "10.96.0.10"), endpointSlice("web", "web-1", "10.244.0.5", "10.244.0.6"))
	h.a.ServiceChanged(web)
	if got, want := change(h.waitSync()), "updated [ns/web] removed []"; got != want {
		t.Errorf("sync beside the drift check: %s, want %s", got, want)
	}
	// Drift found: the repairing sync runs as soon as the rate limit
	// allows, after the minimum interval.
	h.waitArmed(60 * time.Second)
	db.answers <- true
	h.waitArmed(31 * time.Second)
	h.advanceTo(31 * time.Second)
	if got, want := change(h.waitSync()), "updated [] removed []"; got != want {
		t.Errorf("repairing sync's change: %s, want %s", got, want)
	}
	// No drift: nothing is brought forward; the next check is a period on.
	h.waitArmed(61 * time.Second)
	h.advanceTo(60 * time.Second)
	h.noSync()
	select {
	case <-db.checks:
	case <-time.After(5 * time.Second):
		t.Fatal("no second drift check a SyncPeriod after the first")
	}
	db.answers <- false
	h.noSync()
	h.waitArmed(61 * time.Second)
}

// TestDriftCheckCostBounded: a comparison that takes long runs less often,
// driftCheckShare times its duration after it ended (2 s: 100 s, not the
// 30-s SyncPeriod), so that the iptables backend's read of every rule stays
// a small share of a CPU at rest.
func TestDriftCheckCostBounded(t *testing.T) {
	db := &driftBackend{checks: make(chan struct{}, 1), answers: make(chan bool)}
	h := newHarnessWith(t, func(fb *fakeBackend) dataplane.Backend { db.fakeBackend = fb; return db })
	h.src.put(service("web", "10.96.0.10"), endpointSlice("web", "web-1", "10.244.0.5"))
	h.cachesSynced()
	h.waitSync()
	h.waitArmed(30 * time.Second)
	check := func(at time.Duration, want bool) {
		t.Helper()
		wait := 100 * time.Millisecond
		if want {
			wait = 5 * time.Second
		}
		select {
		case <-db.checks:
			if !want {
				t.Fatalf("drift check at %v", at)
			}
		case <-time.After(wait):
			if want {
				t.Fatalf("no drift check at %v", at)
			}
		}
	}
	h.advanceTo(30 * time.Second)
	check(30*time.Second, true)
	h.waitSync() // the periodic one
	h.waitArmed(60 * time.Second)
	timers := h.clock.Waiters()   // without the drift check's, which fired
	h.advanceTo(32 * time.Second) // the comparison took 2 s
	db.answers <- false
	deadline := time.Now().Add(5 * time.Second)
	for h.clock.Waiters() == timers && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	for _, at := range []time.Duration{62 * time.Second, 131 * time.Second} {
		h.advanceTo(at)
		check(at, false)
	}
	h.advanceTo(132 * time.Second)
	check(132*time.Second, true)
	db.answers <- false
}

func TestRetriesWithBackoff(t *testing.T) {
	h := newHarness(t)
	h.src.put(service("web", "10.96.0.10"), endpointSlice("web", "web-1", "10.244.0.5"))
	h.be.failNext(4)
	h.cachesSynced()
	h.waitSync() // t=0, fails
	// Retries after 1s, 2s, 4s (doubling), then succeeds.
	at := time.Duration(0)
	for _, d := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second} {
		at += d
		h.waitArmed(at)
		if d == 2*time.Second {
			// A change does not bypass the back-off.
			h.a.ServiceChanged(types.NamespacedName{Namespace: "ns", Name: "web"})
			h.waitArmed(at)
		}
		h.advanceTo(at - time.Millisecond)
		h.noSync()
		h.advanceTo(at)
		s := h.waitSync()
		if got := names(s); !slices.Equal(got, []string{"ns/web=1"}) {
			t.Errorf("retry at %v programmed %v", at, got)
		}
		if got := change(s); got != "full" {
			t.Errorf("retry at %v after a failed sync: change %s, want full", at, got)
		}
	}
	// Success: back to the periodic schedule.
	h.waitArmed(at + 30*time.Second)
	if got := counterValue(t, h.m.syncErrors); got != 4 {
		t.Errorf("svcnat_sync_errors_total = %v, want 4", got)
	}
}

func TestInvalidObjectsDoNotBlockOthers(t *testing.T) {
	h := newHarness(t)
	bad := service("bad", "10.96.0.11")
	bad.Spec.Ports[0].Protocol = "ICMP"
	h.src.put(bad)
	h.src.put(service("web", "10.96.0.10"), endpointSlice("web", "web-1", "10.244.0.5"))
	h.cachesSynced()
	if got := names(h.waitSync()); !slices.Equal(got, []string{"ns/web=1"}) {
		t.Errorf("programmed %v, want only the valid Service", got)
	}
	if got := counterValue(t, h.m.invalidObjects.WithLabelValues("Service")); got != 1 {
		t.Errorf("svcnat_invalid_objects_total{kind=Service} = %v, want 1", got)
	}
}

func TestProgrammingLatency(t *testing.T) {
	h := newHarness(t)
	old := endpointSlice("web", "web-1", "10.244.0.5")
	old.Annotations = map[string]string{triggerAnnotation: t0.Add(-time.Hour).Format(time.RFC3339Nano)}
	k := h.src.put(service("web", "10.96.0.10"), old)
	h.cachesSynced()
	h.waitSync()
	h.waitArmed(30 * time.Second)
	if c := histogramCount(t, h.m.programmingLatency); c != 0 {
		t.Errorf("latency observations for a change before the agent started = %d, want 0", c)
	}

	changed := endpointSlice("web", "web-1", "10.244.0.6")
	changed.Annotations = map[string]string{triggerAnnotation: t0.Add(500 * time.Millisecond).Format(time.RFC3339Nano)}
	h.src.put(service("web", "10.96.0.10"), changed)
	h.advanceTo(time.Second)
	h.a.ServiceChanged(k)
	h.waitSync()
	if c := histogramCount(t, h.m.programmingLatency); c != 1 {
		t.Errorf("latency observations = %d, want 1", c)
	}
	// Rebuilding the same slice again observes nothing new.
	h.waitArmed(31 * time.Second)
	h.a.ServiceChanged(k)
	h.waitSync()
	if c := histogramCount(t, h.m.programmingLatency); c != 1 {
		t.Errorf("latency observations after an unchanged rebuild = %d, want 1", c)
	}
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func histogramCount(t *testing.T, h prometheus.Histogram) uint64 {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

func TestHealth(t *testing.T) {
	h := newHarness(t)
	srv := httptest.NewServer(h.a.Health().Handler())
	defer srv.Close()

	// Before the first sync, with no Node object: not eligible.
	if code, body := get(t, srv.URL+"/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, `"nodeEligible":false`) {
		t.Errorf("/healthz before node = %d %s", code, body)
	}
	if code, _ := get(t, srv.URL+"/livez"); code != http.StatusOK {
		t.Errorf("/livez right after start = %d, want 200", code)
	}
	// With the Node but before the first sync: alive, not ready.
	h.src.mu.Lock()
	h.src.node = &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node1"}}
	h.src.mu.Unlock()
	if code, body := get(t, srv.URL+"/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, `"nodeEligible":true`) {
		t.Errorf("/healthz before the first sync = %d %s, want 503", code, body)
	}
	// Caches never syncing: unhealthy after twice the sync period.
	h.advanceTo(61 * time.Second)
	if code, body := get(t, srv.URL+"/livez"); code != http.StatusServiceUnavailable || !strings.Contains(body, `"healthy":false`) {
		t.Errorf("/livez with a change waiting 61s = %d %s", code, body)
	}
	h.cachesSynced()
	h.waitSync()
	h.waitArmed(91 * time.Second)
	code, body := get(t, srv.URL+"/healthz")
	if code != http.StatusOK || !strings.Contains(body, `"nodeEligible":true`) || !strings.Contains(body, `"healthy":true`) ||
		!strings.Contains(body, `"lastUpdated":"2026-11-26T01:01:01Z"`) {
		t.Errorf("/healthz after sync = %d %s", code, body)
	}

	// A node about to be removed by the autoscaler is not eligible.
	h.src.mu.Lock()
	h.src.node = &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node1"}, Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: toBeDeletedTaint}}}}
	h.src.mu.Unlock()
	if code, _ := get(t, srv.URL+"/healthz"); code != http.StatusServiceUnavailable {
		t.Errorf("/healthz of a node to be deleted = %d, want 503", code)
	}
	if code, _ := get(t, srv.URL+"/livez"); code != http.StatusOK {
		t.Errorf("/livez of a node to be deleted = %d, want 200", code)
	}

	// Failing syncs: unhealthy once a change waited 2 sync periods.
	h.be.failNext(100)
	h.a.ServiceChanged(types.NamespacedName{Namespace: "ns", Name: "x"})
	h.waitArmed(62 * time.Second)
	h.advanceTo(62 * time.Second)
	h.waitSync()
	h.clock.SetTime(t0.Add(61*time.Second + 59*time.Second))
	if code, _ := get(t, srv.URL+"/livez"); code != http.StatusOK {
		t.Errorf("/livez 59s into failing syncs = %d, want 200", code)
	}
	h.clock.SetTime(t0.Add(61*time.Second + 61*time.Second))
	if code, _ := get(t, srv.URL+"/livez"); code != http.StatusServiceUnavailable {
		t.Errorf("/livez 61s into failing syncs = %d, want 503", code)
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestConflictsAndFailedPortsDoNotBlockOthers: a frontend two Services claim
// is resolved before programming, and a ServicePort the backend cannot
// program fails alone: the sync counts as done, both are reported once
// (log and gauges), and the periodic schedule goes on.
func TestConflictsAndFailedPortsDoNotBlockOthers(t *testing.T) {
	var logs syncBuffer
	h := newHarness(t, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	thief := service("thief", "10.96.0.20")
	thief.Spec.ExternalIPs = []string{"10.96.0.10"}
	h.src.put(service("victim", "10.96.0.10"))
	h.src.put(thief)
	h.src.put(service("web", "10.96.0.30"))
	webPort := model.ServicePortName{Namespace: "ns", Name: "web", Family: model.IPv4}
	h.be.mu.Lock()
	h.be.errs = []error{
		fmt.Errorf("wrapped: %w", dataplane.PortErrors{webPort: errors.New("map full")}),
		dataplane.PortErrors{webPort: errors.New("map full")},
	}
	h.be.mu.Unlock()
	h.cachesSynced()
	s := h.waitSync()
	th := s.ServicePorts[model.ServicePortName{Namespace: "ns", Name: "thief", Family: model.IPv4}]
	if th == nil || len(th.Frontends) != 1 || th.Frontends[0].Kind != model.ClusterIP {
		t.Fatalf("thief programmed with %v, want its ClusterIP only", th)
	}
	// Not a failed sync: no retry with back-off, the next sync is periodic.
	h.waitArmed(30 * time.Second)
	if got := counterValue(t, h.m.syncErrors); got != 0 {
		t.Errorf("svcnat_sync_errors_total = %v, want 0", got)
	}
	if got := gaugeValue(t, h.m.frontendConflicts); got != 1 {
		t.Errorf("svcnat_frontend_conflicts = %v, want 1", got)
	}
	if got := gaugeValue(t, h.m.servicePortsFailed); got != 1 {
		t.Errorf("svcnat_service_ports_failed = %v, want 1", got)
	}
	h.advanceTo(30 * time.Second)
	h.waitSync()
	h.waitArmed(60 * time.Second)
	out := logs.String()
	if n := strings.Count(out, "frontend conflict"); n != 1 {
		t.Errorf("conflict logged %d times over two syncs, want once:\n%s", n, out)
	}
	if n := strings.Count(out, "service port not programmed"); n != 1 || !strings.Contains(out, "ns/web") {
		t.Errorf("failed port logged %d times, want once naming ns/web:\n%s", n, out)
	}
	// The third sync succeeds for all: the gauge clears.
	h.advanceTo(60 * time.Second)
	h.waitSync()
	h.waitArmed(90 * time.Second)
	if got := gaugeValue(t, h.m.servicePortsFailed); got != 0 {
		t.Errorf("svcnat_service_ports_failed = %v after a clean sync, want 0", got)
	}
}

func gaugeValue(t *testing.T, g prometheus.Gauge) float64 {
	t.Helper()
	var m dto.Metric
	if err := g.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetGauge().GetValue()
}

// syncBuffer is a bytes.Buffer safe for the loop goroutine to write while
// the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
