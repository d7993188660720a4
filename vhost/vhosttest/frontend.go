// Package vhosttest is an in-process mock vhost-user frontend: it plays QEMU
// and the guest driver at once. It shares a memfd with the backend, speaks
// the real socket protocol (with SCM_RIGHTS), lays out split rings with the
// virtqueuetest driver and kicks and waits on real eventfds. Whole-appliance
// tests run through it without a VMM.
package vhosttest

import (
	"errors"
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/virtqueue"
	"github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

// Frontend is the mock frontend.
type Frontend struct {
	Conn *protocol.Conn
	// Mem is the shared guest memory; it is mapped here and in the backend.
	Mem   []byte
	MemFD int
	// Drivers are the per-queue mock drivers, each with its own slice of Mem.
	Drivers []*virtqueuetest.Driver
	// PackedDrivers replace Drivers with Options.Packed.
	PackedDrivers []*virtqueuetest.PackedDriver
	Kicks         []*virtqueue.EventFD
	Calls         []*virtqueue.EventFD
	// KickFDs and CallFDs are the descriptors Setup sends for each queue:
	// those of Kicks and Calls unless a test replaces them (with a pipe,
	// say, to play a hostile frontend). The Frontend does not own them.
	KickFDs []int
	CallFDs []int
	// Features is what SET_FEATURES acked.
	Features uint64
	// Log is the dirty-page log SetLog shared with the backend (one bit
	// per 4 KiB guest page), LogFD its memfd.
	Log   []byte
	LogFD int

	opts Options
}

// Options configure Dial.
type Options struct {
	MemSize   int    // bytes of guest memory (default 16 MiB)
	Queues    int    // number of queues (default 2)
	QueueSize uint16 // ring size (default 256)
	// GuestBase is the guest-physical address of the memory (default 1 MiB).
	GuestBase uint64
	// UserBase is the "QEMU virtual address" of the memory (default 0x7f00_0000_0000).
	UserBase uint64
	// MmapOffset is the offset of guest memory in the memfd; not page-aligned
	// values exercise the backend's offset handling.
	MmapOffset uint64
	// Packed lays out packed rings and acks VIRTIO_F_RING_PACKED if it
	// is offered (otherwise the bit is never acked: the rings are split).
	Packed bool
}

func (o *Options) defaults() {
	if o.MemSize == 0 {
		o.MemSize = 16 << 20
	}
	if o.Queues == 0 {
		o.Queues = 2
	}
	if o.QueueSize == 0 {
		o.QueueSize = 256
	}
	if o.GuestBase == 0 {
		o.GuestBase = 1 << 20
	}
	if o.UserBase == 0 {
		o.UserBase = 0x7f0000000000
	}
}

// Dial connects to a backend listening at path and prepares memory and
// rings; it does not send any request yet.
func Dial(path string, opts Options) (*Frontend, error) {
	opts.defaults()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	return New(c, opts)
}

// New wraps an established connection.
func New(c *net.UnixConn, opts Options) (*Frontend, error) {
	opts.defaults()
	fd, err := unix.MemfdCreate("vhosttest-guest", unix.MFD_CLOEXEC)
	if err != nil {
		c.Close()
		return nil, err
	}
	total := int(opts.MmapOffset) + opts.MemSize
	if err := unix.Ftruncate(fd, int64(total)); err != nil {
		unix.Close(fd)
		c.Close()
		return nil, err
	}
	m, err := unix.Mmap(fd, 0, total, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		c.Close()
		return nil, err
	}
	f := &Frontend{Conn: protocol.NewConn(c), Mem: m[opts.MmapOffset:], MemFD: fd, LogFD: -1}
	f.opts = opts
	chunk := opts.MemSize / opts.Queues &^ 4095
	for i := 0; i < opts.Queues; i++ {
		mem := f.Mem[i*chunk : (i+1)*chunk]
		if opts.Packed {
			f.PackedDrivers = append(f.PackedDrivers, virtqueuetest.NewPackedOn(mem, opts.GuestBase+uint64(i*chunk), opts.QueueSize, false))
		} else {
			f.Drivers = append(f.Drivers, virtqueuetest.NewOn(mem, opts.GuestBase+uint64(i*chunk), opts.QueueSize, false))
		}
		k, err := virtqueue.CreateEventFD()
		if err != nil {
			return nil, err
		}
		cl, err := virtqueue.CreateEventFD()
		if err != nil {
			return nil, err
		}
		f.Kicks = append(f.Kicks, k)
		f.Calls = append(f.Calls, cl)
		f.KickFDs = append(f.KickFDs, k.FD())
		f.CallFDs = append(f.CallFDs, cl.FD())
	}
	return f, nil
}

// Close disconnects and releases everything.
func (f *Frontend) Close() error {
	err := f.Conn.Close()
	for _, e := range append(f.Kicks, f.Calls...) {
		e.Close()
	}
	unix.Close(f.MemFD)
	if f.Log != nil {
		unix.Munmap(f.Log)
		unix.Close(f.LogFD)
	}
	return err
}

// Request sends a request and, when it expects one, reads the reply.
func (f *Frontend) Request(req protocol.Request, flags uint32, payload []byte, fds []int, wantReply bool) (protocol.Message, error) {
	if err := f.Conn.Write(protocol.Header{Request: req, Flags: protocol.FlagVersion | flags}, payload, fds); err != nil {
		return protocol.Message{}, err
	}
	if !wantReply && flags&protocol.FlagNeedReply == 0 {
		return protocol.Message{}, nil
	}
	m, err := f.Conn.Read()
	if err != nil {
		return m, err
	}
	if m.Request != req || m.Flags&protocol.FlagReply == 0 {
		return m, fmt.Errorf("reply to %s: got %s flags %#x", req, m.Request, m.Flags)
	}
	m.Payload = append([]byte(nil), m.Payload...)
	return m, nil
}

// U64 sends a request whose payload is a u64 and returns the reply's u64.
func (f *Frontend) U64(req protocol.Request, v uint64, wantReply bool) (uint64, error) {
	var p []byte
	if !wantReply {
		p = u64(v)
	}
	m, err := f.Request(req, 0, p, nil, wantReply)
	if err != nil || !wantReply {
		return 0, err
	}
	return m.U64()
}

// Ack sends a request with NEED_REPLY and returns the backend's verdict.
func (f *Frontend) Ack(req protocol.Request, payload []byte, fds []int) error {
	m, err := f.Request(req, protocol.FlagNeedReply, payload, fds, true)
	if err != nil {
		return err
	}
	v, err := m.U64()
	if err != nil {
		return err
	}
	if v != 0 {
		return fmt.Errorf("%s refused (status %d)", req, v)
	}
	return nil
}

// ringPackedBit is VIRTIO_F_RING_PACKED.
const ringPackedBit = 34

func u64(v uint64) []byte {
	return []byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24), byte(v >> 32), byte(v >> 40), byte(v >> 48), byte(v >> 56)}
}

