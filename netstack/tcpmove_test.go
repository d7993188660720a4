package netstack_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/netstack/netstacktest"
)

// accept waits for one connection on ns at addr, as the NAT's endpoints
// are: a raw endpoint, with its waiter queue.
func accept(t *testing.T, ns *netstack.Stack, at netip.AddrPort, dial func()) (tcpip.Endpoint, *waiter.Queue) {
	t.Helper()
	wq := new(waiter.Queue)
	ln, terr := ns.Stack().NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, wq)
	if terr != nil {
		t.Fatal(terr)
	}
	t.Cleanup(ln.Close)
	if terr := ln.Bind(netstacktest.FullAddr(at)); terr != nil {
		t.Fatal(terr)
	}
	if terr := ln.Listen(16); terr != nil {
		t.Fatal(terr)
	}
	we, ch := waiter.NewChannelEntry(waiter.ReadableEvents)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	go dial()
	deadline := time.After(5 * time.Second)
	for {
		ep, cwq, terr := ln.Accept(nil)
		if terr == nil {
			return ep, cwq
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatal("no connection")
		}
	}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*13+i/253) ^ seed
	}
	return b
}

func readAll(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// exchange sends n bytes each way and checks them.
func exchange(t *testing.T, a, b net.Conn, n int, seed byte) {
	t.Helper()
	for _, d := range []struct{ from, to net.Conn }{{a, b}, {b, a}} {
		want := pattern(n, seed)
		errc := make(chan error, 1)
		go func() { _, err := d.from.Write(want); errc <- err }()
		if got := readAll(t, d.to, n); !bytes.Equal(got, want) {
			t.Fatalf("%d bytes arrived changed", n)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		seed++
	}
}

// moved is a guest connection moved from one stack to another.
type moved struct {
	w       *netstacktest.Wire
	guest   *stack.Stack
	gc      *gonet.TCPConn // the guest's socket
	st      netstack.TCPConnState
	dst     *netstack.Stack
	ep      tcpip.Endpoint // the restored endpoint
	dstConn *gonet.TCPConn
	// synsBefore counts the SYNs the guest had seen before the move.
	synsBefore int32
}

// moveConn connects the guest to a first stack, sends 300 KiB each way
// (enough to move the numbers and grow windows), freezes the connection
// and restores it in a second stack.
func moveConn(t *testing.T) *moved {
	t.Helper()
	m := &moved{w: netstacktest.NewWire(t)}
	w := m.w
	var err error
	if m.guest, err = netstacktest.NewGuest(w.Guest()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.guest.Destroy)
	src, srcLink := w.NewHost(t)
	w.Plug(srcLink)

	at := netip.AddrPortFrom(netstacktest.Gateway4.Addr(), 8080)
	dialed := make(chan error, 1)
	ep, wq := accept(t, src, at, func() {
		var err error
		m.gc, err = netstacktest.DialTCP(context.Background(), m.guest, at)
		dialed <- err
	})
	if err := <-dialed; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.gc.Close() })
	srcConn := gonet.NewTCPConn(wq, ep)
	exchange(t, m.gc, srcConn, 300<<10, 1)
	m.synsBefore = w.SYNsToGuest.Load()

	// Data toward a paused guest is not acknowledged: no move.
	w.Unplug()
	if _, err := srcConn.Write([]byte("unacked")); err != nil {
		t.Fatal(err)
	}
	if _, err := src.FreezeTCP(ep); !errors.Is(err, netstack.ErrTCPUnacked) {
		t.Fatalf("freeze with unacknowledged data: %v, want ErrTCPUnacked", err)
	}
	w.Plug(srcLink)
	if got := readAll(t, m.gc, 7); string(got) != "unacked" {
		t.Fatalf("guest got %q", got)
	}
	// The guest pauses (once it has acknowledged: it may delay its ACK);
	// its connection is frozen and dropped on the source.
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		w.Unplug()
		if m.st, err = src.FreezeTCP(ep); err == nil {
			break
		}
		w.Plug(srcLink)
		if !errors.Is(err, netstack.ErrTCPUnacked) || time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	ep.Abort()
	if st := m.st; !st.Timestamps || !st.SACK || st.SndWndScale == 0 || st.RcvWndScale == 0 {
		t.Fatalf("options not carried: %+v", st)
	}

	var dstLink *channel.Endpoint
	m.dst, dstLink = w.NewHost(t)
	w.Plug(dstLink)
	nep, nwq, err := m.dst.RestoreTCP(context.Background(), m.st, nil)
	if err != nil {
		t.Fatal(err)
	}
	m.ep = nep
	m.dstConn = gonet.NewTCPConn(nwq, nep)
	t.Cleanup(func() { _ = m.dstConn.Close() })
	return m
}

