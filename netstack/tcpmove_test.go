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
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
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

// TestMoveTCP moves an established connection between two stacks: the
// guest's socket must go on, both ways, byte for byte, having seen no
// handshake of the new stack.
func TestMoveTCP(t *testing.T) {
	w := netstacktest.NewWire(t)
	guest, err := netstacktest.NewGuest(w.Guest())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(guest.Destroy)
	src, srcLink := w.NewHost(t)
	w.Plug(srcLink)

	at := netip.AddrPortFrom(netstacktest.Gateway4.Addr(), 8080)
	var gc *gonet.TCPConn
	dialed := make(chan error, 1)
	ep, wq := accept(t, src, at, func() {
		var err error
		gc, err = netstacktest.DialTCP(context.Background(), guest, at)
		dialed <- err
	})
	if err := <-dialed; err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	srcConn := gonet.NewTCPConn(wq, ep)
	exchange(t, gc, srcConn, 300<<10, 1) // enough to move the numbers and grow windows
	synsBefore := w.SYNsToGuest.Load()

	// Data toward a paused guest is not acknowledged: no move.
	w.Unplug()
	if _, err := srcConn.Write([]byte("unacked")); err != nil {
		t.Fatal(err)
	}
	if _, err := src.FreezeTCP(ep); !errors.Is(err, netstack.ErrTCPUnacked) {
		t.Fatalf("freeze with unacknowledged data: %v, want ErrTCPUnacked", err)
	}
	w.Plug(srcLink)
	if got := readAll(t, gc, 7); string(got) != "unacked" {
		t.Fatalf("guest got %q", got)
	}
	// The guest pauses (once it has acknowledged: it may delay its ACK);
	// its connection is frozen and dropped on the source.
	var st netstack.TCPConnState
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		w.Unplug()
		if st, err = src.FreezeTCP(ep); err == nil {
			break
		}
		w.Plug(srcLink)
		if !errors.Is(err, netstack.ErrTCPUnacked) || time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	ep.Abort()
	if !st.Timestamps || !st.SACK || st.SndWndScale == 0 || st.RcvWndScale == 0 {
		t.Fatalf("options not carried: %+v", st)
	}

	dst, dstLink := w.NewHost(t)
	w.Plug(dstLink)
	nep, nwq, err := dst.RestoreTCP(context.Background(), st, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The restored endpoint is where the source's was: the same numbers,
	// and a timestamp clock that goes on from the source's (a Linux
	// guest drops segments whose timestamp went back: PAWS).
	now, err := dst.FreezeTCP(nep)
	if err != nil {
		t.Fatal(err)
	}
	if now.SndNxt != st.SndNxt || now.RcvNxt != st.RcvNxt || now.SndWnd != st.SndWnd ||
		now.SndWndScale != st.SndWndScale || now.RcvWndScale != st.RcvWndScale || now.MaxPayload != st.MaxPayload {
		t.Fatalf("restored endpoint %+v, source %+v", now, st)
	}
	if d := int32(now.TSVal - st.TSVal); d < 1 || d > 1000 {
		t.Fatalf("timestamp clock moved by %d ms across the restore, want a small step forward", d)
	}
	dstConn := gonet.NewTCPConn(nwq, nep)
	defer dstConn.Close()
	if n := w.SYNsToGuest.Load() - synsBefore; n != 0 {
		t.Fatalf("the guest saw %d SYNs of the restore", n)
	}
	exchange(t, gc, dstConn, 300<<10, 7)
	if r := guest.Stats().TCP.ResetsReceived.Value(); r != 0 {
		t.Fatalf("guest received %d resets", r)
	}
	// A clean end: the guest sees EOF.
	_ = dstConn.CloseWrite()
	_ = gc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := gc.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("guest read %d, %v after the close; want EOF", n, err)
	}
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
