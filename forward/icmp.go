package forward

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/forward/egress"
)

// ICMP echo forwarding.
//
// Interception: gVisor hands every echo request it accepts (and with a
// promiscuous NIC it accepts them for any destination) to the stack's ICMP
// endpoints and then to the per-stack default handler for the ICMP protocol
// (installed with SetTransportProtocolHandler). When that handler returns
// true, gVisor does not send its own echo reply. So the handler decides:
//
//   - DNS address, or gateway when it cannot be forwarded: return false and
//     gVisor answers (these are the stack's own addresses).
//   - anything else: send it through a host ping socket and return true;
//     the reply is written back to the guest through a gVisor route whose
//     source is the original destination (the NIC spoofs). If ping sockets
//     are not permitted, the request is dropped (returning false would make
//     gVisor's IPv6 answer on behalf of every address on the Internet).

// pingKey identifies an echo flow: one guest "ping process" to one
// destination. The kernel chooses the host-side identifier.
type pingKey struct {
	guest, dst netip.Addr
	ident      uint16
}

// pinger owns the ICMP echo flows.
type pinger struct {
	f        *Forwarder
	ok4, ok6 bool
	why      string // why ping sockets are unavailable, for the log
	warnOnce sync.Once

	mu    sync.Mutex
	flows map[pingKey]*pingFlow
}

// newPinger probes once whether the host permits ping sockets, so the
// decision for each echo request is a field read.
func newPinger(f *Forwarder) *pinger {
	p := &pinger{f: f, flows: make(map[pingKey]*pingFlow)}
	var errs []error
	for _, v6 := range []bool{false, true} {
		c, err := f.opts.openPing(v6)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		_ = c.Close()
		if v6 {
			p.ok6 = true
		} else {
			p.ok4 = true
		}
	}
	if len(errs) > 0 {
		p.why = fmt.Sprintf("%v (net.ipv4.ping_group_range is %q, our gid is %d)",
			errors.Join(errs...), pingGroupRange(), os.Getegid())
	}
	return p
}

func (p *pinger) available(v6 bool) bool {
	if v6 {
		return p.ok6
	}
	return p.ok4
}

// handleICMP is the per-stack default handler for ICMPv4 and ICMPv6. It is
// called synchronously on gVisor's delivery path and must not block.
func (f *Forwarder) handleICMP(_ stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	nh := pkt.Network()
	src, dst := fromTCPIP(nh.SourceAddress()), fromTCPIP(nh.DestinationAddress())
	v6 := pkt.NetworkProtocolNumber == ipv6.ProtocolNumber
	if len(pkt.TransportHeader().Slice()) == 0 {
		return false
	}
	view := stack.PayloadSince(pkt.TransportHeader())
	msg := append([]byte(nil), view.AsSlice()...)
	view.Release()
	if len(msg) < header.ICMPv4MinimumSize {
		return false
	}
	if v6 && header.ICMPv6Type(msg[0]) != header.ICMPv6EchoRequest ||
		!v6 && header.ICMPv4Type(msg[0]) != header.ICMPv4Echo {
		return false
	}
	// gVisor hands IPv4 echo requests with bad checksums to raw sockets
	// and default handlers anyway; IPv6 ones were already verified.
	if !v6 && checksum.Checksum(msg, 0) != 0xffff {
		f.c.DropInvalid.Add(1)
		return true
	}

	isGateway := dst == f.opts.Gateway4 || dst == f.opts.Gateway6
	if dst == f.opts.DNS4 || dst == f.opts.DNS6 ||
		isGateway && !(f.opts.MapHostLoopback && f.ping.available(v6)) {
		return false // gVisor answers for its own addresses
	}
	to, why := f.target(dst)
	if why != forwardOK {
		f.c.countDrop(why)
		return true
	}
	ident := binary.BigEndian.Uint16(msg[4:6])
	if !f.checkEgress(egress.ICMP, netip.AddrPortFrom(src, 0), netip.AddrPortFrom(dst, 0)) {
		f.sendICMPError(f.gateway(v6), kindProhibited, echoInvoking(src, dst, msg, ident))
		return true
	}
	// vunet is the guest's first router: a request that would leave it
	// with no hops left expires here, and the rest go out with one hop
	// less. That is what makes traceroute -I and mtr show the gateway and
	// then the host's path.
	// The gateway itself (the host) is the destination, not a hop.
	ttl := hopLimit(pkt)
	if ttl <= 1 && !isGateway {
		f.sendICMPError(f.gateway(v6), kindTTL, echoInvoking(src, dst, msg, binary.BigEndian.Uint16(msg[4:6])))
		return true
	}
	if !f.ping.available(v6) {
		f.c.DropPingUnavailable.Add(1)
		f.ping.warnOnce.Do(func() {
			f.log.Warn("ICMP echo to external hosts is not forwarded: the host does not permit unprivileged ping sockets; "+
				"pings to the gateway and DNS addresses are still answered. Allow it with sysctl net.ipv4.ping_group_range",
				"reason", f.ping.why)
		})
		return true
	}
	g := f.guestOf(pkt)
	if g == nil {
		f.c.DropNoGuest.Add(1)
		return true
	}
	f.ping.send(g, pingKey{guest: src, dst: dst, ident: binary.BigEndian.Uint16(msg[4:6])}, to, msg, ttl-1)
	return true
}

