// Package tapfront is a VM-less vhost-user frontend with offloads: it
// connects to a virtio-net backend's socket (vunet's), shares a memfd as
// guest memory, lays out the receive and transmit split rings in it and
// bridges them to a tap device opened with IFF_VNET_HDR. The tap's vnet
// header is the rings' virtio-net header (12 bytes: VERSION_1 and
// MRG_RXBUF), and with TUNSETOFFLOAD the kernel hands over partially
// checksummed 64 KiB TSO frames and takes them back, so the Linux stack in
// a namespace behind the tap is a full-speed guest that negotiates CSUM and
// TSO in both directions. It is test and benchmark infrastructure (design
// section "A VM-less frontend with offloads"), but a careful driver: every
// length the backend reports is checked, the data path copies nothing (the
// tap reads into and writes from the ring buffers), allocates nothing per
// frame, and wakes the backend once per batch.
//
// The control plane is vhosttest.Frontend (socket protocol, memfd,
// SET_MEM_TABLE, ring addresses); the rings are virtqueuetest.Drivers used
// through their allocation-free methods, one goroutine each.
package tapfront

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/endpoint"
	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/vhosttest"
	"github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

const (
	// HdrLen is the virtio-net header with num_buffers, on the rings and
	// on the tap.
	HdrLen = 12
	// maxFrame is the largest Ethernet frame a TSO tap hands over: a
	// 64 KiB IP packet behind an Ethernet and a VLAN header.
	maxFrame = 65535 + 18
	// SlotSize is the per-descriptor buffer: a header and the largest
	// frame, plus slack so that a read that fills the slot exactly is
	// known to be truncated.
	SlotSize = 69632
	// DefaultRingSize is the size of both rings.
	DefaultRingSize = 256
	// batch bounds the frames moved per wake-up before the backend is
	// kicked, so that it starts on a long burst early.
	batch = 64
	// ethFrameMTU is a frame that fits a 1500-byte MTU; larger ones
	// (counted as Big) can only be TSO/GSO frames on the default MTU.
	ethFrameMTU = 1514

	flagNeedsCsum = 1
	flagDataValid = 2
)

// Features is what the frontend acks when the backend offers it.
const Features = 1<<endpoint.FeatureCsum | 1<<endpoint.FeatureGuestCsum |
	1<<endpoint.FeatureGuestTSO4 | 1<<endpoint.FeatureGuestTSO6 |
	1<<endpoint.FeatureHostTSO4 | 1<<endpoint.FeatureHostTSO6 | 1<<endpoint.FeatureHostECN |
	1<<endpoint.FeatureMrgRxbuf | 1<<vhost.FeatureEventIdx | 1<<vhost.FeatureProtocolFeatures |
	1<<vhost.FeatureVersion1

// Options configure Dial.
type Options struct {
	// RingSize is the size of both rings (a power of two); default
	// DefaultRingSize.
	RingSize uint16
	// RXBufSize is the size of each receive buffer; default SlotSize (a
	// whole frame per buffer). Smaller buffers make the backend merge.
	RXBufSize int
	// NoEventIdx leaves VIRTIO_RING_F_EVENT_IDX unacked (flags-based
	// notification suppression instead).
	NoEventIdx bool
	// NoOffloads acks none of the checksum and TSO bits: MTU-sized
	// frames with full checksums both ways.
	NoOffloads bool
	// FillDataValid computes the TCP/UDP checksum of frames the backend
	// marked VIRTIO_NET_HDR_F_DATA_VALID before they reach the tap: a
	// virtio-net driver trusts that flag, so a backend may leave the
	// checksum out (passt --vhost-user does), but the tap verifies it.
	// vunet always sends valid checksums, so its tests leave this off.
	FillDataValid bool
}

