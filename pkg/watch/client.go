package watch

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// Client returns a clientset for the cluster the kubeconfig file names, or,
// when kubeconfig is empty, for the cluster the process runs in (its
// service account).
func Client(kubeconfig, userAgent string) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %q: %w", kubeconfig, err)
	}
	cfg.UserAgent = userAgent
	// Informers list once and then watch; the rate limit matters only
	// for relists after a broken watch.
	cfg.QPS, cfg.Burst = 50, 100
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("create kubernetes client: %w", err)
	}
	return cs, nil
}

// Snapshot is what the apiserver holds for one node at one time: the
// Proxied Services and EndpointSlices, as the Watcher sees them.
type Snapshot struct {
	Services       []*corev1.Service
	EndpointSlices []*discoveryv1.EndpointSlice
	// Node is the named node, nil when it does not exist.
	Node *corev1.Node
}

// List reads every Proxied Service and EndpointSlice and the Node named
// nodeName from the apiserver, once (for `svcnat dump --check`).
func List(ctx context.Context, client kubernetes.Interface, nodeName string) (*Snapshot, error) {
	svcs, _, err := listServices(ctx, client, 0)
	if err != nil {
		return nil, err
	}
	slices, err := client.DiscoveryV1().EndpointSlices(metav1.NamespaceAll).List(ctx, metav1.ListOptions{LabelSelector: Proxied})
	if err != nil {
		return nil, fmt.Errorf("list endpointslices: %w", err)
	}
	snap := &Snapshot{}
	for i := range svcs.Items {
		snap.Services = append(snap.Services, &svcs.Items[i])
	}
	for i := range slices.Items {
		snap.EndpointSlices = append(snap.EndpointSlices, &slices.Items[i])
	}
	node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return nil, fmt.Errorf("get node %s: %w", nodeName, err)
	default:
		snap.Node = node
	}
	return snap, nil
}

// listServices lists up to limit (0: all) Proxied Services, leaving the
// headless ones out if the apiserver can (NotHeadless), and returns the
// field selector it used.
func listServices(ctx context.Context, client kubernetes.Interface, limit int64) (*corev1.ServiceList, string, error) {
	opts := metav1.ListOptions{LabelSelector: Proxied, FieldSelector: NotHeadless, Limit: limit}
	svcs, err := client.CoreV1().Services(metav1.NamespaceAll).List(ctx, opts)
	if apierrors.IsBadRequest(err) {
		opts.FieldSelector = ""
		svcs, err = client.CoreV1().Services(metav1.NamespaceAll).List(ctx, opts)
	}
	if err != nil {
		return nil, "", fmt.Errorf("list services: %w", err)
	}
	return svcs, opts.FieldSelector, nil
}