// hopLimit returns the IPv4 TTL or IPv6 hop limit pkt arrived with.
func hopLimit(pkt *stack.PacketBuffer) uint8 {
	nh := pkt.NetworkHeader().Slice()
	if pkt.NetworkProtocolNumber == ipv6.ProtocolNumber {
		if len(nh) < header.IPv6MinimumSize {
			return 0
		}
		return header.IPv6(nh).HopLimit()
	}
	if len(nh) < header.IPv4MinimumSize {
		return 0
	}
	return header.IPv4(nh).TTL()
}

// echoInvoking is the guest's echo request msg (identifier ident) from src
// to dst, for quoting in an ICMP error.
func echoInvoking(src, dst netip.Addr, msg []byte, ident uint16) invoking {
	inv := invoking{src: src, dst: dst, proto: uint8(header.ICMPv4ProtocolNumber), l4Len: len(msg)}
	if dst.Is6() {
		inv.proto = uint8(header.ICMPv6ProtocolNumber)
	}
	n := copy(inv.l4[:], msg)
	inv.data = msg[n:]
	binary.BigEndian.PutUint16(inv.l4[4:6], ident)
	return inv
}

// send forwards one echo request of guest g with the given hop limit,
// creating the flow (counted against g's limit) if needed.
func (p *pinger) send(g *guestLimits, k pingKey, target netip.Addr, msg []byte, ttl uint8) {
	f := p.f
	p.mu.Lock()
	fl := p.flows[k]
	if fl == nil {
		var err error
		if fl, err = p.newFlow(g, k, target); err != nil {
			p.mu.Unlock()
			f.log.Debug("ping flow not created", "guest", k.guest, "dst", k.dst, "err", err)
			return
		}
	}
	p.mu.Unlock()
	fl.touch()
	fl.sendMu.Lock()
	defer fl.sendMu.Unlock()
	fl.setTTL(ttl)
	// Writes to a datagram socket do not block for long; the deadline keeps
	// a wedged socket from stalling gVisor's delivery path.
	_ = fl.conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	_, err := fl.conn.WriteTo(msg, &net.UDPAddr{IP: target.AsSlice()})
	if err != nil && fl.hostErrors(err) {
		// An error for an earlier request was reported instead of sending
		// this one; the guest has been told, and this one is retried.
		_, err = fl.conn.WriteTo(msg, &net.UDPAddr{IP: target.AsSlice()})
	}
	if err != nil {
		f.c.DropSendErrors.Add(1)
		f.log.Debug("ping send failed", "target", target, "err", err)
		return
	}
	f.c.PingRequests.Add(1)
}

// newFlow opens a ping socket for k, a flow of guest g. Called with p.mu
// held.
func (p *pinger) newFlow(g *guestLimits, k pingKey, target netip.Addr) (*pingFlow, error) {
	f := p.f
	gauge := gauges{&f.c.PingFlows, &g.c.PingFlows}
	if !reserveGuest(gauge, f.opts.MaxPingFlows) {
		f.c.DropPingFlowLimit.Add(1)
		g.c.PingFlowLimit.Add(1)
		return nil, errors.New("ping flow limit reached")
	}
	conn, err := f.opts.openPing(target.Is6())
	if err != nil {
		gauge.add(-1)
		f.c.DropSendErrors.Add(1)
		return nil, err
	}
	fl := &pingFlow{p: p, key: k, conn: conn, gauge: gauge}
	fl.touch()
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		_ = conn.Close()
		gauge.add(-1)
		f.c.DropClosed.Add(1)
		return nil, errors.New("forwarder closed")
	}
	f.pflows[fl] = struct{}{}
	f.wg.Add(1)
	f.mu.Unlock()
	p.flows[k] = fl
	go func() {
		defer f.wg.Done()
		fl.readLoop()
	}()
	return fl, nil
}

// pingFlow is one host ping socket serving one pingKey.
type pingFlow struct {
	p         *pinger
	key       pingKey
	gauge     gauges // the open-flows gauges it counts in (its guest's)
	conn      net.PacketConn
	sendMu    sync.Mutex   // serializes a request's hop limit and its write
	ttl       uint8        // hop limit set on conn; 0: the kernel default
	last      atomic.Int64 // nanoseconds since f.epoch
	closeOnce sync.Once
}

func (fl *pingFlow) touch() { fl.last.Store(int64(time.Since(fl.p.f.epoch))) }

