package watch

import (
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/cache"

	"github.com/svcnat/svcnat/internal/memtest"
)

// managedFields is what the apiserver records for a writer (sizes as a
// real kube-controller-manager or client write them).
func managedFields(manager, fields string) []metav1.ManagedFieldsEntry {
	t := metav1.NewTime(time.Date(2026, 11, 30, 20, 0, 0, 0, time.UTC))
	return []metav1.ManagedFieldsEntry{{Manager: manager, Operation: metav1.ManagedFieldsOperationUpdate,
		APIVersion: "v1", Time: &t, FieldsType: "FieldsV1", FieldsV1: metav1.NewFieldsV1(fields)}}
}

// apiMeta is an object's metadata as the apiserver returns it.
func apiMeta(ns, name string, i int, labels map[string]string, manager, fields string) metav1.ObjectMeta {
	return metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels,
		UID:               types.UID(fmt.Sprintf("3f1c2a8e-5b7d-4e21-9a0c-%012d", i)),
		ResourceVersion:   fmt.Sprint(1000000 + i),
		Generation:        1,
		CreationTimestamp: metav1.NewTime(time.Date(2026, 11, 30, 20, 0, 0, 0, time.UTC)),
		ManagedFields:     managedFields(manager, fields)}
}

// benchService is Service i as `make bench` writes it (test/bench/load.go),
// as the apiserver returns it (defaults, allocated IPs, managed fields);
// controller adds what a typical Deployment's Service carries (labels,
// selector, a last-applied annotation).
func benchService(i int, controller bool) *corev1.Service {
	name := fmt.Sprintf("svc-%05d", i)
	ip := fmt.Sprintf("10.%d.%d.%d", 96+i>>16, i>>8&255, i&255)
	single := corev1.IPFamilyPolicySingleStack
	cluster := corev1.ServiceInternalTrafficPolicyCluster
	svc := &corev1.Service{
		ObjectMeta: apiMeta("bench", name, i, nil, "bench",
			`{"f:spec":{"f:internalTrafficPolicy":{},"f:ports":{".":{},"k:{\"port\":8080,\"protocol\":\"TCP\"}":{".":{},"f:name":{},"f:port":{},"f:protocol":{},"f:targetPort":{}}},"f:sessionAffinity":{},"f:type":{}}}`),
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP, ClusterIP: ip, ClusterIPs: []string{ip},
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol}, IPFamilyPolicy: &single,
			SessionAffinity: corev1.ServiceAffinityNone, InternalTrafficPolicy: &cluster,
			Ports: []corev1.ServicePort{{Name: "tcp", Protocol: corev1.ProtocolTCP, Port: 8080, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	if controller {
		svc.Labels = map[string]string{"app.kubernetes.io/name": name, "app.kubernetes.io/instance": name,
			"app.kubernetes.io/managed-by": "Helm", "helm.sh/chart": "app-1.2.3"}
		svc.Annotations = map[string]string{corev1.LastAppliedConfigAnnotation: `{"apiVersion":"v1","kind":"Service","metadata":{"name":"` + name + `","namespace":"bench"},"spec":{"ports":[{"name":"tcp","port":8080,"targetPort":8080}],"selector":{"app.kubernetes.io/name":"` + name + `"}}}`}
		svc.Spec.Selector = map[string]string{"app.kubernetes.io/name": name, "app.kubernetes.io/instance": name}
	}
	return svc
}

// benchSlice is the EndpointSlice of Service i with 10 endpoints. Without
// controller, as `make bench` writes it (addresses and ready only); with
// controller, as kube-controller-manager's EndpointSlice controller writes
// it for a Deployment's pods: the Service's labels, owner reference,
// change trigger time, and per endpoint all conditions, target
// reference, node name and zone.
func benchSlice(i int, controller bool) *discoveryv1.EndpointSlice {
	name := fmt.Sprintf("svc-%05d", i)
	labels := map[string]string{discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: "testbed.svcnat.io"}
	port, proto, portName := int32(8080), corev1.ProtocolTCP, "tcp"
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: apiMeta("bench", name+"-1", i, labels, "bench",
			`{"f:addressType":{},"f:endpoints":{},"f:metadata":{"f:labels":{".":{},"f:endpointslice.kubernetes.io/managed-by":{},"f:kubernetes.io/service-name":{}}},"f:ports":{}}`),
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Protocol: &proto, Port: &port}},
	}
	for j := range 10 {
		k := i*10 + j
		ready := true
		ep := discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("172.%d.%d.%d", 20+k>>16, k>>8&255, k&255)},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready}}
		if controller {
			serving, terminating := true, false
			node, zone, host := fmt.Sprintf("node-%03d", k%100), fmt.Sprintf("zone-%d", k%3), fmt.Sprintf("%s-%d", name, j)
			ep.Conditions.Serving, ep.Conditions.Terminating = &serving, &terminating
			ep.NodeName, ep.Zone, ep.Hostname = &node, &zone, &host
			ep.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: "bench", Name: fmt.Sprintf("%s-7d9f8b6c5d-%05d", name, j),
				UID: types.UID(fmt.Sprintf("8a4e6f10-2c3b-4d5e-8f90-%012d", k))}
		}
		es.Endpoints = append(es.Endpoints, ep)
	}
	if controller {
		es.GenerateName = name + "-"
		es.Labels = map[string]string{discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: "endpointslice-controller.k8s.io",
			"app.kubernetes.io/name": name, "app.kubernetes.io/instance": name, "app.kubernetes.io/managed-by": "Helm", "helm.sh/chart": "app-1.2.3"}
		es.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: "2026-11-30T20:00:00Z"}
		yes := true
		es.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Service", Name: name,
			UID: types.UID(fmt.Sprintf("3f1c2a8e-5b7d-4e21-9a0c-%012d", i)), Controller: &yes, BlockOwnerDeletion: &yes}}
		es.ManagedFields = managedFields("kube-controller-manager", `{"f:addressType":{},"f:endpoints":{},"f:metadata":{"f:annotations":{".":{},"f:endpoints.kubernetes.io/last-change-trigger-time":{}},"f:generateName":{},"f:labels":{".":{},"f:app.kubernetes.io/instance":{},"f:app.kubernetes.io/managed-by":{},"f:app.kubernetes.io/name":{},"f:endpointslice.kubernetes.io/managed-by":{},"f:helm.sh/chart":{},"f:kubernetes.io/service-name":{}},"f:ownerReferences":{".":{},"k:{\"uid\":\"3f1c2a8e\"}":{}}},"f:ports":{}}`)
	}
	return es
}

