package appliance

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/devstate"
	"github.com/vunet/vunet/endpoint/endpointtest"
	"github.com/vunet/vunet/internal/tcprepair"
	"github.com/vunet/vunet/netstack/netstacktest"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// movingLink is a guest's NIC as QEMU moves it in a live migration: the
// guest sends on the link of the vunet it runs on (none while it is
// paused) and receives from either.
type movingLink struct {
	*endpointtest.GuestLink // the first link: MTU, address, capabilities
	links                   []*endpointtest.GuestLink
	cur                     atomic.Pointer[endpointtest.GuestLink]
}

// Attach implements stack.LinkEndpoint.
func (l *movingLink) Attach(d stack.NetworkDispatcher) {
	for _, x := range l.links {
		x.Attach(d)
	}
}

// WritePackets implements stack.LinkWriter: a paused guest's frames are
// lost.
func (l *movingLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	if c := l.cur.Load(); c != nil {
		return c.WritePackets(pkts)
	}
	return pkts.Len(), nil
}

// movePattern is n checked bytes.
func movePattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*29+i/251) ^ seed
	}
	return b
}

// sendChecked writes n bytes on from and checks that to reads them.
func sendChecked(t *testing.T, from, to net.Conn, n int, seed byte) {
	t.Helper()
	want := movePattern(n, seed)
	errc := make(chan error, 1)
	go func() { _, err := from.Write(want); errc <- err }()
	got := make([]byte, n)
	_ = to.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(to, got); err != nil {
		t.Fatalf("%v -> %v: %v", from.LocalAddr(), to.LocalAddr(), err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%v -> %v: %d bytes arrived changed", from.LocalAddr(), to.LocalAddr(), n)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// TestTCPMovesOverVhostUser is a live migration with --migrate-tcp the
// way QEMU 8.2+ does it (our QEMU 7.2 cannot): the device state, with a
// guest's TCP connection to a host server in it, goes through the
// vhost-user DEVICE_STATE pipes of two mock frontends, and the connection
// goes on, both ways, on the destination vunet; the host peer and the
// guest see nothing of the move.
func TestTCPMovesOverVhostUser(t *testing.T) {
	if err := tcprepair.Available(); err != nil {
		t.Skip(err)
	}
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			accepted <- c
		}
	}()

	type vunet struct {
		a    *Appliance
		f    *vhosttest.Frontend
		link *endpointtest.GuestLink
	}
	newVunet := func() vunet {
		cfg := testConfig(t, t.TempDir())
		cfg.MigrateTCP = true
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		a, err := New(cfg, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Close)
		start(t, a)
		f, err := vhosttest.Dial(cfg.Socket, vhosttest.Options{MemSize: 32 << 20})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		if err := f.Setup(^uint64(0)); err != nil {
			t.Fatal(err)
		}
		gl := endpointtest.New(f, netstacktest.GuestMAC, 1500, 1526)
		t.Cleanup(gl.Stop)
		return vunet{a, f, gl}
	}
	src, dst := newVunet(), newVunet()
	nic := &movingLink{GuestLink: src.link, links: []*endpointtest.GuestLink{src.link, dst.link}}
	nic.cur.Store(src.link)
	g, err := netstacktest.NewGuest(nic)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Destroy)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	port := ln.Addr().(*net.TCPAddr).AddrPort().Port()
	gc, err := netstacktest.DialTCP(ctx, g, netip.AddrPortFrom(netstacktest.Gateway4.Addr(), port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = gc.Close() })
	var hc net.Conn
	select {
	case hc = <-accepted:
		t.Cleanup(func() { _ = hc.Close() })
	case <-ctx.Done():
		t.Fatal("the host server accepted no connection")
	}
	// Toward the guest first, then toward the host: the guest's data
	// acknowledges everything it was sent, and once the host has read it
	// all nothing waits anywhere: the connection is quiet and moves.
	sendChecked(t, hc, gc, 200<<10, 1)
	sendChecked(t, gc, hc, 200<<10, 2)

	// QEMU pauses the guest, stops the source's rings (what the source
	// sends the guest from then on, the reset of its own endpoint of a
	// moved connection among it, goes nowhere) and reads its state.
	nic.cur.Store(nil)
	for i := range src.f.Drivers {
		if _, err := src.f.GetVringBase(i); err != nil {
			t.Fatal(err)
		}
	}
	blob, err := src.f.SaveState(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	st, err := devstate.Decode(blob)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.TCPFlows) != 1 || st.TCPFlows[0].Host.Remote != ln.Addr().(*net.TCPAddr).AddrPort() {
		t.Fatalf("state carries %d TCP connections (%+v), want the one to %s", len(st.TCPFlows), st.TCPFlows, ln.Addr())
	}
	if s := src.a.Forward.Stats(); s.TCPMoved.Load() != 1 || s.TCPConns.Load() != 0 {
		t.Fatalf("source: moved %d, still has %d connections; want 1 and 0", s.TCPMoved.Load(), s.TCPConns.Load())
	}
	// The destination loads it; the guest resumes there.
	if c, err := dst.f.LoadState(blob); err != nil || c != 0 {
		t.Fatalf("load: CHECK_DEVICE_STATE %d, %v", c, err)
	}
	if s := dst.a.Forward.Stats(); s.TCPRestored.Load() != 1 || s.TCPConns.Load() != 1 {
		t.Fatalf("destination: restored %d, has %d connections; want 1 and 1", s.TCPRestored.Load(), s.TCPConns.Load())
	}
	nic.cur.Store(dst.link)
	sendChecked(t, gc, hc, 300<<10, 3)
	sendChecked(t, hc, gc, 300<<10, 4)
	if r := g.Stats().TCP.ResetsReceived.Value(); r != 0 {
		t.Errorf("the guest received %d resets", r)
	}
	// The guest ends it; the host peer reads EOF from the destination.
	if err := gc.Close(); err != nil {
		t.Fatal(err)
	}
	_ = hc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(hc); err != nil || len(b) != 0 {
		t.Fatalf("host peer after the guest's close: %d bytes, %v", len(b), err)
	}
}
