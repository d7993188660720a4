package ra

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// NDP option types (RFC 4861, 8106).
const (
	optSourceLinkAddr = 1
	optPrefixInfo     = 3
	optMTU            = 5
	optRDNSS          = 25
	optDNSSL          = 31
)

// ICMPv6 RA flags.
const (
	flagManaged = 0x80
	flagOther   = 0x40
)

// raParams is what goes into a router advertisement.
type raParams struct {
	src            netip.Addr // link-local
	srcMAC         tcpip.LinkAddress
	prefix         netip.Prefix
	routerLifetime time.Duration
	validLifetime  time.Duration
	prefLifetime   time.Duration
	mtu            int
	dns            []netip.Addr
	search         []string
	dnsLifetime    time.Duration
	managed        bool
}

func seconds(d time.Duration) uint32 {
	s := d / time.Second
	if s > 0xffffffff {
		return 0xffffffff
	}
	return uint32(s)
}

// buildRA returns the ICMPv6 router advertisement body (type 134 onward,
// checksum zero) for p.
func buildRA(p *raParams) []byte {
	b := make([]byte, 16, 256)
	b[0] = byte(header.ICMPv6RouterAdvert)
	b[4] = 64 // current hop limit suggested to hosts
	b[5] = flagOther
	if p.managed {
		b[5] |= flagManaged
	}
	rl := p.routerLifetime / time.Second
	if rl > 9000 {
		rl = 9000 // RFC 4861 6.2.1 maximum
	}
	binary.BigEndian.PutUint16(b[6:], uint16(rl))
	// Reachable time and retrans timer (8..16) stay 0: unspecified.

	if len(p.srcMAC) == 6 {
		b = append(b, optSourceLinkAddr, 1)
		b = append(b, p.srcMAC...)
	}
	if p.mtu != 0 {
		o := make([]byte, 8)
		o[0], o[1] = optMTU, 1
		binary.BigEndian.PutUint32(o[4:], uint32(p.mtu))
		b = append(b, o...)
	}
	{
		o := make([]byte, 32)
		o[0], o[1] = optPrefixInfo, 4
		o[2] = byte(p.prefix.Bits())
		o[3] = 0xc0 // L (on-link) and A (autonomous address configuration)
		binary.BigEndian.PutUint32(o[4:], seconds(p.validLifetime))
		binary.BigEndian.PutUint32(o[8:], seconds(p.prefLifetime))
		a := p.prefix.Masked().Addr().As16()
		copy(o[16:], a[:])
		b = append(b, o...)
	}
	if len(p.dns) > 0 {
		o := make([]byte, 8, 8+16*len(p.dns))
		o[0], o[1] = optRDNSS, byte(1+2*len(p.dns))
		binary.BigEndian.PutUint32(o[4:], seconds(p.dnsLifetime))
		for _, d := range p.dns {
			a := d.As16()
			o = append(o, a[:]...)
		}
		b = append(b, o...)
	}
	if len(p.search) > 0 {
		o := make([]byte, 8)
		o[0] = optDNSSL
		binary.BigEndian.PutUint32(o[4:], seconds(p.dnsLifetime))
		for _, d := range p.search {
			o = append(o, encodeName(d)...)
		}
		for len(o)%8 != 0 {
			o = append(o, 0)
		}
		o[1] = byte(len(o) / 8)
		b = append(b, o...)
	}
	return b
}

// encodeName encodes a validated domain name in DNS wire format,
// uncompressed, as RFC 8106 requires.
func encodeName(d string) []byte {
	var out []byte
	for _, l := range strings.Split(strings.TrimSuffix(d, "."), ".") {
		out = append(out, byte(len(l)))
		out = append(out, l...)
	}
	return append(out, 0)
}

// ipv6Packet wraps an ICMPv6 body into an IPv6 packet from src to dst with
// hop limit 255 (required for NDP) and fills in the ICMPv6 checksum.
func ipv6Packet(src, dst netip.Addr, icmp []byte) []byte {
	pkt := make([]byte, header.IPv6MinimumSize+len(icmp))
	ip := header.IPv6(pkt)
	ip.Encode(&header.IPv6Fields{
		PayloadLength:     uint16(len(icmp)),
		TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit:          header.NDPHopLimit,
		SrcAddr:           tcpip.AddrFrom16(src.As16()),
		DstAddr:           tcpip.AddrFrom16(dst.As16()),
	})
	body := header.ICMPv6(pkt[header.IPv6MinimumSize:])
	copy(body, icmp)
	body.SetChecksum(0)
	body.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
		Header: body,
		Src:    ip.SourceAddress(),
		Dst:    ip.DestinationAddress(),
		// The whole message is in Header; there is no separate payload.
	}))
	return pkt
}