// Stats are the frontend's own counters. TX is tap → backend (the
// guest sending), RX backend → tap.
type Stats struct {
	TXFrames, TXBytes atomic.Uint64
	// TXGSO counts frames with a GSO type, TXBig frames longer than
	// ethFrameMTU, TXNeedsCsum frames with a partial checksum.
	TXGSO, TXBig, TXNeedsCsum atomic.Uint64
	// TXDropped: tap reads too short for a header and an Ethernet header,
	// or that filled the slot (truncated).
	TXDropped                 atomic.Uint64
	RXFrames, RXBytes         atomic.Uint64
	RXGSO, RXBig, RXNeedsCsum atomic.Uint64
	// RXMerged counts frames that spanned more than one buffer.
	RXMerged atomic.Uint64
	// RXBad counts frames dropped because the backend reported an
	// impossible length or num_buffers; RXTapErrors frames the tap
	// refused (bad header for the kernel, device down).
	RXBad, RXTapErrors atomic.Uint64
	// Kicks and Calls count notifications sent and waited for.
	Kicks, Calls atomic.Uint64
}

// Bridge is a running frontend.
type Bridge struct {
	f    *vhosttest.Frontend
	tap  *os.File
	trc  syscall.RawConn
	rx   *virtqueuetest.Driver
	tx   *virtqueuetest.Driver
	size uint16

	rxBufs, txBufs [][]byte
	rxAddrs        []uint64
	txAddrs        []uint64

	fillDataValid bool

	stopping atomic.Bool
	stopOnce sync.Once

	// Stats counts frames, offloads and errors.
	Stats Stats
}

// Dial connects to the backend at socket, negotiates features, shares
// memory and starts nothing yet (Run does). The tap must have a 12-byte
// vnet header (OpenTap); call SetTapOffload before Run to let the kernel
// hand over what was negotiated. Once Dial succeeds the Bridge owns tap
// (Run closes it); on error the caller still does. (Any
// packet socket with a 12-byte header per message, such as one end of a
// SOCK_SEQPACKET pair in tests, works in place of a tap.)
func Dial(socket string, tap *os.File, opts Options) (*Bridge, error) {
	if opts.RingSize == 0 {
		opts.RingSize = DefaultRingSize
	}
	if opts.RingSize&(opts.RingSize-1) != 0 || opts.RingSize > 32768 {
		return nil, fmt.Errorf("tapfront: ring size %d is not a power of two ≤ 32768", opts.RingSize)
	}
	if opts.RXBufSize == 0 {
		opts.RXBufSize = SlotSize
	}
	if opts.RXBufSize < HdrLen+60 || opts.RXBufSize > SlotSize {
		return nil, fmt.Errorf("tapfront: receive buffer size %d out of range %d..%d", opts.RXBufSize, HdrLen+60, SlotSize)
	}
	trc, err := tap.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("tapfront: tap: %w", err)
	}
	n := int(opts.RingSize)
	// Rings (descriptor table, avail, used, each page-aligned) and one
	// 16-byte-aligned buffer per descriptor, in each queue's half.
	ring := 16*n + 4096 + 6 + 2*n + 4096 + 6 + 8*n + 4096
	perQueue := (ring + n*(SlotSize+16) + 4095) &^ 4095
	f, err := vhosttest.Dial(socket, vhosttest.Options{MemSize: 2 * perQueue, Queues: 2, QueueSize: opts.RingSize})
	if err != nil {
		return nil, fmt.Errorf("tapfront: connect %s: %w", socket, err)
	}
	want := uint64(Features)
	if opts.NoEventIdx {
		want &^= 1 << vhost.FeatureEventIdx
	}
	if opts.NoOffloads {
		want &^= 1<<endpoint.FeatureCsum | 1<<endpoint.FeatureGuestCsum | 1<<endpoint.FeatureGuestTSO4 |
			1<<endpoint.FeatureGuestTSO6 | 1<<endpoint.FeatureHostTSO4 | 1<<endpoint.FeatureHostTSO6 | 1<<endpoint.FeatureHostECN
	}
	if err := f.Setup(want); err != nil {
		f.Close()
		return nil, fmt.Errorf("tapfront: set up: %w", err)
	}
	// The tap's header is 12 bytes; so is the rings' with VERSION_1.
	if f.Features&(1<<vhost.FeatureVersion1) == 0 {
		f.Close()
		return nil, errors.New("tapfront: backend does not offer VIRTIO_F_VERSION_1 (12-byte header)")
	}
	b := &Bridge{f: f, tap: tap, trc: trc, rx: f.Drivers[0], tx: f.Drivers[1], size: opts.RingSize,
		fillDataValid: opts.FillDataValid}
	for i := 0; i < n; i++ {
		a, buf, err := b.rx.Reserve(opts.RXBufSize)
		if err != nil {
			f.Close()
			return nil, err
		}
		b.rxAddrs, b.rxBufs = append(b.rxAddrs, a), append(b.rxBufs, buf)
		a, buf, err = b.tx.Reserve(SlotSize)
		if err != nil {
			f.Close()
			return nil, err
		}
		b.txAddrs, b.txBufs = append(b.txAddrs, a), append(b.txBufs, buf)
	}
	return b, nil
}

