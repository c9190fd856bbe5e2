// Package watch follows the apiserver for the objects svcnat programs from:
// Services and EndpointSlices (those the apiserver selects as Proxied) and
// this node's Node. It is the only package that imports client-go. Its event
// handlers do nothing but tell a Sink which Service changed; the sync loop
// reads the objects back through the Watcher's listers when it rebuilds that
// Service.
package watch

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/svcnat/svcnat/pkg/model"
)

// ZoneLabel is the Node label that names the node's zone, for topology hints.
const ZoneLabel = "topology.kubernetes.io/zone"

// LabelServiceProxyName marks a Service (and its EndpointSlices) as handled by
// another proxy; svcnat, like kube-proxy, leaves such objects alone.
const LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"

// Proxied is the label selector of the Services and EndpointSlices svcnat
// proxies: those without the service-proxy-name label (another proxy owns
// them) and without the service.kubernetes.io/headless label. The apiserver
// applies it, as it does for kube-proxy's informers, so other objects never
// reach svcnat: the caches, the event handlers and List never see them. An
// object whose labels change out of the selection arrives as a deletion
// (carrying its last selected state), one whose labels change into it as an
// addition.
const Proxied = "!" + LabelServiceProxyName + ",!" + corev1.IsHeadlessService

// NotHeadless is the field selector that leaves headless Services
// (clusterIP None: nothing to proxy) out on the apiserver, as kube-proxy
// does since Kubernetes 1.32. Apiservers before 1.31 refuse it (400 Bad
// Request); svcnat then selects Services by label only and pkg/model
// ignores the headless ones, as it always does.
const NotHeadless = "spec.clusterIP!=None"

// byService indexes EndpointSlices by "namespace/service-name".
const byService = "service"

// Sink is told which Services need a rebuild. Its methods are called from
// informer goroutines and must not block.
type Sink interface {
	// ServiceChanged says the Service or one of its EndpointSlices changed.
	ServiceChanged(key types.NamespacedName)
	// AllChanged says every Service needs a rebuild (the node changed).
	AllChanged()
}

// Watcher holds the informers and answers questions from their caches.
type Watcher struct {
	client   kubernetes.Interface
	services cache.SharedIndexInformer
	slices   cache.SharedIndexInformer
	node     cache.SharedIndexInformer
	svcList  corelisters.ServiceLister
	nodeList corelisters.NodeLister
	nodeName string
	sink     Sink
	log      *slog.Logger
	start    []func(<-chan struct{})
	// handled say whether each event handler has been handed every
	// object of its informer's first list.
	handled []cache.InformerSynced
	// startServices starts the Services informer once the apiserver has
	// said whether it selects by NotHeadless.
	startServices func(context.Context)
}

// New creates informers for Services, EndpointSlices and the Node named
// nodeName. resync is the informers' resync period (0 for none). Nothing is
// listed or watched until Start.
func New(client kubernetes.Interface, nodeName string, resync time.Duration, log *slog.Logger) (*Watcher, error) {
	factory := informers.NewSharedInformerFactoryWithOptions(client, resync, informers.WithTransform(trim),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = Proxied }))
	// Services have a factory of their own, for the field selector
	// Start finds the apiserver accepts before it starts it.
	var svcFields string
	svcFactory := informers.NewSharedInformerFactoryWithOptions(client, resync, informers.WithTransform(trim),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.LabelSelector, o.FieldSelector = Proxied, svcFields
		}))
	nodeFactory := informers.NewSharedInformerFactoryWithOptions(client, resync, informers.WithTransform(trim),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector(metav1.ObjectNameField, nodeName).String()
		}))
	w := &Watcher{
		client:   client,
		services: svcFactory.Core().V1().Services().Informer(),
		slices:   factory.Discovery().V1().EndpointSlices().Informer(),
		node:     nodeFactory.Core().V1().Nodes().Informer(),
		svcList:  svcFactory.Core().V1().Services().Lister(),
		nodeList: nodeFactory.Core().V1().Nodes().Lister(),
		nodeName: nodeName,
		log:      log,
		start:    []func(<-chan struct{}){factory.Start, nodeFactory.Start},
	}
	w.startServices = func(ctx context.Context) {
		svcFields = w.serviceFieldSelector(ctx)
		svcFactory.Start(ctx.Done())
	}
	if err := w.slices.AddIndexers(cache.Indexers{byService: sliceServiceIndex}); err != nil {
		return nil, fmt.Errorf("index endpointslices by service: %w", err)
	}
	handlers := []struct {
		inf cache.SharedIndexInformer
		h   cache.ResourceEventHandler
	}{
		{w.services, cache.ResourceEventHandlerFuncs{
			AddFunc:    w.serviceChanged,
			UpdateFunc: func(_, obj any) { w.serviceChanged(obj) },
			DeleteFunc: w.serviceDeleted,
		}},
		{w.slices, cache.ResourceEventHandlerFuncs{
			AddFunc:    w.sliceAdded,
			UpdateFunc: w.sliceUpdated,
			DeleteFunc: w.sliceDeleted,
		}},
		{w.node, cache.ResourceEventHandlerFuncs{
			AddFunc:    w.nodeAddedOrDeleted,
			UpdateFunc: w.nodeUpdated,
			DeleteFunc: func(obj any) { w.nodeAddedOrDeleted(untomb(obj)) },
		}},
	}
	for _, h := range handlers {
		reg, err := h.inf.AddEventHandler(h.h)
		if err != nil {
			return nil, fmt.Errorf("add event handler: %w", err)
		}
		w.handled = append(w.handled, reg.HasSynced)
	}
	return w, nil
}

