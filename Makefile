# svcnat: a kube-proxy replacement. `make help` lists the targets.
# Targets that program the kernel or start the test bed need root; they work
# only inside network namespaces they create (see shared/TESTBED.md).

# sudo's secure_path usually lacks Go's directory; fall back to where it is installed.
GO      ?= $(shell command -v go || echo /usr/local/go/bin/go)
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
# Which proxies the end-to-end suite runs against (comma list of
# svcnat-iptables, svcnat-ebpf, kube-proxy-iptables, kube-proxy-nftables).
E2E_PROXIES ?= svcnat-iptables,svcnat-ebpf,kube-proxy-iptables,kube-proxy-nftables

.PHONY: help build echoserver votingapp setup generate check-generated lint unit e2e test demo bench bench-short bench-go image conformance conformance-full conformance-ci clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## build bin/svcnat
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/svcnat ./cmd/svcnat

echoserver: ## build bin/echoserver, the test bed's stand-in for pods
	$(GO) build -o bin/echoserver ./test/echoserver

votingapp: ## build the voting app's programs (examples/voting-app, its own module) into bin/voting-app
	cd examples/voting-app && $(GO) build -o $(CURDIR)/bin/voting-app/ ./vote ./worker ./result ./browser

setup: ## install Debian packages, mount bpffs, build the Kubernetes binaries of the test bed (root)
	scripts/setup.sh

# The clang that compiles bpf/ (make generate CLANG=clang-17 to try another;
# the committed objects are clang-16's), and the multiarch directory of the
# host's uapi headers (<asm/types.h>; x86_64-linux-gnu on Debian amd64).
CLANG     ?= clang-16
MULTIARCH ?= $(shell $(CLANG) -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH)

generate: ## regenerate the eBPF objects and bindings (needs clang-16)
	BPF2GO_CC=$(CLANG) BPF2GO_CFLAGS=-I/usr/include/$(MULTIARCH) $(GO) generate ./pkg/ebpf/...

check-generated: generate ## fail if the committed eBPF objects differ from their sources
	@git diff --exit-code --stat -- pkg/ebpf || { echo "committed eBPF objects are stale: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- pkg/ebpf)" || { git status --porcelain -- pkg/ebpf; echo "make generate produced untracked files"; exit 1; }

lint: ## gofmt, go vet, staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); test -z "$$out" || { echo "not gofmt-clean:"; echo "$$out"; exit 1; }
	$(GO) vet -tags e2e ./...
	# Without the tag too: a test/e2e file that lacks it breaks go test ./...
	$(GO) vet ./...
	$(GO) tool staticcheck -tags e2e ./...
	cd examples/voting-app && $(GO) vet ./... && $$($(GO) -C $(CURDIR) tool -n staticcheck) ./...
	cd test/bench && $(GO) vet ./... && $$($(GO) -C $(CURDIR) tool -n staticcheck) ./...

unit: ## unit tests, and privileged tests in their own namespaces when root
	$(GO) test -count=1 $$($(GO) list ./... | grep -v /test/e2e)
	# The model against kube-proxy's own endpoint selection (its own module,
	# so that svcnat's go.mod never depends on k8s.io/kubernetes).
	cd pkg/model/kporacle && $(GO) test -count=1 ./...
	cd examples/voting-app && $(GO) test -count=1 ./...
	cd test/bench && $(GO) test -count=1 ./...

e2e: build echoserver votingapp ## end-to-end suite against a real kube-apiserver (root)
	SVCNAT_E2E_PROXIES=$(E2E_PROXIES) SVCNAT_BIN=$(CURDIR)/bin/svcnat SVCNAT_ECHOSERVER_BIN=$(CURDIR)/bin/echoserver \
		SVCNAT_VOTINGAPP_BIN_DIR=$(CURDIR)/bin/voting-app \
		$(GO) test -tags e2e -count=1 -timeout 75m -v ./test/e2e/...

test: lint check-generated unit e2e conformance-ci ## everything CI runs

demo: setup build echoserver votingapp ## run the voting app on the test bed (root); DEMO_FLAGS=--once to tear down at once
	$(GO) build -o bin/demo ./test/testbed/cmd/demo
	bin/demo --svcnat bin/svcnat --echoserver bin/echoserver --app-bin-dir bin/voting-app $(DEMO_FLAGS)

# Upstream's own e2e tests against the test bed's real nodes, once per proxy.
CONFORMANCE_FLAGS ?=
conformance: build echoserver ## upstream's Services [Conformance] e2e tests with svcnat (both backends) and kube-proxy; writes docs/conformance.md (root)
	scripts/k8s-bins.sh e2e
	$(GO) run ./test/conformance -svcnat bin/svcnat -echoserver bin/echoserver -out docs/conformance.md $(CONFORMANCE_FLAGS)

conformance-full: build echoserver ## every upstream test of the proxies' behaviour (Services, Conntrack, ...), 3 nodes; writes docs/conformance.md (root; about 2 hours)
	scripts/k8s-bins.sh e2e
	$(GO) run ./test/conformance -suite full -procs 2 -jobs 2 -svcnat bin/svcnat -echoserver bin/echoserver -out docs/conformance.md $(CONFORMANCE_FLAGS)

conformance-ci: build echoserver ## the Services [Conformance] tests with both svcnat backends; fails on a failed test (root; part of make test)
	scripts/k8s-bins.sh e2e
	$(GO) run ./test/conformance -proxies svcnat-iptables,svcnat-ebpf -check -svcnat bin/svcnat -echoserver bin/echoserver -out bin/conformance-ci.md

# The side-by-side benchmark of issue 5 (about an hour): svcnat's backends and
# upstream kube-proxy at 1k, 5k and 10k Services, report and plots in docs/bench.
BENCH_FLAGS ?= -sizes 1000,5000,10000 -cap 5m
bench: setup build echoserver ## svcnat vs kube-proxy side by side on the test bed (root)
	SVCNAT_BIN=$(CURDIR)/bin/svcnat SVCNAT_ECHOSERVER_BIN=$(CURDIR)/bin/echoserver \
		$(GO) -C test/bench run . -out $(CURDIR)/docs/bench $(BENCH_FLAGS)

bench-short: build echoserver ## the benchmark harness at 100 Services, svcnat-iptables only (root; about a minute)
	SVCNAT_BIN=$(CURDIR)/bin/svcnat SVCNAT_ECHOSERVER_BIN=$(CURDIR)/bin/echoserver \
		$(GO) -C test/bench test -count=1 -timeout 20m -run TestShort -v .

bench-go: ## Go benchmarks: render, sync and one-Service change at 10k Services, model build, eBPF maps
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./pkg/...

# The agent image without a registry or Docker: a root made from this
# machine's Debian iptables packages plus a static bin/svcnat, written as a
# docker-archive (load it with `ctr -n k8s.io images import` or `docker load`).
# The Dockerfile builds the same layout where a Docker engine is at hand.
image: ## build bin/svcnat-image.tar (svcnat:latest and svcnat:VERSION), no registry or Docker needed
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o bin/image/svcnat ./cmd/svcnat
	scripts/image-root.sh bin/image/root
	$(GO) run ./test/imagebuild/cmd/imagebuild -o bin/svcnat-image.tar -tag svcnat:latest -tag svcnat:$(VERSION) \
		-root bin/image/root -add /usr/local/bin/svcnat=bin/image/svcnat -entrypoint /usr/local/bin/svcnat -cmd run

clean: ## remove build output
	rm -rf bin