// Setup performs the full QEMU-like start sequence: feature negotiation
// (acking the offered bits in want, except VHOST_F_LOG_ALL, which a
// frontend acks only while migrating: see SetLogging), SET_OWNER,
// SET_MEM_TABLE, and for each queue NUM, BASE, ADDR, KICK, CALL and ENABLE.
func (f *Frontend) Setup(want uint64) error {
	offered, err := f.U64(protocol.GetFeatures, 0, true)
	if err != nil {
		return err
	}
	if !f.opts.Packed {
		want &^= 1 << ringPackedBit
	}
	f.Features = offered & want &^ (1 << logAllBit)
	if f.opts.Packed && f.Features&(1<<ringPackedBit) == 0 {
		return errors.New("backend does not offer VIRTIO_F_RING_PACKED")
	}
	const protoBit = 1 << 30
	if _, err := f.U64(protocol.SetFeatures, f.Features, false); err != nil {
		return err
	}
	if f.Features&protoBit != 0 {
		pf, err := f.U64(protocol.GetProtocolFeatures, 0, true)
		if err != nil {
			return err
		}
		if _, err := f.U64(protocol.SetProtocolFeatures, pf, false); err != nil {
			return err
		}
		if pf&(1<<protocol.ProtoReplyAck) == 0 {
			return errors.New("backend lacks REPLY_ACK")
		}
	}
	if _, err := f.Request(protocol.SetOwner, 0, nil, nil, false); err != nil {
		return err
	}
	region := protocol.MemRegion{GuestAddr: f.opts.GuestBase, Size: uint64(len(f.Mem)), UserAddr: f.opts.UserBase, MmapOffset: f.opts.MmapOffset}
	if err := f.ack(protocol.SetMemTable, protocol.EncodeMemTable(nil, []protocol.MemRegion{region}), []int{f.MemFD}); err != nil {
		return err
	}
	const eventIdxBit = 1 << 29
	var cfgs []virtqueue.Config
	for _, d := range f.Drivers {
		d.EventIdx = f.Features&eventIdxBit != 0
		cfgs = append(cfgs, d.Config())
	}
	for _, d := range f.PackedDrivers {
		d.EventIdx = f.Features&eventIdxBit != 0
		cfgs = append(cfgs, d.Config())
	}
	for i, cfg := range cfgs {
		idx := uint32(i)
		// A split ring's base is the next available index; a packed
		// ring's both positions with their wrap counters (QEMU sends
		// 0x80008000 for a fresh ring).
		base := uint32(cfg.NextAvail) | uint32(cfg.NextUsed)<<16
		steps := []struct {
			req     protocol.Request
			payload []byte
			fds     []int
		}{
			{protocol.SetVringNum, protocol.EncodeVringState(nil, protocol.VringState{Index: idx, Num: uint32(cfg.Size)}), nil},
			{protocol.SetVringBase, protocol.EncodeVringState(nil, protocol.VringState{Index: idx, Num: base}), nil},
			{protocol.SetVringAddr, protocol.EncodeVringAddr(nil, protocol.VringAddr{Index: idx,
				Desc: f.user(cfg.DescAddr), Used: f.user(cfg.UsedAddr), Avail: f.user(cfg.AvailAddr)}), nil},
			{protocol.SetVringCall, u64(uint64(idx)), []int{f.CallFDs[i]}},
			{protocol.SetVringKick, u64(uint64(idx)), []int{f.KickFDs[i]}},
		}
		if f.Features&protoBit != 0 {
			steps = append(steps, struct {
				req     protocol.Request
				payload []byte
				fds     []int
			}{protocol.SetVringEnable, protocol.EncodeVringState(nil, protocol.VringState{Index: idx, Num: 1}), nil})
		}
		for _, s := range steps {
			if err := f.ack(s.req, s.payload, s.fds); err != nil {
				return fmt.Errorf("queue %d: %w", i, err)
			}
		}
	}
	return nil
}

