package appliance

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/iana"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/endpoint/endpointtest"
	"github.com/vunet/vunet/netstack/netstacktest"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// TestStatefulDHCPv6Guest tests --dhcpv6 stateful end to end
// in-process (the QEMU guest runs dhcpcd in e2e.TestLinuxGuestDHCPv6;
// busybox has no udhcpc6): the client is a gVisor guest stack attached
// to the appliance through the vhost-user socket, rings and endpoint as a
// virtio driver. The guest sees the M flag in a solicited RA, gets an
// address with SOLICIT/ADVERTISE/REQUEST/REPLY, reaches an HTTP server on
// the host's [::1] through the gateway fd00::2 from that address, finds
// the lease in /v1/stats, and RELEASEs it.
func TestStatefulDHCPv6Guest(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	cfg.IPv6.DHCPv6 = config.DHCPv6Stateful
	cfg.Forwards = []config.Forward{{Proto: "tcp", Host: netip.MustParseAddrPort("[::1]:0"), GuestPort: 22}}
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	start(t, a)

	var mu sync.Mutex
	var hits []string
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hits = append(hits, r.URL.Path)
		mu.Unlock()
		fmt.Fprint(w, "hello from the host")
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

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
	g, err := netstacktest.NewGuest(gl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Destroy)
	ll := netip.MustParseAddr("fe80::5054:ff:fe12:3456") // EUI-64 of the default MAC
	addAddr(t, g, ll, 64)

	// The RA answering a solicitation carries M (and O).
	if flags := solicitRA(t, g); flags&0xc0 != 0xc0 {
		t.Errorf("RA flags %#x: want M and O", flags)
	}

	conn, err := gonet.DialUDP(g, &tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: tcpip.AddrFrom16(ll.As16()), Port: 546}, nil, ipv6.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	duid := &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: net.HardwareAddr(netstacktest.GuestMAC)}
	iaid := [4]byte{0, 0, 0, 7}
	sol, err := dhcpv6.NewMessage(dhcpv6.WithClientID(duid), dhcpv6.WithIANA(), dhcpv6.WithRequestedOptions(dhcpv6.OptionDNSRecursiveNameServer))
	if err != nil {
		t.Fatal(err)
	}
	sol.MessageType = dhcpv6.MessageTypeSolicit
	sol.UpdateOption(&dhcpv6.OptIANA{IaId: iaid})
	adv := exchange(t, conn, sol, dhcpv6.MessageTypeAdvertise)
	req, err := dhcpv6.NewRequestFromAdvertise(adv, dhcpv6.WithClientID(duid))
	if err != nil {
		t.Fatal(err)
	}
	rep := exchange(t, conn, req, dhcpv6.MessageTypeReply)
	ia := rep.Options.OneIANA()
	if ia == nil || ia.Options.OneAddress() == nil {
		t.Fatalf("REPLY without an address: %s", rep.Summary())
	}
	leased, _ := netip.AddrFromSlice(ia.Options.OneAddress().IPv6Addr)
	if leased != netip.MustParseAddr("fd00::100") || ia.IaId != iaid {
		t.Fatalf("leased %s (IAID %v), want fd00::100", leased, ia.IaId)
	}
	if dns := rep.Options.DNS(); len(dns) != 1 || dns[0].String() != "fd00::3" {
		t.Errorf("DNS %v", dns)
	}
	var found bool
	for _, l := range a.Stats().Leases {
		if l.Addr == leased && l.DUID != "" && l.IAID == 7 && l.MAC == "52:54:00:12:34:56" {
			found = true
		}
	}
	if !found {
		t.Errorf("lease not in stats: %+v", a.Stats().Leases)
	}

	// Through the leased address to the host: fd00::2 is the host's
	// loopback (map_host_loopback).
	addAddr(t, g, leased, 128)
	// The forward on [::1] reaches the guest at its leased address, known
	// from the lease alone (the guest has not sent from it yet).
	if got := forwardLandsOn(t, a, guestListener(t, g)); got != leased {
		t.Errorf("forward on [::1] reached the guest at %s, want %s", got, leased)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	c, err := gonet.DialTCPWithBind(ctx, g,
		tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: tcpip.AddrFrom16(leased.As16())},
		tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: tcpip.AddrFrom16(netip.MustParseAddr("fd00::2").As16()), Port: port},
		ipv6.ProtocolNumber)
	if err != nil {
		t.Fatalf("dial [fd00::2]:%d from %s: %v", port, leased, err)
	}
	defer c.Close()
	if got := netstacktest.AddrOf(c.LocalAddr()).Addr(); got != leased {
		t.Fatalf("connection from %s, want %s", got, leased)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET /via-dhcpv6 HTTP/1.0\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	body.ReadFrom(resp.Body)
	if !strings.Contains(body.String(), "hello from the host") {
		t.Errorf("body %q", body.String())
	}
	mu.Lock()
	if len(hits) != 1 || hits[0] != "/via-dhcpv6" {
		t.Errorf("host saw %v", hits)
	}
	mu.Unlock()

	// RELEASE ends the lease.
	rel, err := dhcpv6.NewMessage(dhcpv6.WithClientID(duid), dhcpv6.WithServerID(adv.Options.ServerID()))
	if err != nil {
		t.Fatal(err)
	}
	rel.MessageType = dhcpv6.MessageTypeRelease
	rel.AddOption(ia)
	exchange(t, conn, rel, dhcpv6.MessageTypeReply)
	for _, l := range a.Stats().Leases {
		if l.Addr.Is6() {
			t.Errorf("lease left after RELEASE: %+v", l)
		}
	}
}

