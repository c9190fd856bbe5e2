//go:build linux

package main

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/svcnat/svcnat/test/testbed"
)

// The workload: Services in one namespace, each with one TCP port and an
// EndpointSlice of endpointsPerService endpoints. Filler endpoints use
// addresses from fillerBase upwards, which no namespace of the test bed
// holds (they are never connected to); probe Services point at real pods.
const (
	benchNamespace      = "bench"
	servicePort         = 8080
	endpointsPerService = 10
	portName            = "tcp"
)

var fillerBase = netip.MustParseAddr("172.20.0.0")

// workload is what the benchmark has written to the apiserver; it keeps the
// latest version of every filler EndpointSlice so that bursts can update
// them without reading them back.
type workload struct {
	kube    kubernetes.Interface
	workers int
	// delivered is when the bench's own watch received probe writes.
	delivered *deliveries

	mu      sync.Mutex
	slices  []*discoveryv1.EndpointSlice // filler slices, by index
	version int                          // bumps filler endpoint addresses on each burst
}

func fillerName(i int) string { return fmt.Sprintf("svc-%05d", i) }

// fillerAddr returns endpoint j of filler Service i, shifted by version.
func fillerAddr(i, j, version int) string {
	a := fillerBase.As4()
	n := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	n += uint32((i*endpointsPerService + j + version) % (1 << 20))
	return netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}).String()
}

func service(name string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: benchNamespace, Name: name},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP,
			Ports: []corev1.ServicePort{{Name: portName, Protocol: corev1.ProtocolTCP, Port: servicePort,
				TargetPort: intstr.FromInt32(servicePort)}},
		},
	}
}

func fillerSlice(i, version int) *discoveryv1.EndpointSlice {
	ready := true
	eps := make([]discoveryv1.Endpoint, endpointsPerService)
	for j := range eps {
		eps[j] = discoveryv1.Endpoint{Addresses: []string{fillerAddr(i, j, version)},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready}}
	}
	return testbed.EndpointSlice(benchNamespace, fillerName(i), fillerName(i)+"-1",
		[]discoveryv1.EndpointPort{testbed.SlicePort(portName, corev1.ProtocolTCP, servicePort)}, eps...)
}

// parallel runs f(i) for i in [from, to) on w workers and returns the first
// error; it stops handing out work once an error occurred or ctx ended.
func parallel(ctx context.Context, w, from, to int, f func(i int) error) error {
	var next atomic.Int64
	next.Store(int64(from))
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for range w {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= to || ctx.Err() != nil {
					return
				}
				if err := f(i); err != nil {
					once.Do(func() { first = err })
					next.Store(int64(to))
					return
				}
			}
		})
	}
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}

// grow creates filler Services (and their slices) until there are n.
func (w *workload) grow(ctx context.Context, n int) error {
	w.mu.Lock()
	have := len(w.slices)
	if n > have {
		w.slices = append(w.slices, make([]*discoveryv1.EndpointSlice, n-have)...)
	}
	version := w.version
	w.mu.Unlock()
	if n <= have {
		return nil
	}
	return parallel(ctx, w.workers, have, n, func(i int) error {
		if _, err := w.kube.CoreV1().Services(benchNamespace).Create(ctx, service(fillerName(i)), metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create service %s: %w", fillerName(i), err)
		}
		s, err := w.kube.DiscoveryV1().EndpointSlices(benchNamespace).Create(ctx, fillerSlice(i, version), metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("create endpointslice of %s: %w", fillerName(i), err)
		}
		w.mu.Lock()
		w.slices[i] = s
		w.mu.Unlock()
		return nil
	})
}

