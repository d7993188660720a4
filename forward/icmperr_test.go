package forward

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// freeUDPPort returns a loopback UDP port with no socket bound to it.
func freeUDPPort(t *testing.T, addr netip.Addr) uint16 {
	t.Helper()
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		t.Fatal(err)
	}
	port := pc.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	_ = pc.Close()
	return port
}

// TestUDPPortUnreachable sends a datagram to a closed host port through the
// gateway mapping: the host kernel answers with ICMP port unreachable on
// loopback, and the guest's connected socket must see "connection refused"
// on its next read, as it would on a real network.
func TestUDPPortUnreachable(t *testing.T) {
	e := newEnv(t, nil)
	fams := families(t)
	for _, fam := range fams {
		dst := netip.AddrPortFrom(fam.gw, freeUDPPort(t, fam.loop))
		c, err := netstacktest.DialUDP(e.p.Guest, dst)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("anyone there?")); err != nil {
			t.Fatal(err)
		}
		// gVisor's gonet wakes readers for data only, not for socket
		// errors, so poll: each Read first returns a pending error.
		deadline := time.Now().Add(10 * time.Second)
		for {
			_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			_, err = c.Read(make([]byte, 100))
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() || time.Now().After(deadline) {
				break
			}
		}
		if err == nil || !strings.Contains(err.Error(), "refused") {
			t.Errorf("%s: read err = %v, want connection refused", dst, err)
		}
		c.Close()
	}
	// The guest can see an error before the sender has counted it.
	eventually(t, fmt.Sprintf("ICMPErrors = %d", len(fams)), func() bool { return e.f.Stats().ICMPErrors.Load() == uint64(len(fams)) })
}

// TestTCPUnreachableGetsICMP makes host connects fail as a router would
// make them fail; the guest's connect must end at once with the same
// error, carried by an ICMP error that quotes its SYN.
func TestTCPUnreachableGetsICMP(t *testing.T) {
	for _, tc := range []struct {
		errno syscall.Errno
		want  string // gVisor's wording of the guest-side error
	}{
		{syscall.EHOSTUNREACH, "no route to host"},
		{syscall.ENETUNREACH, "network is unreachable"},
	} {
		e := newEnv(t, func(o *Options) {
			o.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
				return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("connect", tc.errno)}
			}
		})
		// Any address outside the host: the dialer never reaches it.
		// gVisor (the test guest) acts on ICMPv6 "no route" but ignores
		// "address unreachable" (Linux turns it into EHOSTUNREACH), so
		// only the former is tried over IPv6.
		dsts := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.7:80")}
		if tc.errno == syscall.ENETUNREACH {
			dsts = append(dsts, netip.MustParseAddrPort("[2001:db8::7]:80"))
		}
		for _, dst := range dsts {
			start := time.Now()
			_, err := netstacktest.DialTCP(ctxT(t, 20*time.Second), e.p.Guest, dst)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%v: dial %s: err = %v, want %q", tc.errno, dst, err, tc.want)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("%v: dial %s took %v; the guest retried its SYN instead of taking the error", tc.errno, dst, d)
			}
		}
		n := uint64(len(dsts))
		eventually(t, fmt.Sprintf("%v: ICMPErrors and TCPDialErrors = %d", tc.errno, n), func() bool {
			s := e.f.Stats()
			return s.ICMPErrors.Load() == n && s.TCPDialErrors.Load() == n
		})
	}
}

