package forward

import (
	"bytes"
	"net/netip"
	"testing"
	"time"

	"github.com/vunet/vunet/netstack/netstacktest"
)

func udpRoundTrip(t *testing.T, e *env, dst netip.AddrPort, payload []byte) {
	t.Helper()
	c, err := netstacktest.DialUDP(e.p.Guest, dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(payload); err != nil {
		t.Fatalf("write %d bytes: %v", len(payload), err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 70000)
	n, from, err := c.ReadFrom(buf)
	if err != nil {
		t.Fatalf("%s: read: %v", dst, err)
	}
	if !bytes.Equal(buf[:n], payload) {
		t.Fatalf("%s: echo mismatch (%d bytes back, %d sent)", dst, n, len(payload))
	}
	if got := addrPortOf(from); got != dst {
		t.Errorf("reply from %s, want %s", got, dst)
	}
}

func TestUDPEcho(t *testing.T) {
	e := newEnv(t, nil)
	for _, fam := range families(t) {
		srv := udpEchoServer(t, fam.loop)
		dst := netip.AddrPortFrom(fam.gw, srv.Port())
		udpRoundTrip(t, e, dst, []byte("ping "+fam.gw.String()))
		// The largest IPv4 UDP payload, fragmented on the 1500-byte link
		// in both directions.
		big := bytes.Repeat([]byte("0123456789abcdef"), 65507/16+1)[:65507]
		udpRoundTrip(t, e, dst, big)
	}
	s := e.f.Stats()
	if want := uint64(2 * len(families(t))); s.UDPFlowsTotal.Load() != want {
		t.Errorf("UDPFlowsTotal = %d, want %d", s.UDPFlowsTotal.Load(), want)
	}
}

func TestUDPFlowExpiry(t *testing.T) {
	e := newEnv(t, func(o *Options) {
		o.UDPIdleTimeout = 150 * time.Millisecond
		o.UDPStreamIdleTimeout = time.Hour
	})
	srv := udpEchoServer(t, netip.MustParseAddr("127.0.0.1"))
	dst := netip.AddrPortFrom(gw4, srv.Port())
	c, err := netstacktest.DialUDP(e.p.Guest, dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip := func() {
		t.Helper()
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 10)); err != nil {
			t.Fatal(err)
		}
	}
	roundTrip()
	if s := e.f.Stats(); s.UDPFlows.Load() != 1 {
		t.Fatalf("UDPFlows = %d", s.UDPFlows.Load())
	}
	eventually(t, "flow expiry", func() bool { return e.f.Stats().UDPFlows.Load() == 0 })
	if s := e.f.Stats(); s.UDPFlowsExpired.Load() != 1 {
		t.Errorf("UDPFlowsExpired = %d", s.UDPFlowsExpired.Load())
	}
	// The same 5-tuple gets a fresh flow.
	roundTrip()
	// A second exchange makes it a stream: the long timeout applies.
	roundTrip()
	time.Sleep(400 * time.Millisecond)
	if s := e.f.Stats(); s.UDPFlows.Load() != 1 || s.UDPFlowsTotal.Load() != 2 {
		t.Errorf("stream flow: UDPFlows = %d, total = %d", s.UDPFlows.Load(), s.UDPFlowsTotal.Load())
	}
}

func TestUDPFlowLimit(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxUDPFlows = 1 })
	srv := udpEchoServer(t, netip.MustParseAddr("127.0.0.1"))
	dst := netip.AddrPortFrom(gw4, srv.Port())
	udpRoundTrip(t, e, dst, []byte("first")) // its flow stays (30 s timeout)
	c, err := netstacktest.DialUDP(e.p.Guest, dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = c.Write([]byte("second"))
	eventually(t, "drop", func() bool { return e.f.Stats().DropUDPFlowLimit.Load() == 1 })
}

// TestUDPNotForwarded sends to multicast, the DNS address and the
// unmapped gateway; nothing may reach the host. (gVisor already discards
// multicast for groups the NIC has not joined, before our handler; the
// handler's own broadcast filter is covered by TestTarget.)
func TestUDPNotForwarded(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MapHostLoopback = false })
	srv := udpEchoServer(t, netip.MustParseAddr("127.0.0.1"))
	for _, dst := range []netip.Addr{netip.MustParseAddr("224.0.0.251"), netstacktest.DNS4, gw4} {
		c, err := netstacktest.DialUDP(e.p.Guest, netip.AddrPortFrom(dst, srv.Port()))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = c.Write([]byte("leak?"))
		_ = c.Close()
	}
	eventually(t, "drops", func() bool {
		d := e.f.Stats()
		return d.DropDNSAddress.Load() == 1 && d.DropGateway.Load() == 1
	})
	if s := e.f.Stats(); s.UDPFlowsTotal.Load() != 0 {
		t.Errorf("UDPFlowsTotal = %d", s.UDPFlowsTotal.Load())
	}
}

func TestTarget(t *testing.T) {
	e := newEnv(t, nil)
	for _, tc := range []struct {
		dst  string
		want string
		why  dropReason
	}{
		{"10.0.2.2", "127.0.0.1", forwardOK},
		{"fd00::2", "::1", forwardOK},
		{"192.0.2.1", "192.0.2.1", forwardOK},
		{"::ffff:192.0.2.1", "192.0.2.1", forwardOK},
		{"10.0.2.3", "", dropDNS},
		{"fd00::3", "", dropDNS},
		{"10.0.2.255", "", dropBroadcast},
		{"255.255.255.255", "", dropBroadcast},
		{"239.1.2.3", "", dropBroadcast},
		{"ff02::1", "", dropBroadcast},
		{"0.0.0.0", "", dropUnspecified},
		{"127.0.0.1", "", dropUnspecified},
	} {
		got, why := e.f.target(netip.MustParseAddr(tc.dst))
		if why != tc.why || why == forwardOK && got.String() != tc.want {
			t.Errorf("target(%s) = %s, %s; want %s, %s", tc.dst, got, why, tc.want, tc.why)
		}
	}
}

func TestIdleTimeoutSelection(t *testing.T) {
	f := &Forwarder{opts: Options{UDPIdleTimeout: time.Second, UDPStreamIdleTimeout: time.Minute}}
	fl := &udpFlow{f: f}
	fl.fromGuest.Store(5)
	fl.toGuest.Store(StreamThreshold - 1)
	if fl.idleTimeout() != time.Second {
		t.Error("one-sided flow got the stream timeout")
	}
	fl.toGuest.Store(StreamThreshold)
	if fl.idleTimeout() != time.Minute {
		t.Error("stream flow got the short timeout")
	}
}
