package model

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"time"
)

// stateJSON is the wire form of a State: ServicePorts as a list in name order.
type stateJSON struct {
	ClusterCIDRs []netip.Prefix `json:"clusterCIDRs"`
	ServicePorts []*ServicePort `json:"servicePorts"`
}

// MarshalJSON encodes s as {"clusterCIDRs":[...],"servicePorts":[...]} with
// the ServicePorts in name order, so equal States encode to equal bytes.
func (s *State) MarshalJSON() ([]byte, error) {
	w := stateJSON{ClusterCIDRs: s.ClusterCIDRs, ServicePorts: s.Sorted()}
	if w.ClusterCIDRs == nil {
		w.ClusterCIDRs = []netip.Prefix{}
	}
	return json.Marshal(w)
}

// UnmarshalJSON decodes the form MarshalJSON writes. It fails on a null
// ServicePort and on two ServicePorts with the same name.
func (s *State) UnmarshalJSON(data []byte) error {
	var w stateJSON
	if err := json.Unmarshal(data, &w); err != nil {
		return fmt.Errorf("decode state: %w", err)
	}
	sps := make(map[ServicePortName]*ServicePort, len(w.ServicePorts))
	for i, sp := range w.ServicePorts {
		if sp == nil {
			return fmt.Errorf("decode state: servicePorts[%d] is null", i)
		}
		if _, dup := sps[sp.Name]; dup {
			return fmt.Errorf("decode state: servicePorts[%d]: duplicate name %s", i, sp.Name)
		}
		sps[sp.Name] = sp
	}
	s.ClusterCIDRs = w.ClusterCIDRs
	if len(s.ClusterCIDRs) == 0 {
		s.ClusterCIDRs = nil
	}
	s.ServicePorts = sps
	return nil
}

// servicePortFields is ServicePort without its methods, so that encoding it
// does not recurse into ServicePort.MarshalJSON.
type servicePortFields ServicePort

// servicePortJSON writes AffinityTimeout as a duration string ("3h0m0s"),
// which reads better than nanoseconds; its field shadows the embedded one.
type servicePortJSON struct {
	*servicePortFields
	AffinityTimeout string `json:"affinityTimeout,omitempty"`
}

// MarshalJSON encodes sp with its struct tags, AffinityTimeout as a Go
// duration string, omitted when zero.
func (sp ServicePort) MarshalJSON() ([]byte, error) {
	f := servicePortFields(sp)
	w := servicePortJSON{servicePortFields: &f}
	if sp.AffinityTimeout != 0 {
		w.AffinityTimeout = sp.AffinityTimeout.String()
	}
	return json.Marshal(w)
}

// UnmarshalJSON decodes the form MarshalJSON writes.
func (sp *ServicePort) UnmarshalJSON(data []byte) error {
	var f servicePortFields
	w := servicePortJSON{servicePortFields: &f}
	if err := json.Unmarshal(data, &w); err != nil {
		return fmt.Errorf("decode service port: %w", err)
	}
	if w.AffinityTimeout != "" {
		d, err := time.ParseDuration(w.AffinityTimeout)
		if err != nil {
			return fmt.Errorf("decode service port %s: affinityTimeout: %w", f.Name, err)
		}
		f.AffinityTimeout = d
	}
	*sp = ServicePort(f)
	return nil
}
