package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/spf13/cobra"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
	"github.com/svcnat/svcnat/pkg/nodeaddr"
	"github.com/svcnat/svcnat/pkg/watch"
)

type dumpFlags struct {
	node    nodeFlags
	backend backendFlags
	output  string
	raw     bool
	check   bool
}

func newDumpCommand() *cobra.Command {
	f := &dumpFlags{}
	cmd := &cobra.Command{
		Use:   "dump",
		Short: "Print what the kernel holds, decoded back into Service ports (read-only)",
		Long: "Print what svcnat programmed in this node's kernel, read back from the kernel " +
			"(never from the agent's memory), one row per Service port and address family.\n" +
			"--check compares it with what the apiserver says this node should hold and " +
			"exits 1 when they differ.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return dump(cmd.Context(), f, cmd.OutOrStdout(), slog.Default())
		},
	}
	fs := cmd.Flags()
	f.node.register(fs)
	f.backend.register(fs, backendAuto)
	fs.StringVarP(&f.output, "output", "o", "table", "output format: table or json")
	fs.BoolVar(&f.raw, "raw", false, "print the backend's own view instead (iptables-save text of svcnat's rules, or the eBPF map entries)")
	fs.BoolVar(&f.check, "check", false, "compare with the Services and EndpointSlices in the apiserver (--kubeconfig); exit 1 on any difference")
	return cmd
}

func dump(ctx context.Context, f *dumpFlags, out io.Writer, log *slog.Logger) error {
	if f.output != "table" && f.output != "json" {
		return fmt.Errorf("output format %q: want table or json", f.output)
	}
	b, name, err := f.backend.forDump(log)
	if err != nil {
		return err
	}
	defer func() { _ = closeBackend(b) }()
	if f.raw {
		raw, err := b.Raw(ctx)
		if err != nil {
			return err
		}
		_, err = io.WriteString(out, raw)
		return err
	}
	if f.check {
		cfg, err := f.node.config()
		if err != nil {
			return err
		}
		client, err := watch.Client(f.node.kubeconfig, "svcnat-dump/"+version)
		if err != nil {
			return err
		}
		if cfg.NodeAddresses, err = nodeaddr.List(); err != nil {
			return err
		}
		return check(ctx, client, b, cfg, out)
	}
	got, err := b.Dump(ctx)
	if err != nil {
		return fmt.Errorf("dump %s backend: %w", name, err)
	}
	counters, err := readCounters(ctx, b)
	if err != nil {
		return fmt.Errorf("dump %s backend: %w", name, err)
	}
	if f.output == "json" {
		return writeJSON(out, got, counters)
	}
	return writeTable(out, got, counters)
}

