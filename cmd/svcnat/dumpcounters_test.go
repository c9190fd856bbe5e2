package main

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"

	"github.com/svcnat/svcnat/pkg/dataplane"
	"github.com/svcnat/svcnat/pkg/model"
)

// dumpCounters are counters as the eBPF backend reports them for the IPv4
// web port (packets and bytes too) and as iptables does for shop/lb
// (connections only); the other ports counted nothing.
func dumpCounters() portCounters {
	packets, bytes := uint64(40), uint64(2160)
	return portCounters{
		{Namespace: "default", Name: "web", Port: "http", Family: model.IPv4}: {
			Counters:  dataplane.Counters{Connections: 12, Packets: &packets, Bytes: &bytes},
			Endpoints: map[string]uint64{"10.244.0.5:8080": 5, "10.244.1.5:8080": 7},
		},
		{Namespace: "shop", Name: "lb", Family: model.IPv4}: {
			Counters:  dataplane.Counters{Connections: 3},
			Endpoints: map[string]uint64{"10.244.1.9:8443": 3},
		},
	}
}

// countingBackend is a dumpBackend whose datapath counted c.
type countingBackend struct {
	dumpBackend
	c portCounters
}

func (b *countingBackend) Counters(context.Context) (map[model.ServicePortName]*dataplane.PortCounters, error) {
	return b.c, nil
}

// TestDumpCounters: dump reads the counters from the backend and shows
// them in the CONNS and PACKETS/BYTES columns and per endpoint, and in
// -o json as each Service port's "counters", which does not stop the JSON
// from decoding as a State.
func TestDumpCounters(t *testing.T) {
	b := &countingBackend{dumpBackend{dumpState()}, dumpCounters()}
	got, err := readCounters(t.Context(), b)
	if err != nil {
		t.Fatal(err)
	}
	var table bytes.Buffer
	if err := writeTable(&table, b.state, got); err != nil {
		t.Fatal(err)
	}
	golden(t, "dump-counters.table", table.Bytes())
	var out bytes.Buffer
	if err := writeJSON(&out, b.state, got); err != nil {
		t.Fatal(err)
	}
	golden(t, "dump-counters.json", out.Bytes())

	var w struct {
		ServicePorts []struct {
			Name     model.ServicePortName   `json:"name"`
			Counters *dataplane.PortCounters `json:"counters"`
		} `json:"servicePorts"`
	}
	if err := json.Unmarshal(out.Bytes(), &w); err != nil {
		t.Fatal(err)
	}
	for _, p := range w.ServicePorts {
		want := dumpCounters().of(p.Name)
		if p.Counters == nil || p.Counters.Connections != want.Connections || len(p.Counters.Endpoints) != len(want.Endpoints) {
			t.Errorf("%s: counters %+v in JSON, want %+v", p.Name, p.Counters, want)
		}
	}
	var back model.State
	if err := back.UnmarshalJSON(out.Bytes()); err != nil {
		t.Fatal(err)
	}
	if d := model.Diff(dumpState(), &back); len(d) != 0 {
		t.Errorf("JSON with counters does not decode to the State: %v", d)
	}

	// A backend without counters: no counters field, "-" in the columns.
	if c, err := readCounters(t.Context(), &dumpBackend{dumpState()}); err != nil || c != nil {
		t.Errorf("counters of a backend that has none: %v, %v", c, err)
	}
}