func TestKindMapping(t *testing.T) {
	for _, tc := range []struct {
		v4         bool
		typ, code  uint8
		want       unreachKind
		backT, bkC uint8 // the guest-family encoding of want, same family
	}{
		{true, 3, 0, kindNet, 3, 0},
		{true, 3, 1, kindHost, 3, 1},
		{true, 3, 3, kindPort, 3, 3},
		{true, 3, 13, kindProhibited, 3, 13},
		{true, 3, 10, kindProhibited, 3, 13},
		{true, 11, 0, kindTTL, 11, 0},
		{true, 11, 1, kindNone, 0, 0}, // reassembly time exceeded: not the guest's business
		{true, 3, 4, kindNone, 0, 0},  // fragmentation needed on the host's path
		{true, 5, 0, kindNone, 0, 0},  // redirect
		{false, 1, 0, kindNet, 1, 0},
		{false, 1, 3, kindHost, 1, 3},
		{false, 1, 4, kindPort, 1, 4},
		{false, 1, 1, kindProhibited, 1, 1},
		{false, 1, 6, kindProhibited, 1, 1},
		{false, 3, 0, kindTTL, 3, 0},
		{false, 2, 0, kindNone, 0, 0}, // packet too big
	} {
		var got unreachKind
		if tc.v4 {
			got = kindFromICMPv4(tc.typ, tc.code)
		} else {
			got = kindFromICMPv6(tc.typ, tc.code)
		}
		if got != tc.want {
			t.Errorf("v4=%v type %d code %d: kind %v, want %v", tc.v4, tc.typ, tc.code, got, tc.want)
			continue
		}
		if got == kindNone {
			continue
		}
		var bt, bc uint8
		if tc.v4 {
			a, b := got.icmpv4()
			bt, bc = uint8(a), uint8(b)
		} else {
			a, b := got.icmpv6()
			bt, bc = uint8(a), uint8(b)
		}
		if bt != tc.backT || bc != tc.bkC {
			t.Errorf("%v encodes as %d/%d, want %d/%d", got, bt, bc, tc.backT, tc.bkC)
		}
	}
}

// TestQuote checks the reconstructed invoking packets parse as what the
// guest sent.
func TestQuote(t *testing.T) {
	src4, dst4 := netip.MustParseAddrPort("10.0.2.15:40000"), netip.MustParseAddrPort("10.0.2.2:53")
	q := udpInvoking(src4, dst4, 100, []byte("payload")).quote()
	ip := header.IPv4(q)
	if len(q) != header.IPv4MinimumSize+8+len("payload") || ip.HeaderLength() != header.IPv4MinimumSize {
		t.Fatalf("bad IPv4 quote %x", q)
	}
	if ip.Protocol() != uint8(header.UDPProtocolNumber) || ip.TotalLength() != 20+8+100 ||
		fromTCPIP(ip.SourceAddress()) != src4.Addr() || fromTCPIP(ip.DestinationAddress()) != dst4.Addr() {
		t.Errorf("IPv4 header %x", q[:20])
	}
	if ip.CalculateChecksum() != 0xffff {
		t.Errorf("IPv4 quote checksum does not verify")
	}
	u := header.UDP(q[20:])
	if u.SourcePort() != 40000 || u.DestinationPort() != 53 || u.Length() != 108 || string(u.Payload()) != "payload" {
		t.Errorf("UDP header and payload %x", q[20:])
	}
	// Long payloads are cut to keep the error within 576 / 1280 bytes.
	big := make([]byte, 5000)
	if n := len(udpInvoking(src4, dst4, len(big), big).quote()); n != maxQuote4 {
		t.Errorf("IPv4 quote of a 5000-byte datagram: %d bytes, want %d", n, maxQuote4)
	}
	src6u := netip.MustParseAddrPort("[fd00::15]:1")
	if n := len(udpInvoking(src6u, src6u, len(big), big).quote()); n != maxQuote6 {
		t.Errorf("IPv6 quote of a 5000-byte datagram: %d bytes, want %d", n, maxQuote6)
	}

	src6, dst6 := netip.MustParseAddrPort("[fd00::15]:40001"), netip.MustParseAddrPort("[2001:db8::1]:443")
	q = synInvoking(src6, dst6, 0xdeadbeef).quote()
	ip6 := header.IPv6(q)
	if len(q) != 48 || ip6.NextHeader() != uint8(header.TCPProtocolNumber) ||
		fromTCPIP(ip6.SourceAddress()) != src6.Addr() || fromTCPIP(ip6.DestinationAddress()) != dst6.Addr() {
		t.Fatalf("IPv6 quote %x", q)
	}
	if p := q[40:]; binary.BigEndian.Uint16(p) != 40001 || binary.BigEndian.Uint16(p[2:]) != 443 ||
		binary.BigEndian.Uint32(p[4:]) != 0xdeadbeef {
		t.Errorf("TCP start %x", p)
	}
}