func writeJSON(out io.Writer, s *model.State, c portCounters) error {
	data, err := json.MarshalIndent(newDumpJSON(s, c), "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	_, err = fmt.Fprintf(out, "%s\n", data)
	return err
}

// writeTable prints one row per Service port and family: its frontends,
// the endpoints it may reach (local ones marked), the new connections
// counted (CONNS; per endpoint in brackets) and, where the datapath sees
// them, packets and bytes, and the policies that change which endpoints
// serve which traffic. c is nil when the backend counts nothing.
func writeTable(out io.Writer, s *model.State, c portCounters) error {
	var buf bytes.Buffer
	tw := tabwriter.NewWriter(&buf, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tPROTO\tFRONTENDS\tENDPOINTS\tCONNS\tPACKETS/BYTES\tNOTES")
	for _, sp := range s.Sorted() {
		fes := make([]string, len(sp.Frontends))
		for i, fe := range sp.Frontends {
			fes[i] = fe.String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", sp.Name, sp.Protocol, strings.Join(fes, ", "),
			endpointsCell(sp, c), c.connectionsCell(sp.Name), c.trafficCell(sp.Name), strings.Join(notes(sp), "; "))
	}
	if len(s.ClusterCIDRs) > 0 {
		cidrs := make([]string, len(s.ClusterCIDRs))
		for i, p := range s.ClusterCIDRs {
			cidrs[i] = p.String()
		}
		fmt.Fprintf(tw, "\ncluster CIDRs: %s\n", strings.Join(cidrs, ", "))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// Drop the padding tabwriter leaves after an empty last column.
	for line := range strings.Lines(buf.String()) {
		if _, err := io.WriteString(out, strings.TrimRight(line, " \n")+"\n"); err != nil {
			return err
		}
	}
	return nil
}

func endpointsCell(sp *model.ServicePort, c portCounters) string {
	all := slices.Concat(sp.ClusterEndpoints, sp.LocalEndpoints)
	slices.SortFunc(all, model.Endpoint.Compare)
	all = slices.Compact(all)
	if len(all) == 0 {
		return "none (" + string(sp.NoEndpoints()) + ")"
	}
	cells := make([]string, len(all))
	for i, ep := range all {
		cells[i] = ep.String()
		if ep.Local {
			cells[i] += " (local)"
		}
		cells[i] += c.endpointSuffix(sp.Name, ep)
	}
	return strings.Join(cells, ", ")
}

func notes(sp *model.ServicePort) []string {
	var n []string
	if sp.InternalTrafficLocal {
		n = append(n, "internalTrafficPolicy=Local")
	}
	if sp.ExternalTrafficLocal {
		n = append(n, "externalTrafficPolicy=Local")
	}
	if sp.AffinityTimeout > 0 {
		n = append(n, "affinity=ClientIP "+sp.AffinityTimeout.Round(time.Second).String())
	}
	if len(sp.SourceRanges) > 0 {
		r := make([]string, len(sp.SourceRanges))
		for i, p := range sp.SourceRanges {
			r[i] = p.String()
		}
		n = append(n, "sourceRanges="+strings.Join(r, ","))
	}
	if sp.HealthCheckNodePort != 0 {
		n = append(n, fmt.Sprintf("healthCheckNodePort=%d", sp.HealthCheckNodePort))
	}
	return n
}

// structure returns what a backend finds wrong beyond the state it
// decodes (iptables: chains and jump rules that differ from what svcnat
// writes), and leaves out of want the families it does not program (a
// single-stack node).
func structure(ctx context.Context, b dataplane.Backend, want *model.State) ([]string, error) {
	if f, ok := b.(interface{ Families() []model.Family }); ok {
		fams := f.Families()
		for name := range want.ServicePorts {
			if !slices.Contains(fams, name.Family) {
				delete(want.ServicePorts, name)
			}
		}
	}
	v, ok := b.(interface {
		Verify(context.Context) ([]string, error)
	})
	if !ok {
		return nil, nil
	}
	problems, err := v.Verify(ctx)
	if err != nil {
		return nil, fmt.Errorf("verify backend: %w", err)
	}
	return problems, nil
}

// check builds what this node should hold from the apiserver's objects, as
// the agent does, reads what the kernel holds from b, and prints their
// differences. It returns errDrift when there are any.
func check(ctx context.Context, client kubernetes.Interface, b dataplane.Backend, cfg *model.Config, out io.Writer) error {
	snap, err := watch.List(ctx, client, cfg.NodeName)
	if err != nil {
		return err
	}
	if snap.Node != nil {
		cfg.NodeZone = snap.Node.Labels[corev1.LabelTopologyZone]
		cfg.PrimaryAddresses = model.PrimaryAddresses(snap.Node)
	}
	want, errs := model.Build(cfg, snap.Services, snap.EndpointSlices)
	for _, err := range errs {
		if ce := (*model.ConflictError)(nil); errors.As(err, &ce) {
			fmt.Fprintf(out, "conflict (the agent programs the winner only): %v\n", err)
			continue
		}
		fmt.Fprintf(out, "skipped, as the agent skips it: %v\n", err)
	}
	got, err := b.Dump(ctx)
	if err != nil {
		return fmt.Errorf("dump backend: %w", err)
	}
	diffs, err := structure(ctx, b, want)
	if err != nil {
		return err
	}
	diffs = append(model.Diff(want, got), diffs...)
	if len(diffs) == 0 {
		fmt.Fprintf(out, "in sync: %d service ports match the apiserver\n", len(want.ServicePorts))
		return nil
	}
	for _, d := range diffs {
		fmt.Fprintln(out, d)
	}
	fmt.Fprintf(out, "drift: %d differences between the apiserver (want) and the kernel (got)\n", len(diffs))
	return errDrift
}
