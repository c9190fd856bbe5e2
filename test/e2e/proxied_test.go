//go:build linux && e2e

package e2e

import (
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/svcnat/svcnat/pkg/watch"
)

// testProxiedLabelsChange adds and removes, on objects already programmed,
// the labels that hand a Service or a slice to another proxy. The apiserver
// sends such a change as a deletion (or an addition) of the selected object;
// the proxy must remove (or program) it.
func testProxiedLabelsChange(t *testing.T, e *env) {
	svc := e.simpleService(t, "relabel", corev1.ServiceTypeClusterIP, "node1-a")
	e.slice(t, tcpSlice("relabel", "relabel-2", e.ready("node2-a")...))
	addr := clusterIP(t, svc, 80)
	from := e.pod("node1-b").Origin()
	e.reachesOnly(t, from, "tcp", addr, "node1-a", "node2-a")

	e.updateSlice(t, "relabel-2", func(s *discoveryv1.EndpointSlice) { s.Labels[corev1.IsHeadlessService] = "" })
	e.reachesOnly(t, from, "tcp", addr, "node1-a")
	e.updateSlice(t, "relabel-2", func(s *discoveryv1.EndpointSlice) { delete(s.Labels, corev1.IsHeadlessService) })
	e.reachesOnly(t, from, "tcp", addr, "node1-a", "node2-a")

	e.updateService(t, "relabel", func(s *corev1.Service) {
		s.Labels = map[string]string{watch.LabelServiceProxyName: "someone-else"}
	})
	e.unreachable(t, from, "tcp", addr, false)
	// Neither the kernel nor the apiserver's selection holds it now.
	e.checkDump(t)
	e.updateService(t, "relabel", func(s *corev1.Service) { delete(s.Labels, watch.LabelServiceProxyName) })
	e.reachesOnly(t, from, "tcp", addr, "node1-a", "node2-a")
}

// changedSink is a watch.Sink that remembers which Services it was told of.
type changedSink struct {
	mu      sync.Mutex
	changed map[types.NamespacedName]bool
}

func (s *changedSink) ServiceChanged(k types.NamespacedName) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.changed[k] = true
}

func (s *changedSink) AllChanged() {}

// take reports whether k was changed since the last take, and forgets it.
func (s *changedSink) take(k types.NamespacedName) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	was := s.changed[k]
	delete(s.changed, k)
	return was
}

// testWatcherCachesOnlyProxied runs svcnat's watch.Watcher in the test,
// against the real apiserver: objects labelled for another proxy or headless,
// and headless Services, never enter its caches, and label changes reach it
// as the deletions and additions the agent relies on.
func testWatcherCachesOnlyProxied(t *testing.T, e *env) {
	other := newService("cache-other", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	other.Labels = map[string]string{watch.LabelServiceProxyName: "someone-else"}
	e.service(t, other)
	headlessSvc := newService("cache-headless", corev1.ServiceTypeClusterIP, svcPort("", corev1.ProtocolTCP, 80, tcpA))
	headlessSvc.Spec.ClusterIP = corev1.ClusterIPNone
	e.service(t, headlessSvc)
	e.simpleService(t, "cache-mine", corev1.ServiceTypeClusterIP, "node1-a")
	headless := tcpSlice("cache-mine", "cache-mine-2", e.ready("node2-a")...)
	headless.Labels[corev1.IsHeadlessService] = ""
	e.slice(t, headless)

	w, err := watch.New(e.c.Kube, e.c.Nodes[0].Name, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	sink := &changedSink{changed: map[types.NamespacedName]bool{}}
	w.Start(t.Context(), sink)
	if !w.WaitForCacheSync(t.Context()) {
		t.Fatal("watcher caches did not sync")
	}
	mine := types.NamespacedName{Namespace: ns, Name: "cache-mine"}
	otherKey, headlessKey := types.NamespacedName{Namespace: ns, Name: "cache-other"}, types.NamespacedName{Namespace: ns, Name: "cache-headless"}
	keys, err := w.ServiceKeys()
	if err != nil || !slices.Contains(keys, mine) || slices.Contains(keys, otherKey) || slices.Contains(keys, headlessKey) {
		t.Fatalf("cached services %v, %v; want %s and neither %s nor %s", keys, err, mine, otherKey, headlessKey)
	}
	if s, err := w.Service(otherKey); s != nil || err != nil {
		t.Fatalf("Service(%s) = %v, %v; want nil, nil (not cached)", otherKey, s, err)
	}
	// cached waits until the Watcher was told of mine and its cache holds
	// mine (or not) with exactly the named slices.
	cached := func(what string, want bool, wantSlices ...string) {
		t.Helper()
		eventually(t, what, 15*time.Second, func() error {
			s, err := w.Service(mine)
			if err != nil || (s != nil) != want {
				return fmt.Errorf("Service(%s) = %v, %v; want cached=%t", mine, s, err, want)
			}
			es, err := w.EndpointSlices(mine)
			var names []string
			for _, x := range es {
				names = append(names, x.Name)
			}
			slices.Sort(names)
			if err != nil || !slices.Equal(names, wantSlices) {
				return fmt.Errorf("EndpointSlices(%s) = %v, %v; want %v", mine, names, err, wantSlices)
			}
			if !sink.take(mine) {
				return fmt.Errorf("sink not told that %s changed", mine)
			}
			return nil
		})
	}
	cached("initial list", true, "cache-mine-1")

	e.updateService(t, "cache-mine", func(s *corev1.Service) {
		s.Labels = map[string]string{watch.LabelServiceProxyName: "someone-else"}
	})
	cached("service labelled for another proxy leaves the cache", false, "cache-mine-1")
	e.updateService(t, "cache-mine", func(s *corev1.Service) { delete(s.Labels, watch.LabelServiceProxyName) })
	cached("service unlabelled comes back", true, "cache-mine-1")

	e.updateSlice(t, "cache-mine-2", func(s *discoveryv1.EndpointSlice) { delete(s.Labels, corev1.IsHeadlessService) })
	cached("slice unlabelled enters the cache", true, "cache-mine-1", "cache-mine-2")
	e.updateSlice(t, "cache-mine-2", func(s *discoveryv1.EndpointSlice) { s.Labels[corev1.IsHeadlessService] = "" })
	cached("slice labelled headless leaves the cache", true, "cache-mine-1")
}