// burst changes the endpoint addresses of count filler slices as fast as
// the workers can write, and returns when every write is done.
func (w *workload) burst(ctx context.Context, count int) (time.Duration, error) {
	w.mu.Lock()
	w.version++
	version := w.version
	count = min(count, len(w.slices))
	w.mu.Unlock()
	start := time.Now()
	err := parallel(ctx, w.workers, 0, count, func(i int) error {
		w.mu.Lock()
		s := w.slices[i].DeepCopy()
		w.mu.Unlock()
		s.Endpoints = fillerSlice(i, version).Endpoints
		got, err := w.kube.DiscoveryV1().EndpointSlices(benchNamespace).Update(ctx, s, metav1.UpdateOptions{})
		if err != nil {
			return fmt.Errorf("update endpointslice %s: %w", s.Name, err)
		}
		w.mu.Lock()
		w.slices[i] = got
		w.mu.Unlock()
		return nil
	})
	return time.Since(start), err
}

// hiddenLabel makes every proxy here ignore a Service, as kube-proxy does
// for Services another proxy serves.
const hiddenLabel = "service.kubernetes.io/service-proxy-name"

// fillers returns the number of filler Services.
func (w *workload) fillers() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.slices)
}

// hide sets (or removes) hiddenLabel on the filler Services [from, to).
func (w *workload) hide(ctx context.Context, on bool, from, to int) error {
	patch := []byte(`{"metadata":{"labels":{"` + hiddenLabel + `":null}}}`)
	if on {
		patch = []byte(`{"metadata":{"labels":{"` + hiddenLabel + `":"svcnat-bench-hidden"}}}`)
	}
	return parallel(ctx, w.workers, from, to, func(i int) error {
		if _, err := w.kube.CoreV1().Services(benchNamespace).Patch(ctx, fillerName(i), types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			return fmt.Errorf("label service %s: %w", fillerName(i), err)
		}
		return nil
	})
}

// probeService is a Service whose endpoints are real pods.
type probeService struct {
	name      string
	clusterIP netip.Addr
	slice     *discoveryv1.EndpointSlice
	pod       *testbed.Pod // the pod it currently points at (single-endpoint probes)
}

func (p *probeService) addr() string {
	return netip.AddrPortFrom(p.clusterIP, servicePort).String()
}

// createService creates a Service without endpoints and returns it with
// its ClusterIP.
func (w *workload) createService(ctx context.Context, name string) (*probeService, error) {
	svc, err := w.kube.CoreV1().Services(benchNamespace).Create(ctx, service(name), metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create service %s: %w", name, err)
	}
	ip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil {
		return nil, fmt.Errorf("service %s: cluster IP %q: %w", name, svc.Spec.ClusterIP, err)
	}
	return &probeService{name: name, clusterIP: ip}, nil
}

// createSlice creates the Service's EndpointSlice with the given endpoints.
func (w *workload) createSlice(ctx context.Context, p *probeService, eps ...discoveryv1.Endpoint) (write, error) {
	slice := testbed.EndpointSlice(benchNamespace, p.name, p.name+"-1",
		[]discoveryv1.EndpointPort{testbed.SlicePort(portName, corev1.ProtocolTCP, servicePort)}, eps...)
	slice.Labels[probeLabel] = ""
	wr := write{at: time.Now()}
	got, err := w.kube.DiscoveryV1().EndpointSlices(benchNamespace).Create(ctx, slice, metav1.CreateOptions{})
	if err != nil {
		return wr, fmt.Errorf("create endpointslice of service %s: %w", p.name, err)
	}
	p.slice, wr.version = got, got.ResourceVersion
	return wr, nil
}

// deleteService deletes the Service and its EndpointSlice (no controller
// does it here).
func (w *workload) deleteService(ctx context.Context, p *probeService) error {
	if err := w.kube.DiscoveryV1().EndpointSlices(benchNamespace).Delete(ctx, p.name+"-1", metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete endpointslice of service %s: %w", p.name, err)
	}
	if err := w.kube.CoreV1().Services(benchNamespace).Delete(ctx, p.name, metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete service %s: %w", p.name, err)
	}
	return nil
}

