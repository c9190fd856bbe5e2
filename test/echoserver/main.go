// Command echoserver is the stand-in pod of the test bed. It has two modes.
//
//	echoserver serve -name POD -tcp 8080,8081 -udp 8080 -http 80
//
// listens on the given ports and answers every TCP connection, UDP datagram
// and HTTP request with a JSON Reply naming the pod and the client address it
// saw, so a test can tell which backend answered and whether the source was
// masqueraded. After the first line a TCP connection echoes every line it
// receives, which lets a client hold a stream open.
//
//	echoserver probe -proto tcp|udp|http -addr IP:PORT [-n N] [-timeout D]
//	                 [-sport PORT] [-stream D -interval D]
//
// is the client: it makes N attempts (one connection or datagram each) and
// prints one JSON Result per attempt on standard output. With -stream it
// makes one TCP connection, prints its first Result at once, then sends a
// line every interval for the given duration and prints a final Result
// whose Sent field counts the lines echoed back.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Reply is what the server sends.
type Reply struct {
	Pod    string `json:"pod"`
	Client string `json:"client"`
	Port   int    `json:"port"`
}

// Result is what the probe prints per attempt.
type Result struct {
	Reply
	// Err is empty on success.
	Err string `json:"err,omitempty"`
	// Refused is true when the attempt failed with "connection refused".
	Refused bool `json:"refused,omitempty"`
	// Status is the HTTP status code (http probes only).
	Status int `json:"status,omitempty"`
	// Sent counts the lines echoed back on a stream (stream probes only).
	Sent int `json:"sent,omitempty"`
	// From is the address the answer appeared to come from (udp-socket
	// probes only).
	From string `json:"from,omitempty"`
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: echoserver serve|probe [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "probe":
		err = probe(os.Args[2:])
	default:
		err = fmt.Errorf("unknown mode %q (want serve or probe)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "echoserver:", err)
		os.Exit(1)
	}
}

func parsePorts(s string) ([]int, error) {
	var ports []int
	for f := range strings.SplitSeq(s, ",") {
		if f == "" {
			continue
		}
		p, err := strconv.Atoi(f)
		if err != nil || p <= 0 || p > 65535 {
			return nil, fmt.Errorf("parse port %q: invalid", f)
		}
		ports = append(ports, p)
	}
	return ports, nil
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	name := fs.String("name", "", "pod name to answer with")
	tcpPorts := fs.String("tcp", "", "comma-separated TCP ports")
	udpPorts := fs.String("udp", "", "comma-separated UDP ports")
	httpPorts := fs.String("http", "", "comma-separated HTTP ports")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" {
		return errors.New("serve: -name is required")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pod", *name)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	tcp, err := parsePorts(*tcpPorts)
	if err != nil {
		return err
	}
	udp, err := parsePorts(*udpPorts)
	if err != nil {
		return err
	}
	web, err := parsePorts(*httpPorts)
	if err != nil {
		return err
	}
	for _, p := range tcp {
		l, err := net.Listen("tcp", fmt.Sprintf(":%d", p))
		if err != nil {
			return fmt.Errorf("listen on tcp port %d: %w", p, err)
		}
		go acceptTCP(l, *name, p, log)
	}
	for _, p := range udp {
		c, err := net.ListenPacket("udp", fmt.Sprintf(":%d", p))
		if err != nil {
			return fmt.Errorf("listen on udp port %d: %w", p, err)
		}
		go answerUDP(c, *name, p, log)
	}
	for _, p := range web {
		l, err := net.Listen("tcp", fmt.Sprintf(":%d", p))
		if err != nil {
			return fmt.Errorf("listen on http port %d: %w", p, err)
		}
		srv := &http.Server{
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				// ?bytes=N answers N bytes instead (path MTU tests).
				if q := r.URL.Query().Get("bytes"); q != "" {
					n, err := strconv.Atoi(q)
					if err != nil || n < 0 || n > 1<<30 {
						http.Error(w, "bytes: want 0 to 2^30", http.StatusBadRequest)
						return
					}
					w.Header().Set("Content-Length", q)
					_, _ = io.CopyN(w, zeros{}, int64(n))
					return
				}
				w.Header().Set("Content-Type", "application/json")
				_ = json.NewEncoder(w).Encode(Reply{Pod: *name, Client: r.RemoteAddr, Port: p})
			}),
			ReadHeaderTimeout: 5 * time.Second,
		}
		go func() { _ = srv.Serve(l) }()
	}
	log.Info("serving", "tcp", tcp, "udp", udp, "http", web)
	<-ctx.Done()
	return nil
}

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(b []byte) (int, error) {
	clear(b)
	return len(b), nil
}