// ack uses NEED_REPLY when REPLY_ACK is available, so that the backend has
// finished the request when this returns.
func (f *Frontend) ack(req protocol.Request, payload []byte, fds []int) error {
	if f.Features&(1<<30) != 0 {
		return f.Ack(req, payload, fds)
	}
	_, err := f.Request(req, 0, payload, fds, false)
	return err
}

func (f *Frontend) user(guest uint64) uint64 { return guest - f.opts.GuestBase + f.opts.UserBase }

// Kick notifies the backend that queue i has new buffers.
func (f *Frontend) Kick(i int) error { return f.Kicks[i].Signal() }

// WaitCall waits up to timeout for the backend to interrupt on queue i.
func (f *Frontend) WaitCall(i int, timeout time.Duration) error {
	done := make(chan error, 1)
	go func() {
		_, err := f.Calls[i].Wait()
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(timeout):
		f.Calls[i].Interrupt()
		<-done
		f.Calls[i].Resume()
		return fmt.Errorf("no interrupt on queue %d within %v", i, timeout)
	}
}

// GetVringBase stops queue i and returns its next available index.
func (f *Frontend) GetVringBase(i int) (uint32, error) {
	m, err := f.Request(protocol.GetVringBase, 0, protocol.EncodeVringState(nil, protocol.VringState{Index: uint32(i)}), nil, true)
	if err != nil {
		return 0, err
	}
	st, err := m.VringState()
	return st.Num, err
}

