package tapfront

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// frame builds an Ethernet frame with a correct transport checksum,
// computed by gVisor's header package.
func csumFrame(t *testing.T, v6 bool, proto tcpip.TransportProtocolNumber, payload []byte) []byte {
	t.Helper()
	l4len := header.TCPMinimumSize
	if proto == header.UDPProtocolNumber {
		l4len = header.UDPMinimumSize
	}
	ipLen := header.IPv4MinimumSize
	if v6 {
		ipLen = header.IPv6MinimumSize
	}
	f := make([]byte, header.EthernetMinimumSize+ipLen+l4len+len(payload))
	eth := header.Ethernet(f)
	src4, dst4 := tcpip.AddrFrom4([4]byte{10, 0, 2, 2}), tcpip.AddrFrom4([4]byte{10, 0, 2, 15})
	src6, dst6 := tcpip.AddrFrom16([16]byte{0: 0xfd, 15: 2}), tcpip.AddrFrom16([16]byte{0: 0xfd, 15: 0x15})
	src, dst := src4, dst4
	ethType := header.IPv4ProtocolNumber
	if v6 {
		src, dst, ethType = src6, dst6, header.IPv6ProtocolNumber
	}
	eth.Encode(&header.EthernetFields{Type: ethType})
	ip := f[header.EthernetMinimumSize:]
	if v6 {
		header.IPv6(ip).Encode(&header.IPv6Fields{PayloadLength: uint16(l4len + len(payload)), TransportProtocol: proto, HopLimit: 64, SrcAddr: src, DstAddr: dst})
	} else {
		h := header.IPv4(ip)
		h.Encode(&header.IPv4Fields{TotalLength: uint16(ipLen + l4len + len(payload)), TTL: 64, Protocol: uint8(proto), SrcAddr: src, DstAddr: dst})
		h.SetChecksum(^h.CalculateChecksum())
	}
	l4 := ip[ipLen:]
	copy(l4[l4len:], payload)
	total := uint16(l4len + len(payload))
	xsum := header.PseudoHeaderChecksum(proto, src, dst, total)
	if proto == header.TCPProtocolNumber {
		tcp := header.TCP(l4)
		tcp.Encode(&header.TCPFields{SrcPort: 80, DstPort: 40000, SeqNum: 1, AckNum: 2, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagAck | header.TCPFlagPsh, WindowSize: 1000})
		tcp.SetChecksum(^checksum.Checksum(l4, xsum))
	} else {
		udp := header.UDP(l4)
		udp.Encode(&header.UDPFields{SrcPort: 53, DstPort: 40000, Length: total})
		udp.SetChecksum(^checksum.Checksum(l4, xsum))
	}
	return f
}

// TestFillChecksum: the checksum a backend left out (zeroed, or garbage)
// is filled in exactly as gVisor computes it, for TCP and UDP over IPv4
// and IPv6, odd payload lengths included; other frames are untouched.
func TestFillChecksum(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, proto := range []tcpip.TransportProtocolNumber{header.TCPProtocolNumber, header.UDPProtocolNumber} {
			for _, payload := range [][]byte{nil, []byte("odd"), bytes.Repeat([]byte{0xff, 0x01}, 700)} {
				want := csumFrame(t, v6, proto, payload)
				got := bytes.Clone(want)
				off := len(got) - len(payload) - 2 // UDP checksum: bytes 6-7 of 8
				if proto == header.TCPProtocolNumber {
					off = len(got) - len(payload) - 4 // TCP checksum: bytes 16-17 of 20
				}
				got[off], got[off+1] = 0xde, 0xad
				fillChecksum(got)
				if !bytes.Equal(got, want) {
					t.Errorf("v6=%v proto=%d payload %d bytes: checksum %x, want %x", v6, proto, len(payload), got[off:off+2], want[off:off+2])
				}
			}
		}
	}
	arp := make([]byte, 42)
	arp[12], arp[13] = 0x08, 0x06
	before := bytes.Clone(arp)
	fillChecksum(arp)
	if !bytes.Equal(arp, before) {
		t.Error("an ARP frame was changed")
	}
}
