package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/nodeaddr"
	"github.com/svcnat/svcnat/pkg/trace"
)

type traceFlags struct {
	backend  backendFlags
	from, to string
	protocol string
	origin   string
	iface    string
	output   string
}

// tracer is a backend that can trace a connection through what the
// kernel holds.
type tracer interface {
	rawBackend
	Trace(ctx context.Context, q trace.Query) (*trace.Result, error)
}

func newTraceCommand() *cobra.Command {
	f := &traceFlags{}
	cmd := &cobra.Command{
		Use:   "trace --from ADDR[:PORT] --to ADDR:PORT",
		Short: "Explain what this node's dataplane does with a new connection (read-only)",
		Long: "Explain, from what the kernel holds (never the agent's memory), what happens to the first " +
			"packet of a connection: the frontend it meets and its Service port, the policy that applies, " +
			"every endpoint it can go to with its probability, masquerading, reject or drop, and the " +
			"conntrack entries of the tuple. iptables: the rules iptables-save returns are walked. eBPF: the " +
			"loaded programs run on a synthesized packet (BPF_PROG_TEST_RUN); nothing is written.\n" +
			"--origin defaults to node for one of this node's addresses, pod for an address in the cluster " +
			"CIDRs the kernel holds, outside otherwise.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runTrace(cmd.Context(), f, cmd.OutOrStdout(), slog.Default())
		},
	}
	fs := cmd.Flags()
	f.backend.register(fs, backendAuto)
	fs.StringVar(&f.from, "from", "", "client address, with an optional port (ADDR, ADDR:PORT or [ADDR6]:PORT)")
	fs.StringVar(&f.to, "to", "", "destination address and port (ADDR:PORT or [ADDR6]:PORT)")
	fs.StringVar(&f.protocol, "proto", "tcp", "protocol: tcp, udp or sctp")
	fs.StringVar(&f.origin, "origin", "", "where the connection starts: pod, node or outside (default: from --from)")
	fs.StringVar(&f.iface, "interface", "", "eBPF, --origin outside: the interface the packet arrives on (default: the first with svcnat's tc program)")
	fs.StringVarP(&f.output, "output", "o", "text", "output format: text or json")
	return cmd
}

// parseFrom reads ADDR, ADDR:PORT or [ADDR6]:PORT.
func parseFrom(s string) (netip.AddrPort, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.AddrPortFrom(a, 0), nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("--from %q: want ADDR, ADDR:PORT or [ADDR6]:PORT", s)
	}
	return ap, nil
}

func runTrace(ctx context.Context, f *traceFlags, out io.Writer, log *slog.Logger) error {
	if f.output != "text" && f.output != "json" {
		return fmt.Errorf("output format %q: want text or json", f.output)
	}
	from, err := parseFrom(f.from)
	if err != nil {
		return err
	}
	to, err := netip.ParseAddrPort(f.to)
	if err != nil {
		return fmt.Errorf("--to %q: want ADDR:PORT or [ADDR6]:PORT", f.to)
	}
	q := trace.Query{From: from, To: to, Protocol: model.Protocol(strings.ToUpper(f.protocol)),
		Origin: trace.Origin(f.origin), Interface: f.iface}
	b, name, err := f.backend.forDump(log)
	if err != nil {
		return err
	}
	defer func() { _ = closeBackend(b) }()
	tb, ok := b.(tracer)
	if !ok {
		return fmt.Errorf("the %s backend cannot trace", name)
	}
	if q.Origin == "" {
		if q.Origin, err = defaultOrigin(ctx, b, from.Addr()); err != nil {
			return err
		}
	}
	if err := q.Validate(); err != nil {
		return err
	}
	res, err := tb.Trace(ctx, q)
	if err != nil {
		return fmt.Errorf("trace with the %s backend: %w", name, err)
	}
	if f.output == "json" {
		data, err := json.MarshalIndent(res, "", "  ")
		if err != nil {
			return fmt.Errorf("encode trace: %w", err)
		}
		_, err = fmt.Fprintf(out, "%s\n", data)
		return err
	}
	_, err = io.WriteString(out, res.Text())
	return err
}

// defaultOrigin is node for one of this node's addresses, pod for an
// address in the cluster CIDRs the kernel holds, outside otherwise.
func defaultOrigin(ctx context.Context, b rawBackend, from netip.Addr) (trace.Origin, error) {
	local, err := nodeaddr.List()
	if err != nil {
		return "", err
	}
	if slices.Contains(local, from) {
		return trace.FromNode, nil
	}
	s, err := b.Dump(ctx)
	if err != nil {
		return "", fmt.Errorf("read cluster CIDRs: %w", err)
	}
	if slices.ContainsFunc(s.ClusterCIDRs, func(p netip.Prefix) bool { return p.Contains(from) }) {
		return trace.FromPod, nil
	}
	return trace.FromOutside, nil
}