// logAllBit is VHOST_F_LOG_ALL.
const logAllBit = 26

// LogSize returns the bytes of dirty log that cover guest memory, rounded
// up to whole 64-bit words as QEMU does.
func (f *Frontend) LogSize() uint64 {
	pages := (f.opts.GuestBase + uint64(len(f.Mem)) + 4095) / 4096
	return (pages + 63) / 64 * 8
}

// SetLog creates a memfd of size bytes, maps it and sends it with
// SET_LOG_BASE (size, offset 0) as QEMU does when a migration starts; the
// backend's empty reply is awaited. The log is then in f.Log.
func (f *Frontend) SetLog(size uint64) error {
	fd, err := unix.MemfdCreate("vhosttest-log", unix.MFD_CLOEXEC)
	if err != nil {
		return err
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return err
	}
	m, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return err
	}
	if err := f.SendLogBase(size, 0, fd); err != nil {
		unix.Munmap(m)
		unix.Close(fd)
		return err
	}
	if f.Log != nil {
		unix.Munmap(f.Log)
		unix.Close(f.LogFD)
	}
	f.Log, f.LogFD = m, fd
	return nil
}

// SendLogBase sends SET_LOG_BASE with the given payload and descriptor
// (none if fd < 0) and waits for the reply QEMU waits for.
func (f *Frontend) SendLogBase(size, offset uint64, fd int) error {
	var fds []int
	if fd >= 0 {
		fds = []int{fd}
	}
	m, err := f.Request(protocol.SetLogBase, 0, protocol.EncodeLogBase(nil, protocol.LogBase{Size: size, Offset: offset}), fds, true)
	if err != nil {
		return err
	}
	if len(m.Payload) != 0 {
		return fmt.Errorf("SET_LOG_BASE reply with %d bytes of payload, want none", len(m.Payload))
	}
	return nil
}

// SetLogging turns dirty logging on or off as QEMU does at the start and
// end of a migration: SET_FEATURES with or without VHOST_F_LOG_ALL, then
// SET_VRING_ADDR on every queue with or without VHOST_VRING_F_LOG. The
// used ring of queue i is logged at usedLog[i] (nil: at its own
// guest-physical address, as QEMU does).
func (f *Frontend) SetLogging(on bool, usedLog []uint64) error {
	feat := f.Features &^ (1 << logAllBit)
	var flags uint32
	if on {
		feat |= 1 << logAllBit
		flags = protocol.VringFLog
	}
	if err := f.ack(protocol.SetFeatures, u64(feat), nil); err != nil {
		return err
	}
	f.Features = feat
	for i, d := range f.Drivers {
		cfg := d.Config()
		logAddr := cfg.UsedAddr
		if usedLog != nil {
			logAddr = usedLog[i]
		}
		a := protocol.VringAddr{Index: uint32(i), Flags: flags, Desc: f.user(cfg.DescAddr), Used: f.user(cfg.UsedAddr),
			Avail: f.user(cfg.AvailAddr), Log: logAddr}
		if err := f.ack(protocol.SetVringAddr, protocol.EncodeVringAddr(nil, a), nil); err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
	}
	return nil
}

// DirtyPages returns the guest-physical page numbers whose bits are set
// in the log, in order.
func (f *Frontend) DirtyPages() []uint64 {
	var out []uint64
	for i, b := range f.Log {
		for bit := range 8 {
			if b&(1<<bit) != 0 {
				out = append(out, uint64(i)*8+uint64(bit))
			}
		}
	}
	return out
}
