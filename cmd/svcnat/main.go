// Command svcnat is a kube-proxy replacement: `svcnat run` programs this
// node's dataplane (iptables or eBPF) from the apiserver's Services and
// EndpointSlices; `dump` shows what is programmed; `cleanup` removes it.
package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// errDrift makes `dump --check` exit 1 after printing the differences.
var errDrift = errors.New("dataplane differs from the apiserver")

func main() {
	if err := newRootCommand().Execute(); err != nil {
		if !errors.Is(err, errDrift) {
			fmt.Fprintln(os.Stderr, "svcnat:", err)
		}
		os.Exit(1)
	}
}

// globalFlags are shared by every subcommand.
type globalFlags struct {
	config   string
	logLevel string
}

func newRootCommand() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:           "svcnat",
		Short:         "Kubernetes Service proxy: programs Service translation with iptables or eBPF",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyConfigFile(cmd.Flags(), g.config); err != nil {
				return err
			}
			log, err := newLogger(g.logLevel)
			if err != nil {
				return err
			}
			slog.SetDefault(log)
			klog.SetSlogLogger(log)
			return nil
		},
	}
	root.PersistentFlags().StringVar(&g.config, "config", "", "YAML file whose keys are flag names (without --); flags given on the command line win")
	root.PersistentFlags().StringVarP(&g.logLevel, "log-level", "v", "info", "log level: debug, info, warn, error, or a number (2 and above is debug)")
	root.AddCommand(newRunCommand(), newDumpCommand(), newTraceCommand(), newCleanupCommand(), &cobra.Command{
		Use:   "version",
		Short: "Print svcnat's version",
		Args:  cobra.NoArgs,
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), version) },
	})
	return root
}

// newLogger returns a text logger on stderr at the named level.
func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if n, err := strconv.Atoi(level); err == nil {
		l = slog.LevelInfo
		if n >= 2 {
			l = slog.LevelDebug
		}
	} else if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn, error or a number", level)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}

// applyConfigFile sets every flag named by a key of the YAML file at path,
// unless the flag was given on the command line. Lists become
// comma-separated values. An unknown key is an error.
func applyConfigFile(flags *pflag.FlagSet, path string) error {
	if path == "" {
		return nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read config file: %w", err)
	}
	var values map[string]any
	if err := yaml.Unmarshal(data, &values); err != nil {
		return fmt.Errorf("parse config file %s: %w", path, err)
	}
	for key, v := range values {
		f := flags.Lookup(key)
		if f == nil {
			return fmt.Errorf("config file %s: unknown key %q (keys are flag names)", path, key)
		}
		if f.Changed {
			continue
		}
		var s string
		switch v := v.(type) {
		case []any:
			parts := make([]string, len(v))
			for i, p := range v {
				parts[i] = fmt.Sprint(p)
			}
			s = strings.Join(parts, ",")
		case nil:
			continue
		default:
			s = fmt.Sprint(v)
		}
		if err := flags.Set(key, s); err != nil { // marks the flag Changed, as on the command line
			return fmt.Errorf("config file %s: key %s: %w", path, key, err)
		}
	}
	return nil
}
