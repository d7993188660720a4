package forward

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// env is a vunet stack with a Forwarder, wired to a simulated guest.
type env struct {
	t testing.TB
	p *netstacktest.Pair
	f *Forwarder
}

func testLogger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{tb}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ tb testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.tb.Helper()
	w.tb.Log(string(b[:len(b)-1]))
	return len(b), nil
}

func newEnv(t testing.TB, mutate func(*Options)) *env {
	t.Helper()
	p := netstacktest.NewPair(t, 0)
	o := Options{
		Stack:           p.Host.Stack(),
		NIC:             p.Host.NIC(),
		Gateway4:        netstacktest.Gateway4.Addr(),
		Gateway6:        netstacktest.Gateway6.Addr(),
		DNS4:            netstacktest.DNS4,
		DNS6:            netstacktest.DNS6,
		MapHostLoopback: true,
		DialTimeout:     5 * time.Second,
		Logger:          testLogger(t),
	}
	if mutate != nil {
		mutate(&o)
	}
	f, err := New(o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	// Registered after NewPair's cleanup, so it runs first: the Forwarder
	// is closed while the stacks still exist.
	t.Cleanup(func() { _ = f.Close() })
	return &env{t: t, p: p, f: f}
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

var (
	gw4 = netstacktest.Gateway4.Addr()
	gw6 = netstacktest.Gateway6.Addr()
)

// hasIPv6Loopback reports whether [::1] can be listened on here.
func hasIPv6Loopback() bool {
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}

// families returns the (host loopback, guest-visible gateway) pairs to test.
func families(t *testing.T) []struct{ loop, gw netip.Addr } {
	out := []struct{ loop, gw netip.Addr }{{netip.MustParseAddr("127.0.0.1"), gw4}}
	if hasIPv6Loopback() {
		out = append(out, struct{ loop, gw netip.Addr }{netip.IPv6Loopback(), gw6})
	} else {
		t.Log("no IPv6 loopback here; IPv6 cases skipped")
	}
	return out
}

// tcpServer runs handle for every connection accepted on addr:0.
func tcpServer(t testing.TB, addr netip.Addr, handle func(net.Conn)) netip.AddrPort {
	t.Helper()
	l, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return l.Addr().(*net.TCPAddr).AddrPort()
}

func echoHandler(c net.Conn) { _, _ = io.Copy(c, c) }

// udpEchoServer echoes every datagram on addr:0.
func udpEchoServer(t *testing.T, addr netip.Addr) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		t.Fatalf("listen udp: %v", err)
	}
	_ = pc.SetReadBuffer(1 << 20)
	done := make(chan struct{})
	t.Cleanup(func() { _ = pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			_, _ = pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// freePort returns a loopback port with nothing listening on it.
func freePort(t *testing.T, addr netip.Addr) uint16 {
	t.Helper()
	l, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).AddrPort().Port()
	_ = l.Close()
	return port
}

// eventually polls cond until it holds or a few seconds have passed.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	// Generous: CI runs this beside QEMU guests on two cores.
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// wantReset reads from c and fails the test unless the read ends in a
// connection reset: data, a graceful close (EOF) or a timeout are all
// failures. It accepts the host kernel's ECONNRESET and gVisor's
// "connection reset by peer" (gonet turns tcpip errors into strings).
func wantReset(t *testing.T, c net.Conn, what string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if isReset(err) {
		return
	}
	t.Errorf("%s: read returned %d bytes, err %v; want a connection reset", what, n, err)
}

func isReset(err error) bool {
	if err == nil {
		return false
	}
	return errors.Is(err, syscall.ECONNRESET) || strings.Contains(err.Error(), (&tcpip.ErrConnectionReset{}).String())
}