func TestParseExtendedErr(t *testing.T) {
	ee := func(origin, typ, code uint8, sa []byte) []byte {
		b := make([]byte, 16, 16+len(sa))
		binary.NativeEndian.PutUint32(b, uint32(syscall.EHOSTUNREACH))
		b[4], b[5], b[6] = origin, typ, code
		return append(b, sa...)
	}
	sa4 := make([]byte, 16)
	binary.NativeEndian.PutUint16(sa4, unix.AF_INET)
	copy(sa4[4:], []byte{192, 0, 2, 1})
	sa6 := make([]byte, 28)
	binary.NativeEndian.PutUint16(sa6, unix.AF_INET6)
	copy(sa6[8:], netip.MustParseAddr("2001:db8::1").AsSlice())

	e, ok := parseExtendedErr(unix.SOL_IP, unix.IP_RECVERR, ee(unix.SO_EE_ORIGIN_ICMP, 11, 0, sa4))
	if !ok || e.kind != kindTTL || e.offender != netip.MustParseAddr("192.0.2.1") {
		t.Errorf("v4 time exceeded: %+v %v", e, ok)
	}
	e, ok = parseExtendedErr(unix.SOL_IPV6, unix.IPV6_RECVERR, ee(unix.SO_EE_ORIGIN_ICMP6, 1, 3, sa6))
	if !ok || e.kind != kindHost || e.offender != netip.MustParseAddr("2001:db8::1") {
		t.Errorf("v6 address unreachable: %+v %v", e, ok)
	}
	// Truncated and foreign messages are ignored, never a panic.
	for _, bad := range [][]byte{nil, make([]byte, 15), ee(unix.SO_EE_ORIGIN_LOCAL, 0, 0, nil)} {
		if _, ok := parseExtendedErr(unix.SOL_IP, unix.IP_RECVERR, bad); ok {
			t.Errorf("accepted %x", bad)
		}
	}
	if e, ok := parseExtendedErr(unix.SOL_IP, unix.IP_RECVERR, ee(unix.SO_EE_ORIGIN_ICMP, 3, 3, sa4[:5])); !ok || e.offender.IsValid() {
		t.Errorf("short sockaddr: %+v %v", e, ok)
	}
	if _, ok := parseExtendedErr(unix.SOL_SOCKET, unix.SCM_RIGHTS, ee(unix.SO_EE_ORIGIN_ICMP, 3, 3, sa4)); ok {
		t.Errorf("accepted a foreign control message")
	}
}

// TestPingErrorReachesGuest feeds a ping flow the error a router on the
// host's path would send ("time exceeded", as traceroute provokes): the
// guest must receive an ICMP error from that router which quotes its own
// echo request, identifier included, so its ping can match it.
func TestPingErrorReachesGuest(t *testing.T) {
	e := newEnv(t, nil)
	g := newGuestICMP(t, e, false)
	router := netip.MustParseAddr("198.51.100.1")
	dst := netip.MustParseAddr("192.0.2.9")
	fl := &pingFlow{p: e.f.ping, key: pingKey{guest: netstacktest.Guest4, dst: dst, ident: 0x1234}}
	// The request as the host's ping socket sent it: the kernel's own
	// identifier (0xabcd), the guest's sequence number (7).
	fl.hostError(hostError{kind: kindTTL, offender: router, payload: []byte{8, 0, 0x55, 0x55, 0xab, 0xcd, 0, 7, 'h', 'i'}})

	pkt, _ := g.next(t, func([]byte) bool { return false })
	ip := header.IPv4(pkt)
	if !ip.IsValid(len(pkt)) || fromTCPIP(ip.SourceAddress()) != router || fromTCPIP(ip.DestinationAddress()) != netstacktest.Guest4 {
		t.Fatalf("IP header %x", pkt[:min(len(pkt), 20)])
	}
	icmpMsg := header.ICMPv4(ip.Payload())
	if icmpMsg.Type() != header.ICMPv4TimeExceeded || icmpMsg.Code() != header.ICMPv4TTLExceeded {
		t.Errorf("type/code %d/%d, want time exceeded", icmpMsg.Type(), icmpMsg.Code())
	}
	if checksum.Checksum(icmpMsg, 0) != 0xffff {
		t.Errorf("ICMP checksum does not verify")
	}
	q := header.IPv4(icmpMsg[header.ICMPv4MinimumSize:])
	if len(q) < 28 || fromTCPIP(q.SourceAddress()) != netstacktest.Guest4 || fromTCPIP(q.DestinationAddress()) != dst ||
		q.Protocol() != uint8(header.ICMPv4ProtocolNumber) {
		t.Fatalf("quoted header %x", q)
	}
	if echo := q[20:28]; echo[0] != 8 || binary.BigEndian.Uint16(echo[4:]) != 0x1234 || binary.BigEndian.Uint16(echo[6:]) != 7 {
		t.Errorf("quoted echo %x: want type 8, the guest's identifier 0x1234 and sequence 7", echo)
	}
	eventually(t, "ICMPErrors = 1", func() bool { return e.f.Stats().ICMPErrors.Load() == 1 })
}

