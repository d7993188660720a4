package forward

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// TestPerGuestLimits: with two guests, each has MaxConns, MaxUDPFlows and
// MaxPingFlows for itself. Guest 0 is refused beyond its limits (TCP with
// a RST, UDP and ping dropped), counted under guest 0, while guest 1 is
// served; a flow whose frame no connected guest sent is refused. The
// simulated guest stack plays both guests: GuestOf names the guest by the
// flow's destination (the appliance names it by the source MAC's switch
// port; TestGuestLimits there runs two real guest ports).
func TestPerGuestLimits(t *testing.T) {
	loop := netip.MustParseAddr("127.0.0.1")
	hold := make(chan struct{})
	defer close(hold)
	srvA := tcpServer(t, loop, func(c net.Conn) { echoHandler(c) })
	srvB := tcpServer(t, loop, func(c net.Conn) { echoHandler(c) })
	srvGone := tcpServer(t, loop, func(c net.Conn) { <-hold })
	udpA := []netip.AddrPort{udpEchoServer(t, loop), udpEchoServer(t, loop), udpEchoServer(t, loop)}
	udpB := udpEchoServer(t, loop)
	pingB := netip.MustParseAddr("192.0.2.2")
	guestOf := func(pkt *stack.PacketBuffer) int {
		if fromTCPIP(pkt.Network().DestinationAddress()) == pingB {
			return 1
		}
		th := pkt.TransportHeader().Slice()
		if len(th) < 4 {
			return 0
		}
		switch binary.BigEndian.Uint16(th[2:4]) {
		case srvB.Port(), udpB.Port():
			return 1
		case srvGone.Port():
			return -1
		}
		return 0
	}
	k := newKernelSim(t)
	e := newEnv(t, func(o *Options) {
		o.Guests, o.GuestOf = 2, guestOf
		o.MaxConns, o.MaxUDPFlows, o.MaxPingFlows = 2, 2, 1
		o.openPing = k.open
	})
	g0, _ := e.f.GuestCounters(0)
	g1, _ := e.f.GuestCounters(1)

	// TCP: guest 0's third connection is reset; guest 1's is served.
	for range 2 {
		c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srvA.Port()))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	if c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srvA.Port())); err == nil {
		c.Close()
		t.Fatal("guest 0's third connection was accepted; its limit is 2")
	}
	c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srvB.Port()))
	if err != nil {
		t.Fatalf("guest 1 refused while guest 0 is at its limit: %v", err)
	}
	tcpEcho(t, c, "guest 1")
	c.Close()
	if g0.RejectedConns.Load() != 1 || g1.RejectedConns.Load() != 0 || e.f.Stats().TCPRejectedConns.Load() != 1 {
		t.Errorf("refused: guest 0 %d, guest 1 %d, all %d; want 1, 0, 1",
			g0.RejectedConns.Load(), g1.RejectedConns.Load(), e.f.Stats().TCPRejectedConns.Load())
	}
	// No guest: refused at once, counted.
	if c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srvGone.Port())); err == nil {
		c.Close()
		t.Fatal("a connection of no guest was accepted")
	}
	if n := e.f.Stats().DropNoGuest.Load(); n != 1 {
		t.Errorf("no-guest drops %d, want 1", n)
	}

	// UDP: guest 0's third flow is dropped; guest 1's works.
	for _, dst := range udpA[:2] {
		udpRoundTrip(t, e, netip.AddrPortFrom(gw4, dst.Port()), []byte("flow of guest 0"))
	}
	uc, err := netstacktest.DialUDP(e.p.Guest, netip.AddrPortFrom(gw4, udpA[2].Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	if _, err := uc.Write([]byte("over the limit")); err != nil {
		t.Fatal(err)
	}
	_ = uc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := uc.Read(make([]byte, 64)); err == nil {
		t.Fatalf("guest 0's third UDP flow got %d bytes back; its limit is 2", n)
	}
	udpRoundTrip(t, e, netip.AddrPortFrom(gw4, udpB.Port()), []byte("flow of guest 1"))
	if g0.UDPFlowLimit.Load() != 1 || g0.UDPFlows.Load() != 2 || g1.UDPFlows.Load() != 1 || e.f.Stats().UDPFlows.Load() != 3 {
		t.Errorf("udp: guest 0 %d flows %d refused, guest 1 %d flows, all %d",
			g0.UDPFlows.Load(), g0.UDPFlowLimit.Load(), g1.UDPFlows.Load(), e.f.Stats().UDPFlows.Load())
	}

	// Ping: each call is a new flow (a new identifier); guest 0 has one.
	if _, err := ping(t, e, netip.MustParseAddr("192.0.2.1"), 5*time.Second); err != nil {
		t.Fatalf("guest 0's first ping: %v", err)
	}
	if from, err := ping(t, e, netip.MustParseAddr("192.0.2.3"), 300*time.Millisecond); err == nil {
		t.Fatalf("guest 0's second ping flow got a reply from %s; its limit is 1", from)
	}
	if _, err := ping(t, e, pingB, 5*time.Second); err != nil {
		t.Fatalf("guest 1's ping while guest 0 is at its limit: %v", err)
	}
	if g0.PingFlowLimit.Load() != 1 || g1.PingFlowLimit.Load() != 0 || g1.PingFlows.Load() != 1 {
		t.Errorf("ping: guest 0 refused %d, guest 1 refused %d with %d flows", g0.PingFlowLimit.Load(), g1.PingFlowLimit.Load(), g1.PingFlows.Load())
	}
}

// tcpEcho writes a line on c and reads it back.
func tcpEcho(t *testing.T, c net.Conn, who string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("echo for " + who)
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("%s: write: %v", who, err)
	}
	buf := make([]byte, len(msg))
	if _, err := c.Read(buf); err != nil || string(buf) != string(msg) {
		t.Fatalf("%s: echo %q, %v", who, buf, err)
	}
}

// TestSYNTablePerGuest: one guest's notes filling its part of the table
// clear only that part; another guest's SYN under way keeps its guest.
func TestSYNTablePerGuest(t *testing.T) {
	tab := newSYNTable(2, 4)
	g0, g1 := &guestLimits{id: 0}, &guestLimits{id: 1}
	syn := func(port uint16) (stack.TransportEndpointID, *stack.PacketBuffer) {
		h := make([]byte, header.TCPMinimumSize)
		header.TCP(h).Encode(&header.TCPFields{SrcPort: port, DstPort: 80, SeqNum: uint32(port), Flags: header.TCPFlagSyn, DataOffset: header.TCPMinimumSize})
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: len(h)})
		copy(pkt.TransportHeader().Push(len(h)), h)
		return stack.TransportEndpointID{RemotePort: port, LocalPort: 80}, pkt
	}
	idB, pktB := syn(1)
	defer pktB.DecRef()
	if !tab.note(idB, pktB, g1) {
		t.Fatal("guest 1's SYN not noted")
	}
	for p := uint16(100); p < 120; p++ {
		id, pkt := syn(p)
		tab.note(id, pkt, g0)
		pkt.DecRef()
	}
	if g := tab.guest(idB); g != 1 {
		t.Fatalf("guest 1's SYN is now guest %d's: guest 0's flood cleared it", g)
	}
	if seq, ok := tab.take(idB); !ok || seq != 1 {
		t.Fatalf("take = %d, %v", seq, ok)
	}
	if id, pkt := syn(2); tab.note(id, pkt, nil) || tab.guest(id) != -1 {
		t.Fatal("a SYN of no guest was noted")
	} else {
		pkt.DecRef()
	}
}
