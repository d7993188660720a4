package endpoint

import "encoding/binary"

// Virtio-net header (virtio 1.2, 5.1.6). gVisor's header.VirtioNetHeader is
// the 10-byte legacy layout read big-endian, so we keep our own codec: the
// header is little-endian for VERSION_1 devices and guest-native (x86 and
// arm64 are little-endian) for legacy ones.
const (
	hdrLenLegacy = 10 // without num_buffers
	hdrLenMrg    = 12 // VERSION_1 or MRG_RXBUF

	hdrFNeedsCsum = 1
	hdrFDataValid = 2

	gsoNone  = 0
	gsoTCPv4 = 1
	gsoUDP   = 3
	gsoTCPv6 = 4
	gsoUDPL4 = 5
	gsoECN   = 0x80
)

// vnetHdr is a decoded virtio-net header.
type vnetHdr struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16
	GSOSize    uint16
	CsumStart  uint16
	CsumOffset uint16
	NumBuffers uint16
}

func decodeHdr(b []byte) vnetHdr {
	h := vnetHdr{
		Flags: b[0], GSOType: b[1],
		HdrLen:     binary.LittleEndian.Uint16(b[2:]),
		GSOSize:    binary.LittleEndian.Uint16(b[4:]),
		CsumStart:  binary.LittleEndian.Uint16(b[6:]),
		CsumOffset: binary.LittleEndian.Uint16(b[8:]),
	}
	if len(b) >= hdrLenMrg {
		h.NumBuffers = binary.LittleEndian.Uint16(b[10:])
	}
	return h
}

// encode writes h into b, which is 10 or 12 bytes long.
func (h *vnetHdr) encode(b []byte) {
	b[0], b[1] = h.Flags, h.GSOType
	binary.LittleEndian.PutUint16(b[2:], h.HdrLen)
	binary.LittleEndian.PutUint16(b[4:], h.GSOSize)
	binary.LittleEndian.PutUint16(b[6:], h.CsumStart)
	binary.LittleEndian.PutUint16(b[8:], h.CsumOffset)
	if len(b) >= hdrLenMrg {
		binary.LittleEndian.PutUint16(b[10:], h.NumBuffers)
	}
}
