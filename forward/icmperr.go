package forward

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"sync"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Host ICMP errors, translated for the guest.
//
// The guest reaches the world through host sockets, so the ICMP errors that
// routers and hosts send back ("port unreachable", "host unreachable", "time
// exceeded") arrive at vunet's sockets, not at the guest. vunet sends the
// guest an ICMP error of the same kind instead, quoting a reconstruction of
// the packet the guest sent: its addresses, ports and, for TCP, the SYN's
// sequence number. Guest stacks match an error to a socket by exactly those
// fields (Linux also drops TCP errors whose quoted sequence number is outside
// the send window), and abort a connect or fail the next UDP receive with
// the matching errno, just as on a routed network.

// unreachKind is an ICMP error kind, independent of the IP family: a host
// error of either family becomes the guest family's equivalent.
type unreachKind uint8

const (
	kindNone       unreachKind = iota
	kindNet                    // no route to the network
	kindHost                   // no route to / no answer from the host
	kindPort                   // nothing listening (a UDP peer's "port unreachable")
	kindProhibited             // a firewall refused it
	kindTTL                    // hop limit exceeded in transit
)

func (k unreachKind) String() string {
	switch k {
	case kindNet:
		return "network unreachable"
	case kindHost:
		return "host unreachable"
	case kindPort:
		return "port unreachable"
	case kindProhibited:
		return "administratively prohibited"
	case kindTTL:
		return "time exceeded"
	}
	return "none"
}

// kindFromICMPv4 classifies an ICMPv4 error; kinds the guest cannot act on
// (redirects, parameter problems, fragmentation needed on the host's own
// path) are kindNone.
func kindFromICMPv4(typ, code uint8) unreachKind {
	switch header.ICMPv4Type(typ) {
	case header.ICMPv4DstUnreachable:
		switch header.ICMPv4Code(code) {
		case header.ICMPv4NetUnreachable, header.ICMPv4DestinationNetworkUnknown,
			header.ICMPv4NetUnreachableForTos:
			return kindNet
		case header.ICMPv4HostUnreachable, header.ICMPv4DestinationHostUnknown,
			header.ICMPv4HostUnreachableForTos:
			return kindHost
		case header.ICMPv4PortUnreachable:
			return kindPort
		case header.ICMPv4NetProhibited, header.ICMPv4HostProhibited,
			header.ICMPv4AdminProhibited:
			return kindProhibited
		}
	case header.ICMPv4TimeExceeded:
		if header.ICMPv4Code(code) == header.ICMPv4TTLExceeded {
			return kindTTL
		}
	}
	return kindNone
}

// kindFromICMPv6 is kindFromICMPv4 for ICMPv6.
func kindFromICMPv6(typ, code uint8) unreachKind {
	switch header.ICMPv6Type(typ) {
	case header.ICMPv6DstUnreachable:
		switch header.ICMPv6Code(code) {
		case header.ICMPv6NetworkUnreachable, header.ICMPv6BeyondScope:
			return kindNet
		case header.ICMPv6AddressUnreachable:
			return kindHost
		case header.ICMPv6PortUnreachable:
			return kindPort
		case header.ICMPv6Prohibited, header.ICMPv6Policy, header.ICMPv6RejectRoute:
			return kindProhibited
		}
	case header.ICMPv6TimeExceeded:
		if header.ICMPv6Code(code) == header.ICMPv6HopLimitExceeded {
			return kindTTL
		}
	}
	return kindNone
}

// kindFromErrno classifies a host connect error. A refusal is not here: the
// guest gets a RST for it, as it would from the peer.
func kindFromErrno(err error) unreachKind {
	switch {
	case errors.Is(err, syscall.ENETUNREACH):
		return kindNet
	case errors.Is(err, syscall.EHOSTUNREACH):
		return kindHost
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return kindProhibited
	}
	return kindNone
}

// icmpv4 returns the ICMPv4 type and code for k.
func (k unreachKind) icmpv4() (header.ICMPv4Type, header.ICMPv4Code) {
	switch k {
	case kindNet:
		return header.ICMPv4DstUnreachable, header.ICMPv4NetUnreachable
	case kindHost:
		return header.ICMPv4DstUnreachable, header.ICMPv4HostUnreachable
	case kindPort:
		return header.ICMPv4DstUnreachable, header.ICMPv4PortUnreachable
	case kindProhibited:
		return header.ICMPv4DstUnreachable, header.ICMPv4AdminProhibited
	default: // kindTTL
		return header.ICMPv4TimeExceeded, header.ICMPv4TTLExceeded
	}
}

