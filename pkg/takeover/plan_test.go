package takeover

import (
	"os"
	"reflect"
	"strings"
	"testing"
)

func TestPlanIptablesSelectsOnlyKubeProxy(t *testing.T) {
	save, err := os.ReadFile("testdata/kube-proxy-iptables.save")
	if err != nil {
		t.Fatal(err)
	}
	plans, err := PlanIptables(string(save))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]TablePlan{}
	for _, p := range plans {
		got[p.Table] = p
	}
	// The kubelet's chains, foreign chains and svcnat's stay; so do all
	// their rules, including the quoted comment with escaped quotes.
	for table, p := range got {
		for _, c := range p.Chains {
			if c == "KUBE-FIREWALL" || c == "KUBE-KUBELET-CANARY" || !strings.HasPrefix(c, "KUBE-") {
				t.Errorf("%s: selected chain %s, which is not kube-proxy's", table, c)
			}
		}
		for _, j := range p.Jumps {
			if target := jumpTarget(j.Spec); !strings.HasPrefix(target, "KUBE-") || target == "KUBE-FIREWALL" {
				t.Errorf("%s: selected rule %s %v, which is not a jump to kube-proxy", table, j.Chain, j.Spec)
			}
		}
		if len(p.Kept) > 0 {
			t.Errorf("%s: kept %v, want none", table, p.Kept)
		}
	}
	if c := got["mangle"].Chains; !reflect.DeepEqual(c, []string{"KUBE-PROXY-CANARY"}) {
		t.Errorf("mangle chains = %v, want [KUBE-PROXY-CANARY]", c)
	}
	if c, w := got["filter"].Chains, []string{"KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-CANARY", "KUBE-PROXY-FIREWALL", "KUBE-SERVICES"}; !reflect.DeepEqual(c, w) {
		t.Errorf("filter chains = %v, want %v", c, w)
	}
	if c, w := got["nat"].Chains, []string{"KUBE-MARK-MASQ", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-PROXY-CANARY", "KUBE-SEP-ABCDEFGHIJKLMNOP", "KUBE-SERVICES", "KUBE-SVC-QRSTUVWXYZ012345", "KUBE-EXT-QRSTUVWXYZ012345"}; !reflect.DeepEqual(c, w) {
		t.Errorf("nat chains = %v, want %v", c, w)
	}
	wantNATJumps := []Rule{
		{"PREROUTING", []string{"-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"}},
		{"OUTPUT", []string{"-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"}},
		{"POSTROUTING", []string{"-m", "comment", "--comment", "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING"}},
	}
	if j := got["nat"].Jumps; !reflect.DeepEqual(j, wantNATJumps) {
		t.Errorf("nat jumps = %q, want %q", j, wantNATJumps)
	}
	// INPUT has 3 jumps to kube-proxy plus one to the kubelet's KUBE-FIREWALL;
	// FORWARD 4 plus DOCKER-USER, SVCNAT-FORWARD and a foreign ACCEPT; OUTPUT 2
	// plus KUBE-FIREWALL.
	if n := len(got["filter"].Jumps); n != 9 {
		t.Errorf("filter jumps = %d, want 9: %q", n, got["filter"].Jumps)
	}
}

func TestPlanIptablesKeepsChainsForeignRulesReach(t *testing.T) {
	save := `*nat
:PREROUTING ACCEPT [0:0]
:MY-CHAIN - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-A - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-POSTROUTING - [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -j MY-CHAIN
-A PREROUTING -j KUBE-SERVICES
-A MY-CHAIN -d 10.0.0.1/32 -j KUBE-SERVICES
-A KUBE-SERVICES -j KUBE-SVC-A
-A KUBE-SVC-A -j KUBE-SEP-A
-A POSTROUTING -j KUBE-POSTROUTING
COMMIT
`
	plans, err := PlanIptables(save)
	if err != nil {
		t.Fatal(err)
	}
	if len(plans) != 1 {
		t.Fatalf("got %d plans, want 1", len(plans))
	}
	p := plans[0]
	if w := []string{"KUBE-SERVICES", "KUBE-SVC-A", "KUBE-SEP-A"}; !reflect.DeepEqual(p.Kept, w) {
		t.Errorf("kept = %v, want %v", p.Kept, w)
	}
	if w := []string{"KUBE-POSTROUTING"}; !reflect.DeepEqual(p.Chains, w) {
		t.Errorf("chains = %v, want %v", p.Chains, w)
	}
	if w := []Rule{{"POSTROUTING", []string{"-j", "KUBE-POSTROUTING"}}}; !reflect.DeepEqual(p.Jumps, w) {
		t.Errorf("jumps = %v, want %v (the jump to the kept KUBE-SERVICES stays)", p.Jumps, w)
	}
}

func TestPlanIptablesNothingOfKubeProxy(t *testing.T) {
	save := "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n:SVCNAT-SERVICES - [0:0]\n-A PREROUTING -j SVCNAT-SERVICES\nCOMMIT\n"
	plans, err := PlanIptables(save)
	if err != nil || len(plans) != 0 {
		t.Fatalf("PlanIptables = %v, %v; want nothing", plans, err)
	}
	if _, err := PlanIptables("-A PREROUTING -j X\n"); err == nil {
		t.Error("a rule outside a table parsed without error")
	}
}

func TestSplitArgs(t *testing.T) {
	got, err := splitArgs(`-A FORWARD -m comment --comment "site policy: \"trusted\" nets" -j ACCEPT`)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"-A", "FORWARD", "-m", "comment", "--comment", `site policy: "trusted" nets`, "-j", "ACCEPT"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("splitArgs = %q, want %q", got, want)
	}
	if _, err := splitArgs(`-A X --comment "open`); err == nil {
		t.Error("unterminated quote split without error")
	}
}

func TestPlanNft(t *testing.T) {
	// nft -j list ruleset on a node with kube-proxy's nftables mode, an
	// iptables-nft nat table and another tool's inet table.
	ruleset := `{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
{"table": {"family": "ip", "name": "nat", "handle": 1}},
{"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
{"table": {"family": "ip", "name": "kube-proxy", "handle": 2, "comment": "rules for kube-proxy"}},
{"chain": {"family": "ip", "table": "kube-proxy", "name": "nat-prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
{"map": {"family": "ip", "name": "service-ips", "table": "kube-proxy", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 5, "map": "verdict"}},
{"table": {"family": "ip6", "name": "kube-proxy", "handle": 3, "comment": "rules for kube-proxy"}},
{"table": {"family": "inet", "name": "kube-proxy", "handle": 4}},
{"table": {"family": "inet", "name": "firewalld", "handle": 5}},
{"table": {"family": "ip", "name": "kube-proxy-extra", "handle": 6}}]}`
	got, err := PlanNft([]byte(ruleset))
	if err != nil {
		t.Fatal(err)
	}
	want := []NftTable{{"ip", "kube-proxy"}, {"ip6", "kube-proxy"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("PlanNft = %v, want %v", got, want)
	}
	if _, err := PlanNft([]byte("not json")); err == nil {
		t.Error("bad JSON planned without error")
	}
}
