package endpoint

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// gsoFrame builds an Ethernet + IP + TCP frame with a CHECKSUM_PARTIAL TCP
// checksum (pseudo-header sum only), as the stack hands a GSO packet.
func gsoFrame(v6 bool, payload []byte, flags header.TCPFlags) ([]byte, gsoLayout) {
	ipLen := header.IPv4MinimumSize
	if v6 {
		ipLen = header.IPv6MinimumSize
	}
	l4 := header.EthernetMinimumSize + ipLen
	f := make([]byte, l4+header.TCPMinimumSize+len(payload))
	copy(f[l4+header.TCPMinimumSize:], payload)
	var src, dst tcpip.Address
	proto := header.IPv4ProtocolNumber
	if v6 {
		proto = header.IPv6ProtocolNumber
		src = tcpip.AddrFrom16Slice([]byte{0xfd, 0, 14: 0, 15: 2})
		dst = tcpip.AddrFrom16Slice([]byte{0xfd, 0, 14: 0, 15: 0x15})
		header.IPv6(f[14:]).Encode(&header.IPv6Fields{PayloadLength: uint16(len(f) - l4), TransportProtocol: header.TCPProtocolNumber, HopLimit: 64, SrcAddr: src, DstAddr: dst})
	} else {
		src = tcpip.AddrFrom4([4]byte{10, 0, 2, 2})
		dst = tcpip.AddrFrom4([4]byte{10, 0, 2, 15})
		ip := header.IPv4(f[14:])
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(f) - 14), ID: 100, TTL: 64, Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	header.Ethernet(f).Encode(&header.EthernetFields{SrcAddr: gwMAC, DstAddr: guestMAC, Type: proto})
	tcp := header.TCP(f[l4:])
	tcp.Encode(&header.TCPFields{SrcPort: 80, DstPort: 4000, SeqNum: 1000, AckNum: 5, DataOffset: header.TCPMinimumSize, Flags: flags, WindowSize: 1000})
	tcp.SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(len(f)-l4)))
	return f, gsoLayout{l4Start: l4, hdrLen: l4 + header.TCPMinimumSize, payload: len(payload), v6: v6}
}

func tcpValid(t *testing.T, seg []byte, l gsoLayout) header.TCP {
	t.Helper()
	var src, dst tcpip.Address
	if l.v6 {
		ip := header.IPv6(seg[14:])
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
		if int(ip.PayloadLength()) != len(seg)-l.l4Start {
			t.Fatalf("IPv6 payload length %d, want %d", ip.PayloadLength(), len(seg)-l.l4Start)
		}
	} else {
		ip := header.IPv4(seg[14:])
		if !ip.IsChecksumValid() || int(ip.TotalLength()) != len(seg)-14 {
			t.Fatalf("IPv4 header: checksum valid %v, total length %d for %d", ip.IsChecksumValid(), ip.TotalLength(), len(seg)-14)
		}
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
	}
	tcp := header.TCP(seg[l.l4Start:])
	data := seg[l.hdrLen:]
	if !tcp.IsChecksumValid(src, dst, checksum.Checksum(data, 0), uint16(len(data))) {
		t.Fatal("TCP checksum invalid")
	}
	return tcp
}

func TestSegment(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		payload := make([]byte, 4500)
		for i := range payload {
			payload[i] = byte(i*31 + 7)
		}
		frame, l := gsoFrame(v6, payload, header.TCPFlagAck|header.TCPFlagPsh|header.TCPFlagFin|header.TCPFlagCwr)
		var got []byte
		var segs int
		segment(frame, l, 1000, nil, func(seg []byte) bool {
			tcp := tcpValid(t, seg, l)
			if want := uint32(1000 + segs*1000); tcp.SequenceNumber() != want {
				t.Fatalf("segment %d seq %d want %d", segs, tcp.SequenceNumber(), want)
			}
			last := len(seg)-l.hdrLen < 1000
			fl := tcp.Flags()
			if last != (fl&header.TCPFlagFin != 0) || last != (fl&header.TCPFlagPsh != 0) || (segs == 0) != (fl&header.TCPFlagCwr != 0) {
				t.Fatalf("segment %d flags %s", segs, fl)
			}
			if !v6 && header.IPv4(seg[14:]).ID() != uint16(100+segs) {
				t.Fatalf("segment %d IP ID %d", segs, header.IPv4(seg[14:]).ID())
			}
			got = append(got, seg[l.hdrLen:]...)
			segs++
			return true
		})
		if segs != 5 || !bytes.Equal(got, payload) {
			t.Fatalf("v6=%v: %d segments, payload equal %v", v6, segs, bytes.Equal(got, payload))
		}
	}
}

func TestFinishChecksum(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		frame, l := gsoFrame(v6, []byte("odd-length payload!"), header.TCPFlagAck)
		// Split the frame at awkward places: the sum must not depend on it.
		parts := [][]byte{frame[:13], frame[13 : l.l4Start+3], frame[l.l4Start+3 : l.l4Start+17], frame[l.l4Start+17:]}
		c := finishChecksum(parts, l.l4Start)
		header.TCP(frame[l.l4Start:]).SetChecksum(c)
		tcpValid(t, frame, l)
	}
}