// TestForwardToGuestIPv6: a TCP or UDP forward on an IPv6 host address reaches the
// guest over IPv4 while vunet knows no IPv6 address of it, and over IPv6
// at its SLAAC (EUI-64) address once the guest has used it.
func TestForwardToGuestIPv6(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	cfg.Forwards = []config.Forward{{Proto: "tcp", Host: netip.MustParseAddrPort("[::1]:0"), GuestPort: 22},
		{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), GuestPort: 22},
		{Proto: "udp", Host: netip.MustParseAddrPort("[::1]:0"), GuestPort: 5353}}
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	start(t, a)
	if _, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	g := guestOn(t, cfg.Socket)
	ln := guestListener(t, g)
	if got := forwardLandsOn(t, a, ln); got != netstacktest.Guest4 {
		t.Errorf("before any IPv6 traffic the forward reached %s, want %s", got, netstacktest.Guest4)
	}
	udpLandsOn(t, a, g, netstacktest.Guest4)
	slaac := netip.MustParseAddr("fd00::5054:ff:fe12:3456")
	addAddr(t, g, slaac, 128)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Pings from the guest's static fd00::15 and its SLAAC address: the
	// guest's neighbour solicitations for the gateway, from each, tell
	// vunet about both, and the SLAAC one is preferred.
	for _, src := range []netip.Addr{netstacktest.Guest6, slaac} {
		if _, err := pingFrom(ctx, g, src, netip.MustParseAddr("fd00::2")); err != nil {
			t.Fatal(err)
		}
	}
	if got := forwardLandsOn(t, a, ln); got != slaac {
		t.Errorf("forward on [::1] reached %s, want the SLAAC address %s", got, slaac)
	}
	// UDP flows are new per client: a new client socket gets a new flow.
	udpLandsOn(t, a, g, slaac)
}

