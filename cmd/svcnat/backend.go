package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/ebpf"
	"github.com/svcnat/svcnat/pkg/iptables"
)

// The --backend values.
const (
	backendIptables = "iptables"
	backendEBPF     = "ebpf"
	backendAuto     = "auto"
)

// rawBackend is a backend that can also print its own kernel state.
type rawBackend interface {
	dataplane.Backend
	Raw(ctx context.Context) (string, error)
}

// backendFlags choose and configure the backend.
type backendFlags struct {
	name          string
	iptablesMode  string
	masqueradeBit int
	bpffsPath     string
	cgroupPath    string
	interfaces    []string
	maxServices   int
	maxBackends   int
	maxAffinity   int
}

func (f *backendFlags) register(fs *pflag.FlagSet, defaultBackend string) {
	fs.StringVar(&f.name, "backend", defaultBackend, "dataplane backend: iptables, ebpf or auto")
	fs.StringVar(&f.iptablesMode, "iptables-mode", iptables.ModeAuto, "iptables variant: auto (the one the host's rules use), nft or legacy")
	fs.IntVar(&f.masqueradeBit, "masquerade-bit", iptables.DefaultMasqueradeBit, "packet mark bit (1-31) svcnat's iptables rules use to ask for masquerading")
	fs.StringVar(&f.bpffsPath, "bpffs-path", ebpf.DefaultBPFFSPath, "directory on a bpffs where the eBPF backend pins its maps and links")
	fs.StringVar(&f.cgroupPath, "cgroup-path", "", "cgroup v2 whose processes get eBPF connect-time translation (the node's cgroup v2 root in production); required by --backend=ebpf")
	fs.StringSliceVar(&f.interfaces, "bpf-interfaces", nil, "interfaces external traffic arrives on; each gets the eBPF tc program (NodePort, externalIPs, LoadBalancer), which hands NAT to conntrack")
	fs.IntVar(&f.maxServices, "bpf-map-max-services", ebpf.DefaultMaxServices, "eBPF map size: frontends")
	fs.IntVar(&f.maxBackends, "bpf-map-max-backends", ebpf.DefaultMaxBackends, "eBPF map size: endpoints")
	fs.IntVar(&f.maxAffinity, "bpf-map-max-affinity", ebpf.DefaultMaxAffinity, "eBPF map size: session affinity entries")
	// The tc path keeps its flows in conntrack: the flag sizes nothing. It
	// is accepted, with a warning naming it, so that existing
	// configurations start.
	fs.Int("bpf-map-max-nat", 0, "")
	_ = fs.MarkDeprecated("bpf-map-max-nat", "it is ignored: the eBPF tc path keeps its flows in the kernel's conntrack, sized by nf_conntrack_max")
}

func (f *backendFlags) iptables(reg prometheus.Registerer, log *slog.Logger) (*iptables.Backend, error) {
	if f.masqueradeBit == 0 {
		// iptables.Options reads 0 as "the default"; say so instead of
		// silently using bit 13.
		return nil, fmt.Errorf("--masquerade-bit 0: want 1-31")
	}
	return iptables.New(iptables.Options{Mode: f.iptablesMode, MasqueradeBit: f.masqueradeBit,
		Registerer: reg, Logger: log})
}

// ebpf creates the eBPF backend. Dump, Raw and Cleanup never attach to a
// cgroup, so they work without --cgroup-path; Init requires it.
func (f *backendFlags) ebpf(reg prometheus.Registerer, log *slog.Logger) (*ebpf.Backend, error) {
	return ebpf.New(ebpf.Options{
		BPFFSPath: f.bpffsPath, CgroupPath: f.cgroupPath, Interfaces: f.interfaces,
		MaxServices: f.maxServices, MaxBackends: f.maxBackends, MaxAffinity: f.maxAffinity,
		Registerer: reg, Logger: log,
	})
}

// forRun returns the backend the agent programs, and its name. auto tries
// eBPF (which needs --cgroup-path and the kernel features it probes) and
// falls back to iptables, saying why, only when the kernel does not
// support it: any other failure (a bad flag, a metrics clash, a probe that
// could not tell) is an error, never a silent switch of dataplane.
func (f *backendFlags) forRun(reg prometheus.Registerer, log *slog.Logger) (rawBackend, string, error) {
	switch f.name {
	case backendIptables:
		b, err := f.iptables(reg, log)
		return b, backendIptables, err
	case backendEBPF:
		b, err := f.ebpf(reg, log)
		return b, backendEBPF, err
	case backendAuto:
		if f.cgroupPath == "" {
			log.Info("backend auto: using iptables", "reason", "no --cgroup-path for eBPF")
		} else if b, err := f.ebpf(reg, log); err == nil {
			log.Info("backend auto: using ebpf")
			return b, backendEBPF, nil
		} else if errors.Is(err, ebpf.ErrNotSupported) {
			log.Warn("backend auto: eBPF unavailable, using iptables", "reason", err)
		} else {
			return nil, "", fmt.Errorf("backend auto: %w", err)
		}
		b, err := f.iptables(reg, log)
		return b, backendIptables, err
	}
	return nil, "", fmt.Errorf("backend %q: want iptables, ebpf or auto", f.name)
}

// forDump returns the backend to read from without changing anything:
// the named one, or with auto the eBPF one when maps are pinned under
// --bpffs-path, else iptables.
func (f *backendFlags) forDump(log *slog.Logger) (rawBackend, string, error) {
	name := f.name
	if name == backendAuto {
		name = backendIptables
		pins, err := os.ReadDir(f.bpffsPath)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, "", fmt.Errorf("detect backend: %w", err)
		}
		if len(pins) > 0 {
			name = backendEBPF
		}
	}
	switch name {
	case backendIptables:
		b, err := f.iptables(nil, log)
		return b, name, err
	case backendEBPF:
		b, err := f.ebpf(nil, log)
		return b, name, err
	}
	return nil, "", fmt.Errorf("backend %q: want iptables, ebpf or auto", f.name)
}

// closeBackend releases what a backend holds open without removing what it
// programmed (the eBPF backend's file descriptors; pins stay).
func closeBackend(b dataplane.Backend) error {
	if c, ok := b.(interface{ Close() error }); ok {
		return c.Close()
	}
	return nil
}
