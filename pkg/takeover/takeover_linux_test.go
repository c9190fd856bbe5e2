//go:build linux

package takeover

import (
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/svcnat/svcnat/pkg/internal/netnstest"
)

// TestRemoveInNamespace loads kube-proxy's rules (iptables-nft and legacy,
// nftables) beside foreign ones into a fresh namespace, removes them with
// the real binaries and checks that exactly kube-proxy's are gone.
func TestRemoveInNamespace(t *testing.T) {
	for _, bin := range []string{"iptables-nft-restore", "iptables-legacy-restore", "nft"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("needs %s: %v", bin, err)
		}
	}
	if !netnstest.InNetns(t) {
		return
	}
	save, err := os.ReadFile("testdata/kube-proxy-iptables.save")
	if err != nil {
		t.Fatal(err)
	}
	restore := func(bin, payload string) {
		t.Helper()
		cmd := exec.Command(bin)
		cmd.Stdin = strings.NewReader(payload)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", bin, err, out)
		}
	}
	restore("iptables-nft-restore", string(save))
	restore("ip6tables-nft-restore", "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n")
	restore("iptables-legacy-restore", "*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:FOREIGN - [0:0]\n-A OUTPUT -j KUBE-SERVICES\n-A OUTPUT -j FOREIGN\nCOMMIT\n")
	nft := "table ip kube-proxy {\n chain nat-prerouting { type nat hook prerouting priority -100; policy accept; }\n}\n" +
		"table ip6 kube-proxy {\n chain nat-output { type nat hook output priority -100; policy accept; }\n}\n" +
		"table inet other {\n chain c { type filter hook input priority 0; policy accept; }\n}\n"
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(nft)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v: %s", err, out)
	}
	before := stdout(t, "iptables-nft-save")

	r, err := Remove(t.Context(), slog.Default())
	if err != nil {
		t.Fatalf("Remove: %v", err)
	}
	// nft: 3+9 jumps, 1+6+8 chains; ip6 nft: 1 jump, 1 chain; legacy: 1, 1.
	if want := (Removed{Jumps: 14, Chains: 17, NftTables: 2}); r != want {
		t.Errorf("Remove = %+v, want %+v", r, want)
	}

	after := stdout(t, "iptables-nft-save")
	for _, line := range strings.Split(after, "\n") {
		if strings.Contains(line, "KUBE-") && !strings.Contains(line, "KUBE-FIREWALL") && !strings.Contains(line, "KUBE-KUBELET-CANARY") {
			t.Errorf("kube-proxy's rule left: %s", line)
		}
	}
	// Every line of the foreign rules is still there, unchanged.
	for _, line := range strings.Split(before, "\n") {
		if strings.HasPrefix(line, "-A ") && !strings.Contains(line, "KUBE-") || strings.Contains(line, "KUBE-FIREWALL") || strings.Contains(line, "KUBE-KUBELET-CANARY") {
			if !strings.Contains(after, line) {
				t.Errorf("foreign rule removed: %s", line)
			}
		}
	}
	if out := stdout(t, "ip6tables-nft-save", "-t", "nat"); strings.Contains(out, "KUBE-") {
		t.Errorf("ip6tables nat still holds kube-proxy's rules:\n%s", out)
	}
	legacy := stdout(t, "iptables-legacy-save")
	if strings.Contains(legacy, "KUBE-") || !strings.Contains(legacy, "-A OUTPUT -j FOREIGN") {
		t.Errorf("legacy tables after Remove:\n%s", legacy)
	}
	if strings.Contains(legacy, "*filter") || strings.Contains(legacy, "*mangle") {
		t.Errorf("Remove created legacy tables that were not there:\n%s", legacy)
	}
	tables := netnstest.Run(t, "", "nft", "list", "tables")
	if strings.Contains(tables, "kube-proxy") || !strings.Contains(tables, "table inet other") {
		t.Errorf("nftables tables after Remove:\n%s", tables)
	}

	for _, fam := range []string{"ip", "ip6"} {
		if out := stdout(t, "nft", "list", "table", fam, NATHooksTable); strings.Count(out, "type nat hook") != 4 || strings.Count(out, "ct state new counter") != 1 {
			t.Errorf("%s %s does not hold the four NAT hooks:\n%s", fam, NATHooksTable, out)
		}
	}

	// Nothing left: a second run removes nothing.
	if r, err := Remove(t.Context(), slog.Default()); err != nil || r.Any() {
		t.Errorf("second Remove = %+v, %v; want nothing removed", r, err)
	}
	for range 2 {
		if err := RemoveNATHooks(t.Context()); err != nil {
			t.Fatalf("RemoveNATHooks: %v", err)
		}
	}
	if tables := stdout(t, "nft", "list", "tables"); strings.Contains(tables, NATHooksTable) || !strings.Contains(tables, "table inet other") {
		t.Errorf("nftables tables after RemoveNATHooks:\n%s", tables)
	}
}