// udpLandsOn sends a datagram to the UDP forward on [::1] from a new
// client socket and checks it arrives at a guest socket bound to at:5353
// (one bound elsewhere would not receive it).
func udpLandsOn(t *testing.T, a *Appliance, g *stack.Stack, at netip.Addr) {
	t.Helper()
	gc, err := netstacktest.ListenUDP(g, netip.AddrPortFrom(at, 5353))
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	var host netip.AddrPort
	for _, f := range a.Forwards() {
		if f.Proto == "udp" {
			host = f.Host
		}
	}
	c, err := net.Dial("udp", host.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for try := 0; try < 20; try++ {
		if _, err := c.Write([]byte("probe")); err != nil {
			t.Fatal(err)
		}
		gc.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		if n, _, err := gc.ReadFrom(buf); err == nil && string(buf[:n]) == "probe" {
			return
		}
	}
	t.Errorf("no datagram from the udp forward on %s at %s:5353", host, at)
}

// guestOn attaches a gVisor guest to the appliance's vhost-user socket.
func guestOn(t *testing.T, sock string) *stack.Stack {
	t.Helper()
	f, err := vhosttest.Dial(sock, vhosttest.Options{MemSize: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Setup(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	gl := endpointtest.New(f, netstacktest.GuestMAC, 1500, 1526)
	t.Cleanup(gl.Stop)
	g, err := netstacktest.NewGuest(gl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Destroy)
	return g
}

// forwardLandsOn connects to the appliance's forward on [::1] (guest port
// 22; the IPv4 forward, if any, must still land on the IPv4 address) and
// returns the guest address the connection arrived at.
func forwardLandsOn(t *testing.T, a *Appliance, ln *gonet.TCPListener) netip.Addr {
	t.Helper()
	var got netip.Addr
	for _, f := range a.Forwards() {
		if f.Proto != "tcp" {
			continue
		}
		c, err := net.DialTimeout("tcp", f.Host.String(), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		gc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		at := netstacktest.AddrOf(gc.LocalAddr()).Addr().Unmap()
		gc.Close()
		c.Close()
		if f.Host.Addr().Is4() {
			if at != netstacktest.Guest4 {
				t.Errorf("forward on %s reached %s, want %s", f.Host, at, netstacktest.Guest4)
			}
			continue
		}
		got = at
	}
	return got
}

// guestListener is the guest's dual-stack listener on port 22; one per
// guest, as the port stays taken while accepted connections wind down.
func guestListener(t *testing.T, g *stack.Stack) *gonet.TCPListener {
	t.Helper()
	ln, err := gonet.ListenTCP(g, tcpip.FullAddress{NIC: netstacktest.GuestNIC, Port: 22}, ipv6.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// pingFrom sends one ICMPv6 echo from src to dst on the guest.
func pingFrom(ctx context.Context, g *stack.Stack, src, dst netip.Addr) (netip.Addr, error) {
	var wq waiter.Queue
	ep, terr := g.NewEndpoint(icmp.ProtocolNumber6, ipv6.ProtocolNumber, &wq)
	if terr != nil {
		return netip.Addr{}, fmt.Errorf("icmp endpoint: %s", terr)
	}
	defer ep.Close()
	if terr := ep.Bind(tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: tcpip.AddrFrom16(src.As16())}); terr != nil {
		return netip.Addr{}, fmt.Errorf("bind %s: %s", src, terr)
	}
	we, ch := waiter.NewChannelEntry(waiter.ReadableEvents)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	msg := make([]byte, 8)
	msg[0] = byte(header.ICMPv6EchoRequest)
	to := tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: tcpip.AddrFrom16(dst.As16())}
	if _, terr := ep.Write(bytes.NewReader(msg), tcpip.WriteOptions{To: &to}); terr != nil {
		return netip.Addr{}, fmt.Errorf("icmp write: %s", terr)
	}
	for {
		var b bytes.Buffer
		res, terr := ep.Read(&b, tcpip.ReadOptions{NeedRemoteAddr: true})
		if _, ok := terr.(*tcpip.ErrWouldBlock); ok {
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return netip.Addr{}, ctx.Err()
			}
		}
		if terr != nil {
			return netip.Addr{}, fmt.Errorf("icmp read: %s", terr)
		}
		a, _ := netip.AddrFromSlice(res.RemoteAddr.Addr.AsSlice())
		return a, nil
	}
}

func addAddr(t *testing.T, g *stack.Stack, a netip.Addr, bits int) {
	t.Helper()
	pa := tcpip.ProtocolAddress{Protocol: ipv6.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom16(a.As16()), PrefixLen: bits}}
	if terr := g.AddProtocolAddress(netstacktest.GuestNIC, pa, stack.AddressProperties{}); terr != nil {
		t.Fatalf("add %s: %s", a, terr)
	}
}

// exchange sends m to ff02::1:2 and returns the first reply of type want
// with m's transaction id, retransmitting once a second (the first RA or
// neighbour discovery may still be in flight).
func exchange(t *testing.T, c *gonet.UDPConn, m *dhcpv6.Message, want dhcpv6.MessageType) *dhcpv6.Message {
	t.Helper()
	dst := &net.UDPAddr{IP: net.ParseIP("ff02::1:2"), Port: 547}
	buf := make([]byte, 1500)
	for try := 0; try < 10; try++ {
		if _, err := c.WriteTo(m.ToBytes(), dst); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		for {
			n, _, err := c.ReadFrom(buf)
			if err != nil {
				break
			}
			d, err := dhcpv6.FromBytes(buf[:n])
			if err != nil {
				continue
			}
			if r, ok := d.(*dhcpv6.Message); ok && r.MessageType == want && r.TransactionID == m.TransactionID {
				return r
			}
		}
	}
	t.Fatalf("no %s to %s", want, m.MessageType)
	return nil
}

// solicitRA sends router solicitations until an advertisement
// arrives and returns its flags byte (M is 0x80, O 0x40).
func solicitRA(t *testing.T, g *stack.Stack) byte {
	t.Helper()
	var wq waiter.Queue
	ep, terr := g.NewRawEndpoint(header.ICMPv6ProtocolNumber, ipv6.ProtocolNumber, &wq, true)
	if terr != nil {
		t.Fatalf("raw endpoint: %s", terr)
	}
	defer ep.Close()
	// Not bound to ll: a bound raw endpoint only sees packets to ll, and
	// the RA goes to ff02::1.
	if terr := ep.SocketOptions().SetBindToDevice(int32(netstacktest.GuestNIC)); terr != nil {
		t.Fatalf("bind to device: %s", terr)
	}
	we, ch := waiter.NewChannelEntry(waiter.ReadableEvents)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	rs := make([]byte, header.ICMPv6HeaderSize+header.NDPRSMinimumSize)
	rs[0] = byte(header.ICMPv6RouterSolicit)
	allRouters := tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: tcpip.AddrFrom16(netip.MustParseAddr("ff02::2").As16())}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if _, terr := ep.Write(bytes.NewReader(rs), tcpip.WriteOptions{To: &allRouters,
			ControlMessages: tcpip.SendableControlMessages{HasHopLimit: true, HopLimit: 255}}); terr != nil {
			t.Fatalf("send RS: %s", terr)
		}
		wait := time.After(4 * time.Second) // RAs are at most one per 3s
		for {
			var b bytes.Buffer
			_, terr := ep.Read(&b, tcpip.ReadOptions{})
			if _, block := terr.(*tcpip.ErrWouldBlock); block {
				select {
				case <-ch:
					continue
				case <-wait:
				}
				break
			}
			if terr != nil {
				t.Fatalf("read: %s", terr)
			}
			if p := b.Bytes(); len(p) >= header.ICMPv6HeaderSize+header.NDPRAMinimumSize && p[0] == byte(header.ICMPv6RouterAdvert) {
				return p[5]
			}
		}
	}
	t.Fatal("no router advertisement")
	return 0
}
