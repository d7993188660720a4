package forward

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// guestPeerServer listens in the guest and answers each connection with
// the peer address it sees, then echoes.
func guestPeerServer(t *testing.T, e *env, at netip.AddrPort) {
	t.Helper()
	l, err := netstacktest.ListenTCP(e.p.Guest, at)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { _ = l.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.WriteString(c, addrPortOf(c.RemoteAddr()).String()+"\n")
				_, _ = io.Copy(c, c)
			}()
		}
	}()
}

func TestInboundTCP(t *testing.T) {
	e := newEnv(t, nil)
	for _, fam := range families(t) {
		guest := netip.AddrPortFrom(netstacktest.Guest4, 8080)
		if fam.loop.Is6() {
			guest = netip.AddrPortFrom(netstacktest.Guest6, 8080)
		}
		guestPeerServer(t, e, guest)
		pf, err := e.f.AddPortForward(PortForward{Proto: "tcp", Host: netip.AddrPortFrom(fam.loop, 0), Guest: guest})
		if err != nil {
			t.Fatal(err)
		}
		if pf.Host.Port() == 0 || pf.Host.Addr() != fam.loop {
			t.Fatalf("effective forward %s", pf)
		}
		c, err := net.Dial("tcp", pf.Host.String())
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		r := bufio.NewReader(c)
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read peer line: %v", err)
		}
		want := netip.AddrPortFrom(fam.gw, addrPortOf(c.LocalAddr()).Port())
		if got := strings.TrimSpace(line); got != want.String() {
			t.Errorf("guest saw peer %s, want %s", got, want)
		}
		_, _ = io.WriteString(c, "echo\n")
		if l, err := r.ReadString('\n'); err != nil || l != "echo\n" {
			t.Errorf("echo %q, %v", l, err)
		}
		_ = c.Close()
	}
	if n := len(e.f.ListPortForwards()); n != len(families(t)) {
		t.Errorf("ListPortForwards has %d entries", n)
	}
}

// TestInboundSpoofedSource checks the path used for non-loopback clients:
// the guest sees the client's own address, from a documentation prefix
// that exists only inside the simulated link.
func TestInboundSpoofedSource(t *testing.T) {
	e := newEnv(t, nil)
	for _, tc := range []struct{ src, guest netip.AddrPort }{
		{netip.MustParseAddrPort("192.0.2.7:4321"), netip.AddrPortFrom(netstacktest.Guest4, 8081)},
		{netip.MustParseAddrPort("[2001:db8::7]:4321"), netip.AddrPortFrom(netstacktest.Guest6, 8081)},
	} {
		guestPeerServer(t, e, tc.guest)
		ep, wq, err := e.f.dialGuestTCP(ctxT(t, 5*time.Second), tc.src, tc.guest)
		if err != nil {
			t.Fatalf("dial from %s: %v", tc.src, err)
		}
		c := gonet.NewTCPConn(wq, ep)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || strings.TrimSpace(line) != tc.src.String() {
			t.Errorf("guest saw %q (%v), want %s", line, err, tc.src)
		}
		_ = c.Close()
	}
}

func TestGuestSource(t *testing.T) {
	e := newEnv(t, nil)
	for _, tc := range []struct{ client, guest, want string }{
		{"127.0.0.1:5", "10.0.2.15", "10.0.2.2:5"},
		{"127.1.2.3:5", "10.0.2.15", "10.0.2.2:5"},
		{"[::1]:5", "fd00::15", "[fd00::2]:5"},
		{"[::1]:5", "10.0.2.15", "10.0.2.2:5"},
		{"192.168.1.9:5", "10.0.2.15", "192.168.1.9:5"},
		{"[::ffff:192.168.1.9]:5", "10.0.2.15", "192.168.1.9:5"},
		{"192.168.1.9:5", "fd00::15", "[fd00::2]:5"},
		{"[2001:db8::9]:5", "fd00::15", "[2001:db8::9]:5"},
	} {
		got, ok := e.f.guestSource(netip.MustParseAddrPort(tc.client), netip.MustParseAddr(tc.guest))
		if !ok || got.String() != tc.want {
			t.Errorf("guestSource(%s, %s) = %s, %v; want %s", tc.client, tc.guest, got, ok, tc.want)
		}
	}
}

func TestInboundTCPGuestRefuses(t *testing.T) {
	e := newEnv(t, nil)
	pf, err := e.f.AddPortForward(PortForward{Proto: "tcp", Guest: netip.AddrPortFrom(netstacktest.Guest4, 9)})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", pf.Host.String())
	if errors.Is(err, syscall.ECONNRESET) {
		return // the reset beat the end of our own connect: also fine
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("read err = %v, want reset or EOF", err)
	}
}