// TestPingTTLExpiresAtGateway sends the guest's echo requests with TTL 1,
// as traceroute -I does for its first hop: vunet, the guest's first
// router, must answer "time exceeded" from the gateway address, quoting
// the request, whether or not the host permits ping sockets.
func TestPingTTLExpiresAtGateway(t *testing.T) {
	e := newEnv(t, nil)
	for _, fam := range []struct {
		net     tcpip.NetworkProtocolNumber
		dst, gw netip.Addr
		echo    byte
		ttlOpt  tcpip.SockOptInt
	}{
		{ipv4.ProtocolNumber, netip.MustParseAddr("192.0.2.9"), gw4, 8, tcpip.IPv4TTLOption},
		{ipv6.ProtocolNumber, netip.MustParseAddr("2001:db8::9"), gw6, 128, tcpip.IPv6HopLimitOption},
	} {
		v6 := fam.net == ipv6.ProtocolNumber
		g := newGuestICMP(t, e, v6)
		ep := g.ep
		if terr := ep.SetSockOptInt(fam.ttlOpt, 1); terr != nil {
			t.Fatal(terr)
		}
		req := []byte{fam.echo, 0, 0, 0, 0x12, 0x34, 0, 1, 'h', 'o', 'p'}
		if fam.net == ipv4.ProtocolNumber { // ICMPv6 raw sockets get theirs from the stack
			binary.BigEndian.PutUint16(req[2:], checksumOf(req))
		}
		to := tcpip.FullAddress{Addr: toTCPIP(fam.dst)}
		if _, terr := ep.Write(bytes.NewReader(req), tcpip.WriteOptions{To: &to}); terr != nil {
			t.Fatal(terr)
		}

		msg := func(b []byte) []byte {
			if !v6 {
				return header.IPv4(b).Payload()
			}
			return b
		}
		// Skip our own request, looped to the raw socket, and neighbor
		// discovery: informational ICMPv6 types are >= 128.
		pkt, from := g.next(t, func(b []byte) bool { m := msg(b); return m[0] == fam.echo || v6 && m[0] >= 128 })
		pkt = msg(pkt)
		if from != fam.gw {
			t.Errorf("%s: time exceeded from %s, want the gateway %s", fam.dst, from, fam.gw)
		}
		wantType := byte(header.ICMPv4TimeExceeded)
		qoff := header.ICMPv4MinimumSize + header.IPv4MinimumSize
		if fam.net == ipv6.ProtocolNumber {
			wantType, qoff = byte(header.ICMPv6TimeExceeded), header.ICMPv6MinimumSize+header.IPv6MinimumSize
		}
		if pkt[0] != wantType || pkt[1] != 0 {
			t.Errorf("%s: type/code %d/%d, want %d/0", fam.dst, pkt[0], pkt[1], wantType)
		}
		if len(pkt) < qoff+8 || pkt[qoff] != fam.echo || binary.BigEndian.Uint16(pkt[qoff+4:]) != 0x1234 {
			t.Errorf("%s: quoted echo %x", fam.dst, pkt[min(qoff, len(pkt)):])
		}
	}
}

func checksumOf(b []byte) uint16 { return ^checksum.Checksum(b, 0) }

// guestICMP is a raw ICMP socket on the simulated guest: it sees every
// ICMP message the guest receives.
type guestICMP struct {
	ep tcpip.Endpoint
	ch chan struct{}
}

