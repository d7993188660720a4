package virtqueue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/vhost/internal/fdkind"
)

// ErrInterrupted is returned by EventFD.Wait after Interrupt.
var ErrInterrupted = errors.New("virtqueue: wait interrupted")

// EventFD is a kick or call eventfd shared with the frontend. Waiting goes
// through Go's netpoller so that a stopped queue can interrupt its worker
// without closing the descriptor under it.
type EventFD struct {
	f           *os.File
	interrupted atomic.Bool
}

// NewEventFD takes ownership of fd, which must be an eventfd (anything
// else is closed and refused with an error wrapping fdkind.ErrWrongKind):
// on a pipe or /dev/zero a worker would spin or block, and on a descriptor
// the netpoller cannot watch, Interrupt would do nothing and the worker
// could never be stopped.
func NewEventFD(fd int) (*EventFD, error) {
	if err := fdkind.EventFD(fd); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("eventfd %d: %w", fd, err)
	}
	f := os.NewFile(uintptr(fd), "eventfd")
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return nil, fmt.Errorf("%w: fd %d cannot be polled: %v", fdkind.ErrWrongKind, fd, err)
	}
	return &EventFD{f: f}, nil
}

// ErrWrongKind is returned (wrapped) by NewEventFD for a descriptor that
// is not an eventfd.
var ErrWrongKind = fdkind.ErrWrongKind

// CreateEventFD makes a new eventfd (for tests and the mock frontend).
func CreateEventFD() (*EventFD, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, err
	}
	return NewEventFD(fd)
}

// FD returns the descriptor number (valid until Close).
func (e *EventFD) FD() int { return int(e.f.Fd()) }

// Wait blocks until the eventfd is signalled and returns the count, or
// returns ErrInterrupted after Interrupt, or an error once closed.
func (e *EventFD) Wait() (uint64, error) {
	var b [8]byte
	_, err := e.f.Read(b[:])
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return 0, ErrInterrupted
		}
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// Interrupt makes current and future Waits return ErrInterrupted until
// Resume, and Interrupted report true: a worker that is busy (the guest
// keeps the ring full) checks it between batches, so that stopping a
// queue never waits for the ring to run dry.
func (e *EventFD) Interrupt() {
	e.interrupted.Store(true)
	e.f.SetReadDeadline(time.Unix(1, 0))
}

// Resume undoes Interrupt.
func (e *EventFD) Resume() {
	e.f.SetReadDeadline(time.Time{})
	e.interrupted.Store(false)
}

// Interrupted reports whether Interrupt was called (and not undone).
func (e *EventFD) Interrupted() bool { return e.interrupted.Load() }

// Signal adds one to the counter, waking the other side. A full counter
// (EAGAIN) means the other side already has a pending wakeup, so it is not
// an error.
func (e *EventFD) Signal() error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], 1)
	_, err := e.f.Write(b[:])
	if errors.Is(err, unix.EAGAIN) {
		return nil
	}
	return err
}

// Close releases the descriptor.
func (e *EventFD) Close() error { return e.f.Close() }
