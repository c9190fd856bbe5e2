#!/usr/bin/env bash
# Builds kube-apiserver, kube-proxy and kubectl (the test bed's control plane,
# the reference proxy, and the client of the manifests' dry run) from k8s.io/kubernetes, pinned in test/tools/go.mod, into
# SVCNAT_K8S_BIN_DIR. Reuses what is already there. About 10 minutes cold on
# 2 cores, seconds with a warm Go build cache.
set -euo pipefail
export PATH=$PATH:/usr/local/go/bin  # sudo's secure_path lacks it
cd "$(dirname "$0")/../test/tools"
version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
dir=${SVCNAT_K8S_BIN_DIR:-$HOME/.cache/svcnat/k8s-$version}
if [[ -x $dir/kube-apiserver && -x $dir/kube-proxy && -x $dir/kubectl ]]; then
	exit 0
fi
echo "k8s-bins: building kube-apiserver, kube-proxy and kubectl $version into $dir"
mkdir -p "$dir"
go build -o "$dir/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl
