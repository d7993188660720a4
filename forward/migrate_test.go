package forward

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// fromServer answers every datagram with the address it came from.
func fromServer(t *testing.T) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { _ = pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFromUDPAddrPort(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err == nil {
				_, _ = pc.WriteToUDPAddrPort([]byte(from.String()), from)
			}
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// hostSource sends one datagram from the guest's port to dst and returns
// the host address the server saw it from.
func hostSource(t *testing.T, e *env, guestPort uint16, dst netip.AddrPort) netip.AddrPort {
	t.Helper()
	c, err := netstacktest.ListenUDP(e.p.Guest, netip.AddrPortFrom(netstacktest.Guest4, guestPort))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.WriteTo([]byte("hi"), net.UDPAddrFromAddrPort(dst)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 100)
	n, _, err := c.ReadFrom(buf)
	if err != nil {
		t.Fatalf("guest port %d: %v", guestPort, err)
	}
	ap, err := netip.ParseAddrPort(string(buf[:n]))
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// A UDP flow carried over to another forwarder sends from the same host
// port when it is free, and from a new one (still working) when it is not.
func TestUDPPortsCarriedOver(t *testing.T) {
	srv := fromServer(t)
	dst := netip.AddrPortFrom(gw4, srv.Port())
	src := newEnv(t, nil)
	kept, lost := hostSource(t, src, 40000, dst), hostSource(t, src, 40001, dst)
	states := src.f.UDPFlowStates()
	if len(states) != 2 {
		t.Fatalf("flow states %+v", states)
	}
	for _, st := range states {
		want := kept.Port()
		if st.Guest.Port() == 40001 {
			want = lost.Port()
		}
		if st.Guest.Addr() != netstacktest.Guest4 || st.Remote != dst || st.HostPort != want || st.Idle < 0 || st.Idle > time.Minute {
			t.Errorf("flow state %+v, want host port %d", st, want)
		}
	}
	_ = src.f.Close() // the source lets its sockets go; one port is then taken
	hold, err := net.ListenUDP("udp4", &net.UDPAddr{Port: int(lost.Port())})
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()

	dstEnv := newEnv(t, nil)
	if n := dstEnv.f.RestoreUDPPorts(states); n != 2 {
		t.Fatalf("RestoreUDPPorts = %d", n)
	}
	if got := hostSource(t, dstEnv, 40000, dst); got.Port() != kept.Port() {
		t.Errorf("carried-over flow sends from port %d, want %d", got.Port(), kept.Port())
	}
	if got := hostSource(t, dstEnv, 40001, dst); got.Port() == lost.Port() {
		t.Errorf("flow whose port is taken sends from it anyway")
	}
	s := dstEnv.f.Stats()
	if s.UDPPortsKept.Load() != 1 || s.UDPPortsLost.Load() != 1 {
		t.Errorf("kept %d lost %d, want 1 and 1", s.UDPPortsKept.Load(), s.UDPPortsLost.Load())
	}
	// An entry is used once, and one past the flow's idle timeout not at all.
	if dstEnv.f.takeUDPPort(states[0].Guest, states[0].Remote) != 0 {
		t.Error("a carried-over port was offered twice")
	}
	old := []UDPFlowState{{Guest: states[0].Guest, Remote: states[0].Remote, HostPort: 1234, Idle: DefaultUDPStreamIdleTimeout}}
	if n := dstEnv.f.RestoreUDPPorts(old); n != 0 {
		t.Errorf("a flow idle past its timeout was restored")
	}
}

// guestTCP is a raw TCP socket on the simulated guest: it sends crafted
// segments and sees every TCP segment the guest receives.
type guestTCP struct {
	ep tcpip.Endpoint
	ch chan struct{}
}

func newGuestTCP(t *testing.T, e *env) *guestTCP {
	t.Helper()
	var wq waiter.Queue
	ep, terr := e.p.Guest.NewRawEndpoint(header.TCPProtocolNumber, ipv4.ProtocolNumber, &wq, true)
	if terr != nil {
		t.Fatal(terr)
	}
	g := &guestTCP{ep: ep, ch: make(chan struct{}, 1)}
	we := waiter.NewFunctionEntry(waiter.ReadableEvents, func(waiter.EventMask) {
		select {
		case g.ch <- struct{}{}:
		default:
		}
	})
	wq.EventRegister(&we)
	t.Cleanup(func() { wq.EventUnregister(&we); ep.Close() })
	return g
}

// send writes one segment from the guest's address.
func (g *guestTCP) send(t *testing.T, src uint16, dst netip.AddrPort, seq, ack uint32, flags header.TCPFlags, payload []byte) {
	t.Helper()
	seg := make([]byte, header.TCPMinimumSize+len(payload))
	h := header.TCP(seg)
	h.Encode(&header.TCPFields{SrcPort: src, DstPort: dst.Port(), SeqNum: seq, AckNum: ack,
		DataOffset: header.TCPMinimumSize, Flags: flags, WindowSize: 65535})
	copy(seg[header.TCPMinimumSize:], payload)
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, netstacktest.Addr(netstacktest.Guest4),
		netstacktest.Addr(dst.Addr()), uint16(len(seg)))
	sum = checksum.Checksum(payload, sum)
	h.SetChecksum(^h.CalculateChecksum(sum))
	var r bytes.Reader
	r.Reset(seg)
	to := tcpip.FullAddress{Addr: netstacktest.Addr(dst.Addr())}
	if _, terr := g.ep.Write(&r, tcpip.WriteOptions{To: &to}); terr != nil {
		t.Fatal(terr)
	}
}

// next returns the next segment the guest receives for its port (the IPv4
// header stripped).
func (g *guestTCP) next(t *testing.T, port uint16) header.TCP {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		var b bytes.Buffer
		if _, terr := g.ep.Read(&b, tcpip.ReadOptions{}); terr == nil {
			ip := header.IPv4(b.Bytes())
			seg := header.TCP(ip.Payload())
			if len(seg) >= header.TCPMinimumSize && seg.DestinationPort() == port {
				return seg
			}
			continue
		}
		select {
		case <-g.ch:
		case <-deadline:
			t.Fatal("no TCP segment reached the guest")
		}
	}
}

// After a migration without TCP_REPAIR the guest's TCP connections are
// unknown on the destination: the next segment of one (an ACK with data,
// to the gateway or to an outside address) is answered with a RST at once,
// so the guest's application sees a reset, not a hang; and the forwarder
// does not dial for it (only a SYN opens a connection).
func TestUnknownConnectionGetsRST(t *testing.T) {
	var dials atomic.Int64
	e := newEnv(t, func(o *Options) {
		o.dial = func(context.Context, string, string) (net.Conn, error) {
			dials.Add(1)
			return nil, errors.New("no dial expected")
		}
	})
	g := newGuestTCP(t, e)
	for i, dst := range []netip.AddrPort{netip.AddrPortFrom(gw4, 8080), netip.MustParseAddrPort("192.0.2.9:443")} {
		src := uint16(45000 + i)
		const seq, ack = 1000, 777777
		g.send(t, src, dst, seq, ack, header.TCPFlagAck|header.TCPFlagPsh, []byte("data of a migrated connection"))
		rst := g.next(t, src)
		if rst.Flags()&header.TCPFlagRst == 0 || rst.SourcePort() != dst.Port() {
			t.Fatalf("%s: got flags %s from port %d, want a RST", dst, rst.Flags(), rst.SourcePort())
		}
		// RFC 9293 3.10.7.1: the RST takes its sequence number from the
		// segment's acknowledgment, so the guest accepts it.
		if rst.SequenceNumber() != ack {
			t.Errorf("%s: RST seq %d, want %d", dst, rst.SequenceNumber(), ack)
		}
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("%d dials for segments of unknown connections", n)
	}
}
