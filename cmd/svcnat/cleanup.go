package main

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/svcnat/svcnat/pkg/dataplane"
)

func newCleanupCommand() *cobra.Command {
	f := &backendFlags{}
	cmd := &cobra.Command{
		Use:   "cleanup",
		Short: "Remove everything svcnat programmed (iptables rules and eBPF programs and maps), nothing else",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := slog.Default()
			ipt, err := f.iptables(nil, log)
			if err != nil {
				return fmt.Errorf("clean up iptables backend: %w", err)
			}
			var errs []error
			backends := []dataplane.Backend{ipt}
			if bpf, err := f.ebpf(nil, log, true); err != nil {
				// Without eBPF support nothing of svcnat's can be there.
				log.Info("eBPF backend unavailable, nothing to clean up there", "reason", err)
			} else {
				backends = append(backends, bpf)
			}
			for _, b := range backends {
				if err := b.Cleanup(cmd.Context()); err != nil {
					errs = append(errs, err)
				}
			}
			return errors.Join(errs...)
		},
	}
	f.register(cmd.Flags(), backendAuto)
	_ = cmd.Flags().MarkHidden("backend")
	return cmd
}