// SetTapOffload sets the tap's offloads to the negotiated ones: partial
// checksums with CSUM, TSO with HOST_TSO4/6 (and ECN). Frames the kernel
// writes to us need what the backend accepts; what the backend sends us
// (GUEST_*) the tap takes whatever its offloads.
func (b *Bridge) SetTapOffload() error {
	has := func(bit int) bool { return b.f.Features&(1<<bit) != 0 }
	return SetOffload(b.tap, has(endpoint.FeatureCsum), has(endpoint.FeatureHostTSO4), has(endpoint.FeatureHostTSO6), has(endpoint.FeatureHostECN))
}

// Features returns the negotiated feature bits.
func (b *Bridge) Features() uint64 { return b.f.Features }

// Run moves frames until ctx ends, the backend closes the connection or a
// ring breaks, then stops its goroutines and returns why (nil for ctx).
// It closes the connection and the tap on return.
func (b *Bridge) Run(ctx context.Context) error {
	errs := make(chan error, 3)
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); errs <- b.rxLoop() }()
	go func() { defer wg.Done(); errs <- b.txLoop() }()
	go func() {
		defer wg.Done()
		// The backend sends nothing unasked after set-up; a read that
		// returns is the disconnect (or garbage, which ends us too).
		_, err := b.f.Conn.Read()
		if b.stopping.Load() {
			err = nil
		} else if err == nil {
			err = errors.New("tapfront: unexpected message from the backend")
		} else {
			err = fmt.Errorf("tapfront: backend connection: %w", err)
		}
		errs <- err
	}()
	var first error
	select {
	case <-ctx.Done():
	case first = <-errs:
	}
	b.stop()
	wg.Wait()
	b.f.Close()
	b.tap.Close()
	return first
}

// stop wakes every goroutine: deadlines on the tap, interrupts on the
// call eventfds, and a closed connection.
func (b *Bridge) stop() {
	b.stopOnce.Do(func() {
		b.stopping.Store(true)
		past := time.Unix(1, 0)
		b.tap.SetDeadline(past)
		for _, c := range b.f.Calls {
			c.Interrupt()
		}
		b.f.Conn.Close()
	})
}

var errStopped = errors.New("tapfront: stopped")

// waitCall sleeps until the backend interrupts on queue i.
func (b *Bridge) waitCall(i int) error {
	b.Stats.Calls.Add(1)
	if _, err := b.f.Calls[i].Wait(); err != nil {
		if b.stopping.Load() {
			return errStopped
		}
		return fmt.Errorf("tapfront: call eventfd %d: %w", i, err)
	}
	return nil
}

func (b *Bridge) kick(i int) {
	b.Stats.Kicks.Add(1)
	b.f.Kick(i)
}

// done maps a goroutine's end to Run's error: nil once stopping.
func (b *Bridge) done(err error) error {
	if b.stopping.Load() {
		return nil
	}
	return err
}