// trim replaces an object, before it is cached, by a copy of only what
// svcnat reads from it, so that fields it never reads (managed fields,
// annotations, owner references, target references, hostnames, zones,
// selectors, most of a Node's status, and fields future API versions add)
// take no memory:
//   - every object: name, namespace, resourceVersion (the informer tells
//     resyncs apart by it);
//   - Service: uid (Build's tie-break), the spec fields and the load
//     balancer ingress IPs pkg/model reads;
//   - EndpointSlice: its service-name label (the index, pkg/model), its
//     change trigger time annotation (the agent's latency metric), its
//     address type and ports, and per endpoint its addresses, conditions,
//     nodeName and hints;
//   - Node (one object, trimmed less strictly): all but its managed fields,
//     annotations and status other than its addresses (the health check
//     reads its deletion timestamp and taints, pkg/model its zone label and
//     its addresses).
//
// The copies share what many objects hold alike (namespaces, node and
// port names, protocols, condition values): cached objects are read-only.
// Endpoint lists are allocated to their length. Other types, such as
// tombstones, pass unchanged.
func trim(obj any) (any, error) {
	switch o := obj.(type) {
	case *discoveryv1.EndpointSlice:
		return trimSlice(o), nil
	case *corev1.Service:
		return trimService(o), nil
	case *corev1.Node:
		o.ManagedFields, o.Annotations = nil, nil
		o.Status = corev1.NodeStatus{Addresses: o.Status.Addresses}
	}
	return obj, nil
}

// trimMeta returns the name, namespace and resourceVersion of m, with the
// given labels and annotations.
func trimMeta(m *metav1.ObjectMeta, labels, annotations map[string]string) metav1.ObjectMeta {
	return metav1.ObjectMeta{Name: m.Name, Namespace: shared.str(m.Namespace), ResourceVersion: m.ResourceVersion,
		Labels: labels, Annotations: annotations}
}

// keep returns the entry of m named key as a map of its own, nil when m
// has none.
func keep(m map[string]string, key string) map[string]string {
	v, ok := m[key]
	if !ok {
		return nil
	}
	return map[string]string{key: v}
}

func trimService(o *corev1.Service) *corev1.Service {
	spec := &o.Spec
	out := &corev1.Service{ObjectMeta: trimMeta(&o.ObjectMeta, nil, nil),
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceType(shared.str(string(spec.Type))), ClusterIP: spec.ClusterIP, ClusterIPs: spec.ClusterIPs, ExternalIPs: spec.ExternalIPs,
			SessionAffinity: spec.SessionAffinity, SessionAffinityConfig: spec.SessionAffinityConfig,
			LoadBalancerSourceRanges: spec.LoadBalancerSourceRanges, ExternalTrafficPolicy: spec.ExternalTrafficPolicy,
			HealthCheckNodePort: spec.HealthCheckNodePort, InternalTrafficPolicy: spec.InternalTrafficPolicy,
		}}
	out.UID = o.UID
	if len(spec.ClusterIPs) > 0 && spec.ClusterIP == spec.ClusterIPs[0] {
		out.Spec.ClusterIP = spec.ClusterIPs[0]
	}
	if len(spec.Ports) > 0 {
		out.Spec.Ports = make([]corev1.ServicePort, len(spec.Ports))
		for i, p := range spec.Ports {
			out.Spec.Ports[i] = corev1.ServicePort{Name: shared.str(p.Name), Protocol: p.Protocol, Port: p.Port, NodePort: p.NodePort}
		}
	}
	if ing := o.Status.LoadBalancer.Ingress; len(ing) > 0 {
		out.Status.LoadBalancer.Ingress = make([]corev1.LoadBalancerIngress, len(ing))
		for i, in := range ing {
			out.Status.LoadBalancer.Ingress[i] = corev1.LoadBalancerIngress{IP: in.IP, IPMode: in.IPMode}
		}
	}
	return out
}

