// Package memory maps the guest memory a vhost-user frontend shares with us
// and translates guest-physical and frontend-virtual addresses into byte
// slices, with full bounds checks: every address comes from the guest or
// the frontend and is untrusted.
package memory

import (
	"errors"
	"fmt"
	"sort"
	"sync/atomic"
)

// MaxRegions bounds the region table. QEMU's SET_MEM_TABLE carries at most 8
// regions; ADD_MEM_REG can add more, up to the number of slots we advertise
// with GET_MAX_MEM_SLOTS, which is this value.
const MaxRegions = 64

// Errors returned by translation and table updates. They are wrapped with
// the offending values; test with errors.Is.
var (
	ErrNoRegion   = errors.New("address outside every memory region")
	ErrOverflow   = errors.New("address plus length overflows")
	ErrBadRegion  = errors.New("invalid memory region")
	ErrOverlap    = errors.New("memory region overlaps an existing one")
	ErrTooMany    = errors.New("too many memory regions")
	ErrNotFound   = errors.New("memory region not found")
	ErrNotContig  = errors.New("range is not contiguous in one region")
	ErrTooManyIov = errors.New("too many iovecs for descriptor")
)

// Region is one contiguous range of guest memory mapped into our address
// space.
type Region struct {
	// GuestAddr is the guest-physical address of the first byte.
	GuestAddr uint64
	// UserAddr is the frontend's (QEMU's) virtual address of the first byte;
	// vring addresses in SET_VRING_ADDR are expressed in this space.
	UserAddr uint64
	// data holds exactly the region's bytes.
	data []byte
	// unmap releases the mapping; nil for regions over plain memory.
	unmap func() error
	// hits, if set (regions hot-added with ADD_MEM_REG, see
	// CountHits), counts the descriptor buffers translated into the
	// region: the proof that a guest's hot-plugged memory carries
	// traffic. nil for the boot-time regions, which costs one branch.
	hits *atomic.Uint64
}

// CountHits makes Translate count, in c, every buffer it finds in r.
func (r *Region) CountHits(c *atomic.Uint64) { r.hits = c }

// NewRegion returns a region over data, which the caller owns. It is used by
// tests and by anything that already has the memory mapped.
func NewRegion(guestAddr, userAddr uint64, data []byte) Region {
	return Region{GuestAddr: guestAddr, UserAddr: userAddr, data: data}
}

// Size returns the region's length in bytes.
func (r *Region) Size() uint64 { return uint64(len(r.data)) }

// Bytes returns the region's memory.
func (r *Region) Bytes() []byte { return r.data }

func (r *Region) guestEnd() uint64 { return r.GuestAddr + r.Size() }
func (r *Region) userEnd() uint64  { return r.UserAddr + r.Size() }

// Release unmaps the region if it was mapped from a file descriptor.
func (r *Region) Release() error {
	if r.unmap == nil {
		return nil
	}
	err := r.unmap()
	r.unmap, r.data = nil, nil
	return err
}

// Table is a set of non-overlapping regions sorted by guest address. It is
// not safe for concurrent mutation; the vhost device replaces or mutates it
// only while the queues using it are stopped or locked.
type Table struct {
	regions []Region
}

// Len returns the number of regions.
func (t *Table) Len() int { return len(t.regions) }

// Regions returns the regions in guest-address order. The slice must not be
// modified.
func (t *Table) Regions() []Region { return t.regions }

// Add inserts r, rejecting empty regions, address wrap-around and overlap
// with an existing region in either address space.
func (t *Table) Add(r Region) error {
	if r.Size() == 0 {
		return fmt.Errorf("%w: empty region at guest %#x", ErrBadRegion, r.GuestAddr)
	}
	if r.guestEnd() < r.GuestAddr || r.userEnd() < r.UserAddr {
		return fmt.Errorf("%w: guest %#x user %#x size %#x", ErrOverflow, r.GuestAddr, r.UserAddr, r.Size())
	}
	if len(t.regions) >= MaxRegions {
		return ErrTooMany
	}
	for i := range t.regions {
		o := &t.regions[i]
		if r.GuestAddr < o.guestEnd() && o.GuestAddr < r.guestEnd() {
			return fmt.Errorf("%w: guest %#x+%#x and %#x+%#x", ErrOverlap, r.GuestAddr, r.Size(), o.GuestAddr, o.Size())
		}
		if r.UserAddr < o.userEnd() && o.UserAddr < r.userEnd() {
			return fmt.Errorf("%w: user %#x+%#x and %#x+%#x", ErrOverlap, r.UserAddr, r.Size(), o.UserAddr, o.Size())
		}
	}
	t.regions = append(t.regions, r)
	sort.Slice(t.regions, func(i, j int) bool { return t.regions[i].GuestAddr < t.regions[j].GuestAddr })
	return nil
}

