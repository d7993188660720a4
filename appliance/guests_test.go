package appliance

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/endpoint/endpointtest"
	"github.com/vunet/vunet/netstack/netstacktest"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// testGuest is a gVisor guest stack behind a mock vhost-user frontend.
type testGuest struct {
	f   *vhosttest.Frontend
	gl  *endpointtest.GuestLink
	s   *stack.Stack
	mac tcpip.LinkAddress
}

// connectGuest attaches a guest with mac, its IPv4 address set to addr.
func connectGuest(t *testing.T, sock string, mac tcpip.LinkAddress, addr netip.Addr) *testGuest {
	t.Helper()
	f, err := vhosttest.Dial(sock, vhosttest.Options{MemSize: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Setup(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	g := &testGuest{f: f, mac: mac, gl: endpointtest.New(f, mac, 1500, 1526)}
	if g.s, err = netstacktest.NewGuest(g.gl); err != nil {
		t.Fatal(err)
	}
	if addr != netstacktest.Guest4 {
		if err := g.s.RemoveAddress(netstacktest.GuestNIC, tcpip.AddrFrom4(netstacktest.Guest4.As4())); err != nil {
			t.Fatal(err)
		}
		if err := g.s.AddProtocolAddress(netstacktest.GuestNIC, tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(addr.As4()), PrefixLen: 24}}, stack.AddressProperties{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(g.close)
	return g
}

func (g *testGuest) close() {
	g.f.Close()
	g.gl.Stop()
	g.s.Destroy()
}

func (g *testGuest) dial(t *testing.T, to netip.AddrPort) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := gonet.DialContextTCP(ctx, g.s, tcpip.FullAddress{NIC: netstacktest.GuestNIC,
		Addr: tcpip.AddrFrom4(to.Addr().As4()), Port: to.Port()}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatalf("dial %s: %v", to, err)
	}
	return c
}

func eventuallyTrue(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// switchDump describes every guest's rings (the device's view, and the
// mock driver's counters: rx_used against the device's used_total shows
// entries the driver has not reaped), both stacks' TCP counters, and the
// non-zero link, virtqueue and switch counters, for a stalled transfer.
// It reads only atomics, so it adds no race report of its own.
func switchDump(a *Appliance, gs ...*testGuest) string {
	var b strings.Builder
	for i, g := range gs {
		fmt.Fprintf(&b, "guest %d driver: delivered %d posted %d ring_full %d rx_used %d\n", i+1,
			g.gl.Delivered.Load(), g.gl.Posted.Load(), g.gl.RingFull.Load(), g.gl.RXUsed.Load())
		st := g.s.Stats()
		fmt.Fprintf(&b, "  tcp: sent %d received %d retransmits %d timeouts %d fast_retransmit %d invalid %d; ip: received %d delivered %d; nic rx %d tx %d\n",
			st.TCP.SegmentsSent.Value(), st.TCP.ValidSegmentsReceived.Value(), st.TCP.Retransmits.Value(), st.TCP.Timeouts.Value(),
			st.TCP.FastRetransmit.Value(), st.TCP.InvalidSegmentsReceived.Value(), st.IP.PacketsReceived.Value(), st.IP.PacketsDelivered.Value(),
			st.NICs.Rx.Packets.Value(), st.NICs.Tx.Packets.Value())
	}
	for _, p := range a.Link.Ports() {
		fmt.Fprintf(&b, "port %d: rx backlog %d\n", p.PortID(), p.RXBacklog())
		for q := range p.NumQueues() {
			fmt.Fprintf(&b, "  queue %d device: %+v\n", q, p.RingState(q))
		}
	}
	for _, m := range a.Stats().Metrics {
		if m.Value != 0 && (m.Layer == "link" || m.Layer == "virtqueue" || m.Layer == "switch") {
			fmt.Fprintf(&b, "%s%v %d\n", m.Name, m.Labels, m.Value)
		}
	}
	return b.String()
}

// TestTwoGuests runs two guests on one appliance (--max-guests 2): a TCP
// transfer between them goes through the switch, not the NAT; Guests
// lists both; a third frontend is refused; when one guest's frontend goes
// away its NAT flow to the host is torn down at once while the other
// guest's connection carries on.
func TestTwoGuests(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	cfg.MaxGuests = 2
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	start(t, a)
	a1, a2 := netstacktest.Guest4, netip.MustParseAddr("10.0.2.16")
	g1 := connectGuest(t, cfg.Socket, "\x52\x54\x00\x00\x00\x01", a1)
	g2 := connectGuest(t, cfg.Socket, "\x52\x54\x00\x00\x00\x02", a2)

	// Guest 1 serves; guest 2 sends it 512 KiB directly (the mock driver drops
	// frames when its TX ring is full, so TCP may retransmit).
	ln, err := gonet.ListenTCP(g1.s, tcpip.FullAddress{NIC: netstacktest.GuestNIC, Port: 7000}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- [32]byte{}
			return
		}
		defer c.Close()
		h := sha256.New()
		io.Copy(h, c)
		got <- [32]byte(h.Sum(nil))
	}()
	payload := bytes.Repeat([]byte("guest to guest, switched ring to ring. "), 512<<10/39)
	c := g2.dial(t, netip.AddrPortFrom(a1, 7000))
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case sum := <-got:
		if sum != sha256.Sum256(payload) {
			t.Fatal("guest 1 received other bytes than guest 2 sent")
		}
	case <-time.After(30 * time.Second):
		first := switchDump(a, g1, g2)
		time.Sleep(2 * time.Second) // a stall, or only slow?
		t.Fatalf("guest-to-guest transfer did not finish\n%s\n2 s later:\n%s", first, switchDump(a, g1, g2))
	}
	if n := a.Forward.Stats().TCPConnsTotal.Load(); n != 0 {
		t.Errorf("the NAT carried %d connections; guest to guest must not enter it", n)
	}
	if n := a.Link.Stats.Unicast.Load(); n < 100 {
		t.Errorf("switch unicast frames %d, want the transfer's", n)
	}

	gs := a.Guests()
	if len(gs) != 2 || gs[0].MAC != "52:54:00:00:00:01" || gs[1].MAC != "52:54:00:00:00:02" ||
		len(gs[1].IPv4) == 0 || gs[1].IPv4[0] != a2 || len(gs[0].Rings) != 2 {
		t.Fatalf("Guests = %+v", gs)
	}

	// A third frontend is refused at once.
	f3, err := vhosttest.Dial(cfg.Socket, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f3.Close()
	if err := f3.Setup(^uint64(0)); err == nil {
		t.Fatal("a third frontend was served with --max-guests 2")
	}
	if n := a.VHost.Stats.SessionsRefused.Load(); n != 1 {
		t.Errorf("frontends refused %d, want 1", n)
	}

	// Both guests hold a connection to a host server.
	hostConns := make(chan net.Conn, 2)
	ended := make(chan netip.AddrPort, 2)
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	go func() {
		for {
			c, err := hl.Accept()
			if err != nil {
				return
			}
			hostConns <- c
			go func() {
				io.Copy(c, c) // echo until the guest side goes away
				ended <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
			}()
		}
	}()
	port := uint16(hl.Addr().(*net.TCPAddr).Port)
	c1 := g1.dial(t, netip.AddrPortFrom(cfg.IPv4.Gateway, port))
	defer c1.Close()
	c2 := g2.dial(t, netip.AddrPortFrom(cfg.IPv4.Gateway, port))
	defer c2.Close()
	for range 2 {
		select {
		case <-hostConns:
		case <-time.After(10 * time.Second):
			t.Fatal("host connection missing")
		}
	}

	// Registered (TCPConnsTotal counts at registration, once the splice
	// runs), not only admitted: a flow the forwarder has not registered
	// yet is not found by CloseGuest.
	eventuallyTrue(t, "both NAT flows registered", func() bool { return a.Forward.Stats().TCPConnsTotal.Load() == 2 })

	// Guest 2's VM is killed (its frontend goes away, its stack says
	// nothing more): its flow ends at once, guest 1's does not.
	g2.f.Close()
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the departed guest's host connection is still open")
	}
	eventuallyTrue(t, "guest list shrinks", func() bool { return len(a.Guests()) == 1 })
	eventuallyTrue(t, "the departed guest's flow counted", func() bool { return a.Forward.Stats().GuestFlowsClosed.Load() == 1 })
	c1.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c1.Write([]byte("still here")); err != nil {
		t.Fatalf("guest 1's connection broke: %v", err)
	}
	buf := make([]byte, 10)
	if _, err := io.ReadFull(c1, buf); err != nil || string(buf) != "still here" {
		t.Fatalf("guest 1's echo: %q, %v", buf, err)
	}
	select {
	case <-ended:
		t.Fatal("guest 1's host connection ended too")
	default:
	}
	// The DHCP lease, if any, is kept; the port serves the next frontend.
	g3 := connectGuest(t, cfg.Socket, "\x52\x54\x00\x00\x00\x02", a2)
	c3 := g3.dial(t, netip.AddrPortFrom(a1, 7000)) // nobody accepts a second time, but the SYN is answered
	c3.Close()
}

// TestRebootedGuestReusesFourTuple: with one guest (the default), a VM
// that goes away and comes back connects again at once from the same
// address and port to the same host service. Before its flows were torn
// down with it, the new SYN met the old connection in the stack and the
// connect hung for tens of seconds.
func TestRebootedGuestReusesFourTuple(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	start(t, a)
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	go func() {
		for {
			c, err := hl.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	dst := tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: tcpip.AddrFrom4(cfg.IPv4.Gateway.As4()), Port: uint16(hl.Addr().(*net.TCPAddr).Port)}
	src := tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: tcpip.AddrFrom4(netstacktest.Guest4.As4()), Port: 40000}
	echo := func(g *testGuest, within time.Duration) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), within)
		defer cancel()
		c, err := gonet.DialTCPWithBind(ctx, g.s, src, dst, ipv4.ProtocolNumber)
		if err != nil {
			t.Fatalf("connect from %s:%d: %v", netstacktest.Guest4, src.Port, err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(within))
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 4)
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
			t.Fatalf("echo %q, %v", b, err)
		}
	}
	g := connectGuest(t, cfg.Socket, netstacktest.GuestMAC, netstacktest.Guest4)
	// The first connection stays open when the VM dies.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	old, err := gonet.DialTCPWithBind(ctx, g.s, src, dst, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	eventuallyTrue(t, "the flow registered", func() bool { return a.Forward.Stats().TCPConnsTotal.Load() == 1 })
	g.f.Close() // the VM is killed: its stack sends nothing more
	eventuallyTrue(t, "the flow torn down", func() bool { return a.Forward.Stats().GuestFlowsClosed.Load() == 1 })

	// The VM boots again: same MAC, same address, same port.
	g2 := connectGuest(t, cfg.Socket, netstacktest.GuestMAC, netstacktest.Guest4)
	echo(g2, 5*time.Second)
}
