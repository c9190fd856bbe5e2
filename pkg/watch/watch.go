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
	services cache.SharedIndexInformer
	slices   cache.SharedIndexInformer
	node     cache.SharedIndexInformer
	svcList  corelisters.ServiceLister
	nodeList corelisters.NodeLister
	nodeName string
	sink     Sink
	log      *slog.Logger
	start    []func(<-chan struct{})
}

// New creates informers for Services, EndpointSlices and the Node named
// nodeName. resync is the informers' resync period (0 for none). Nothing is
// listed or watched until Start.
func New(client kubernetes.Interface, nodeName string, resync time.Duration, log *slog.Logger) (*Watcher, error) {
	factory := informers.NewSharedInformerFactoryWithOptions(client, resync, informers.WithTransform(trim),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = Proxied }))
	nodeFactory := informers.NewSharedInformerFactoryWithOptions(client, resync, informers.WithTransform(trim),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector(metav1.ObjectNameField, nodeName).String()
		}))
	w := &Watcher{
		services: factory.Core().V1().Services().Informer(),
		slices:   factory.Discovery().V1().EndpointSlices().Informer(),
		node:     nodeFactory.Core().V1().Nodes().Informer(),
		svcList:  factory.Core().V1().Services().Lister(),
		nodeList: nodeFactory.Core().V1().Nodes().Lister(),
		nodeName: nodeName,
		log:      log,
		start:    []func(<-chan struct{}){factory.Start, nodeFactory.Start},
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
		if _, err := h.inf.AddEventHandler(h.h); err != nil {
			return nil, fmt.Errorf("add event handler: %w", err)
		}
	}
	return w, nil
}

// trim drops from an object, before it is cached, what svcnat never reads:
// managed fields, annotations (kubectl's last-applied-configuration alone can
// double an object) except an EndpointSlice's change trigger time, and a
// Node's status (its image list is often the largest part of a cluster's
// Nodes). It modifies obj, which the informer owns; other types, such as
// tombstones, pass unchanged.
func trim(obj any) (any, error) {
	switch o := obj.(type) {
	case *discoveryv1.EndpointSlice:
		o.ManagedFields = nil
		trigger, ok := o.Annotations[corev1.EndpointsLastChangeTriggerTime]
		o.Annotations = nil
		if ok {
			o.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: trigger}
		}
	case *corev1.Service:
		o.ManagedFields = nil
		o.Annotations = nil
	case *corev1.Node:
		o.ManagedFields = nil
		o.Annotations = nil
		o.Status = corev1.NodeStatus{}
	}
	return obj, nil
}

// Start starts the informers, which tell sink about every change until ctx
// ends. It returns at once. Call it once.
func (w *Watcher) Start(ctx context.Context, sink Sink) {
	w.sink = sink
	for _, start := range w.start {
		start(ctx.Done())
	}
}

// WaitForCacheSync blocks until every informer has listed its objects once,
// and reports false if ctx ended first.
func (w *Watcher) WaitForCacheSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), w.services.HasSynced, w.slices.HasSynced, w.node.HasSynced)
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

// nodeAddedOrDeleted rebuilds everything: the zone (topology hints) may have
// come or gone.
func (w *Watcher) nodeAddedOrDeleted(obj any) {
	if n, ok := obj.(*corev1.Node); ok && n.Name == w.nodeName {
		w.sink.AllChanged()
	}
}

func (w *Watcher) nodeUpdated(oldObj, newObj any) {
	old, ok1 := oldObj.(*corev1.Node)
	n, ok2 := newObj.(*corev1.Node)
	if !ok1 || !ok2 || n.Name != w.nodeName || old.Labels[ZoneLabel] == n.Labels[ZoneLabel] {
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
