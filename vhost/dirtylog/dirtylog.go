// Package dirtylog is the dirty-page log of vhost-user live migration: a
// bitmap, shared with the frontend (VHOST_USER_SET_LOG_BASE with
// PROTOCOL_F_LOG_SHMFD), with one bit per 4 KiB page of guest-physical
// memory. While the frontend migrates the guest it copies guest memory to
// the destination and then, round after round, the pages whose bits are
// set: the pages the guest dirtied (which the hypervisor tracks itself)
// and the pages the device wrote (which only the device knows of, so it
// must set their bits here). A write the device makes without marking its
// page reaches the destination stale: a received frame with old bytes, a
// used ring entry the destination guest never sees.
//
// The frontend collects bits concurrently (QEMU exchanges each word with
// zero, then copies the pages), so every bit is set atomically, after the
// write it records.
package dirtylog

import (
	"fmt"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/vhost/internal/fdkind"
	"github.com/vunet/vunet/vhost/internal/ringatomic"
)

// PageSize is the granularity of the log (VHOST_LOG_PAGE): one bit per
// 4 KiB of guest-physical address space, whatever the host's page size.
const PageSize = 4096

// MaxSize bounds the log a frontend may make us map: 64 MiB of bits
// covers 2 TiB of guest-physical addresses, twice the largest memory
// region we map (vhost/memory).
const MaxSize = 64 << 20

// Counters are where a log counts what it did; the vhost layer's Stats
// own them.
type Counters struct {
	// Pages counts bits set that were clear: pages newly marked dirty.
	Pages *atomic.Uint64
	// Outside counts writes (of any length) that fell, at least partly,
	// beyond the end of the log.
	Outside *atomic.Uint64
}

// Log is one mapped dirty-page log. Its methods may be called from any
// number of queue workers at once; Close and SetNotify only while none
// uses it.
type Log struct {
	bits   []byte
	unmap  func() error
	c      Counters
	notify func() error
}

// Map maps size bytes of the log file fd at offset, as SET_LOG_BASE
// describes it. The log is frontend input: the size must be non-zero and
// at most MaxSize, the range must lie inside the file (touching a mapping
// past the end of its file raises SIGBUS), and the descriptor must be a
// memory file. The caller keeps ownership of fd.
func Map(fd int, size, offset uint64, c Counters) (*Log, error) {
	if size == 0 || size > MaxSize {
		return nil, fmt.Errorf("dirty log: size %#x not in 1..%#x", size, MaxSize)
	}
	if offset+size < offset {
		return nil, fmt.Errorf("dirty log: offset %#x plus size %#x overflows", offset, size)
	}
	st, err := fdkind.RegularFile(fd)
	if err != nil {
		return nil, fmt.Errorf("dirty log: %w", err)
	}
	if uint64(st.Size) < offset+size {
		return nil, fmt.Errorf("dirty log: offset %#x size %#x beyond the file's %#x bytes", offset, size, st.Size)
	}
	page := uint64(os.Getpagesize())
	delta := offset % page
	m, err := unix.Mmap(fd, int64(offset-delta), int(size+delta), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("dirty log: mmap offset %#x size %#x: %w", offset, size, err)
	}
	return &Log{bits: m[delta : delta+size : delta+size], unmap: func() error { return unix.Munmap(m) }, c: c}, nil
}

// New returns a log over bits, which the caller owns (tests).
func New(bits []byte, c Counters) *Log { return &Log{bits: bits, c: c} }

// Size returns the log's length in bytes.
func (l *Log) Size() uint64 { return uint64(len(l.bits)) }

// Covers reports whether the log has a bit for every page of the
// guest-physical range [addr, addr+n).
func (l *Log) Covers(addr, n uint64) bool {
	if n == 0 {
		return true
	}
	last := addr + n - 1
	if last < addr {
		return false
	}
	return last/PageSize/8 < uint64(len(l.bits))
}

// Mark records a write of n bytes at guest-physical address addr: the bit
// of every page the range touches is set. Pages beyond the log are
// counted in Outside, never written.
func (l *Log) Mark(addr, n uint64) {
	if n == 0 {
		return
	}
	last := addr + n - 1
	if last < addr {
		last = ^uint64(0)
	}
	limit := uint64(len(l.bits)) * 8 // pages the log covers
	first, end := addr/PageSize, last/PageSize
	if end >= limit {
		l.c.Outside.Add(1)
		if first >= limit {
			return
		}
		end = limit - 1
	}
	for p := first; p <= end; p++ {
		off, bit := int(p/8), uint8(1)<<(p%8)
		// A bit already set needs no locked write: the frontend has
		// not collected it yet, and when it does it copies the page
		// after our write.
		if ringatomic.Load8(l.bits, off)&bit != 0 {
			continue
		}
		if ringatomic.Or8(l.bits, off, bit)&bit == 0 {
			l.c.Pages.Add(1)
		}
	}
}

// SetNotify sets the function that tells the frontend the log changed
// (the SET_LOG_FD eventfd), or clears it with nil.
func (l *Log) SetNotify(f func() error) { l.notify = f }

// Notify tells the frontend, if it gave us a way to, that bits were set.
// Queues call it once per batch of published used entries.
func (l *Log) Notify() {
	if l.notify != nil {
		l.notify()
	}
}

// Close unmaps a mapped log.
func (l *Log) Close() error {
	if l.unmap == nil {
		return nil
	}
	err := l.unmap()
	l.unmap, l.bits = nil, nil
	return err
}
