package memory

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/vhost/internal/fdkind"
)

// maxRegionSize bounds a single mapping (1 TiB): far above any guest we
// serve, low enough that size arithmetic cannot overflow an int.
const maxRegionSize = 1 << 40

// MapRegion maps size bytes of fd starting at offset mmapOffset (which need
// not be page-aligned) and returns it as a region at the given guest and user
// addresses. The caller keeps ownership of fd; the mapping stays valid after
// fd is closed.
func MapRegion(fd int, guestAddr, userAddr, size, mmapOffset uint64) (Region, error) {
	if size == 0 || size > maxRegionSize {
		return Region{}, fmt.Errorf("%w: size %#x", ErrBadRegion, size)
	}
	if mmapOffset > maxRegionSize*64 || guestAddr+size < guestAddr || userAddr+size < userAddr {
		return Region{}, fmt.Errorf("%w: offset %#x guest %#x user %#x size %#x", ErrBadRegion, mmapOffset, guestAddr, userAddr, size)
	}
	// Touching a mapping beyond the end of its file raises SIGBUS, which
	// would kill the process: a frontend must not be able to do that.
	// Guest memory is shared as a memfd or a file on tmpfs/hugetlbfs; a
	// device (/dev/zero, /dev/mem) or a pipe is refused.
	st, err := fdkind.RegularFile(fd)
	if err != nil {
		return Region{}, err
	}
	if uint64(st.Size) < mmapOffset+size {
		return Region{}, fmt.Errorf("%w: offset %#x size %#x beyond file size %#x", ErrBadRegion, mmapOffset, size, st.Size)
	}
	page := uint64(os.Getpagesize())
	// mmap needs a page-aligned file offset; map from the page below and
	// slice off the difference.
	delta := mmapOffset % page
	m, err := unix.Mmap(fd, int64(mmapOffset-delta), int(size+delta), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return Region{}, fmt.Errorf("mmap fd %d offset %#x size %#x: %w", fd, mmapOffset, size, err)
	}
	r := NewRegion(guestAddr, userAddr, m[delta:delta+size:delta+size])
	r.unmap = func() error { return unix.Munmap(m) }
	return r, nil
}
