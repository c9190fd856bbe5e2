package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os/exec"

	"github.com/spf13/cobra"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/iptables"
	"github.com/svcnat/svcnat/pkg/takeover"
)

func newCleanupCommand() *cobra.Command {
	f := &backendFlags{}
	cmd := &cobra.Command{
		Use:   "cleanup",
		Short: "Remove everything svcnat programmed (iptables rules, eBPF programs and maps, the NAT hooks table of a takeover), nothing else",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := slog.Default()
			var errs []error
			var backends []dataplane.Backend
			// Both iptables variants: svcnat's rules may sit in the one the
			// host does not use by default.
			modes := []string{iptables.ModeNFT, iptables.ModeLegacy}
			if f.iptablesMode != iptables.ModeAuto {
				modes = []string{f.iptablesMode}
			}
			for _, mode := range modes {
				if _, err := exec.LookPath("iptables-" + mode); err != nil {
					log.Info("iptables variant not installed, nothing to clean up there", "mode", mode)
					continue
				}
				mf := *f
				mf.iptablesMode = mode
				ipt, err := mf.iptables(nil, log)
				if err != nil {
					return fmt.Errorf("clean up iptables backend (%s): %w", mode, err)
				}
				backends = append(backends, ipt)
			}
			if bpf, err := f.ebpf(nil, log); err != nil {
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
			// What run --take-over-from left to keep kube-proxy's
			// connections translated.
			errs = append(errs, takeover.RemoveNATHooks(cmd.Context()))
			return errors.Join(errs...)
		},
	}
	f.register(cmd.Flags(), backendAuto)
	_ = cmd.Flags().MarkHidden("backend")
	return cmd
}