func TestPortForwardAddRemove(t *testing.T) {
	e := newEnv(t, nil)
	guest := netip.AddrPortFrom(netstacktest.Guest4, 8082)
	guestPeerServer(t, e, guest)
	for _, bad := range []PortForward{
		{Proto: "sctp", Guest: guest},
		{Proto: "tcp"},
		{Proto: "udp", Guest: netip.AddrPortFrom(netstacktest.Guest4, 0)},
	} {
		if _, err := e.f.AddPortForward(bad); err == nil {
			t.Errorf("AddPortForward(%s) succeeded", bad)
		}
	}
	pf, err := e.f.AddPortForward(PortForward{Proto: "TCP", Guest: guest})
	if err != nil {
		t.Fatal(err)
	}
	if pf.Proto != "tcp" || pf.Host.Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("normalized to %s", pf)
	}
	if _, err := e.f.AddPortForward(pf); err == nil {
		t.Error("duplicate forward accepted")
	}
	// A live connection is closed by the removal.
	c, err := net.Dial("tcp", pf.Host.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	if err := e.f.RemovePortForward(PortForward{Proto: "tcp", Host: pf.Host}); err != nil {
		t.Fatal(err)
	}
	// The host peer is reset (zero linger), not closed gracefully or left
	// open: dropping abort's SetLinger(0) fails here (checked by hand).
	wantReset(t, c, "host connection after RemovePortForward")
	if _, err := net.Dial("tcp", pf.Host.String()); err == nil {
		t.Error("listener survived RemovePortForward")
	}
	if err := e.f.RemovePortForward(pf); err == nil {
		t.Error("second removal succeeded")
	}
	if n := len(e.f.ListPortForwards()); n != 0 {
		t.Errorf("%d forwards left", n)
	}
	eventually(t, "connections drained", func() bool { return e.f.Stats().TCPConns.Load() == 0 })
}

func TestInboundUDP(t *testing.T) {
	e := newEnv(t, func(o *Options) {
		o.UDPIdleTimeout = 300 * time.Millisecond
		o.UDPStreamIdleTimeout = 300 * time.Millisecond
	})
	for _, fam := range families(t) {
		guest := netip.AddrPortFrom(netstacktest.Guest4, 5353)
		if fam.loop.Is6() {
			guest = netip.AddrPortFrom(netstacktest.Guest6, 5353)
		}
		// Guest server: reply with the peer address it sees + payload.
		gc, err := netstacktest.ListenUDP(e.p.Guest, guest)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = gc.Close() })
		go func() {
			buf := make([]byte, 65535)
			for {
				n, from, err := gc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = gc.WriteTo(append([]byte(addrPortOf(from).String()+" "), buf[:n]...), from)
			}
		}()
		pf, err := e.f.AddPortForward(PortForward{Proto: "udp", Host: netip.AddrPortFrom(fam.loop, 0), Guest: guest})
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("udp", pf.Host.String())
		if err != nil {
			t.Fatal(err)
		}
		want := netip.AddrPortFrom(fam.gw, addrPortOf(c.LocalAddr()).Port()).String() + " hi"
		for i := 0; i < 2; i++ {
			_, _ = c.Write([]byte("hi"))
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 1024)
			n, err := c.Read(buf)
			if err != nil || string(buf[:n]) != want {
				t.Fatalf("reply %q (%v), want %q", buf[:n], err, want)
			}
		}
		_ = c.Close()
	}
	s := e.f.Stats()
	if s.InboundUDPFlows.Load() != uint64(len(families(t))) {
		t.Errorf("InboundUDPFlows = %d", s.InboundUDPFlows.Load())
	}
	eventually(t, "inbound flows to expire", func() bool { return e.f.Stats().UDPFlows.Load() == 0 })
}

func TestCloseStopsPortForwards(t *testing.T) {
	e := newEnv(t, nil)
	pf, err := e.f.AddPortForward(PortForward{Proto: "udp", Guest: netip.AddrPortFrom(netstacktest.Guest4, 53)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() { _ = e.f.Close(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("Close hung")
	}
	if _, err := e.f.AddPortForward(pf); err == nil {
		t.Error("AddPortForward after Close succeeded")
	}
	if n := len(e.f.ListPortForwards()); n != 0 {
		t.Errorf("%d forwards after Close", n)
	}
}