// readLoop relays echo replies to the guest until the flow has been idle
// for UDPIdleTimeout or is closed.
func (fl *pingFlow) readLoop() {
	f := fl.p.f
	defer fl.close()
	buf := make([]byte, maxDatagram)
	for {
		deadline := f.epoch.Add(time.Duration(fl.last.Load()) + f.opts.UDPIdleTimeout)
		if !time.Now().Before(deadline) {
			return
		}
		_ = fl.conn.SetReadDeadline(deadline)
		n, _, err := fl.conn.ReadFrom(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if fl.hostErrors(err) {
				continue
			}
			if !errors.Is(err, net.ErrClosed) {
				f.log.Debug("ping socket failed", "dst", fl.key.dst, "err", err)
			}
			return
		}
		reply := buf[:n]
		v6 := fl.key.dst.Is6()
		if n < header.ICMPv4MinimumSize ||
			v6 && header.ICMPv6Type(reply[0]) != header.ICMPv6EchoReply ||
			!v6 && header.ICMPv4Type(reply[0]) != header.ICMPv4EchoReply {
			continue
		}
		fl.touch()
		binary.BigEndian.PutUint16(reply[4:6], fl.key.ident)
		if err := f.injectICMP(fl.key.dst, fl.key.guest, reply); err != nil {
			f.c.DropSendErrors.Add(1)
			f.log.Debug("ping reply not delivered", "err", err)
			continue
		}
		f.c.PingReplies.Add(1)
	}
}

// setTTL sets the hop limit of the next request, if it differs from the
// last one (pings repeat theirs; traceroute raises it one step at a time).
// Called with sendMu held.
func (fl *pingFlow) setTTL(ttl uint8) {
	sc, ok := fl.conn.(syscall.Conn)
	if !ok || ttl == fl.ttl {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	var serr error
	_ = rc.Control(func(fd uintptr) {
		if fl.key.dst.Is6() {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS, int(ttl))
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, int(ttl))
		}
	})
	if serr == nil {
		fl.ttl = ttl
	}
}

// hostErrors handles err from the flow's ping socket. If it reports ICMP
// errors for earlier echo requests (host or network unreachable, time
// exceeded), they are sent on to the guest and hostErrors returns true.
func (fl *pingFlow) hostErrors(err error) bool {
	sc, ok := fl.conn.(syscall.Conn)
	if !ok || !icmpErrno(err) {
		return false
	}
	rc, rerr := sc.SyscallConn()
	if rerr != nil {
		return false
	}
	drainErrQueue(rc, fl.hostError)
	return true
}

// hostError sends one host ICMP error about an echo request to the guest,
// quoting the request as the guest sent it: the queued payload is the
// request as the ping socket sent it, whose identifier the kernel chose.
func (fl *pingFlow) hostError(e hostError) {
	if len(e.payload) < header.ICMPv4MinimumSize {
		return
	}
	fl.p.f.sendICMPError(e.offender, e.kind, echoInvoking(fl.key.guest, fl.key.dst, e.payload, fl.key.ident))
}

func (fl *pingFlow) close() {
	fl.closeOnce.Do(func() {
		p, f := fl.p, fl.p.f
		_ = fl.conn.Close()
		p.mu.Lock()
		if p.flows[fl.key] == fl {
			delete(p.flows, fl.key)
		}
		p.mu.Unlock()
		f.mu.Lock()
		delete(f.pflows, fl)
		f.mu.Unlock()
		fl.gauge.add(-1)
	})
}

// injectICMP sends an ICMP message to the guest from src (any address: the
// NIC spoofs), fixing its checksum.
func (f *Forwarder) injectICMP(src, dst netip.Addr, msg []byte) error {
	proto := netProto(dst)
	r, terr := f.s.FindRoute(f.opts.NIC, toTCPIP(src), toTCPIP(dst), proto, false)
	if terr != nil {
		return fmt.Errorf("route %s->%s: %s", src, dst, terr)
	}
	defer r.Release()

	if proto == ipv6.ProtocolNumber {
		h := header.ICMPv6(msg)
		h.SetChecksum(0)
		h.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: msg, Src: r.LocalAddress(), Dst: r.RemoteAddress(),
		}))
	} else {
		h := header.ICMPv4(msg)
		h.SetChecksum(0)
		h.SetChecksum(^checksum.Checksum(msg, 0))
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(r.MaxHeaderLength()) + header.ICMPv4MinimumSize,
		Payload:            buffer.MakeWithData(msg[header.ICMPv4MinimumSize:]),
	})
	defer pkt.DecRef()
	copy(pkt.TransportHeader().Push(header.ICMPv4MinimumSize), msg[:header.ICMPv4MinimumSize])
	pkt.TransportProtocolNumber = header.ICMPv4ProtocolNumber
	if proto == ipv6.ProtocolNumber {
		pkt.TransportProtocolNumber = header.ICMPv6ProtocolNumber
	}
	if terr := r.WritePacket(stack.NetworkHeaderParams{
		Protocol: pkt.TransportProtocolNumber,
		TTL:      r.DefaultTTL(),
		TOS:      stack.DefaultTOS,
	}, pkt); terr != nil {
		return fmt.Errorf("write %s->%s: %s", src, dst, terr)
	}
	return nil
}
