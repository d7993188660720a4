package iov

import (
	"bytes"
	"testing"
)

// compositions calls f with every way of splitting n bytes into non-empty
// consecutive segments (2^(n-1) of them), including all 1-byte segments.
func compositions(n int, f func(sizes []int)) {
	if n == 0 {
		f(nil)
		return
	}
	for mask := 0; mask < 1<<(n-1); mask++ {
		var sizes []int
		cur := 1
		for i := 0; i < n-1; i++ {
			if mask&(1<<i) != 0 {
				sizes = append(sizes, cur)
				cur = 1
			} else {
				cur++
			}
		}
		f(append(sizes, cur))
	}
}

// split carves a fresh copy of flat into segments of the given sizes.
func split(flat []byte, sizes []int) [][]byte {
	b := append([]byte(nil), flat...)
	v := make([][]byte, 0, len(sizes))
	for _, s := range sizes {
		v = append(v, b[:s:s])
		b = b[s:]
	}
	return v
}

func join(v [][]byte) []byte { return bytes.Join(v, nil) }

func pattern(n int, base byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = base + byte(i)
	}
	return b
}

func TestFillAllCompositions(t *testing.T) {
	const n = 8
	flat := pattern(n, 1)
	compositions(n, func(sizes []int) {
		for off := 0; off <= n+1; off++ {
			for cnt := 0; cnt <= n+1; cnt++ {
				v := split(flat, sizes)
				got := Fill(v, off, 0xee, cnt)
				want := append([]byte(nil), flat...)
				wantN := 0
				for i := off; i < n && i < off+cnt; i++ {
					want[i] = 0xee
					wantN++
				}
				if got != wantN || !bytes.Equal(join(v), want) {
					t.Fatalf("sizes %v off %d n %d: got %d %x want %d %x", sizes, off, cnt, got, join(v), wantN, want)
				}
			}
		}
	})
}

func TestCopyAllCompositions(t *testing.T) {
	const n = 6
	src := pattern(n, 0x10)
	dst := pattern(n, 0x80)
	compositions(n, func(ss []int) {
		compositions(n, func(ds []int) {
			for soff := 0; soff <= n; soff++ {
				for doff := 0; doff <= n; doff++ {
					for cnt := 0; cnt <= n+1; cnt++ {
						sv, dv := split(src, ss), split(dst, ds)
						got := Copy(dv, doff, sv, soff, cnt)
						want := append([]byte(nil), dst...)
						wantN := copy(want[doff:], src[soff:])
						if wantN > cnt {
							want = append([]byte(nil), dst...)
							wantN = copy(want[doff:doff+cnt], src[soff:])
						}
						if got != wantN || !bytes.Equal(join(dv), want) || !bytes.Equal(join(sv), src) {
							t.Fatalf("src %v dst %v soff %d doff %d n %d: got %d %x want %d %x",
								ss, ds, soff, doff, cnt, got, join(dv), wantN, want)
						}
					}
				}
			}
		})
	})
}

func TestTailAllCompositions(t *testing.T) {
	const n = 8
	flat := pattern(n, 1)
	compositions(n, func(sizes []int) {
		for off := 0; off <= n; off++ {
			for hl := 0; hl <= n-off; hl++ {
				v := split(flat, sizes)
				tl := Tail{V: v}
				if !tl.Skip(off) {
					t.Fatalf("skip %d failed", off)
				}
				scratch := make([]byte, n)
				got := tl.Remove(hl, scratch)
				if !bytes.Equal(got, flat[off:off+hl]) {
					t.Fatalf("sizes %v off %d len %d: got %x", sizes, off, hl, got)
				}
				if tl.Size() != n-off-hl {
					t.Fatalf("size after remove %d", tl.Size())
				}
				// Writing a header back through a fresh cursor lands at the same place.
				w := Tail{V: v, Off: off}
				hdr := pattern(hl, 0xa0)
				if !w.Write(hdr) {
					t.Fatal("write failed")
				}
				want := append([]byte(nil), flat...)
				copy(want[off:], hdr)
				if !bytes.Equal(join(v), want) {
					t.Fatalf("write: got %x want %x", join(v), want)
				}
			}
			tl := Tail{V: split(flat, sizes), Off: off}
			if tl.Peek(n-off+1, make([]byte, n+1)) != nil || tl.Skip(n-off+1) || tl.Write(make([]byte, n-off+1)) {
				t.Fatalf("cursor went past the end")
			}
		}
	})
}

func TestTruncate(t *testing.T) {
	const n = 7
	flat := pattern(n, 1)
	compositions(n, func(sizes []int) {
		for k := 0; k <= n+1; k++ {
			v := Truncate(split(flat, sizes), k)
			want := flat[:min(k, n)]
			if !bytes.Equal(join(v), want) || Size(v) != len(want) {
				t.Fatalf("sizes %v k %d: got %x", sizes, k, join(v))
			}
		}
	})
}

func FuzzCopy(f *testing.F) {
	f.Add([]byte{3, 1, 2}, []byte{1, 1, 4}, 1, 2, 5)
	f.Fuzz(func(t *testing.T, ss, ds []byte, soff, doff, n int) {
		mk := func(sz []byte, base byte) ([][]byte, []byte) {
			var v [][]byte
			var flat []byte
			for i, s := range sz {
				if i == 16 {
					break
				}
				seg := pattern(int(s%9), base+byte(len(flat)))
				v = append(v, seg)
				flat = append(flat, seg...)
			}
			return v, flat
		}
		sv, sflat := mk(ss, 0)
		dv, dflat := mk(ds, 0x80)
		got := Copy(dv, doff, sv, soff, n)
		want := append([]byte(nil), dflat...)
		wantN := 0
		if soff >= 0 && doff >= 0 && n > 0 && soff <= len(sflat) && doff <= len(dflat) {
			end := doff + min(n, len(dflat)-doff)
			wantN = copy(want[doff:end], sflat[soff:])
		}
		if got != wantN || !bytes.Equal(join(dv), want) {
			t.Fatalf("got %d %x want %d %x", got, join(dv), wantN, want)
		}
	})
}

func BenchmarkCopy64K(b *testing.B) {
	src := [][]byte{make([]byte, 12), make([]byte, 65536)}
	dst := make([][]byte, 16)
	for i := range dst {
		dst[i] = make([]byte, 4096+12)
	}
	b.SetBytes(65536)
	for b.Loop() {
		Copy(dst, 12, src, 12, 65536)
	}
}
