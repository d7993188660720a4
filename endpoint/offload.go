package endpoint

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// gsoMaxSize bounds the TCP segments the stack hands us with host GSO: a
// whole frame (Ethernet + IP + TCP + data) must stay within 64 KiB.
const gsoMaxSize = 65535 - header.EthernetMinimumSize - 128

var _ stack.GSOEndpoint = (*Endpoint)(nil)

// SupportedGSO implements stack.GSOEndpoint.SupportedGSO. The stack asks
// when a TCP connection is set up, which happens after the guest has
// negotiated features: 64 KiB segments with partial checksums are handed to
// us only when the guest can take them (GUEST_CSUM and a GUEST_TSO bit).
// Everything else gets MTU-sized frames with full checksums, so iPXE,
// firmware and guests with offloads switched off see ordinary frames.
func (e *Endpoint) SupportedGSO() stack.SupportedGSO {
	if e.opts.NoOffloads || !e.has(FeatureGuestCsum) || !(e.has(FeatureGuestTSO4) || e.has(FeatureGuestTSO6)) {
		return stack.GSONotSupported
	}
	return stack.HostGSOSupported
}

// GSOMaxSize implements stack.GSOEndpoint.GSOMaxSize.
func (e *Endpoint) GSOMaxSize() uint32 { return gsoMaxSize }

// txPlan says how one stack packet becomes guest frames.
type txPlan int

const (
	planPlain    txPlan = iota // full checksums already in place
	planOffload                // hand the partial checksum / GSO to the guest
	planComplete               // finish the partial checksum ourselves
	planSegment                // segment in software (guest lacks TSO for it)
)

// gsoLayout is where the headers of a TCP GSO packet are, relative to the
// start of the Ethernet frame.
type gsoLayout struct {
	l4Start, hdrLen, payload int
	v6                       bool
}

func layoutOf(pkt *stack.PacketBuffer) gsoLayout {
	l4 := len(pkt.LinkHeader().Slice()) + len(pkt.NetworkHeader().Slice())
	th := len(pkt.TransportHeader().Slice())
	return gsoLayout{
		l4Start: l4, hdrLen: l4 + th, payload: pkt.Size() - l4 - th,
		v6: pkt.GSOOptions.Type == stack.GSOTCPv6,
	}
}

// plan decides how to deliver pkt and fills h for the offload case.
func (e *Endpoint) plan(pkt *stack.PacketBuffer, h *vnetHdr) (txPlan, gsoLayout) {
	g := pkt.GSOOptions
	if !g.NeedsCsum || (g.Type != stack.GSOTCPv4 && g.Type != stack.GSOTCPv6) {
		return planPlain, gsoLayout{}
	}
	l := layoutOf(pkt)
	big := l.payload > int(g.MSS)
	tso := (!l.v6 && e.has(FeatureGuestTSO4)) || (l.v6 && e.has(FeatureGuestTSO6))
	switch {
	case e.has(FeatureGuestCsum) && (!big || tso):
		h.Flags = hdrFNeedsCsum
		h.CsumStart = uint16(l.l4Start)
		h.CsumOffset = header.TCPChecksumOffset
		if big {
			h.GSOType = gsoTCPv4
			if l.v6 {
				h.GSOType = gsoTCPv6
			}
			h.GSOSize = g.MSS
			h.HdrLen = uint16(l.hdrLen)
		}
		return planOffload, l
	case big:
		return planSegment, l
	}
	return planComplete, l
}

// finishChecksum returns the full TCP checksum of a frame whose checksum
// field holds the pseudo-header sum (CHECKSUM_PARTIAL).
func finishChecksum(frame [][]byte, l4Start int) uint16 {
	var c checksum.Checksumer
	off := 0
	for _, s := range frame {
		if off+len(s) > l4Start {
			from := max(l4Start-off, 0)
			c.Add(s[from:])
		}
		off += len(s)
	}
	return ^c.Checksum()
}

// segment splits a TCP GSO frame (flattened into frame) into MSS-sized
// frames with full checksums, calling emit for each. Headers are copied
// from the original; IP lengths and IDs, TCP sequence numbers and flags
// (FIN and PSH only on the last segment, CWR only on the first) are fixed
// up. emit's slice is reused for the next segment.
func segment(frame []byte, l gsoLayout, mss int, buf []byte, emit func([]byte) bool) {
	hdr := frame[:l.hdrLen]
	data := frame[l.hdrLen:]
	l3 := header.EthernetMinimumSize
	seq0 := header.TCP(frame[l.l4Start:]).SequenceNumber()
	flags := header.TCP(frame[l.l4Start:]).Flags()
	for i, off := 0, 0; off < len(data); i, off = i+1, off+mss {
		n := min(mss, len(data)-off)
		seg := append(append(buf[:0], hdr...), data[off:off+n]...)
		if l.v6 {
			header.IPv6(seg[l3:]).SetPayloadLength(uint16(len(seg) - l3 - header.IPv6MinimumSize))
		} else {
			ip := header.IPv4(seg[l3:])
			ip.SetTotalLength(uint16(len(seg) - l3))
			ip.SetID(ip.ID() + uint16(i))
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
		}
		tcp := header.TCP(seg[l.l4Start:])
		tcp.SetSequenceNumber(seq0 + uint32(off))
		f := flags
		if off+n < len(data) {
			f &^= header.TCPFlagFin | header.TCPFlagPsh
		}
		if i > 0 {
			f &^= header.TCPFlagCwr
		}
		tcp.SetFlags(uint8(f))
		// Recompute the pseudo-header sum for this segment's length:
		// the one in the GSO frame covered the whole payload.
		tcp.SetChecksum(0)
		var src, dst []byte
		var proto uint16 = uint16(header.TCPProtocolNumber)
		if l.v6 {
			ip := header.IPv6(seg[l3:])
			src, dst = ip.SourceAddressSlice(), ip.DestinationAddressSlice()
		} else {
			ip := header.IPv4(seg[l3:])
			src, dst = ip.SourceAddressSlice(), ip.DestinationAddressSlice()
		}
		tcpLen := len(seg) - l.l4Start
		ps := checksum.Checksum(src, 0)
		ps = checksum.Checksum(dst, ps)
		var tail [4]byte
		binary.BigEndian.PutUint16(tail[0:], proto)
		binary.BigEndian.PutUint16(tail[2:], uint16(tcpLen))
		ps = checksum.Checksum(tail[:], ps)
		tcp.SetChecksum(^checksum.Checksum(seg[l.l4Start:], ps))
		if !emit(seg) {
			return
		}
	}
}