// cacheFromWire fills stores as the informers fill theirs: each list
// decoded from its protobuf encoding (as the apiserver sends it), its items
// extracted to one allocation each, transformed by trim, and indexed as the
// informers index them.
func cacheFromWire(b *testing.B, svcWire, sliceWire []byte) (svcs, slices cache.Indexer) {
	svcs = cache.NewIndexer(cache.DeletionHandlingMetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	slices = cache.NewIndexer(cache.DeletionHandlingMetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc, byService: sliceServiceIndex})
	svcList, sliceList := &corev1.ServiceList{}, &discoveryv1.EndpointSliceList{}
	for _, c := range []struct {
		wire []byte
		list interface {
			runtime.Object
			Unmarshal([]byte) error
		}
		store cache.Indexer
	}{{svcWire, svcList, svcs}, {sliceWire, sliceList, slices}} {
		if err := c.list.Unmarshal(c.wire); err != nil {
			b.Fatal(err)
		}
		items, err := meta.ExtractListWithAlloc(c.list)
		if err != nil {
			b.Fatal(err)
		}
		for _, obj := range items {
			t, err := trim(obj)
			if err != nil {
				b.Fatal(err)
			}
			if err := c.store.Add(t); err != nil {
				b.Fatal(err)
			}
		}
	}
	return svcs, slices
}

// BenchmarkCache10k reports the live heap the informer caches hold per
// Service at 10,000 Services of 10 endpoints, for objects as `make bench`
// writes them and as a cluster's controllers write them.
func BenchmarkCache10k(b *testing.B) {
	const n = 10000
	for _, shape := range []struct {
		name       string
		controller bool
	}{{"Bench", false}, {"Controller", true}} {
		b.Run(shape.name, func(b *testing.B) {
			svcList, sliceList := &corev1.ServiceList{}, &discoveryv1.EndpointSliceList{}
			for i := range n {
				svcList.Items = append(svcList.Items, *benchService(i, shape.controller))
				sliceList.Items = append(sliceList.Items, *benchSlice(i, shape.controller))
			}
			svcWire, err := svcList.Marshal()
			if err != nil {
				b.Fatal(err)
			}
			sliceWire, err := sliceList.Marshal()
			if err != nil {
				b.Fatal(err)
			}
			svcList, sliceList = nil, nil
			var heap uint64
			for b.Loop() {
				heap = memtest.LiveHeap(func() any {
					svcs, slices := cacheFromWire(b, svcWire, sliceWire)
					return []cache.Indexer{svcs, slices}
				})
			}
			b.ReportMetric(float64(heap)/n, "heapB/service")
		})
	}
}