// TestMoveTCP moves an established connection between two stacks: the
// guest's socket must go on, both ways, byte for byte, having seen no
// handshake of the new stack.
func TestMoveTCP(t *testing.T) {
	m := moveConn(t)
	st := m.st
	// The restored endpoint is where the source's was: the same numbers,
	// the window the guest was offered, and a timestamp clock that goes
	// on from the source's (a Linux guest drops segments whose timestamp
	// went back: PAWS).
	now, err := m.dst.FreezeTCP(m.ep)
	if err != nil {
		t.Fatal(err)
	}
	if now.SndNxt != st.SndNxt || now.RcvNxt != st.RcvNxt || now.SndWnd != st.SndWnd || now.RcvWnd != st.RcvWnd ||
		now.SndWndScale != st.SndWndScale || now.RcvWndScale != st.RcvWndScale || now.MaxPayload != st.MaxPayload {
		t.Fatalf("restored endpoint %+v, source %+v", now, st)
	}
	if d := int32(now.TSVal - st.TSVal); d < 1 || d > 1000 {
		t.Fatalf("timestamp clock moved by %d ms across the restore, want a small step forward", d)
	}
	if n := m.w.SYNsToGuest.Load() - m.synsBefore; n != 0 {
		t.Fatalf("the guest saw %d SYNs of the restore", n)
	}
	exchange(t, m.gc, m.dstConn, 300<<10, 7)
	if r := m.guest.Stats().TCP.ResetsReceived.Value(); r != 0 {
		t.Fatalf("guest received %d resets", r)
	}
	// A clean end: the guest sees EOF.
	_ = m.dstConn.CloseWrite()
	_ = m.gc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := m.gc.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("guest read %d, %v after the close; want EOF", n, err)
	}
}

// TestMoveTCPWindow: the guest may send the whole window the source
// offered it before anyone reads on the destination. Every byte of it
// must be taken at once, none dropped and retransmitted. (TestMoveTCP
// failed about once in 100 runs under load: the restored endpoint kept
// the swallowed handshake's 29 KiB as its offer and half the buffer it
// needed, closed its window once the reader fell behind, dropped the
// rest of the guest's flight as out of window, and the guest, without
// SACK information, took more than 10 s to resend it.)
func TestMoveTCPWindow(t *testing.T) {
	m := moveConn(t)
	st := m.st
	if st.RcvWnd < 64<<10 {
		t.Fatalf("the source offered only %d bytes, too little to test with", st.RcvWnd)
	}
	rexmits := m.guest.Stats().TCP.Retransmits.Value()
	// The guest knows the window in units of the scale, rounded down.
	want := pattern(int(st.RcvWnd)-(1<<st.RcvWndScale-1), 3)
	errc := make(chan error, 1)
	go func() { _, err := m.gc.Write(want); errc <- err }()
	queued := func() int {
		n, _ := m.ep.GetSockOptInt(tcpip.ReceiveQueueSizeOption)
		return n
	}
	for deadline := time.Now().Add(5 * time.Second); queued() < len(want); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the restored endpoint holds %d of the %d bytes the guest was offered, unread (guest retransmitted %d segments)",
				queued(), len(want), m.guest.Stats().TCP.Retransmits.Value()-rexmits)
		}
	}
	// (Not the guest's retransmissions: a tail loss probe sent while the
	// destination is slow to answer under load counts as one.)
	if n := m.ep.Stats().(*tcp.Stats).ReceiveErrors.SegmentQueueDropped.Value(); n != 0 {
		t.Errorf("the restored endpoint dropped %d segments of the window the guest was offered (guest retransmitted %d)",
			n, m.guest.Stats().TCP.Retransmits.Value()-rexmits)
	}
	if got := readAll(t, m.dstConn, len(want)); !bytes.Equal(got, want) {
		t.Fatal("bytes arrived changed")
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	exchange(t, m.gc, m.dstConn, 64<<10, 9)
}

func TestRestoreRejectsInvalidState(t *testing.T) {
	w := netstacktest.NewWire(t)
	ns, link := w.NewHost(t)
	w.Plug(link)
	for _, st := range []netstack.TCPConnState{
		{},
		{Local: netip.MustParseAddrPort("10.0.2.2:80"), Remote: netip.MustParseAddrPort("[fd00::15]:1000"), MaxPayload: 1400},
		{Local: netip.MustParseAddrPort("10.0.2.2:80"), Remote: netip.MustParseAddrPort("10.0.2.15:1000"), MaxPayload: 1400, SndWndScale: 15},
	} {
		if _, _, err := ns.RestoreTCP(context.Background(), st, nil); err == nil {
			t.Errorf("restored %+v", st)
		}
	}
}