// icmpv6 returns the ICMPv6 type and code for k.
func (k unreachKind) icmpv6() (header.ICMPv6Type, header.ICMPv6Code) {
	switch k {
	case kindNet:
		return header.ICMPv6DstUnreachable, header.ICMPv6NetworkUnreachable
	case kindHost:
		return header.ICMPv6DstUnreachable, header.ICMPv6AddressUnreachable
	case kindPort:
		return header.ICMPv6DstUnreachable, header.ICMPv6PortUnreachable
	case kindProhibited:
		return header.ICMPv6DstUnreachable, header.ICMPv6Prohibited
	default: // kindTTL
		return header.ICMPv6TimeExceeded, header.ICMPv6HopLimitExceeded
	}
}

// invoking is the guest packet an ICMP error refers to, reconstructed from
// what the flow knows: addresses and protocol as the guest sent them, the
// first 8 bytes of its transport header (all that RFC 792 requires an error
// to quote, and all that kernels look at), what followed them as far as
// known (tools such as traceroute6 match their probes by payload), and the
// transport length.
type invoking struct {
	src, dst netip.Addr // guest's view: src is the guest
	proto    uint8      // transport protocol number
	l4       [8]byte
	data     []byte // the bytes after l4, possibly truncated
	l4Len    int
}

// Quote limits: an ICMPv4 error stays within 576 bytes (RFC 1812 4.3.2.3),
// an ICMPv6 one within the minimum MTU of 1280 (RFC 4443 2.4(c)).
const (
	maxQuote4 = 576 - header.IPv4MinimumSize - header.ICMPv4MinimumSize
	maxQuote6 = header.IPv6MinimumMTU - header.IPv6MinimumSize - header.ICMPv6MinimumSize
)

// udpInvoking is a UDP datagram of n payload bytes from src to dst, of
// which data is the start.
func udpInvoking(src, dst netip.AddrPort, n int, data []byte) invoking {
	inv := invoking{src: src.Addr(), dst: dst.Addr(), proto: uint8(header.UDPProtocolNumber),
		l4Len: header.UDPMinimumSize + max(n, len(data)), data: data}
	u := header.UDP(inv.l4[:])
	u.SetSourcePort(src.Port())
	u.SetDestinationPort(dst.Port())
	u.SetLength(uint16(min(inv.l4Len, 0xffff)))
	return inv
}

// synInvoking is a TCP SYN from src to dst with sequence number seq.
func synInvoking(src, dst netip.AddrPort, seq uint32) invoking {
	inv := invoking{src: src.Addr(), dst: dst.Addr(), proto: uint8(header.TCPProtocolNumber), l4Len: header.TCPMinimumSize}
	binary.BigEndian.PutUint16(inv.l4[0:], src.Port())
	binary.BigEndian.PutUint16(inv.l4[2:], dst.Port())
	binary.BigEndian.PutUint32(inv.l4[4:], seq)
	return inv
}

// quote returns the invoking packet's IP header, its first 8 transport
// bytes and as much of the rest as is known and fits.
func (inv invoking) quote() []byte {
	if inv.src.Is4() {
		data := inv.data[:min(len(inv.data), maxQuote4-header.IPv4MinimumSize-len(inv.l4))]
		b := make([]byte, header.IPv4MinimumSize+len(inv.l4)+len(data))
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(min(header.IPv4MinimumSize+inv.l4Len, 0xffff)),
			TTL:         64,
			Protocol:    inv.proto,
			SrcAddr:     toTCPIP(inv.src),
			DstAddr:     toTCPIP(inv.dst),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		copy(b[header.IPv4MinimumSize:], inv.l4[:])
		copy(b[header.IPv4MinimumSize+len(inv.l4):], data)
		return b
	}
	data := inv.data[:min(len(inv.data), maxQuote6-header.IPv6MinimumSize-len(inv.l4))]
	b := make([]byte, header.IPv6MinimumSize+len(inv.l4)+len(data))
	header.IPv6(b).Encode(&header.IPv6Fields{
		PayloadLength:     uint16(min(inv.l4Len, 0xffff)),
		TransportProtocol: tcpip.TransportProtocolNumber(inv.proto),
		HopLimit:          64,
		SrcAddr:           toTCPIP(inv.src),
		DstAddr:           toTCPIP(inv.dst),
	})
	copy(b[header.IPv6MinimumSize:], inv.l4[:])
	copy(b[header.IPv6MinimumSize+len(inv.l4):], data)
	return b
}

