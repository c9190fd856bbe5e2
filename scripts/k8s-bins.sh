#!/usr/bin/env bash
# Builds kube-apiserver, kube-proxy and kubectl (the test bed's control plane,
# the reference proxy, and the client of the manifests' dry run), and
# kubelet, kube-controller-manager and kube-scheduler (the test bed's cluster
# mode with real nodes) from k8s.io/kubernetes, pinned in test/tools/go.mod, into
# SVCNAT_K8S_BIN_DIR. Reuses what is already there. About 10 minutes cold on
# 2 cores, seconds with a warm Go build cache.
set -euo pipefail
export PATH=$PATH:/usr/local/go/bin  # sudo's secure_path lacks it
cd "$(dirname "$0")/../test/tools"
version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
dir=${SVCNAT_K8S_BIN_DIR:-$HOME/.cache/svcnat/k8s-$version}
cmds=(kube-apiserver kube-proxy kubectl kubelet kube-controller-manager kube-scheduler)
missing=()
for c in "${cmds[@]}"; do
	[[ -x $dir/$c ]] || missing+=("k8s.io/kubernetes/cmd/$c")
done
if ((${#missing[@]})); then
	echo "k8s-bins: building ${missing[*]##*/} $version into $dir"
	mkdir -p "$dir"
	go build -o "$dir/" "${missing[@]}"
fi
# With the argument "e2e": upstream's e2e.test, the ginkgo CLI that runs it in
# parallel, and its test image's agnhost (the image's Debian root has the libc
# it links), for `make conformance`.
if [[ ${1:-} == e2e ]]; then
	[[ -x $dir/ginkgo ]] || GOFLAGS=-mod=mod go build -o "$dir/ginkgo" github.com/onsi/ginkgo/v2/ginkgo
	[[ -x $dir/agnhost ]] || go build -o "$dir/agnhost" k8s.io/kubernetes/test/images/agnhost
	[[ -x $dir/e2e.test ]] || GOFLAGS=-mod=mod go test -c -o "$dir/e2e.test" k8s.io/kubernetes/test/e2e
fi
