package netstack_test

import (
	"context"
	"io"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/netstack/netstacktest"
)

func TestNewValidates(t *testing.T) {
	ep := channel.New(1, 1500, "")
	cases := []netstack.Options{
		{},
		{Endpoint: ep},
		{Endpoint: ep, Gateway4: netip.MustParsePrefix("fd00::2/64")},
		{Endpoint: ep, Gateway4: netstacktest.Gateway4, DNS4: netstacktest.DNS6},
		{Endpoint: ep, Gateway4: netstacktest.Gateway4, DNS4: netstacktest.Gateway4.Addr()},
		{Endpoint: ep, Gateway4: netstacktest.Gateway4, DNS6: netstacktest.DNS6},
	}
	for i, o := range cases {
		if s, err := netstack.New(o); err == nil {
			s.Close()
			t.Errorf("case %d: New(%+v) succeeded, want error", i, o)
		}
	}
}

func TestPingGateway(t *testing.T) {
	p := netstacktest.NewPair(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, dst := range []netip.Addr{
		netstacktest.Gateway4.Addr(), netstacktest.DNS4,
		netstacktest.Gateway6.Addr(), netstacktest.DNS6,
	} {
		from, err := netstacktest.Ping(ctx, p.Guest, dst, []byte("hello "+dst.String()))
		if err != nil {
			t.Fatalf("ping %s: %v", dst, err)
		}
		if from != dst {
			t.Errorf("ping %s: reply from %s", dst, from)
		}
	}
}

// TestPromiscuous checks that a wildcard listener in the vunet stack accepts
// connections to arbitrary destinations and sees that destination as its
// local address (promiscuous + spoofing), for both families.
func TestPromiscuous(t *testing.T) {
	p := netstacktest.NewPair(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, dst := range []netip.AddrPort{
		netip.MustParseAddrPort("192.0.2.77:80"),
		netip.MustParseAddrPort("[2001:db8::77]:82"),
		netip.AddrPortFrom(netstacktest.Gateway4.Addr(), 81),
	} {
		l, err := netstacktest.ListenTCP(p.Host.Stack(), netip.AddrPortFrom(netip.Addr{}, dst.Port()))
		if err != nil {
			t.Fatalf("listen: %v", err)
		}
		done := make(chan netip.AddrPort, 1)
		go func() {
			c, err := l.Accept()
			if err != nil {
				done <- netip.AddrPort{}
				return
			}
			done <- netstacktest.AddrOf(c.LocalAddr())
			_, _ = c.Write([]byte("ok"))
			_ = c.Close()
		}()
		c, err := netstacktest.DialTCP(ctx, p.Guest, dst)
		if err != nil {
			t.Fatalf("dial %s: %v", dst, err)
		}
		b, _ := io.ReadAll(c)
		_ = c.Close()
		if got := <-done; got != dst {
			t.Errorf("server saw local %s, want %s", got, dst)
		}
		if string(b) != "ok" {
			t.Errorf("read %q", b)
		}
		_ = l.Close()
	}
}

func TestAccessors(t *testing.T) {
	p := netstacktest.NewPair(t, 0)
	if p.Host.NIC() != netstack.NICID || p.Host.Stack() == nil {
		t.Fatal("accessors")
	}
	if p.Host.Gateway4() != netstacktest.Gateway4 || p.Host.DNS6() != netstacktest.DNS6 {
		t.Fatal("address accessors")
	}
	p.Host.Close()
	p.Host.Close() // idempotent
}

// TestNoTailLossProbes: the stack runs TCP without RACK (and so without
// tail loss probes, which a guest with stalling ACKs answered with
// spurious full-segment retransmissions), with SACK on.
func TestNoTailLossProbes(t *testing.T) {
	p := netstacktest.NewPair(t, 0)
	var rec tcpip.TCPRecovery
	if err := p.Host.Stack().TransportProtocolOption(tcp.ProtocolNumber, &rec); err != nil {
		t.Fatal(err)
	}
	if rec != 0 {
		t.Fatalf("TCPRecovery = %#x, want 0 (no RACK, no TLP)", rec)
	}
	var sack tcpip.TCPSACKEnabled
	if err := p.Host.Stack().TransportProtocolOption(tcp.ProtocolNumber, &sack); err != nil || !sack {
		t.Fatalf("SACK enabled %v (%v), want true", sack, err)
	}
}

// TestShortTimeWait: an endpoint of vunet's stack that closed first leaves
// TIME_WAIT after netstack.TimeWait, not gVisor's 60 s, so a guest whose
// peers close first does not keep an endpoint per connection for a
// minute. Red with the option removed (the endpoint is still connected
// after 10 s).
func TestShortTimeWait(t *testing.T) {
	p := netstacktest.NewPair(t, 0)
	var tw tcpip.TCPTimeWaitTimeoutOption
	if err := p.Host.Stack().TransportProtocolOption(tcp.ProtocolNumber, &tw); err != nil {
		t.Fatal(err)
	}
	if time.Duration(tw) != netstack.TimeWait {
		t.Errorf("TIME_WAIT %v, want %v", time.Duration(tw), netstack.TimeWait)
	}
	at := netip.AddrPortFrom(netstacktest.Gateway4.Addr(), 7070)
	l, err := netstacktest.ListenTCP(p.Host.Stack(), at)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	gc, err := netstacktest.DialTCP(ctx, p.Guest, at)
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	hc, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	connected := p.Host.Stack().Stats().TCP.CurrentConnected
	if n := connected.Value(); n != 1 {
		t.Fatalf("%d connected endpoints in vunet's stack, want 1", n)
	}
	// vunet's side closes first (FIN_WAIT), then the guest: vunet's
	// endpoint goes to TIME_WAIT.
	_ = hc.Close()
	_ = gc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := gc.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("guest read after vunet's close: %v, want EOF", err)
	}
	closed := time.Now()
	_ = gc.Close()
	for connected.Value() != 0 {
		if time.Since(closed) > 10*time.Second {
			t.Fatalf("vunet's endpoint still connected (TIME_WAIT) %v after the close", time.Since(closed).Round(time.Millisecond))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("vunet's endpoint gone %v after the close", time.Since(closed).Round(time.Millisecond))
}