// createProbe creates a probe Service pointing at pod.
func (w *workload) createProbe(ctx context.Context, name string, pod *testbed.Pod) (*probeService, error) {
	p, err := w.createService(ctx, name)
	if err != nil {
		return nil, err
	}
	if _, err := w.createSlice(ctx, p, pod.Endpoint(testbed.Ready)); err != nil {
		return nil, err
	}
	p.pod = pod
	return p, nil
}

// setEndpoints rewrites the Service's slice.
func (w *workload) setEndpoints(ctx context.Context, p *probeService, eps ...discoveryv1.Endpoint) (write, error) {
	s := p.slice.DeepCopy()
	s.Endpoints = eps
	wr := write{at: time.Now()}
	got, err := w.kube.DiscoveryV1().EndpointSlices(benchNamespace).Update(ctx, s, metav1.UpdateOptions{})
	if err != nil {
		return wr, fmt.Errorf("update endpointslice of service %s: %w", p.name, err)
	}
	p.slice, wr.version = got, got.ResourceVersion
	return wr, nil
}

// point updates the probe Service's slice to the given pod.
func (w *workload) point(ctx context.Context, p *probeService, pod *testbed.Pod) (write, error) {
	wr, err := w.setEndpoints(ctx, p, pod.Endpoint(testbed.Ready))
	if err == nil {
		p.pod = pod
	}
	return wr, err
}

// rollingService is a Deployment's Service, as a rolling update rewrites
// it: replicas ready pods out of pods, replaced one by one.
type rollingService struct {
	*probeService
	pods  []*testbed.Pod
	ready []*testbed.Pod // oldest first
	next  int            // index in pods of the next new pod
}

// createRolling creates the rolling Service with the first replicas pods
// ready.
func (w *workload) createRolling(ctx context.Context, name string, pods []*testbed.Pod, replicas int) (*rollingService, error) {
	if replicas+2 > len(pods) { // the ready ones, one terminating, one new
		return nil, fmt.Errorf("rolling service %s: %d replicas need %d pods, not %d", name, replicas, replicas+2, len(pods))
	}
	p, err := w.createService(ctx, name)
	if err != nil {
		return nil, err
	}
	r := &rollingService{probeService: p, pods: pods, ready: slices.Clone(pods[:replicas]), next: replicas}
	_, err = w.createSlice(ctx, p, r.endpoints(nil)...)
	return r, err
}

// endpoints returns the slice's endpoints: the ready pods, then old as
// serving and terminating when it is not nil.
func (r *rollingService) endpoints(old *testbed.Pod) []discoveryv1.Endpoint {
	var eps []discoveryv1.Endpoint
	for _, p := range r.ready {
		if p != old {
			eps = append(eps, p.Endpoint(testbed.Ready))
		}
	}
	if old != nil {
		eps = append(eps, old.Endpoint(testbed.ServingTerminating))
	}
	return eps
}

// step replaces the oldest ready pod as a Deployment does: the new pod
// becomes ready (the previous step's terminating pod is gone by then), then
// the old one terminates, written as soon as the first write returned. It
// returns the two writes.
func (w *workload) step(ctx context.Context, r *rollingService) (addedW, oldW write, err error) {
	added, old := r.upcoming()
	r.next++
	r.ready = append(r.ready, added)
	if addedW, err = w.setEndpoints(ctx, r.probeService, r.endpoints(nil)...); err != nil {
		return addedW, oldW, err
	}
	oldW, err = w.setEndpoints(ctx, r.probeService, r.endpoints(old)...)
	r.ready = slices.DeleteFunc(r.ready, func(p *testbed.Pod) bool { return p == old })
	return addedW, oldW, err
}

// upcoming returns the pods the next step adds and replaces.
func (r *rollingService) upcoming() (added, old *testbed.Pod) {
	return r.pods[r.next%len(r.pods)], r.ready[0]
}