// Has reports whether the table holds a region with exactly this guest
// address, user address and size (what Remove would remove).
func (t *Table) Has(guestAddr, userAddr, size uint64) bool {
	for i := range t.regions {
		if r := &t.regions[i]; r.GuestAddr == guestAddr && r.UserAddr == userAddr && r.Size() == size {
			return true
		}
	}
	return false
}

// Remove deletes the region with the given guest address, user address and
// size, releases its mapping and returns any error from doing so.
func (t *Table) Remove(guestAddr, userAddr, size uint64) error {
	for i := range t.regions {
		r := &t.regions[i]
		if r.GuestAddr == guestAddr && r.UserAddr == userAddr && r.Size() == size {
			err := r.Release()
			t.regions = append(t.regions[:i], t.regions[i+1:]...)
			return err
		}
	}
	return fmt.Errorf("%w: guest %#x user %#x size %#x", ErrNotFound, guestAddr, userAddr, size)
}

// Close releases every region and empties the table.
func (t *Table) Close() error {
	var errs []error
	for i := range t.regions {
		errs = append(errs, t.regions[i].Release())
	}
	t.regions = nil
	return errors.Join(errs...)
}

func (t *Table) findGuest(addr uint64) *Region {
	// Few regions (usually 1-3): a linear scan beats a binary search.
	for i := range t.regions {
		r := &t.regions[i]
		if addr >= r.GuestAddr && addr < r.guestEnd() {
			return r
		}
	}
	return nil
}

// Translate appends to out the slices covering guest-physical range
// [addr, addr+n). A range that crosses region boundaries becomes several
// slices. At most maxIov slices are appended. A zero-length range appends
// nothing.
func (t *Table) Translate(out [][]byte, addr, n uint64, maxIov int) ([][]byte, error) {
	if addr+n < addr {
		return out, fmt.Errorf("%w: %#x+%#x", ErrOverflow, addr, n)
	}
	added := 0
	for n > 0 {
		r := t.findGuest(addr)
		if r == nil {
			return out, fmt.Errorf("%w: guest %#x", ErrNoRegion, addr)
		}
		if added == maxIov {
			return out, fmt.Errorf("%w: limit %d", ErrTooManyIov, maxIov)
		}
		if r.hits != nil {
			r.hits.Add(1)
		}
		off := addr - r.GuestAddr
		c := min(n, r.Size()-off)
		out = append(out, r.data[off:off+c:off+c])
		added++
		addr += c
		n -= c
	}
	return out, nil
}

// Slice returns guest-physical range [addr, addr+n) as one slice; the range
// must lie inside one region. Rings are accessed this way.
func (t *Table) Slice(addr, n uint64) ([]byte, error) {
	if addr+n < addr {
		return nil, fmt.Errorf("%w: %#x+%#x", ErrOverflow, addr, n)
	}
	r := t.findGuest(addr)
	if r == nil {
		return nil, fmt.Errorf("%w: guest %#x", ErrNoRegion, addr)
	}
	off := addr - r.GuestAddr
	if n > r.Size()-off {
		return nil, fmt.Errorf("%w: guest %#x+%#x", ErrNotContig, addr, n)
	}
	return r.data[off : off+n : off+n], nil
}

// UserToGuest converts a frontend virtual address into a guest-physical one.
func (t *Table) UserToGuest(uaddr uint64) (uint64, error) {
	for i := range t.regions {
		r := &t.regions[i]
		if uaddr >= r.UserAddr && uaddr < r.userEnd() {
			return r.GuestAddr + (uaddr - r.UserAddr), nil
		}
	}
	return 0, fmt.Errorf("%w: user %#x", ErrNoRegion, uaddr)
}
