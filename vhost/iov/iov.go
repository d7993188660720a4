// Package iov provides scatter-gather helpers over lists of byte slices.
//
// A virtqueue element is a chain of descriptors, so one frame can span many
// iovec entries: iPXE puts the 12-byte virtio-net header and the frame in
// separate buffers, and with mergeable RX buffers one frame spans several
// elements. Every helper here therefore takes explicit offsets and lengths
// and works across segment boundaries; none assumes that a header, or any
// other structure, lies in a single segment.
package iov

// Size returns the total number of bytes in v.
func Size(v [][]byte) int {
	n := 0
	for _, s := range v {
		n += len(s)
	}
	return n
}

// locate returns the index of the segment containing byte off of v and the
// offset within that segment. If off is at or past the end of v, it returns
// len(v) and the number of bytes off lies beyond the end.
func locate(v [][]byte, off int) (int, int) {
	for i, s := range v {
		if off < len(s) {
			return i, off
		}
		off -= len(s)
	}
	return len(v), off
}

// Fill sets n bytes of v, starting at byte offset off, to b. It stops at the
// end of v and returns the number of bytes set.
func Fill(v [][]byte, off int, b byte, n int) int {
	if off < 0 || n <= 0 {
		return 0
	}
	i, o := locate(v, off)
	done := 0
	for ; i < len(v) && done < n; i, o = i+1, 0 {
		seg := v[i][o:]
		if rem := n - done; len(seg) > rem {
			seg = seg[:rem]
		}
		for j := range seg {
			seg[j] = b
		}
		done += len(seg)
	}
	return done
}

// Copy copies up to n bytes from src starting at byte offset soff into dst
// starting at byte offset doff, walking both lists at once and copying in
// chunks bounded by the smaller of the two current segments. It returns the
// number of bytes copied, which is less than n if either list ends first.
func Copy(dst [][]byte, doff int, src [][]byte, soff int, n int) int {
	if doff < 0 || soff < 0 || n <= 0 {
		return 0
	}
	di, do := locate(dst, doff)
	si, so := locate(src, soff)
	done := 0
	for di < len(dst) && si < len(src) && done < n {
		d := dst[di][do:]
		if rem := n - done; len(d) > rem {
			d = d[:rem]
		}
		c := copy(d, src[si][so:])
		done += c
		do += c
		so += c
		if do == len(dst[di]) {
			di, do = di+1, 0
		}
		if so == len(src[si]) {
			si, so = si+1, 0
		}
	}
	return done
}

// CopyFrom copies b into v starting at byte offset off and returns the
// number of bytes copied.
func CopyFrom(v [][]byte, off int, b []byte) int {
	return Copy(v, off, [][]byte{b}, 0, len(b))
}

// CopyTo copies bytes of v starting at byte offset off into b and returns the
// number of bytes copied.
func CopyTo(b []byte, v [][]byte, off int) int {
	return Copy([][]byte{b}, 0, v, off, len(b))
}

// Truncate returns the prefix of v holding at most n bytes. It reslices the
// last segment kept and reuses v's backing array.
func Truncate(v [][]byte, n int) [][]byte {
	if n <= 0 {
		return v[:0]
	}
	i, o := locate(v, n)
	if i == len(v) {
		return v
	}
	if o == 0 {
		return v[:i]
	}
	v[i] = v[i][:o]
	return v[:i+1]
}
