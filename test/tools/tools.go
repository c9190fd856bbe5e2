//go:build tools

// Package tools pins the upstream Kubernetes binaries that the test bed runs:
// kube-apiserver (the control plane of the end-to-end tests and the demo),
// kube-proxy (the reference proxy in the end-to-end suite and the benchmarks)
// and kubectl (the server-side dry run of deploy/).
// It is a separate module so that svcnat's own go.mod never depends on
// k8s.io/kubernetes.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
