// Package harness holds what the end-to-end tests (package e2e) and the demo
// (e2e/cmd/demo) share: the host-side servers a guest talks to, the guest
// scripts and the parser for the results they print.
//
// Everything here listens on loopback only (127.0.0.1 and ::1); the callers
// run inside a private network namespace, where the guest reaches these
// servers through vunet's gateway address (10.0.2.2 / fd00::2 map to host
// loopback).
package harness

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// BlobSize is the size of the file the guest downloads.
const BlobSize = 8 << 20

// HelloText is served at /hello, the small file fetched over IPv6.
const HelloText = "hello from the vunet e2e host\n"

// Blob returns BlobSize deterministic pseudo-random bytes (ChaCha8 with a
// fixed seed, so every run serves the same file) and their sha256.
func Blob() ([]byte, string) {
	var seed [32]byte
	copy(seed[:], "vunet e2e blob, deterministic!!")
	b := make([]byte, BlobSize)
	rand.NewChaCha8(seed).Read(b)
	sum := sha256.Sum256(b)
	return b, hex.EncodeToString(sum[:])
}

// Upload is one body received by the HTTP server's upload handler.
type Upload struct {
	Bytes  int64
	SHA256 string
}

// HTTPServer serves, on 127.0.0.1 and [::1] (same handler, separate ports):
//
//	GET  /blob          the BlobSize file from Blob
//	GET  /hello         HelloText
//	GET  /generation    the value set by SetGeneration ("1" at first)
//	POST|PUT /upload/NAME  hashes the body, records it under NAME and answers
//	                    "sha256 HEX bytes N"
type HTTPServer struct {
	Port4, Port6 int // 0 if that family could not listen
	BlobSHA256   string

	blob    []byte
	mu      sync.Mutex
	uploads map[string]Upload
	gen     int
	changed chan struct{}
	srv     *http.Server
}

// StartHTTP starts the server; Close stops it. IPv6 is optional (Port6 stays
// 0 if [::1] cannot be bound); IPv4 is not.
func StartHTTP() (*HTTPServer, error) {
	blob, sum := Blob()
	h := &HTTPServer{BlobSHA256: sum, blob: blob, uploads: map[string]Upload{}, gen: 1, changed: make(chan struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /blob", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(h.blob)))
		w.Write(h.blob)
	})
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, HelloText)
	})
	mux.HandleFunc("GET /generation", func(w http.ResponseWriter, r *http.Request) {
		h.mu.Lock()
		g := h.gen
		h.mu.Unlock()
		fmt.Fprintf(w, "%d\n", g)
	})
	upload := func(w http.ResponseWriter, r *http.Request) {
		hash := sha256.New()
		n, err := io.Copy(hash, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		u := Upload{Bytes: n, SHA256: hex.EncodeToString(hash.Sum(nil))}
		h.mu.Lock()
		h.uploads[r.PathValue("name")] = u
		close(h.changed)
		h.changed = make(chan struct{})
		h.mu.Unlock()
		fmt.Fprintf(w, "sha256 %s bytes %d\n", u.SHA256, u.Bytes)
	}
	mux.HandleFunc("POST /upload/{name}", upload)
	mux.HandleFunc("PUT /upload/{name}", upload)
	h.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second}

	l4, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	h.Port4 = l4.Addr().(*net.TCPAddr).Port
	go h.srv.Serve(l4)
	if l6, err := net.Listen("tcp6", "[::1]:0"); err == nil {
		h.Port6 = l6.Addr().(*net.TCPAddr).Port
		go h.srv.Serve(l6)
	}
	return h, nil
}

// Close stops the server.
func (h *HTTPServer) Close() error { return h.srv.Close() }

// SetGeneration changes what /generation returns.
func (h *HTTPServer) SetGeneration(g int) {
	h.mu.Lock()
	h.gen = g
	h.mu.Unlock()
}

// Upload returns the upload recorded under name, if any.
func (h *HTTPServer) Upload(name string) (Upload, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	u, ok := h.uploads[name]
	return u, ok
}

// DNS names served by DNSServer. The guest resolves them through vunet's
// forwarder (10.0.2.3), which forwards to the server as its upstream.
const (
	DNSName = "test.vunet.example."
	DNSA    = "192.0.2.44"
	DNSAAAA = "2001:db8::44"
	DNSTXT  = "vunet-e2e-txt-ok"
	DNSSRV  = "_http._tcp.test.vunet.example."
	// DNSSRVPort is the port in the SRV record's target.
	DNSSRVPort = 8044
)

