package agent

import (
	"testing"

	discoveryv1 "k8s.io/api/discovery/v1"
)

// What the agent leaves alone on purpose (here an FQDN slice) is counted
// once per object and reason, not once per rebuild, and not as invalid.
func TestIgnoredObjectsCountedOnce(t *testing.T) {
	h := newHarness(t)
	fqdn := endpointSlice("web", "web-fqdn", "db.example.com")
	fqdn.AddressType = discoveryv1.AddressTypeFQDN
	key := h.src.put(service("web", "10.96.0.10"), endpointSlice("web", "web-1", "10.244.0.5"), fqdn)
	h.cachesSynced()
	h.waitSync()
	for range 2 {
		h.a.ServiceChanged(key)
		h.advanceTo(h.clock.Since(t0) + 2*h.a.opts.MinSyncInterval)
		h.waitSync()
	}
	if got := counterValue(t, h.m.ignoredObjects.WithLabelValues("EndpointSlice")); got != 1 {
		t.Errorf("svcnat_ignored_objects_total{kind=EndpointSlice} = %v after three rebuilds, want 1", got)
	}
	if got := counterValue(t, h.m.invalidObjects.WithLabelValues("EndpointSlice")); got != 0 {
		t.Errorf("svcnat_invalid_objects_total{kind=EndpointSlice} = %v, want 0", got)
	}
}