// txLoop reads frames from the tap straight into free transmit slots and
// publishes them, one kick per batch. Slots come back from the used ring;
// interrupts are wanted only while every slot is in flight.
func (b *Bridge) txLoop() error {
	d := b.tx
	d.DisableInterrupts()
	free := make([]uint16, 0, b.size)
	inFlight := make([]bool, b.size)
	for i := int(b.size) - 1; i >= 0; i-- {
		free = append(free, uint16(i))
	}
	var rerr error
	for {
		for p := d.UsedPending(); p > 0; p = d.UsedPending() {
			if p > b.size {
				return b.done(fmt.Errorf("tapfront: transmit used index %d entries ahead (ring size %d)", p, b.size))
			}
			for ; p > 0; p-- {
				head, _ := d.PeekUsed(0)
				d.TakeUsed(1)
				if head >= b.size || !inFlight[head] {
					return b.done(fmt.Errorf("tapfront: transmit used entry with head %d not in flight", head))
				}
				inFlight[head] = false
				free = append(free, head)
			}
		}
		if len(free) == 0 {
			d.EnableInterrupts(1)
			if d.UsedPending() == 0 {
				if err := b.waitCall(1); err != nil {
					return b.done(err)
				}
			}
			d.DisableInterrupts()
			continue
		}
		old := d.AvailIdx()
		moved := 0
		err := b.trc.Read(func(fd uintptr) bool {
			for len(free) > 0 && moved < batch {
				id := free[len(free)-1]
				buf := b.txBufs[id]
				n, err := unix.Read(int(fd), buf)
				if err == unix.EINTR {
					continue
				}
				if err == unix.EAGAIN {
					return moved > 0 // sleep in the poller only with nothing to publish
				}
				if err != nil {
					rerr = err
					return true
				}
				if !b.checkTX(buf[:n]) {
					continue
				}
				d.WriteDesc(id, virtqueuetest.Desc{Addr: b.txAddrs[id], Len: uint32(n)})
				d.PublishRaw(id)
				inFlight[id] = true
				free = free[:len(free)-1]
				moved++
			}
			return true
		})
		if moved > 0 && d.NeedKick(old) {
			b.kick(1)
		}
		if err == nil {
			err = rerr
		}
		if err != nil {
			return b.done(fmt.Errorf("tapfront: tap read: %w", err))
		}
	}
}

// checkTX validates and counts a frame read from the tap (header included)
// and makes its header one a driver may send: num_buffers 0 and no
// DATA_VALID (virtio 1.2, 5.1.6.2.1).
func (b *Bridge) checkTX(p []byte) bool {
	if len(p) < HdrLen+14 || len(p) >= SlotSize {
		b.Stats.TXDropped.Add(1)
		return false
	}
	p[0] &^= flagDataValid
	p[10], p[11] = 0, 0
	frame := len(p) - HdrLen
	b.Stats.TXFrames.Add(1)
	b.Stats.TXBytes.Add(uint64(frame))
	if p[1] != 0 {
		b.Stats.TXGSO.Add(1)
	}
	if p[0]&flagNeedsCsum != 0 {
		b.Stats.TXNeedsCsum.Add(1)
	}
	if frame > ethFrameMTU {
		b.Stats.TXBig.Add(1)
	}
	return true
}