// DNSServer is an authoritative server for the names above on 127.0.0.1
// (UDP and TCP on the same port); everything else is NXDOMAIN.
type DNSServer struct {
	Addr    string // 127.0.0.1:PORT, for --dns-upstream
	mu      sync.Mutex
	queries []string
	udp     *dns.Server
	tcp     *dns.Server
}

// StartDNS starts the server; Close stops it.
func StartDNS() (*DNSServer, error) {
	d := &DNSServer{}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := pc.LocalAddr().(*net.UDPAddr).Port
	l, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		pc.Close()
		return nil, err
	}
	d.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	d.udp = &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(d.serve)}
	d.tcp = &dns.Server{Listener: l, Handler: dns.HandlerFunc(d.serve)}
	started := make(chan struct{}, 2)
	d.udp.NotifyStartedFunc = func() { started <- struct{}{} }
	d.tcp.NotifyStartedFunc = func() { started <- struct{}{} }
	go d.udp.ActivateAndServe()
	go d.tcp.ActivateAndServe()
	for range 2 {
		select {
		case <-started:
		case <-time.After(10 * time.Second):
			d.Close()
			return nil, errors.New("harness: DNS server did not start")
		}
	}
	return d, nil
}

func (d *DNSServer) serve(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	if len(req.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		w.WriteMsg(m)
		return
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	d.mu.Lock()
	d.queries = append(d.queries, dns.TypeToString[q.Qtype]+" "+name)
	d.mu.Unlock()
	hdr := func(t uint16) dns.RR_Header {
		return dns.RR_Header{Name: q.Name, Rrtype: t, Class: dns.ClassINET, Ttl: 60}
	}
	want := func(t uint16) bool { return q.Qtype == t || q.Qtype == dns.TypeANY }
	switch name {
	case DNSName:
		if want(dns.TypeA) {
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr(dns.TypeA), A: net.ParseIP(DNSA)})
		}
		if want(dns.TypeAAAA) {
			m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr(dns.TypeAAAA), AAAA: net.ParseIP(DNSAAAA)})
		}
		if want(dns.TypeTXT) {
			m.Answer = append(m.Answer, &dns.TXT{Hdr: hdr(dns.TypeTXT), Txt: []string{DNSTXT}})
		}
	case DNSSRV:
		if want(dns.TypeSRV) {
			m.Answer = append(m.Answer, &dns.SRV{Hdr: hdr(dns.TypeSRV), Priority: 10, Weight: 5, Port: DNSSRVPort, Target: DNSName})
		}
	default:
		m.Rcode = dns.RcodeNameError
	}
	w.WriteMsg(m)
}

// Queries returns "TYPE name." for every query received so far.
func (d *DNSServer) Queries() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.queries...)
}

// Close stops the server.
func (d *DNSServer) Close() error {
	e1 := d.udp.Shutdown()
	e2 := d.tcp.Shutdown()
	return errors.Join(e1, e2)
}

// ProbeForward connects to the host side of an inbound forward, sends
// ForwardProbe and returns the source address the guest's echo
// service saw. It retries until ctx ends: the guest side may not be up yet.
// addr "unix:PATH" dials a Unix socket (a unix forward).
func ProbeForward(ctx context.Context, addr string) (peer string, err error) {
	for {
		peer, err = probeOnce(addr)
		if err == nil {
			return peer, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("forward %s: %w (last error: %v)", addr, ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func probeOnce(addr string) (string, error) {
	network := "tcp"
	if p, ok := strings.CutPrefix(addr, "unix:"); ok { // a unix forward's socket
		network, addr = "unix", p
	}
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := fmt.Fprintf(c, "%s\n", ForwardProbe); err != nil {
		return "", err
	}
	r := bufio.NewReader(c)
	echo, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("reading the echo: %w", err)
	}
	if strings.TrimSpace(echo) != ForwardProbe {
		return "", fmt.Errorf("echo %q, want %q", echo, ForwardProbe)
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("reading the peer line: %w", err)
	}
	peer, ok := strings.CutPrefix(strings.TrimSpace(line), "peer=")
	if !ok {
		return "", fmt.Errorf("peer line %q", line)
	}
	return peer, nil
}
