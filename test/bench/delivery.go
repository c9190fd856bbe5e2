//go:build linux

package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// probeLabel marks the EndpointSlices of probe Services, which the bench
// watches itself.
const probeLabel = "bench.svcnat.io/probe"

// write is a write of a probe Service's EndpointSlice: when it was sent and
// the resourceVersion it made.
type write struct {
	at      time.Time
	version string
}

// deliveries records when an informer of the bench's own, beside the
// proxy's, receives each write of a probe's EndpointSlice. The apiserver's
// write and the watch's delivery are the floor of any proxy's programming
// latency: what is left above it is the proxy's, and the connection's.
type deliveries struct {
	mu sync.Mutex
	at map[string]time.Time // by resourceVersion
}

// watchDeliveries starts the informer and waits for its list.
func watchDeliveries(ctx context.Context, kube kubernetes.Interface) (*deliveries, error) {
	d := &deliveries{at: map[string]time.Time{}}
	f := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(benchNamespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = probeLabel }))
	inf := f.Discovery().V1().EndpointSlices().Informer()
	record := func(obj any) {
		now := time.Now()
		if s, ok := obj.(*discoveryv1.EndpointSlice); ok {
			d.mu.Lock()
			d.at[s.ResourceVersion] = now
			d.mu.Unlock()
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    record,
		UpdateFunc: func(_, obj any) { record(obj) },
	}); err != nil {
		return nil, fmt.Errorf("watch probe endpointslices: %w", err)
	}
	f.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return nil, fmt.Errorf("watch probe endpointslices: not listed: %w", context.Cause(ctx))
	}
	return d, nil
}

// took returns how long after it was sent the informer received w, and
// forgets it; false when it has not received it.
func (d *deliveries) took(w write) (time.Duration, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	at, ok := d.at[w.version]
	delete(d.at, w.version)
	return at.Sub(w.at), ok
}
