// Package ringatomic reads and writes the 16-bit ring fields that a virtio
// device and driver share, atomically.
package ringatomic

import (
	"sync/atomic"
	"unsafe"
)

// The ring indices and flags shared with the guest are 16-bit fields that the
// guest reads and writes concurrently. Go has no 16-bit atomics, so these
// helpers operate on the naturally aligned 32-bit word containing the field.
// Callers guarantee that off is 2-byte aligned within a slice whose base is
// 2-byte aligned (ring addresses are validated), so a field never straddles
// two words, and the containing word lies in the same page as the field, so
// it is always mapped. Go's atomics are sequentially consistent, which gives
// the acquire/release (and, for notification decisions, full) ordering the
// virtio memory model asks for.

func word(b []byte, off int) (*uint32, uint) {
	p := unsafe.Pointer(&b[off])
	mis := uintptr(p) & 3
	return (*uint32)(unsafe.Add(p, -int(mis))), uint(mis) * 8
}

// Load16 atomically reads the little-endian uint16 at b[off:].
func Load16(b []byte, off int) uint16 {
	_ = b[off : off+2] // bounds check without a (racy) read
	w, sh := word(b, off)
	return uint16(atomic.LoadUint32(w) >> sh)
}

// Store16 atomically writes v as a little-endian uint16 at b[off:] without
// disturbing the other half of the word, which the guest may own.
func Store16(b []byte, off int, v uint16) {
	_ = b[off : off+2] // bounds check without a (racy) read
	w, sh := word(b, off)
	for {
		old := atomic.LoadUint32(w)
		nw := old&^(0xffff<<sh) | uint32(v)<<sh
		if atomic.CompareAndSwapUint32(w, old, nw) {
			return
		}
	}
}

// Or8 atomically sets the bits of v in the byte b[off] and returns the
// byte's previous value. The dirty-page log is a bitmap that the frontend
// reads and clears concurrently (QEMU exchanges whole words with zero), so
// a plain read-modify-write could lose its update or ours. The byte's
// containing aligned word must lie in the same mapping as b (it does for
// memory mapped from a file: mappings start on a page boundary).
func Or8(b []byte, off int, v uint8) uint8 {
	_ = b[off] // bounds check without a (racy) read
	w, sh := word(b, off)
	return uint8(atomic.OrUint32(w, uint32(v)<<sh) >> sh)
}

// Load8 atomically reads the byte b[off].
func Load8(b []byte, off int) uint8 {
	_ = b[off]
	w, sh := word(b, off)
	return uint8(atomic.LoadUint32(w) >> sh)
}
