//go:build tools

// Package tools pins the upstream Kubernetes binaries that the test bed runs:
// kube-apiserver (the control plane of the end-to-end tests and the demo),
// kube-proxy (the reference proxy in the end-to-end suite and the benchmarks),
// kubectl (the server-side dry run of deploy/ and the DaemonSet deploy),
// kubelet, kube-controller-manager and kube-scheduler (the cluster mode with
// real nodes), and agnhost (the test image upstream's e2e tests run in pods).
// It is a separate module so that svcnat's own go.mod never depends on
// k8s.io/kubernetes.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/test/images/agnhost"
)