// sendICMPError tells the guest that inv failed with k, as reported by from
// (the peer itself, or a router on the way). It is rate limited by the
// stack's ICMP limiter, like the errors gVisor generates itself. It reports
// whether the error was sent.
func (f *Forwarder) sendICMPError(from netip.Addr, k unreachKind, inv invoking) bool {
	if k == kindNone {
		return false
	}
	if !from.IsValid() || from.Is4() != inv.src.Is4() || from.IsLoopback() || from.IsUnspecified() {
		// A loopback or foreign-family reporter means nothing inside the
		// guest's network; the address the guest talked to stands in.
		from = inv.dst
	}
	if !f.s.AllowICMPMessage() {
		f.c.ICMPErrorsLimited.Add(1)
		return false
	}
	q := inv.quote()
	msg := make([]byte, header.ICMPv4MinimumSize+len(q))
	if inv.src.Is4() {
		typ, code := k.icmpv4()
		h := header.ICMPv4(msg)
		h.SetType(typ)
		h.SetCode(code)
	} else {
		typ, code := k.icmpv6()
		h := header.ICMPv6(msg)
		h.SetType(typ)
		h.SetCode(code)
	}
	copy(msg[header.ICMPv4MinimumSize:], q)
	if err := f.injectICMP(from, inv.src, msg); err != nil {
		f.c.DropSendErrors.Add(1)
		f.log.Debug("icmp error not delivered", "kind", k.String(), "err", err)
		return false
	}
	f.c.ICMPErrors.Add(1)
	f.log.Debug("icmp error sent to guest", "kind", k.String(), "from", from, "to", inv.src, "about", inv.dst)
	return true
}

// gateway returns the gateway address of the family, the source of errors
// vunet raises as the guest's first router.
func (f *Forwarder) gateway(v6 bool) netip.Addr {
	if v6 {
		return f.opts.Gateway6
	}
	return f.opts.Gateway4
}

// synTable remembers the guest SYNs whose host connect is under way: their
// sequence number, so that an ICMP error for a failed connect can quote the
// SYN, and the guest that sent them, whose limits the connection counts
// against. gVisor's forwarder request does not expose the segment, so the
// TCP handler notes both on the way in. It is kept per guest and bounded
// per guest: when a guest's part is full it is cleared, and that guest's
// connects then under way fall back to a RST (another guest's SYN flood
// cannot clear this one's).
type synTable struct {
	mu    sync.Mutex
	parts []map[stack.TransportEndpointID]uint32 // by guest index
	max   int
}

func newSYNTable(guests, max int) *synTable {
	t := &synTable{max: max}
	for range guests {
		t.parts = append(t.parts, make(map[stack.TransportEndpointID]uint32))
	}
	return t
}

// note records pkt's sequence number and guest g if it is a bare SYN from
// a guest; it reports whether it did.
func (t *synTable) note(id stack.TransportEndpointID, pkt *stack.PacketBuffer, g *guestLimits) bool {
	h := header.TCP(pkt.TransportHeader().Slice())
	if g == nil || len(h) < header.TCPMinimumSize || h.Flags()&(header.TCPFlagSyn|header.TCPFlagAck) != header.TCPFlagSyn {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	m := t.parts[g.id]
	if len(m) >= t.max {
		clear(m)
	}
	m[id] = h.SequenceNumber()
	return true
}

// guest returns the index of the guest that sent the SYN of id, or -1 when
// none was noted (no guest sent it, or its part was cleared).
func (t *synTable) guest(id stack.TransportEndpointID) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, m := range t.parts {
		if _, ok := m[id]; ok {
			return i
		}
	}
	return -1
}

// take returns and forgets the sequence number noted for id.
func (t *synTable) take(id stack.TransportEndpointID) (uint32, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, m := range t.parts {
		if seq, ok := m[id]; ok {
			delete(m, id)
			return seq, true
		}
	}
	return 0, false
}

func (t *synTable) forget(id stack.TransportEndpointID) { t.take(id) }
