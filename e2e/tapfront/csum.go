package tapfront

import "encoding/binary"

// fillChecksum computes the TCP or UDP checksum of an Ethernet frame
// carrying IPv4 or IPv6 (no extension headers, not a fragment) in place.
// A virtio-net driver trusts VIRTIO_NET_HDR_F_DATA_VALID, so a backend
// may leave the checksum out of such frames (passt does for TCP); the tap
// verifies every checksum, so the frontend fills it in first
// (Options.FillDataValid). Other frames are left alone.
func fillChecksum(f []byte) {
	if len(f) < 14 {
		return
	}
	var (
		proto    byte
		l4       []byte
		pseudo   uint32
		ethType  = binary.BigEndian.Uint16(f[12:])
		ip       = f[14:]
		addSlice = func(sum uint32, b []byte) uint32 {
			for len(b) >= 2 {
				sum += uint32(binary.BigEndian.Uint16(b))
				b = b[2:]
			}
			if len(b) == 1 {
				sum += uint32(b[0]) << 8
			}
			return sum
		}
	)
	switch ethType {
	case 0x0800:
		if len(ip) < 20 || ip[0]>>4 != 4 {
			return
		}
		ihl := int(ip[0]&0xf) * 4
		total := int(binary.BigEndian.Uint16(ip[2:]))
		if ihl < 20 || total < ihl || total > len(ip) || binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 {
			return // malformed, or a fragment
		}
		proto, l4 = ip[9], ip[ihl:total]
		pseudo = addSlice(0, ip[12:20])
	case 0x86dd:
		if len(ip) < 40 || ip[0]>>4 != 6 {
			return
		}
		plen := int(binary.BigEndian.Uint16(ip[4:]))
		if 40+plen > len(ip) {
			return
		}
		proto, l4 = ip[6], ip[40:40+plen]
		pseudo = addSlice(0, ip[8:40])
	default:
		return
	}
	var off int
	switch proto {
	case 6:
		off = 16
		if len(l4) < 20 {
			return
		}
	case 17:
		off = 6
		if len(l4) < 8 {
			return
		}
	default:
		return
	}
	pseudo += uint32(proto) + uint32(len(l4))
	l4[off], l4[off+1] = 0, 0
	sum := addSlice(pseudo, l4)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	c := ^uint16(sum)
	if c == 0 && proto == 17 {
		c = 0xffff // 0 means "no checksum" for UDP
	}
	binary.BigEndian.PutUint16(l4[off:], c)
}
