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
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/budget"
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
		Memory: budget.New(64 << 20),
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
	noDrops(t, to, guest)
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

// noDrops checks that h's stack dropped nothing the guest sent: a
// restored connection's receive buffer holds the window the guest was
// offered (not its minimum share: the guest's first flight after the
// move would be dropped in part).
func noDrops(t *testing.T, h *moveHost, guest *stack.Stack) {
	t.Helper()
	if n := h.ns.Stack().Stats().DroppedPackets.Value(); n != 0 {
		t.Errorf("the destination's stack dropped %d packets (the guest retransmitted %d segments)", n, guest.Stats().TCP.Retransmits.Value())
	}
}

// waitQuiet waits until every connection of h could move: all its data
// toward the guest acknowledged, none from the guest unread.
func waitQuiet(t *testing.T, h *moveHost) {
	t.Helper()
	eventually(t, "the connections to be quiet", func() bool {
		h.f.mu.Lock()
		defer h.f.mu.Unlock()
		for c := range h.f.conns {
			if _, err := h.ns.FreezeTCP(c.gep); err != nil {
				return false
			}
		}
		return true
	})
}

// TestMoveInboundTCPConnection moves a connection that came in through a
// port forward (host client → guest server): it goes on both ways on the
// destination, where it belongs to the same forward (its inbound gauge,
// its memory share, ended when the forward is removed), and the guest
// sends into the window it was offered without losing a segment.
func TestMoveInboundTCPConnection(t *testing.T) {
	if err := tcprepair.Available(); err != nil {
		t.Skip(err)
	}
	w := netstacktest.NewWire(t)
	guest, err := netstacktest.NewGuest(w.Guest())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(guest.Destroy)
	at := netip.AddrPortFrom(netstacktest.Guest4, 8080)
	ln, err := netstacktest.ListenTCP(guest, at)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	src := newMoveHost(t, w, true)
	w.Plug(src.link)
	pf, err := src.f.AddPortForward(PortForward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), Guest: at})
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			accepted <- c
		}
	}()
	client, err := net.Dial("tcp", pf.Host.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	var gc net.Conn
	select {
	case gc = <-accepted:
		t.Cleanup(func() { _ = gc.Close() })
	case <-time.After(5 * time.Second):
		t.Fatal("the guest accepted no connection")
	}
	both(t, client, gc, 300<<10, 1)
	if got := src.f.c.InboundTCPOpen.Load(); got != 1 {
		t.Fatalf("source counts %d inbound connections, want 1", got)
	}
	waitQuiet(t, src)

	w.Unplug()
	flows := src.f.SaveTCP()
	if len(flows) != 1 || src.f.c.TCPMoved.Load() != 1 {
		t.Fatalf("saved %d connections (moved %d), want 1", len(flows), src.f.c.TCPMoved.Load())
	}
	if fl := flows[0]; fl.Host.Local != pf.Host || fl.Guest.Remote != at {
		t.Fatalf("saved host %s, guest %s; want %s and %s", fl.Host.Local, fl.Guest.Remote, pf.Host, at)
	}
	eventually(t, "the source to let go", func() bool {
		return src.f.c.InboundTCPOpen.Load() == 0 && src.f.c.TCPConns.Load() == 0
	})
	// The source vunet ends; the destination has the same forward (from
	// its command line or the device state).
	if err := src.f.RemovePortForward(pf); err != nil {
		t.Fatal(err)
	}
	to := newMoveHost(t, w, true)
	if _, err := to.f.AddPortForward(pf); err != nil {
		t.Fatal(err)
	}
	w.Plug(to.link)
	syns := w.SYNsToGuest.Load()
	if n := to.f.RestoreTCP(flows); n != 1 {
		t.Fatalf("restored %d connections, want 1", n)
	}
	if n := w.SYNsToGuest.Load() - syns; n != 0 {
		t.Fatalf("the guest saw %d SYNs of the restore", n)
	}
	// Its buffers are the inbound share's, the receive buffer as large as
	// the window the guest holds.
	want := MinTCPBuffer + min(netstack.RestoreReceiveBuffer(flows[0].Guest), MaxTCPBuffer)
	for deadline := time.Now().Add(5 * time.Second); to.f.memIn.Used() != want; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("destination's inbound memory share holds %d bytes, want %d", to.f.memIn.Used(), want)
		}
	}
	both(t, client, gc, 300<<10, 5)
	noDrops(t, to, guest)
	if got := to.f.c.InboundTCPOpen.Load(); got != 1 {
		t.Errorf("destination counts %d inbound connections, want 1", got)
	}
	if got := to.f.memOut.Used(); got != 0 {
		t.Errorf("destination's outbound memory share holds %d bytes, want 0", got)
	}
	// Removing the forward ends its connections, the moved one too.
	if err := to.f.RemovePortForward(pf); err != nil {
		t.Fatal(err)
	}
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(client); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client after the forward's removal: %v", err)
	}
	eventually(t, "the destination's connection to end", func() bool {
		return to.f.c.TCPConns.Load() == 0 && to.f.c.InboundTCPOpen.Load() == 0
	})
}
