package forward

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/netstack/netstacktest"
)

// TestTCPBurstAfterIdleIsNotDropped: a guest that uploads, falls quiet
// for longer than shrinkAfter and uploads again loses nothing. The
// splice returns an idle receive buffer to its minimum share, but the
// window gVisor offered the guest never shrinks, so a buffer lowered
// below that window drops the guest's next in-window flight.
func TestTCPBurstAfterIdleIsNotDropped(t *testing.T) {
	e := newEnv(t, nil)
	got := make(chan int64, 1)
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		got <- n
	})
	c, err := netstacktest.DialTCP(ctxT(t, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 1<<17) // 2 MiB
	if _, err := c.Write(chunk); err != nil {
		t.Fatal(err)
	}
	time.Sleep(shrinkAfter + 500*time.Millisecond)
	before := e.p.Host.Stack().Stats().DroppedPackets.Value()
	if _, err := c.Write(chunk); err != nil {
		t.Fatal(err)
	}
	_ = c.CloseWrite()
	select {
	case n := <-got:
		if n != 2*int64(len(chunk)) {
			t.Fatalf("host got %d bytes, want %d", n, 2*len(chunk))
		}
	case <-time.After(20 * time.Second):
		t.Fatal("host did not get the upload")
	}
	if n := e.p.Host.Stack().Stats().DroppedPackets.Value() - before; n != 0 {
		t.Errorf("vunet's stack dropped %d of the guest's packets after the idle spell (guest retransmitted %d segments)",
			n, e.p.Guest.Stats().TCP.Retransmits.Value())
	}
}

// TestTCPIdleRecvBufferGivenBackUnderPressure: once the budget is tight,
// an idle grown receive buffer does go back to the minimum share.
func TestTCPIdleRecvBufferGivenBackUnderPressure(t *testing.T) {
	const limit = 16 << 20
	mem := budget.New(limit)
	e := newEnv(t, func(o *Options) { o.Memory = mem })
	got := make(chan int64, 1)
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		got <- n
	})
	c, err := netstacktest.DialTCP(ctxT(t, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 1<<17) // 2 MiB
	if _, err := c.Write(chunk); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the receive buffer to grow", func() bool { return mem.Used() > 2*MinTCPBuffer+MinTCPBuffer })
	grown := mem.Used()
	// Somebody else holds most of the budget: it is tight now.
	if !mem.Take(limit/2) || !mem.Tight() {
		t.Fatalf("could not make the budget tight (used %d of %d)", mem.Used(), limit)
	}
	eventually(t, "the idle receive buffer to be given back", func() bool {
		return e.f.c.TCPRecvShrinks.Load() == 1
	})
	if after := mem.Used() - limit/2; after >= grown {
		t.Errorf("budget used %d after the shrink, %d before", after, grown)
	}
}
