package watch

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"

	"github.com/svcnat/svcnat/pkg/model"
)

// recorder is a Sink that remembers what it was told.
type recorder struct {
	mu      sync.Mutex
	changed []types.NamespacedName
	all     int
}

func (r *recorder) ServiceChanged(k types.NamespacedName) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.changed = append(r.changed, k)
}

func (r *recorder) AllChanged() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.all++
}

// take returns and forgets what was recorded.
func (r *recorder) take() ([]types.NamespacedName, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, a := r.changed, r.all
	r.changed, r.all = nil, 0
	return c, a
}

// waitFor polls until the recorder has seen want (in any order, maybe more
// than once) and nothing else, or fails after a few seconds.
func (r *recorder) waitFor(t *testing.T, want ...types.NamespacedName) {
	t.Helper()
	var got []types.NamespacedName
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		r.mu.Lock()
		got = slices.Clone(r.changed)
		r.mu.Unlock()
		if containsAll(got, want) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Give stray events a moment to show up.
	time.Sleep(50 * time.Millisecond)
	got, _ = r.take()
	if !containsAll(got, want) {
		t.Fatalf("changed services: got %v, want %v", got, want)
	}
	for _, k := range got {
		if !slices.Contains(want, k) {
			t.Fatalf("changed services: got %v, want only %v", got, want)
		}
	}
}

func containsAll(got, want []types.NamespacedName) bool {
	for _, w := range want {
		if !slices.Contains(got, w) {
			return false
		}
	}
	return true
}

func key(ns, name string) types.NamespacedName {
	return types.NamespacedName{Namespace: ns, Name: name}
}

func service(ns, name string, labels map[string]string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec:       corev1.ServiceSpec{ClusterIP: "10.96.0.10", Ports: []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP}}},
	}
}

func slice(ns, name, svc string) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.244.0.5"}}},
	}
	if svc != "" {
		s.Labels[discoveryv1.LabelServiceName] = svc
	}
	return s
}

func start(t *testing.T, objs ...runtime.Object) (*fake.Clientset, *Watcher, *recorder) {
	t.Helper()
	rec := &recorder{}
	client, w := startWith(t, rec, objs...)
	return client, w, rec
}

// startWith starts a watcher telling sink, over a fake clientset holding
// objs, and waits for its caches.
func startWith(t *testing.T, sink Sink, objs ...runtime.Object) (*fake.Clientset, *Watcher) {
	t.Helper()
	client := fake.NewClientset(objs...)
	return client, startOn(t, client, sink)
}