func trimSlice(o *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	out := &discoveryv1.EndpointSlice{
		ObjectMeta: trimMeta(&o.ObjectMeta, keep(o.Labels, discoveryv1.LabelServiceName),
			keep(o.Annotations, corev1.EndpointsLastChangeTriggerTime)),
		AddressType: discoveryv1.AddressType(shared.str(string(o.AddressType))),
	}
	if len(o.Ports) > 0 {
		out.Ports = make([]discoveryv1.EndpointPort, len(o.Ports))
		for i, p := range o.Ports {
			out.Ports[i] = discoveryv1.EndpointPort{Name: shared.ptr(p.Name), Protocol: sharedProtocol(p.Protocol), Port: p.Port}
		}
	}
	if len(o.Endpoints) > 0 {
		out.Endpoints = make([]discoveryv1.Endpoint, len(o.Endpoints))
		for i := range o.Endpoints {
			ep := &o.Endpoints[i]
			out.Endpoints[i] = discoveryv1.Endpoint{
				Addresses: ep.Addresses,
				Conditions: discoveryv1.EndpointConditions{Ready: sharedBool(ep.Conditions.Ready),
					Serving: sharedBool(ep.Conditions.Serving), Terminating: sharedBool(ep.Conditions.Terminating)},
				NodeName: shared.ptr(ep.NodeName),
				Hints:    ep.Hints,
			}
		}
	}
	return out
}

// protocols are the values every cached EndpointSlice port protocol points
// to.
var protocols = map[corev1.Protocol]*corev1.Protocol{}

func init() {
	for _, p := range []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP} {
		protocols[p] = &p
	}
}

func sharedProtocol(p *corev1.Protocol) *corev1.Protocol {
	if p != nil {
		if q, ok := protocols[*p]; ok {
			return q
		}
	}
	return p
}

// yes and no are the values every cached condition points to.
var yes, no = true, false

func sharedBool(b *bool) *bool {
	switch {
	case b == nil:
		return nil
	case *b:
		return &yes
	}
	return &no
}

// shared interns the strings cached objects hold alike.
var shared = &interner{strs: map[string]*string{}}

// interner hands out one copy of each string it is given. It forgets
// everything when it holds maxInterned strings, so that names that come
// and go (nodes of an autoscaled cluster) cannot grow it without bound;
// copies handed out stay valid.
type interner struct {
	mu   sync.Mutex
	strs map[string]*string
}

const maxInterned = 1 << 14

// ptr returns a pointer to the shared copy of *s; nil for nil.
func (in *interner) ptr(s *string) *string {
	if s == nil {
		return nil
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if p, ok := in.strs[*s]; ok {
		return p
	}
	if len(in.strs) >= maxInterned {
		clear(in.strs)
	}
	in.strs[*s] = s
	return s
}

// str returns the shared copy of s.
func (in *interner) str(s string) string { return *in.ptr(&s) }

// Start starts the informers, which tell sink about every change until ctx
// ends. It returns at once. Call it once.
func (w *Watcher) Start(ctx context.Context, sink Sink) {
	w.sink = sink
	for _, start := range w.start {
		start(ctx.Done())
	}
	go w.startServices(ctx)
}

// serviceFieldSelector asks the apiserver, until it answers or ctx ends,
// whether it selects Services by NotHeadless, and returns the field
// selector to watch them with.
func (w *Watcher) serviceFieldSelector(ctx context.Context) string {
	delay := time.Second
	for {
		_, fields, err := listServices(ctx, w.client, 1)
		switch {
		case err == nil && fields == "":
			w.log.Info("the apiserver does not select Services by " + NotHeadless + " (Kubernetes before 1.31): headless Services are cached, and ignored")
			return fields
		case err == nil || ctx.Err() != nil:
			return fields
		}
		w.log.Warn("list services, trying again", "err", err, "in", delay)
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
		delay = min(2*delay, 30*time.Second)
	}
}

// WaitForCacheSync blocks until every informer has listed its objects once
// and handed each of them to the Sink, and reports false if ctx ended
// first. Waiting for the caches alone, the agent's first sync ran while the
// list's events were still arriving, and a second sync rebuilt the
// Services they named (about half of 10,000) for nothing.
func (w *Watcher) WaitForCacheSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), w.handled...)
}

// Service returns the Service named key from the cache, or nil when there
// is none (or it is not Proxied). The object is shared: do not modify it.
func (w *Watcher) Service(key types.NamespacedName) (*corev1.Service, error) {
	svc, err := w.svcList.Services(key.Namespace).Get(key.Name)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get service %s from cache: %w", key, err)
	}
	return svc, nil
}

