# svcnat agent image: a static binary on Debian slim with the iptables tools
# (both nf_tables and legacy variants; svcnat detects which one the host uses).
#   docker build -t svcnat:latest .

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The eBPF objects are committed (bpf2go output), so no clang is needed here.
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/svcnat ./cmd/svcnat

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/svcnat /usr/local/bin/svcnat
ENTRYPOINT ["/usr/local/bin/svcnat"]
CMD ["run"]
