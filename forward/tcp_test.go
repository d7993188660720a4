package forward

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vunet/vunet/netstack/netstacktest"
)

func TestTCPGatewayMapsToLoopback(t *testing.T) {
	e := newEnv(t, nil)
	for _, fam := range families(t) {
		peers := make(chan netip.AddrPort, 1)
		srv := tcpServer(t, fam.loop, func(c net.Conn) {
			peers <- addrPortOf(c.RemoteAddr())
			echoHandler(c)
		})
		c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(fam.gw, srv.Port()))
		if err != nil {
			t.Fatalf("%s: dial: %v", fam.gw, err)
		}
		if got := addrPortOf(c.LocalAddr()); got.Addr() != netstacktest.Guest4 && got.Addr() != netstacktest.Guest6 {
			t.Errorf("guest local address %s", got)
		}
		msg := []byte("hello through " + fam.gw.String())
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("%s: echo %q, %v", fam.gw, got, err)
		}
		if p := <-peers; p.Addr() != fam.loop {
			t.Errorf("host server saw peer %s, want %s", p, fam.loop)
		}
		_ = c.Close()
	}
	eventually(t, "connections to drain", func() bool { return e.f.Stats().TCPConns.Load() == 0 })
	if s := e.f.Stats(); s.TCPConnsTotal.Load() != uint64(len(families(t))) {
		t.Errorf("TCPConnsTotal = %d", s.TCPConnsTotal.Load())
	}
}

// TestTCPLargeTransfer sends 4 MiB each way at the same time and compares
// SHA-256 digests; the guest half-closes after sending, the host after its
// own data, which exercises both CloseWrite paths.
func TestTCPLargeTransfer(t *testing.T) {
	const size = 4 << 20
	e := newEnv(t, nil)
	up := make([]byte, size)
	down := make([]byte, size)
	rng := rand.NewChaCha8([32]byte{1})
	_, _ = rng.Read(up)
	_, _ = rng.Read(down)

	serverGot := make(chan [32]byte, 1)
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := sha256.New()
			_, _ = io.Copy(h, c)
			serverGot <- [32]byte(h.Sum(nil))
		}()
		_, _ = c.Write(down)
		_ = c.(*net.TCPConn).CloseWrite()
		wg.Wait()
	})
	c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go func() {
		_, _ = c.Write(up)
		_ = c.CloseWrite()
	}()
	h := sha256.New()
	if _, err := io.Copy(h, c); err != nil {
		t.Fatalf("guest read: %v", err)
	}
	if [32]byte(h.Sum(nil)) != sha256.Sum256(down) {
		t.Error("host->guest data corrupted")
	}
	select {
	case got := <-serverGot:
		if got != sha256.Sum256(up) {
			t.Error("guest->host data corrupted")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server did not finish")
	}
}

func TestTCPRefusedGetsRST(t *testing.T) {
	e := newEnv(t, nil)
	for _, fam := range families(t) {
		port := freePort(t, fam.loop)
		start := time.Now()
		_, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(fam.gw, port))
		if err == nil || !strings.Contains(err.Error(), "refused") {
			t.Fatalf("%s: dial err = %v, want connection refused", fam.gw, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("refusal took %v", d)
		}
	}
	if s := e.f.Stats(); s.TCPRefused.Load() != uint64(len(families(t))) {
		t.Errorf("TCPRefused = %d", s.TCPRefused.Load())
	}
}

func TestTCPHalfClose(t *testing.T) {
	e := newEnv(t, nil)
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		b, _ := io.ReadAll(c) // until the guest's FIN
		_, _ = c.Write(append(b, "-and-after-EOF"...))
	})
	c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = c.Write([]byte("request"))
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "request-and-after-EOF" {
		t.Fatalf("read %q, %v", b, err)
	}
}

func TestTCPHTTP(t *testing.T) {
	e := newEnv(t, nil)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "hi "+r.URL.Path)
	}))
	t.Cleanup(hs.Close)
	port := hs.Listener.Addr().(*net.TCPAddr).Port
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			ap, err := netip.ParseAddrPort(addr)
			if err != nil {
				return nil, err
			}
			return netstacktest.DialTCP(ctx, e.p.Guest, ap)
		},
	}}
	defer client.CloseIdleConnections()
	for i := 0; i < 3; i++ {
		resp, err := client.Get("http://" + netip.AddrPortFrom(gw4, uint16(port)).String() + "/x")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if string(b) != "hi /x" {
			t.Fatalf("body %q", b)
		}
	}
}

