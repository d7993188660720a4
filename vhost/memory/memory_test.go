package memory

import (
	"bytes"
	"errors"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

func table(t *testing.T) (*Table, []byte, []byte) {
	t.Helper()
	a, b := make([]byte, 0x1000), make([]byte, 0x2000)
	for i := range a {
		a[i] = 1
	}
	for i := range b {
		b[i] = 2
	}
	var tb Table
	// Two regions, adjacent in guest-physical space but not in ours.
	if err := tb.Add(NewRegion(0x10000, 0x7000000, a)); err != nil {
		t.Fatal(err)
	}
	if err := tb.Add(NewRegion(0x11000, 0x9000000, b)); err != nil {
		t.Fatal(err)
	}
	return &tb, a, b
}

func TestTranslateAcrossRegions(t *testing.T) {
	tb, _, _ := table(t)
	v, err := tb.Translate(nil, 0x10ff0, 0x20, 8)
	if err != nil || len(v) != 2 || len(v[0]) != 0x10 || len(v[1]) != 0x10 {
		t.Fatalf("%v %v", v, err)
	}
	if !bytes.Equal(v[0], bytes.Repeat([]byte{1}, 16)) || !bytes.Equal(v[1], bytes.Repeat([]byte{2}, 16)) {
		t.Fatal("wrong bytes")
	}
	// A slice handed out cannot be grown into the next byte of the region.
	if cap(v[0]) != len(v[0]) {
		t.Fatal("slice capacity leaks memory beyond the range")
	}
	if _, err := tb.Translate(nil, 0x10ff0, 0x20, 1); !errors.Is(err, ErrTooManyIov) {
		t.Fatalf("iov limit: %v", err)
	}
	if _, err := tb.Slice(0x10ff0, 0x20); !errors.Is(err, ErrNotContig) {
		t.Fatalf("slice across regions: %v", err)
	}
}

func TestTranslateHostile(t *testing.T) {
	tb, _, _ := table(t)
	for _, c := range []struct {
		addr, n uint64
		want    error
	}{
		{0, 1, ErrNoRegion},
		{0x13000, 1, ErrNoRegion},
		{0x12fff, 2, ErrNoRegion},
		{^uint64(0) - 1, 4, ErrOverflow},
		{0x10000, ^uint64(0), ErrOverflow},
	} {
		if _, err := tb.Translate(nil, c.addr, c.n, 64); !errors.Is(err, c.want) {
			t.Errorf("%#x+%#x: %v, want %v", c.addr, c.n, err, c.want)
		}
	}
	if v, err := tb.Translate(nil, 0x12fff, 1, 64); err != nil || len(v) != 1 {
		t.Errorf("last byte: %v", err)
	}
	if v, err := tb.Translate(nil, 0, 0, 64); err != nil || len(v) != 0 {
		t.Errorf("empty range: %v %v", v, err)
	}
}

func TestAddRemove(t *testing.T) {
	tb, _, _ := table(t)
	for _, r := range []Region{
		NewRegion(0x10800, 0x1, make([]byte, 0x1000)),       // guest overlap
		NewRegion(0x50000, 0x7000800, make([]byte, 0x1000)), // user overlap
		NewRegion(0x60000, 0x1, nil),                        // empty
		NewRegion(^uint64(0)-10, 0x1, make([]byte, 0x1000)), // wraps
	} {
		if err := tb.Add(r); err == nil {
			t.Errorf("region %#x accepted", r.GuestAddr)
		}
	}
	if g, err := tb.UserToGuest(0x9000010); err != nil || g != 0x11010 {
		t.Fatalf("user→guest %#x %v", g, err)
	}
	if err := tb.Remove(0x10000, 0x7000000, 0x1000); err != nil {
		t.Fatal(err)
	}
	if err := tb.Remove(0x10000, 0x7000000, 0x1000); !errors.Is(err, ErrNotFound) {
		t.Fatalf("double remove: %v", err)
	}
	if _, err := tb.UserToGuest(0x7000000); !errors.Is(err, ErrNoRegion) {
		t.Fatalf("removed region still translates: %v", err)
	}
	for i := 0; i < MaxRegions; i++ {
		tb.Add(NewRegion(uint64(0x100000+i*0x1000), uint64(0x100000+i*0x1000), make([]byte, 0x1000)))
	}
	if tb.Len() != MaxRegions {
		t.Fatalf("table grew to %d", tb.Len())
	}
}

func TestMapRegion(t *testing.T) {
	fd, err := unix.MemfdCreate("memtest", 0)
	if err != nil {
		t.Skip(err)
	}
	defer unix.Close(fd)
	unix.Ftruncate(fd, 0x3000)
	r, err := MapRegion(fd, 0, 0x1000, 0x1000, 0x1234)
	if err != nil {
		t.Fatal(err)
	}
	r.Bytes()[0] = 7
	var b [1]byte
	unix.Pread(fd, b[:], 0x1234)
	if b[0] != 7 {
		t.Fatal("unaligned offset mapped the wrong bytes")
	}
	if err := r.Release(); err != nil {
		t.Fatal(err)
	}
	if _, err := MapRegion(fd, 0, 0, 0x1000, 0x2800); !errors.Is(err, ErrBadRegion) {
		t.Fatalf("region past end of file: %v", err)
	}
	if _, err := MapRegion(-1, 0, 0, 0x1000, 0); err == nil {
		t.Fatal("bad fd mapped")
	}
}

// TestCountHits: buffers translated into a region that counts hits (one
// hot-added with ADD_MEM_REG) are counted once per slice; a boot-time
// region counts nothing. (Mutation checked: dropping the increment fails
// it.)
func TestCountHits(t *testing.T) {
	var hits atomic.Uint64
	var tbl Table
	boot := NewRegion(0, 0x10000, make([]byte, 4096))
	hot := NewRegion(4096, 0x20000, make([]byte, 4096))
	hot.CountHits(&hits)
	if err := tbl.Add(boot); err != nil {
		t.Fatal(err)
	}
	if err := tbl.Add(hot); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ addr, n, want uint64 }{
		{0, 100, 0},     // boot region only
		{5000, 100, 1},  // hot region
		{4000, 200, 2},  // crosses into the hot region
		{4096, 4096, 3}, // the whole hot region
	} {
		if _, err := tbl.Translate(nil, tc.addr, tc.n, 4); err != nil {
			t.Fatal(err)
		}
		if got := hits.Load(); got != tc.want {
			t.Errorf("after %#x+%d: %d hits, want %d", tc.addr, tc.n, got, tc.want)
		}
	}
}