// rxLoop posts every receive buffer, then writes each frame the backend
// returns to the tap from the buffers themselves (one writev per frame,
// however many buffers it was merged over) and posts them again, one kick
// per batch.
func (b *Bridge) rxLoop() error {
	d := b.rx
	posted := make([]bool, b.size)
	for i := uint16(0); i < b.size; i++ {
		d.WriteDesc(i, virtqueuetest.Desc{Addr: b.rxAddrs[i], Len: uint32(len(b.rxBufs[i])), Flags: 2})
		d.PublishRaw(i)
		posted[i] = true
	}
	d.DisableInterrupts()
	b.kick(0)
	iovs := make([]unix.Iovec, 0, b.size)
	heads := make([]uint16, 0, b.size)
	need := uint16(1)
	for {
		pending := d.UsedPending()
		if pending > b.size {
			return b.done(fmt.Errorf("tapfront: receive used index %d entries ahead (ring size %d)", pending, b.size))
		}
		if pending < need {
			d.EnableInterrupts(need)
			if d.UsedPending() < need {
				if err := b.waitCall(0); err != nil {
					return b.done(err)
				}
			}
			d.DisableInterrupts()
			continue
		}
		need = 1
		old := d.AvailIdx()
		for frames := 0; pending > 0 && frames < batch; frames++ {
			head, l := d.PeekUsed(0)
			if head >= b.size || !posted[head] {
				return b.done(fmt.Errorf("tapfront: receive used entry with head %d not posted", head))
			}
			buf := b.rxBufs[head]
			if int(l) > len(buf) || l < HdrLen {
				// The buffer is ours again, whatever the backend wrote.
				b.Stats.RXBad.Add(1)
				d.TakeUsed(1)
				pending--
				d.PublishRaw(head)
				continue
			}
			nb := binary.LittleEndian.Uint16(buf[10:])
			if nb == 0 || nb > b.size {
				b.Stats.RXBad.Add(1)
				d.TakeUsed(1)
				pending--
				d.PublishRaw(head)
				continue
			}
			if nb > pending {
				// The rest of the frame is not published yet.
				need = nb
				break
			}
			iovs, heads = iovs[:0], heads[:0]
			bad := false
			frame := 0
			for j := uint16(0); j < nb; j++ {
				h, l := d.PeekUsed(j)
				if h >= b.size || !posted[h] {
					return b.done(fmt.Errorf("tapfront: receive used entry with head %d not posted", h))
				}
				posted[h] = false
				heads = append(heads, h)
				if int(l) > len(b.rxBufs[h]) || (j > 0 && l == 0) {
					bad = true
					continue
				}
				frame += int(l)
				if l > 0 {
					iovs = append(iovs, unix.Iovec{Base: &b.rxBufs[h][0], Len: uint64(l)})
				}
			}
			d.TakeUsed(nb)
			pending -= nb
			frame -= HdrLen
			if bad || frame < 14 || frame > maxFrame {
				b.Stats.RXBad.Add(1)
			} else {
				b.countRX(buf, frame, nb)
				if b.fillDataValid && buf[0]&(flagDataValid|flagNeedsCsum) == flagDataValid && len(iovs) == 1 {
					fillChecksum(buf[HdrLen : HdrLen+frame])
				}
				if err := b.writeTap(iovs); err != nil {
					if b.stopping.Load() {
						return nil
					}
					b.Stats.RXTapErrors.Add(1)
				}
			}
			for _, h := range heads {
				posted[h] = true
				d.PublishRaw(h)
			}
		}
		if d.AvailIdx() != old && d.NeedKick(old) {
			b.kick(0)
		}
	}
}

func (b *Bridge) countRX(hdr []byte, frame int, nb uint16) {
	b.Stats.RXFrames.Add(1)
	b.Stats.RXBytes.Add(uint64(frame))
	if hdr[1] != 0 {
		b.Stats.RXGSO.Add(1)
	}
	if hdr[0]&flagNeedsCsum != 0 {
		b.Stats.RXNeedsCsum.Add(1)
	}
	if frame > ethFrameMTU {
		b.Stats.RXBig.Add(1)
	}
	if nb > 1 {
		b.Stats.RXMerged.Add(1)
	}
}

// writeTap writes one frame (header first) with writev; the iovecs point
// into the shared memory, which stays mapped for the Bridge's life.
func (b *Bridge) writeTap(iovs []unix.Iovec) error {
	var werr error
	err := b.trc.Write(func(fd uintptr) bool {
		_, _, e := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&iovs[0])), uintptr(len(iovs)))
		if e == unix.EAGAIN {
			return false
		}
		if e == unix.EINTR {
			return false
		}
		if e != 0 {
			werr = e
		}
		return true
	})
	if err != nil {
		return err
	}
	return werr
}
