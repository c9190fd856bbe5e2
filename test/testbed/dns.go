//go:build linux

package testbed

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ClusterDomain is the cluster mode's DNS domain.
const ClusterDomain = "cluster.local"

// serveDNS is the cluster mode's cluster DNS, on UDP port 53 of the first
// node's address (kubelets give pods that nameserver), so that upstream's
// tests can reach Services by name. It answers A queries for
// <service>.<namespace>.svc.cluster.local with the Service's ClusterIP,
// looked up in the apiserver per query, and NXDOMAIN for every other name
// (no headless Services, no pod records, no forwarding). It does not go
// through any Service, so it works the same whichever proxy runs.
func (c *Cluster) serveDNS() error {
	var conn net.PacketConn
	var listenErr error
	addr := netip.AddrPortFrom(c.Nodes[0].IP, 53).String()
	if err := inNetns(c.Nodes[0].Netns, func() { conn, listenErr = net.ListenPacket("udp4", addr) }); err != nil {
		return err
	}
	if listenErr != nil {
		return listenErr
	}
	c.onClose(func() error { conn.Close(); return nil })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := conn.ReadFrom(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				continue
			}
			if resp, err := c.answerDNS(buf[:n]); err == nil {
				_, _ = conn.WriteTo(resp, from)
			}
		}
	}()
	return nil
}

// answerDNS answers one query.
func (c *Cluster) answerDNS(query []byte) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RCode: dnsmessage.RCodeNameError}
	ip, found := c.lookupService(q.Name.String())
	if found {
		rh.RCode = dnsmessage.RCodeSuccess
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if ip.IsValid() && q.Type == dnsmessage.TypeA && q.Class == dnsmessage.ClassINET {
		if err := b.StartAnswers(); err != nil {
			return nil, err
		}
		if err := b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}, dnsmessage.AResource{A: ip.As4()}); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

// lookupService maps <service>.<namespace>.svc.cluster.local. to the
// Service's IPv4 ClusterIP; found is true for an existing Service, also one
// without a ClusterIP (headless, ExternalName): its queries get an empty
// answer rather than NXDOMAIN.
func (c *Cluster) lookupService(name string) (ip netip.Addr, found bool) {
	rest, ok := strings.CutSuffix(strings.ToLower(name), ".svc."+ClusterDomain+".")
	if !ok {
		return ip, false
	}
	svcName, ns, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(ns, ".") {
		return ip, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	svc, err := c.Kube.CoreV1().Services(ns).Get(ctx, svcName, metav1.GetOptions{})
	if err != nil {
		return ip, false
	}
	if a, err := netip.ParseAddr(svc.Spec.ClusterIP); err == nil && a.Is4() {
		return a, true
	}
	return ip, true
}