func acceptTCP(l net.Listener, name string, port int, log *slog.Logger) {
	for {
		c, err := l.Accept()
		if err != nil {
			log.Error("accept", "port", port, "err", err)
			return
		}
		go func() {
			defer c.Close()
			b, _ := json.Marshal(Reply{Pod: name, Client: c.RemoteAddr().String(), Port: port})
			if _, err := c.Write(append(b, '\n')); err != nil {
				return
			}
			// Echo lines until the client goes away.
			_, _ = io.Copy(c, c)
		}()
	}
}

func answerUDP(c net.PacketConn, name string, port int, log *slog.Logger) {
	buf := make([]byte, 2048)
	for {
		_, from, err := c.ReadFrom(buf)
		if err != nil {
			log.Error("read udp", "port", port, "err", err)
			return
		}
		b, _ := json.Marshal(Reply{Pod: name, Client: from.String(), Port: port})
		_, _ = c.WriteTo(b, from)
	}
}

func probe(args []string) error {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	proto := fs.String("proto", "tcp", "tcp, udp, udp-socket (one unconnected socket for all attempts, each to the next of the comma-separated -addr) or http")
	addr := fs.String("addr", "", "IP:PORT to reach")
	n := fs.Int("n", 1, "number of attempts")
	timeout := fs.Duration("timeout", 2*time.Second, "limit per attempt")
	sport := fs.Int("sport", 0, "local port to send from (udp and tcp; 0 picks one)")
	stream := fs.Duration("stream", 0, "hold one TCP connection this long, sending a line every -interval")
	interval := fs.Duration("interval", 100*time.Millisecond, "pause between stream lines")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *addr == "" {
		return errors.New("probe: -addr is required")
	}
	if *n < 1 || *n > 10000 {
		return fmt.Errorf("probe: -n %d out of range 1..10000", *n)
	}
	out := json.NewEncoder(os.Stdout)
	if *stream > 0 {
		return out.Encode(streamTCP(*addr, *stream, *interval, *timeout, func(r Result) { _ = out.Encode(r) }))
	}
	var sock net.PacketConn
	if *proto == "udp-socket" {
		var err error
		if sock, err = net.ListenPacket("udp", fmt.Sprintf(":%d", *sport)); err != nil {
			return fmt.Errorf("probe: %w", err)
		}
		defer sock.Close()
	}
	addrs := strings.Split(*addr, ",")
	for i := range *n {
		var r Result
		switch *proto {
		case "udp-socket":
			r = viaSocket(sock, addrs[i%len(addrs)], *timeout)
		case "tcp":
			r = onceTCP(*addr, *sport, *timeout)
		case "udp":
			r = onceUDP(*addr, *sport, *timeout)
		case "http":
			r = onceHTTP(*addr, *timeout)
		default:
			return fmt.Errorf("probe: unknown protocol %q", *proto)
		}
		if err := out.Encode(r); err != nil {
			return err
		}
	}
	return nil
}

func failed(err error) Result {
	return Result{Err: err.Error(), Refused: errors.Is(err, syscall.ECONNREFUSED)}
}

