// Package kporacle checks svcnat's model against upstream kube-proxy: random
// Services and EndpointSlices go through model.Build and through kube-proxy's
// own change trackers and CategorizeEndpoints (k8s.io/kubernetes/pkg/proxy),
// and every difference in what traffic reaches is an error.
//
// It is a module of its own so that svcnat's go.mod never depends on
// k8s.io/kubernetes; run it with `cd pkg/model/kporacle && go test`.
package kporacle
