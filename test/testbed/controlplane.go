//go:build linux

package testbed

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// APIServerPort is the apiserver's secure port on the first node.
const APIServerPort = 6443

// DialerIn returns a dial function whose sockets are created inside the named
// network namespace, so the test process (which lives in the root namespace)
// can reach the test bed without any route in the root namespace.
//
// The dial runs on a locked OS thread that switches namespace and back. If
// switching back fails the thread stays locked and dies with its goroutine.
// Threads are otherwise never ended: a child started with Pdeathsig dies
// with the thread that forked it.
func DialerIn(nsName string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		var dialErr error
		if err := inNetns(nsName, func() {
			var d net.Dialer
			c, dialErr = d.DialContext(ctx, network, addr)
		}); err != nil {
			return nil, err
		}
		return c, dialErr
	}
}

// inNetns runs f on a locked OS thread switched into the named network
// namespace (see DialerIn); sockets f creates stay in that namespace.
func inNetns(nsName string, f func()) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current network namespace: %w", err)
			return
		}
		defer orig.Close()
		h, err := netns.GetFromName(nsName)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open network namespace %s: %w", nsName, err)
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter network namespace %s: %w", nsName, err)
			return
		}
		f()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- nil
	}()
	return <-errc
}

// HTTPClientIn returns an HTTP client whose connections start inside the
// named namespace.
func HTTPClientIn(nsName string, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout:   timeout,
		Transport: &http.Transport{DialContext: DialerIn(nsName), DisableKeepAlives: true},
	}
}

func (c *Cluster) apiServerURL() string {
	return fmt.Sprintf("https://%s", net.JoinHostPort(c.Nodes[0].IP.String(), fmt.Sprint(APIServerPort)))
}

// startControlPlane runs etcd and kube-apiserver in the first node's
// namespace, writes the kubeconfig and makes the client.
func (c *Cluster) startControlPlane(ctx context.Context) error {
	n := c.Nodes[0]
	tok := make([]byte, 16)
	if _, err := rand.Read(tok); err != nil {
		return fmt.Errorf("make apiserver token: %w", err)
	}
	c.token = hex.EncodeToString(tok)
	tokenFile := filepath.Join(c.Dir, "tokens.csv")
	if err := os.WriteFile(tokenFile, []byte(c.token+",admin,admin,system:masters\n"), 0o600); err != nil {
		return fmt.Errorf("write token file: %w", err)
	}
	saKey := filepath.Join(c.Dir, "sa.key")
	if err := writeRSAKey(saKey); err != nil {
		return err
	}
	var err error
	c.etcd, err = start(procSpec{name: "etcd", netns: n.Netns, log: c.logPath("etcd"), args: []string{
		c.Binaries.Etcd, "--data-dir", filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
		"--listen-peer-urls", "http://127.0.0.1:2380",
	}})
	if err != nil {
		return err
	}
	c.onClose(func() error { c.etcd.Stop(stopGrace); return nil })
	if err := c.StartAPIServer(ctx); err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["testbed"] = &clientcmdapi.Cluster{Server: c.apiServerURL(), InsecureSkipTLSVerify: true}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: c.token}
	cfg.Contexts["testbed"] = &clientcmdapi.Context{Cluster: "testbed", AuthInfo: "admin"}
	cfg.CurrentContext = "testbed"
	c.Kubeconfig = filepath.Join(c.Dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, c.Kubeconfig); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	c.RESTConfig = &rest.Config{
		Host:            c.apiServerURL(),
		BearerToken:     c.token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		Dial:            DialerIn(n.Netns),
		QPS:             200,
		Burst:           400,
		Timeout:         30 * time.Second,
	}
	if c.Kube, err = kubernetes.NewForConfig(c.RESTConfig); err != nil {
		return fmt.Errorf("make apiserver client: %w", err)
	}
	return nil
}

// StartAPIServer starts kube-apiserver (again, after StopAPIServer) and
// waits until /readyz answers.
func (c *Cluster) StartAPIServer(ctx context.Context) error {
	if c.apiserver != nil && !c.apiserver.Exited() {
		return fmt.Errorf("start kube-apiserver: already running as pid %d", c.apiserver.PID())
	}
	n := c.Nodes[0]
	saKey := filepath.Join(c.Dir, "sa.key")
	first := c.apiserver == nil
	var err error
	c.apiserver, err = start(procSpec{name: "kube-apiserver", netns: n.Netns, log: c.logPath("kube-apiserver"), args: append([]string{
		filepath.Join(c.Binaries.K8sDir, "kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--service-cluster-ip-range=" + c.serviceCIDRs(),
		"--bind-address=0.0.0.0",
		fmt.Sprintf("--secure-port=%d", APIServerPort),
		"--advertise-address=" + n.IP.String(),
		"--cert-dir=" + filepath.Join(c.Dir, "pki"),
		"--token-auth-file=" + filepath.Join(c.Dir, "tokens.csv"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + saKey,
		"--service-account-signing-key-file=" + saKey,
		"--authorization-mode=RBAC",
		"--endpoint-reconciler-type=none",
		// As kubeadm and kind set it: node agents such as svcnat run privileged.
		"--allow-privileged=true",
	}, c.apiserverFlags...)})
	if err != nil {
		return err
	}
	if first {
		c.onClose(func() error { c.StopAPIServer(); return nil })
	}
	return c.waitReady(ctx)
}

// StopAPIServer stops kube-apiserver (etcd keeps running).
func (c *Cluster) StopAPIServer() {
	if c.apiserver != nil {
		c.apiserver.Stop(stopGrace)
	}
}

func (c *Cluster) waitReady(ctx context.Context) error {
	client := HTTPClientIn(c.Nodes[0].Netns, 2*time.Second)
	client.Transport.(*http.Transport).TLSClientConfig = insecureTLS()
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	return waitHTTPOK(ctx, client, c.apiServerURL()+"/readyz", c.token, c.apiserver, "kube-apiserver /readyz", 300*time.Millisecond)
}

func writeRSAKey(path string) error {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("generate service account key: %w", err)
	}
	b := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("write service account key: %w", err)
	}
	return nil
}

// registerNodes creates a Node object per node namespace, with its LAN
// address, pod CIDR and zone label.
func (c *Cluster) registerNodes(ctx context.Context) error {
	for _, n := range c.Nodes {
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{
				"kubernetes.io/hostname":      n.Name,
				"topology.kubernetes.io/zone": n.Zone,
			}},
			Spec: corev1.NodeSpec{PodCIDR: n.PodCIDR.String(), PodCIDRs: []string{n.PodCIDR.String()}},
		}
		if n.IP6.IsValid() {
			node.Spec.PodCIDRs = append(node.Spec.PodCIDRs, n.PodCIDR6.String())
		}
		got, err := c.Kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			got, err = c.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		}
		if err != nil {
			return fmt.Errorf("create node %s: %w", n.Name, err)
		}
		got.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: n.IP.String()},
			{Type: corev1.NodeHostName, Address: n.Name},
		}
		if n.IP6.IsValid() {
			got.Status.Addresses = append(got.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: n.IP6.String()})
		}
		got.Status.Conditions = []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "TestBed",
			LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now(),
		}}
		if _, err := c.Kube.CoreV1().Nodes().UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("set status of node %s: %w", n.Name, err)
		}
	}
	return nil
}
