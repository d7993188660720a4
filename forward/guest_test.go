package forward

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// TestCloseGuest: the flows of a guest that went away are torn down at
// once (the host peer sees a reset, the gauges drop, the counter counts
// them); flows of other addresses are left alone.
func TestCloseGuest(t *testing.T) {
	e := newEnv(t, nil)
	hostSide := make(chan net.Conn, 1)
	readErr := make(chan error, 1)
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		hostSide <- c
		// Held open by the guest; only CloseGuest ends it.
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := c.Read(make([]byte, 1))
		readErr <- err
	})
	c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	udpSrv := udpEchoServer(t, netip.MustParseAddr("127.0.0.1"))
	udpRoundTrip(t, e, netip.AddrPortFrom(gw4, udpSrv.Port()), []byte("ping"))
	s := e.f.Stats()
	// TCPConnsTotal counts a splice once it is registered (TCPConns
	// already when the dial starts).
	eventually(t, "flows", func() bool { return s.TCPConnsTotal.Load() == 1 && s.UDPFlows.Load() == 1 })
	select {
	case <-hostSide:
	case <-time.After(5 * time.Second):
		t.Fatal("no host connection")
	}

	// Another guest's address: nothing happens.
	if n := e.f.CloseGuest([]netip.Addr{netip.MustParseAddr("10.0.2.16")}); n != 0 {
		t.Fatalf("CloseGuest(other) closed %d flows", n)
	}
	if s.TCPConns.Load() != 1 || s.UDPFlows.Load() != 1 {
		t.Fatal("another guest's flows were closed")
	}

	if n := e.f.CloseGuest([]netip.Addr{netstacktest.Guest4}); n != 2 {
		t.Fatalf("CloseGuest closed %d flows, want 2", n)
	}
	eventually(t, "flows gone", func() bool { return s.TCPConns.Load() == 0 && s.UDPFlows.Load() == 0 })
	if got := s.GuestFlowsClosed.Load(); got != 2 {
		t.Errorf("guest_gone_closed %d, want 2", got)
	}
	// The host peer learns at once (a reset), not after a timeout.
	select {
	case err := <-readErr:
		if err == nil || isTimeout(err) {
			t.Fatalf("host side read %v, want EOF or reset", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the host side still waits: the connection was not torn down")
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