func dialer(proto string, sport int, timeout time.Duration) *net.Dialer {
	d := &net.Dialer{Timeout: timeout}
	if sport != 0 {
		if proto == "udp" {
			d.LocalAddr = &net.UDPAddr{Port: sport}
		} else {
			d.LocalAddr = &net.TCPAddr{Port: sport}
		}
	}
	return d
}

func readReply(c net.Conn, timeout time.Duration) (Reply, *bufio.Reader, error) {
	var rep Reply
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	br := bufio.NewReader(c)
	line, err := br.ReadBytes('\n')
	if err != nil && len(line) == 0 {
		return rep, br, fmt.Errorf("read reply: %w", err)
	}
	if err := json.Unmarshal(line, &rep); err != nil {
		return rep, br, fmt.Errorf("decode reply %q: %w", line, err)
	}
	return rep, br, nil
}

func onceTCP(addr string, sport int, timeout time.Duration) Result {
	c, err := dialer("tcp", sport, timeout).Dial("tcp", addr)
	if err != nil {
		return failed(err)
	}
	defer c.Close()
	rep, _, err := readReply(c, timeout)
	if err != nil {
		return failed(err)
	}
	return Result{Reply: rep}
}

func onceUDP(addr string, sport int, timeout time.Duration) Result {
	c, err := dialer("udp", sport, timeout).Dial("udp", addr)
	if err != nil {
		return failed(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		return failed(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 2048)
	m, err := c.Read(buf)
	if err != nil {
		return failed(err)
	}
	var rep Reply
	if err := json.Unmarshal(buf[:m], &rep); err != nil {
		return failed(fmt.Errorf("decode reply %q: %w", buf[:m], err))
	}
	return Result{Reply: rep}
}

// viaSocket sends one datagram from the unconnected socket sock to addr
// and reads the answer.
func viaSocket(sock net.PacketConn, addr string, timeout time.Duration) Result {
	to, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return failed(err)
	}
	if _, err := sock.WriteTo([]byte("ping"), to); err != nil {
		return failed(err)
	}
	_ = sock.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 2048)
	m, from, err := sock.ReadFrom(buf)
	if err != nil {
		return failed(err)
	}
	var rep Reply
	if err := json.Unmarshal(buf[:m], &rep); err != nil {
		return failed(fmt.Errorf("decode reply %q: %w", buf[:m], err))
	}
	return Result{Reply: rep, From: from.String()}
}

func onceHTTP(addr string, timeout time.Duration) Result {
	client := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + addr + "/")
	if err != nil {
		return failed(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if err != nil {
		return Result{Status: resp.StatusCode, Err: fmt.Sprintf("read body: %v", err)}
	}
	r := Result{Status: resp.StatusCode}
	// Bodies from other servers (health checks) are not Replies; that is fine.
	_ = json.Unmarshal(body, &r.Reply)
	return r
}

func streamTCP(addr string, d, interval, timeout time.Duration, first func(Result)) Result {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		r := failed(err)
		first(r)
		return r
	}
	defer c.Close()
	rep, br, err := readReply(c, timeout)
	if err != nil {
		r := failed(err)
		first(r)
		return r
	}
	first(Result{Reply: rep})
	r := Result{Reply: rep}
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(interval) {
		line := fmt.Sprintf("line %d\n", r.Sent)
		_ = c.SetDeadline(time.Now().Add(timeout))
		if _, err := io.WriteString(c, line); err != nil {
			r.Err = fmt.Sprintf("write line %d: %v", r.Sent, err)
			return r
		}
		got, err := br.ReadString('\n')
		if err != nil {
			r.Err = fmt.Sprintf("read echo of line %d: %v", r.Sent, err)
			return r
		}
		if got != line {
			r.Err = fmt.Sprintf("echo of line %d: got %q", r.Sent, got)
			return r
		}
		r.Sent++
	}
	return r
}
