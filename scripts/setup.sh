#!/usr/bin/env bash
# Installs what svcnat's build, tests and demo need on a Debian 12 machine:
# Debian packages (only those missing), bpffs, and the upstream Kubernetes
# binaries of the test bed. Idempotent; run as root.
set -euo pipefail

packages=(iptables nftables conntrack ipset iproute2 clang-16 llvm-16 libbpf-dev
	linux-libc-dev bpftool etcd-server socat curl make
	redis-server postgresql chromium # the voting app: its servers, and the browser that checks it
	containerd runc containernetworking-plugins busybox-static netcat-openbsd wget) # the test bed's real nodes
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "setup: installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

"$(dirname "$0")/k8s-bins.sh"
