package forward

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/link/channel"

	"github.com/vunet/vunet/internal/tcprepair"
	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/netstack/netstacktest"
)

// moveHost is one vunet of a migration: a stack on the wire and its NAT.
type moveHost struct {
	ns   *netstack.Stack
	link *channel.Endpoint
	f    *Forwarder
}

func newMoveHost(t *testing.T, w *netstacktest.Wire, move bool) *moveHost {
	t.Helper()
	ns, link := w.NewHost(t)
	o := Options{
		Stack: ns.Stack(), NIC: ns.NIC(), Gateway4: gw4, DNS4: netstacktest.DNS4,
		MapHostLoopback: true, DialTimeout: 5 * time.Second, Logger: testLogger(t),
	}
	if move {
		o.MoveTCP = ns
	}
	f, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return &moveHost{ns: ns, link: link, f: f}
}

func movePattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31+i/241) ^ seed
	}
	return b
}

// both sends n checked bytes from a to b and from b to a.
func both(t *testing.T, a, b net.Conn, n int, seed byte) {
	t.Helper()
	for _, d := range [][2]net.Conn{{a, b}, {b, a}} {
		want := movePattern(n, seed)
		seed++
		errc := make(chan error, 1)
		go func() { _, err := d[0].Write(want); errc <- err }()
		got := make([]byte, n)
		_ = d[1].SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(d[1], got); err != nil {
			t.Fatalf("%v -> %v: %v", d[0].LocalAddr(), d[1].LocalAddr(), err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%v -> %v: %d bytes arrived changed", d[0].LocalAddr(), d[1].LocalAddr(), n)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
}

// TestMoveTCPConnection is a live migration of a guest with two
// connections to a host server: the quiet one moves to the second vunet
// and goes on both ways with every byte checked; the busy one (data on
// its way to the paused guest) is reset on both sides.
func TestMoveTCPConnection(t *testing.T) {
	if err := tcprepair.Available(); err != nil {
		t.Skip(err)
	}
	accepted := make(chan net.Conn, 2)
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		accepted <- c
		<-t.Context().Done()
	})
	w := netstacktest.NewWire(t)
	guest, err := netstacktest.NewGuest(w.Guest())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(guest.Destroy)
	src := newMoveHost(t, w, true)
	w.Plug(src.link)

	dst := netip.AddrPortFrom(gw4, srv.Port())
	dial := func() (net.Conn, net.Conn) {
		gc, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), guest, dst)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = gc.Close() })
		select {
		case hc := <-accepted:
			return gc, hc
		case <-time.After(5 * time.Second):
			t.Fatal("no host connection")
		}
		return nil, nil
	}
	quietG, quietH := dial()
	busyG, busyH := dial()
	both(t, quietG, quietH, 200<<10, 1)
	both(t, busyG, busyH, 1000, 9)
	// Wait until the guest has acknowledged everything (it may delay).
	time.Sleep(300 * time.Millisecond)

	// The guest pauses. The busy connection's host peer still sends: that
	// data is unacknowledged at the save.
	w.Unplug()
	if _, err := busyH.Write([]byte("late")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	flows := src.f.SaveTCP()
	if len(flows) != 1 {
		t.Fatalf("saved %d connections, want 1", len(flows))
	}
	if c := &src.f.c; c.TCPMoved.Load() != 1 || c.TCPMoveResetBusy.Load() != 1 {
		t.Fatalf("moved %d, reset busy %d; want 1 and 1", c.TCPMoved.Load(), c.TCPMoveResetBusy.Load())
	}
	if got := src.f.c.TCPConns.Load(); got != 0 {
		t.Fatalf("source still counts %d connections", got)
	}
	// The reset one's host peer sees the reset; the moved one's nothing.
	_ = busyH.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(busyH); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("busy connection's host peer: %v, want ECONNRESET", err)
	}

	// The destination vunet takes over; the guest resumes there.
	to := newMoveHost(t, w, true)
	w.Plug(to.link)
	syns := w.SYNsToGuest.Load()
	if n := to.f.RestoreTCP(flows); n != 1 {
		t.Fatalf("restored %d connections, want 1", n)
	}
	if n := w.SYNsToGuest.Load() - syns; n != 0 {
		t.Fatalf("the guest saw %d SYNs of the restore", n)
	}
	both(t, quietG, quietH, 300<<10, 3)
	if got := to.f.c.TCPConns.Load(); got != 1 {
		t.Fatalf("destination counts %d connections, want 1", got)
	}
	// The guest ends it; the host peer sees EOF, and the destination's
	// splice ends.
	if err := quietG.Close(); err != nil {
		t.Fatal(err)
	}
	_ = quietH.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(quietH); err != nil || len(b) != 0 {
		t.Fatalf("host peer after the guest's close: %d bytes, %v", len(b), err)
	}
	_ = quietH.Close()
	eventually(t, "the destination's connection to end", func() bool { return to.f.c.TCPConns.Load() == 0 })
}

// TestMoveTCPOff: without MoveTCP a save moves nothing and a restore
// takes nothing (counted).
func TestMoveTCPOff(t *testing.T) {
	w := netstacktest.NewWire(t)
	h := newMoveHost(t, w, false)
	if flows := h.f.SaveTCP(); flows != nil {
		t.Fatalf("saved %v", flows)
	}
	if n := h.f.RestoreTCP([]TCPFlowState{{}}); n != 0 {
		t.Fatalf("restored %d", n)
	}
	if got := h.f.c.TCPRestoreRefused.Load(); got != 1 {
		t.Fatalf("refused %d, want 1", got)
	}
}