// startOn starts a watcher over client telling sink, and waits (up to 30 s)
// for its caches.
func startOn(t *testing.T, client kubernetes.Interface, sink Sink) *Watcher {
	t.Helper()
	w, err := New(client, "node1", 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	w.Start(ctx, sink)
	if !w.WaitForCacheSync(ctx) {
		t.Fatal("caches did not sync")
	}
	return w
}

// slowSink takes a millisecond a call, as a busy agent may.
type slowSink struct{ recorder }

func (s *slowSink) ServiceChanged(k types.NamespacedName) {
	time.Sleep(time.Millisecond)
	s.recorder.ServiceChanged(k)
}

// TestWaitForCacheSyncWaitsForHandlers: when WaitForCacheSync returns, the
// sink has been told of every listed Service, so the agent's first sync
// leaves none for a second one. Waiting for the caches alone, it had been
// told of 30 of 200.
func TestWaitForCacheSyncWaitsForHandlers(t *testing.T) {
	const n = 200
	var objs []runtime.Object
	for i := range n {
		objs = append(objs, service("a", fmt.Sprintf("s%d", i), nil))
	}
	sink := &slowSink{}
	startWith(t, sink, objs...)
	got, _ := sink.take()
	if len(got) < n {
		t.Errorf("the sink was told of %d of %d Services when the caches were synced", len(got), n)
	}
}

// TestServiceEvents checks that adding, changing and deleting a Service
// marks it. (Services leaving or entering Proxied arrive as deletions and
// additions from the apiserver, which the fake clientset does not model:
// test/e2e's ProxiedSelectedOnAPIServer covers them.)
func TestServiceEvents(t *testing.T) {
	client, w, rec := start(t, service("a", "web", nil))
	rec.waitFor(t, key("a", "web"))
	ctx := context.Background()
	svcs := client.CoreV1().Services("a")

	if _, err := svcs.Create(ctx, service("a", "api", nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, key("a", "api"))
	changed := service("a", "web", nil)
	changed.Spec.Ports[0].Port = 8080
	if _, err := svcs.Update(ctx, changed, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, key("a", "web"))
	if s, err := w.Service(key("a", "web")); err != nil || s == nil || s.Spec.Ports[0].Port != 8080 {
		t.Errorf("Service(a/web) = %v, %v; want the updated Service", s, err)
	}
	if err := svcs.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, key("a", "web"))
	if s, err := w.Service(key("a", "web")); s != nil || err != nil {
		t.Errorf("Service(a/web) after delete = %v, %v; want nil, nil", s, err)
	}
	keys, err := w.ServiceKeys()
	if err != nil || !slices.Equal(keys, []types.NamespacedName{key("a", "api")}) {
		t.Errorf("ServiceKeys() = %v, %v; want [a/api]", keys, err)
	}
}

// TestOnlyProxiedCached checks that the Services and EndpointSlices
// informers ask the apiserver for Proxied objects only, so objects of
// another proxy or labelled headless never enter the caches.
func TestOnlyProxiedCached(t *testing.T) {
	other := map[string]string{LabelServiceProxyName: "other-proxy"}
	headless := map[string]string{corev1.IsHeadlessService: ""}
	foreign, headlessSlice := slice("a", "web-2", "web"), slice("a", "web-3", "web")
	maps.Copy(foreign.Labels, other)
	maps.Copy(headlessSlice.Labels, headless)
	client, w, _ := start(t, service("a", "web", map[string]string{"app": "web"}), service("a", "other", other),
		service("a", "headless", headless), slice("a", "web-1", "web"), foreign, headlessSlice)

	for _, c := range []struct {
		inf  cache.SharedIndexInformer
		want []string
	}{{w.services, []string{"a/web"}}, {w.slices, []string{"a/web-1"}}} {
		if got := c.inf.GetStore().ListKeys(); !slices.Equal(got, c.want) {
			t.Errorf("cached %v, want only %v", got, c.want)
		}
	}
	requests := map[string]int{}
	for _, a := range client.Actions() {
		sel, fsel, ok := restrictions(a)
		res := a.GetResource().Resource
		if !ok || res != "services" && res != "endpointslices" {
			continue
		}
		requests[res]++
		if want := map[string]string{"services": NotHeadless}[res]; fsel.String() != want {
			t.Errorf("%s %s with field selector %q, want %q", a.GetVerb(), res, fsel, want)
		}
		for _, l := range []map[string]string{other, headless} {
			if sel.Matches(labels.Set(l)) {
				t.Errorf("%s %s selects labels %v (selector %q)", a.GetVerb(), res, l, sel)
			}
		}
		if !sel.Matches(labels.Set{"app": "web"}) {
			t.Errorf("%s %s does not select labels app=web (selector %q)", a.GetVerb(), res, sel)
		}
	}
	if requests["services"] < 2 || requests["endpointslices"] < 2 {
		t.Errorf("list and watch requests seen: %v, want both for services and endpointslices", requests)
	}
}

// restrictions returns the label and field selectors of a list or watch
// request, and whether a is one.
func restrictions(a k8stesting.Action) (labels.Selector, fields.Selector, bool) {
	switch a := a.(type) {
	case k8stesting.ListAction:
		r := a.GetListRestrictions()
		return r.Labels, r.Fields, true
	case k8stesting.WatchAction:
		r := a.GetWatchRestrictions()
		return r.Labels, r.Fields, true
	}
	return nil, nil, false
}

// TestServicesWithoutNotHeadless: an apiserver before Kubernetes 1.31
// refuses the NotHeadless field selector (400 Bad Request). The Watcher then
// lists and watches Services by label only, and List does too, instead of
// failing every request.
func TestServicesWithoutNotHeadless(t *testing.T) {
	client := fake.NewClientset(service("a", "web", nil))
	refused := 0
	refuse := func(a k8stesting.Action) (bool, runtime.Object, error) {
		if _, f, _ := restrictions(a); f != nil && !f.Empty() {
			refused++
			return true, nil, apierrors.NewBadRequest(`Unable to find "/v1, Resource=services" that match label selector "", field selector NotHeadless: field label not supported: spec.clusterIP`)
		}
		return false, nil, nil
	}
	client.PrependReactor("list", "services", refuse)
	client.PrependWatchReactor("services", func(a k8stesting.Action) (bool, watch.Interface, error) {
		handled, _, err := refuse(a)
		return handled, nil, err
	})
	w := startOn(t, client, &recorder{})
	if keys, err := w.ServiceKeys(); err != nil || !slices.Equal(keys, []types.NamespacedName{key("a", "web")}) {
		t.Errorf("ServiceKeys() = %v, %v; want [a/web]", keys, err)
	}
	snap, err := List(context.Background(), client, "node1")
	if err != nil || len(snap.Services) != 1 {
		t.Errorf("List: %v services, %v; want a/web", snap, err)
	}
	if refused != 2 {
		t.Errorf("%d requests with the field selector refused, want 2 (the Watcher's first, List's first)", refused)
	}
}

func TestSliceEvents(t *testing.T) {
	client, w, rec := start(t, slice("a", "web-1", "web"), slice("a", "web-2", "web"), slice("a", "nolabel", ""))
	rec.waitFor(t, key("a", "web"))
	ctx := context.Background()
	es := client.DiscoveryV1().EndpointSlices("a")

	got, err := w.EndpointSlices(key("a", "web"))
	if err != nil || len(got) != 2 {
		t.Fatalf("EndpointSlices(a/web) = %d slices, %v; want 2", len(got), err)
	}

	// Moving a slice to another Service changes both.
	if _, err := es.Update(ctx, slice("a", "web-2", "api"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, key("a", "web"), key("a", "api"))
	if got, _ := w.EndpointSlices(key("a", "web")); len(got) != 1 || got[0].Name != "web-1" {
		t.Errorf("EndpointSlices(a/web) after move = %v, want [web-1]", names(got))
	}
	if got, _ := w.EndpointSlices(key("a", "api")); len(got) != 1 || got[0].Name != "web-2" {
		t.Errorf("EndpointSlices(a/api) after move = %v, want [web-2]", names(got))
	}

	// A changed slice changes its Service.
	changed := slice("a", "web-1", "web")
	changed.Endpoints[0].Addresses[0] = "10.244.0.9"
	if _, err := es.Update(ctx, changed, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, key("a", "web"))

	if err := es.Delete(ctx, "web-2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	rec.waitFor(t, key("a", "api"))
}

func TestTombstones(t *testing.T) {
	_, w, rec := start(t)
	w.serviceDeleted(cache.DeletedFinalStateUnknown{Key: "a/web", Obj: service("a", "web", nil)})
	w.sliceDeleted(cache.DeletedFinalStateUnknown{Key: "b/x", Obj: slice("b", "x", "api")})
	changed, _ := rec.take()
	if want := []types.NamespacedName{key("a", "web"), key("b", "api")}; !slices.Equal(changed, want) {
		t.Errorf("changed after tombstones = %v, want %v", changed, want)
	}
}

func TestNodeZoneChangesEverything(t *testing.T) {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node1", Labels: map[string]string{ZoneLabel: "z1"}}}
	client, w, rec := start(t, node)
	waitAll(t, rec, 1)
	if n := w.Node(); n == nil || n.Labels[ZoneLabel] != "z1" {
		t.Fatalf("Node() = %v, want node1 in zone z1", n)
	}
	ctx := context.Background()
	nodes := client.CoreV1().Nodes()

	// Another label: nothing to rebuild.
	n := node.DeepCopy()
	n.Labels["x"] = "y"
	if _, err := nodes.Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Another node: nothing either.
	if _, err := nodes.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node2"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if _, all := rec.take(); all != 0 {
		t.Errorf("AllChanged called %d times for an unrelated node change, want 0", all)
	}

	n = n.DeepCopy()
	n.Labels[ZoneLabel] = "z2"
	if _, err := nodes.Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitAll(t, rec, 1)

	// A new primary address (--nodeport-addresses=primary) rebuilds too,
	// and the cache holds it.
	n = n.DeepCopy()
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.1.7"}}
	if _, err := nodes.UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitAll(t, rec, 1)
	if got := model.PrimaryAddresses(w.Node()); len(got) != 1 || got[0].String() != "192.168.1.7" {
		t.Errorf("primary addresses of the cached node = %v, want [192.168.1.7]", got)
	}
}

func waitAll(t *testing.T, rec *recorder, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		rec.mu.Lock()
		n := rec.all
		rec.mu.Unlock()
		if n >= want {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	if _, all := rec.take(); all != want {
		t.Fatalf("AllChanged called %d times, want %d", all, want)
	}
}

func names(s []*discoveryv1.EndpointSlice) []string {
	var out []string
	for _, x := range s {
		out = append(out, x.Name)
	}
	return out
}

// TestCachedObjectsTrimmed checks that the informer caches keep what svcnat
// reads and drop managed fields, annotations (but the slice's change trigger
// time) and the Node's status but its addresses (TestTrimKeepsOnlyWhatIsRead
// checks trim field by field).
func TestCachedObjectsTrimmed(t *testing.T) {
	managed := []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}}
	svc := service("default", "web", nil)
	svc.ManagedFields = managed
	svc.Annotations = map[string]string{corev1.LastAppliedConfigAnnotation: "{}"}
	es := slice("default", "web-1", "web")
	es.ManagedFields = managed
	es.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: "2026-11-26T01:02:03Z", "other": "x"}
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "node1", Labels: map[string]string{ZoneLabel: "z1"}, ManagedFields: managed,
			Annotations: map[string]string{"node.alpha.kubernetes.io/ttl": "0"}},
		Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: "ToBeDeletedByClusterAutoscaler", Effect: corev1.TaintEffectNoSchedule}}},
		Status: corev1.NodeStatus{Images: []corev1.ContainerImage{{Names: []string{"registry/big:1"}, SizeBytes: 1 << 30}},
			Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.1.2"}}},
	}
	_, w, _ := start(t, svc, es, node)

	gotSvc, err := w.Service(key("default", "web"))
	if err != nil {
		t.Fatal(err)
	}
	if gotSvc.ManagedFields != nil || gotSvc.Annotations != nil || gotSvc.Spec.ClusterIP != "10.96.0.10" {
		t.Errorf("cached Service = managedFields %v, annotations %v, clusterIP %q; want both dropped, spec kept",
			gotSvc.ManagedFields, gotSvc.Annotations, gotSvc.Spec.ClusterIP)
	}
	gotSlices, err := w.EndpointSlices(key("default", "web"))
	if err != nil || len(gotSlices) != 1 {
		t.Fatalf("EndpointSlices = %v, %v; want the one slice", names(gotSlices), err)
	}
	want := map[string]string{corev1.EndpointsLastChangeTriggerTime: "2026-11-26T01:02:03Z"}
	if s := gotSlices[0]; s.ManagedFields != nil || !maps.Equal(s.Annotations, want) || len(s.Endpoints) != 1 {
		t.Errorf("cached slice = managedFields %v, annotations %v, %d endpoints; want annotations %v, endpoints kept",
			s.ManagedFields, s.Annotations, len(s.Endpoints), want)
	}
	n := w.Node()
	if n == nil {
		t.Fatal("Node not cached")
	}
	if n.ManagedFields != nil || n.Annotations != nil || len(n.Status.Images) != 0 || n.Labels[ZoneLabel] != "z1" ||
		len(n.Status.Addresses) != 1 || len(n.Spec.Taints) != 1 {
		t.Errorf("cached Node = managedFields %v, annotations %v, %d images, labels %v, addresses %v, taints %v; want labels, addresses and taints kept",
			n.ManagedFields, n.Annotations, len(n.Status.Images), n.Labels, n.Status.Addresses, n.Spec.Taints)
	}
}