// EndpointSlices returns the cached (so Proxied) EndpointSlices labelled for
// the Service named key. The objects are shared: do not modify them.
func (w *Watcher) EndpointSlices(key types.NamespacedName) ([]*discoveryv1.EndpointSlice, error) {
	objs, err := w.slices.GetIndexer().ByIndex(byService, key.String())
	if err != nil {
		return nil, fmt.Errorf("list endpointslices of service %s from cache: %w", key, err)
	}
	out := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		if s, ok := o.(*discoveryv1.EndpointSlice); ok {
			out = append(out, s)
		}
	}
	return out, nil
}

// ServiceKeys returns the names of every cached (so Proxied) Service.
func (w *Watcher) ServiceKeys() ([]types.NamespacedName, error) {
	svcs, err := w.svcList.List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("list services from cache: %w", err)
	}
	out := make([]types.NamespacedName, 0, len(svcs))
	for _, s := range svcs {
		out = append(out, types.NamespacedName{Namespace: s.Namespace, Name: s.Name})
	}
	return out, nil
}

// Node returns this node's Node object from the cache, or nil when it does
// not exist (yet). The object is shared: do not modify it.
func (w *Watcher) Node() *corev1.Node {
	n, err := w.nodeList.Get(w.nodeName)
	if err != nil {
		return nil
	}
	return n
}

func (w *Watcher) serviceChanged(obj any) {
	if svc, ok := obj.(*corev1.Service); ok {
		w.sink.ServiceChanged(types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name})
	}
}

func (w *Watcher) serviceDeleted(obj any) { w.serviceChanged(untomb(obj)) }

func (w *Watcher) sliceAdded(obj any) {
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return
	}
	if s.Labels[discoveryv1.LabelServiceName] == "" {
		w.unlabelled(s)
	}
	w.sliceChanged(s)
}

func (w *Watcher) sliceDeleted(obj any) {
	if s, ok := untomb(obj).(*discoveryv1.EndpointSlice); ok {
		w.sliceChanged(s)
	}
}

// IgnoredSink is a Sink that also wants to hear about objects the watcher
// leaves alone on purpose, once per object.
type IgnoredSink interface {
	Ignored(err *model.IgnoredError)
}

// unlabelled says, once per slice (when it appears or loses the label),
// that a slice without the service-name label belongs to no Service: to
// the sink when it is an IgnoredSink, else to the log.
func (w *Watcher) unlabelled(s *discoveryv1.EndpointSlice) {
	ig := &model.IgnoredError{Kind: model.KindEndpointSlice, Namespace: s.Namespace, Name: s.Name,
		Reason: "no " + discoveryv1.LabelServiceName + " label, so it belongs to no service"}
	if is, ok := w.sink.(IgnoredSink); ok {
		is.Ignored(ig)
		return
	}
	w.log.Info("object ignored", "kind", ig.Kind, "object", ig.Namespace+"/"+ig.Name, "reason", ig.Reason)
}

func (w *Watcher) sliceUpdated(oldObj, newObj any) {
	old, ok1 := oldObj.(*discoveryv1.EndpointSlice)
	s, ok2 := newObj.(*discoveryv1.EndpointSlice)
	if !ok1 || !ok2 {
		return
	}
	// The slice may have moved to another Service: both the Service it
	// belonged to and the one it belongs to now change.
	w.sliceChanged(old)
	if s.Labels[discoveryv1.LabelServiceName] != old.Labels[discoveryv1.LabelServiceName] {
		if s.Labels[discoveryv1.LabelServiceName] == "" {
			w.unlabelled(s)
		}
		w.sliceChanged(s)
	}
}

func (w *Watcher) sliceChanged(s *discoveryv1.EndpointSlice) {
	name := s.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return
	}
	w.sink.ServiceChanged(types.NamespacedName{Namespace: s.Namespace, Name: name})
}

// nodeAddedOrDeleted rebuilds everything: the zone (topology hints) and the
// primary addresses (--nodeport-addresses=primary) may have come or gone.
func (w *Watcher) nodeAddedOrDeleted(obj any) {
	if n, ok := obj.(*corev1.Node); ok && n.Name == w.nodeName {
		w.sink.AllChanged()
	}
}

func (w *Watcher) nodeUpdated(oldObj, newObj any) {
	old, ok1 := oldObj.(*corev1.Node)
	n, ok2 := newObj.(*corev1.Node)
	if !ok1 || !ok2 || n.Name != w.nodeName || old.Labels[ZoneLabel] == n.Labels[ZoneLabel] &&
		slices.Equal(model.PrimaryAddresses(old), model.PrimaryAddresses(n)) {
		return
	}
	w.sink.AllChanged()
}

// untomb returns the object a deletion event is about, also when the
// informer missed the deletion and only has its last known state.
func untomb(obj any) any {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		return t.Obj
	}
	return obj
}

func sliceServiceIndex(obj any) ([]string, error) {
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	name := s.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return nil, nil
	}
	return []string{s.Namespace + "/" + name}, nil
}