// stdout runs a command and returns its standard output only (the save
// binaries warn on standard error).
func stdout(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return string(out)
}

// TestEstablishedNATSurvives: a TCP connection DNATed by a kube-proxy-like
// nftables table keeps working after Remove deleted that table, because
// svcnat-nat-hooks keeps conntrack and its NAT on; once that table is gone
// too (nothing else needs NAT here), the same connection stops working,
// which shows the table is what carries it.
func TestEstablishedNATSurvives(t *testing.T) {
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skipf("needs nft: %v", err)
	}
	if !netnstest.InNetns(t) {
		return
	}
	// This namespace is the node; a client and a server hang off it.
	cli, srv := netnstest.NewNamespace(t, "sn-tc"), netnstest.NewNamespace(t, "sn-ts")
	for _, c := range [][]string{
		{"ip", "link", "add", "to-cli", "type", "veth", "peer", "name", "eth0", "netns", cli},
		{"ip", "link", "add", "to-srv", "type", "veth", "peer", "name", "eth0", "netns", srv},
		{"ip", "addr", "add", "10.2.0.1/24", "dev", "to-cli"},
		{"ip", "addr", "add", "10.1.0.1/24", "dev", "to-srv"},
		{"ip", "link", "set", "to-cli", "up"},
		{"ip", "link", "set", "to-srv", "up"},
		{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
	} {
		netnstest.Run(t, "", c[0], c[1:]...)
	}
	for ns, addr := range map[string]string{cli: "10.2.0.2", srv: "10.1.0.2"} {
		gw := strings.TrimSuffix(addr, "2") + "1"
		netnstest.Run(t, ns, "ip", "addr", "add", addr+"/24", "dev", "eth0")
		netnstest.Run(t, ns, "ip", "link", "set", "eth0", "up")
		netnstest.Run(t, ns, "ip", "route", "add", "default", "via", gw)
	}
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader("table ip kube-proxy {\n chain nat-prerouting { type nat hook prerouting priority -100; policy accept; ip daddr 10.96.0.1 tcp dport 80 dnat to 10.1.0.2:8080; }\n}\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v: %s", err, out)
	}

	var ln net.Listener
	var err error
	netnstest.Do(t, srv, func() { ln, err = net.Listen("tcp", "10.1.0.2:8080") })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()
	var conn net.Conn
	netnstest.Do(t, cli, func() { conn, err = net.DialTimeout("tcp", "10.96.0.1:80", 3*time.Second) })
	if err != nil {
		t.Fatalf("connect through the DNAT: %v", err)
	}
	defer conn.Close()
	echo := func() error {
		_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := conn.Write([]byte("ping\n")); err != nil {
			return err
		}
		buf := make([]byte, 5)
		_, err := io.ReadFull(conn, buf)
		return err
	}
	if err := echo(); err != nil {
		t.Fatalf("echo before Remove: %v", err)
	}
	if _, err := Remove(t.Context(), slog.Default()); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if err := echo(); err != nil {
		t.Fatalf("echo after Remove (kube-proxy's table gone, %s in place): %v", NATHooksTable, err)
	}
	if err := RemoveNATHooks(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := echo(); err == nil {
		t.Errorf("echo still works without any NAT chain: the test does not show what %s does", NATHooksTable)
	}
}