func newGuestICMP(t *testing.T, e *env, v6 bool) *guestICMP {
	t.Helper()
	netProto, transport := ipv4.ProtocolNumber, header.ICMPv4ProtocolNumber
	if v6 {
		netProto, transport = ipv6.ProtocolNumber, header.ICMPv6ProtocolNumber
	}
	var wq waiter.Queue
	ep, terr := e.p.Guest.NewRawEndpoint(transport, netProto, &wq, true)
	if terr != nil {
		t.Fatal(terr)
	}
	g := &guestICMP{ep: ep, ch: make(chan struct{}, 1)}
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

// next returns the next message not skipped, and its source. IPv4 raw
// reads include the IP header, IPv6 ones do not.
func (g *guestICMP) next(t *testing.T, skip func([]byte) bool) ([]byte, netip.Addr) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		var b bytes.Buffer
		res, terr := g.ep.Read(&b, tcpip.ReadOptions{NeedRemoteAddr: true})
		if terr == nil {
			if !skip(b.Bytes()) {
				return b.Bytes(), fromTCPIP(res.RemoteAddr.Addr)
			}
			continue
		}
		select {
		case <-g.ch:
		case <-deadline:
			t.Fatal("no ICMP message reached the guest")
		}
	}
}

// TestUDPHopLimits: vunet is the guest's first router for UDP too. A
// datagram arriving with TTL 1 expires at the gateway ("time exceeded"
// quoting it, as traceroute's first probe expects) and is not sent; one
// with TTL 5 leaves the host socket with TTL 4. The host socket is pointed
// at a loopback server whatever the guest's destination, so nothing leaves
// this machine.
func TestUDPHopLimits(t *testing.T) {
	srv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	rc, _ := srv.SyscallConn()
	rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVTTL, 1) })
	e := newEnv(t, func(o *Options) {
		o.dialUDP = func(network string, _ uint16, _ netip.AddrPort) (*net.UDPConn, error) {
			return net.DialUDP(network, nil, srv.LocalAddr().(*net.UDPAddr))
		}
	})
	g := newGuestICMP(t, e, false)
	dst := netip.MustParseAddrPort("192.0.2.9:33434")

	send := func(ttl int, payload string) {
		t.Helper()
		var wq waiter.Queue
		ep, terr := e.p.Guest.NewEndpoint(udp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
		if terr != nil {
			t.Fatal(terr)
		}
		defer ep.Close()
		if terr := ep.SetSockOptInt(tcpip.IPv4TTLOption, ttl); terr != nil {
			t.Fatal(terr)
		}
		if terr := ep.Bind(tcpip.FullAddress{Port: 40000}); terr != nil {
			t.Fatal(terr)
		}
		to := netstacktest.FullAddr(dst)
		if _, terr := ep.Write(strings.NewReader(payload), tcpip.WriteOptions{To: &to}); terr != nil {
			t.Fatal(terr)
		}
	}

	send(1, "probe-ttl-1")
	pkt, from := g.next(t, func(b []byte) bool { return header.IPv4(b).Payload()[0] != byte(header.ICMPv4TimeExceeded) })
	if from != gw4 {
		t.Errorf("time exceeded from %s, want the gateway %s", from, gw4)
	}
	q := header.IPv4(header.IPv4(pkt).Payload()[header.ICMPv4MinimumSize:])
	if u := header.UDP(q[header.IPv4MinimumSize:]); len(q) < 28 || u.SourcePort() != 40000 ||
		u.DestinationPort() != dst.Port() || !strings.HasPrefix(string(u.Payload()), "probe-ttl-1") {
		t.Errorf("quoted datagram %x", q)
	}

	send(5, "probe-ttl-5")
	buf, oob := make([]byte, 100), make([]byte, 64)
	_ = srv.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, oobn, _, _, err := srv.ReadMsgUDP(buf, oob)
	if err != nil {
		t.Fatalf("the TTL 5 datagram never reached the host side: %v", err)
	}
	if string(buf[:n]) != "probe-ttl-5" {
		t.Fatalf("host side got %q first; the TTL 1 probe must not have been sent", buf[:n])
	}
	msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
	ttl := -1
	for _, m := range msgs {
		if m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_TTL && len(m.Data) >= 4 {
			ttl = int(binary.NativeEndian.Uint32(m.Data))
		}
	}
	if ttl != 4 {
		t.Errorf("host socket sent with TTL %d, want 4 (one hop less than the guest's 5)", ttl)
	}
}