func TestTCPNotForwarded(t *testing.T) {
	for _, tc := range []struct {
		name    string
		mapLoop bool
		dst     netip.Addr
		drops   func(*Stats) uint64
	}{
		{"dns4", true, netstacktest.DNS4, func(s *Stats) uint64 { return s.DropDNSAddress.Load() }},
		{"dns6", true, netstacktest.DNS6, func(s *Stats) uint64 { return s.DropDNSAddress.Load() }},
		{"gateway-unmapped", false, gw4, func(s *Stats) uint64 { return s.DropGateway.Load() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(o *Options) { o.MapHostLoopback = tc.mapLoop })
			srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), echoHandler)
			_, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(tc.dst, srv.Port()))
			if err == nil || !strings.Contains(err.Error(), "refused") {
				t.Fatalf("dial err = %v, want refused", err)
			}
			if n := tc.drops(e.f.Stats()); n != 1 {
				t.Errorf("drop counter = %d", n)
			}
		})
	}
}

// TestTCPInFlightLimit holds one dial open with a blocking dialer and checks
// that a second SYN is refused at once.
func TestTCPInFlightLimit(t *testing.T) {
	release := make(chan struct{})
	e := newEnv(t, func(o *Options) {
		o.MaxInFlightDials = 1
		real := &net.Dialer{}
		o.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			select {
			case <-release:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			return real.DialContext(ctx, network, addr)
		}
	})
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), echoHandler)
	dst := netip.AddrPortFrom(gw4, srv.Port())
	first := make(chan error, 1)
	go func() {
		c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, dst)
		if err == nil {
			_ = c.Close()
		}
		first <- err
	}()
	eventually(t, "first dial in flight", func() bool { return e.f.Stats().TCPDialsInFlight.Load() == 1 })
	_, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, dst)
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("second dial err = %v, want refused", err)
	}
	if s := e.f.Stats(); s.TCPRejectedInFlight.Load() != 1 {
		t.Errorf("TCPRejectedInFlight = %d", s.TCPRejectedInFlight.Load())
	}
	// The refused SYN gives its connection slot back at once: only the
	// first connection holds one.
	if n := e.f.Stats().TCPConns.Load(); n != 1 {
		t.Errorf("TCPConns = %d after an in-flight refusal, want 1", n)
	}
	close(release)
	if err := <-first; err != nil {
		t.Fatalf("first dial: %v", err)
	}
}

func TestTCPConnLimit(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxConns = 1 })
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), echoHandler)
	dst := netip.AddrPortFrom(gw4, srv.Port())
	c1, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, dst)
	if err != nil {
		t.Fatal(err)
	}
	_, err = netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, dst)
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("second dial err = %v, want refused", err)
	}
	if s := e.f.Stats(); s.TCPRejectedConns.Load() != 1 || s.TCPConns.Load() != 1 {
		t.Errorf("stats %+v", s)
	}
	_ = c1.Close()
	eventually(t, "slot freed", func() bool { return e.f.Stats().TCPConns.Load() == 0 })
	c3, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, dst)
	if err != nil {
		t.Fatalf("dial after close: %v", err)
	}
	_ = c3.Close()
}

// TestTCPCloseAbortsConnections checks that Forwarder.Close ends live
// splices (it would hang on its wait group otherwise) and resets the guest.
func TestTCPCloseAbortsConnections(t *testing.T) {
	e := newEnv(t, nil)
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), echoHandler)
	c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	eventually(t, "connection", func() bool { return e.f.Stats().TCPConns.Load() == 1 })
	done := make(chan struct{})
	go func() { _ = e.f.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hung")
	}
	// A reset, not a graceful close or silence: replacing the splice's
	// gep.Abort() with Close() fails here (checked by hand).
	wantReset(t, c, "guest connection after Forwarder.Close")
	// New SYNs are refused after Close.
	if _, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port())); err == nil {
		t.Error("dial succeeded after Close")
	}
}
