//go:build linux

package testbed

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// EndpointCondition is the state of an endpoint in an EndpointSlice.
type EndpointCondition int

// The endpoint states tests use.
const (
	Ready EndpointCondition = iota
	// ServingTerminating: not ready, still serving, terminating.
	ServingTerminating
	// Terminating: not ready, not serving, terminating.
	Terminating
)

// Endpoint returns an EndpointSlice endpoint for the pod, on its node and
// in its node's zone.
func (p *Pod) Endpoint(cond EndpointCondition) discoveryv1.Endpoint {
	ready, serving, terminating := true, true, false
	switch cond {
	case ServingTerminating:
		ready, terminating = false, true
	case Terminating:
		ready, serving, terminating = false, false, true
	}
	node, zone := p.Node.Name, p.Node.Zone
	return discoveryv1.Endpoint{
		Addresses:  []string{p.IP.String()},
		Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating},
		NodeName:   &node,
		Zone:       &zone,
		TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: p.Name},
	}
}

// EndpointSlice returns an IPv4 EndpointSlice named name for the Service
// svcName in namespace ns, with the given ports and endpoints.
func EndpointSlice(ns, svcName, name string, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{
			discoveryv1.LabelServiceName: svcName,
			discoveryv1.LabelManagedBy:   "testbed.svcnat.io",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       ports,
		Endpoints:   eps,
	}
}

// SlicePort returns an EndpointSlice port.
func SlicePort(name string, proto corev1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &port}
}
