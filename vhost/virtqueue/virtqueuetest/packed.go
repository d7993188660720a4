package virtqueuetest

import (
	"encoding/binary"
	"fmt"

	"github.com/vunet/vunet/vhost/internal/ringatomic"
	"github.com/vunet/vunet/vhost/memory"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// Packed descriptor and event suppression flags (virtio 1.2, 2.8), as a
// driver sees them.
const (
	PackedFNext     = 1
	PackedFWrite    = 2
	PackedFIndirect = 4
	PackedFAvail    = 1 << 7
	PackedFUsed     = 1 << 15

	EventEnable  = 0
	EventDisable = 1
	EventDesc    = 2
)

// PackedDriver owns fake guest memory and one packed ring in it, and
// drives it the way Linux's virtio_ring does: each chain takes the next
// free slots in ring order, every descriptor carries the buffer id, the
// first descriptor's flags are written last, used descriptors are read in
// ring order and skipped by their chain's length.
type PackedDriver struct {
	Mem      []byte
	Base     uint64
	Table    *memory.Table
	Size     uint16
	EventIdx bool

	descAddr, drvAddr, devAddr uint64
	heap                       uint64

	next     uint16 // next slot to make available
	wrap     bool   // driver ring wrap counter
	usedNext uint16 // next slot to look for a used descriptor in
	usedWrap bool   // the device's wrap counter as the driver tracks it
	numFree  int    // slots not in flight

	freeIDs []uint16
	slots   map[uint16]uint16 // per id in flight: ring slots of its chain
	// Chains maps an id in flight to the buffers it was posted with.
	Chains map[uint16]Chain
	free   map[int][]uint64
	allocs map[uint16][]alloc
	cur    []alloc
}

// NewPacked returns a packed-ring driver with memSize bytes of fresh
// memory at GuestBase and a ring of size entries (any number in 1..32768).
func NewPacked(memSize int, size uint16, eventIdx bool) *PackedDriver {
	return NewPackedOn(make([]byte, memSize), GuestBase, size, eventIdx)
}

// NewPackedOn returns a packed-ring driver that lays out its ring and
// buffers in mem, which the guest sees at guest-physical address base.
func NewPackedOn(mem []byte, base uint64, size uint16, eventIdx bool) *PackedDriver {
	d := &PackedDriver{Mem: mem, Base: base, Table: &memory.Table{}, Size: size, EventIdx: eventIdx,
		wrap: true, usedWrap: true, numFree: int(size),
		slots: map[uint16]uint16{}, Chains: map[uint16]Chain{}, free: map[int][]uint64{}, allocs: map[uint16][]alloc{}}
	if err := d.Table.Add(memory.NewRegion(base, 0x7f0000000000+base, mem)); err != nil {
		panic(err)
	}
	d.descAddr = base
	d.drvAddr = align(d.descAddr+16*uint64(size), 16)
	d.devAddr = d.drvAddr + 16
	d.heap = align(d.devAddr+4, 4096)
	for i := int(size) - 1; i >= 0; i-- {
		d.freeIDs = append(d.freeIDs, uint16(i))
	}
	return d
}

// Config returns the ring configuration for virtqueue.Queue.Setup: a
// fresh ring, both wrap counters 1.
func (d *PackedDriver) Config() virtqueue.Config {
	return virtqueue.Config{Size: d.Size, DescAddr: d.descAddr, AvailAddr: d.drvAddr, UsedAddr: d.devAddr,
		EventIdx: d.EventIdx, Indirect: true, Packed: true, NextAvail: 0x8000, NextUsed: 0x8000}
}

// Queue returns a queue set up on this driver's ring.
func (d *PackedDriver) Queue(notify func() error) *virtqueue.Queue {
	q := virtqueue.New(notify, nil)
	if err := q.Setup(d.Table, d.Config()); err != nil {
		panic(err)
	}
	return q
}

// Alloc reserves n bytes of guest memory (recycled once the chain it
// belongs to is reaped) and returns its guest address and the slice.
func (d *PackedDriver) Alloc(n int) (uint64, []byte) {
	if l := d.free[n]; len(l) > 0 {
		addr := l[len(l)-1]
		d.free[n] = l[:len(l)-1]
		d.cur = append(d.cur, alloc{addr, n})
		off := addr - d.Base
		return addr, d.Mem[off : off+uint64(n) : off+uint64(n)]
	}
	d.cur = append(d.cur, alloc{d.heap, n})
	addr := d.heap
	d.heap = align(d.heap+uint64(n), 16)
	if d.heap-d.Base > uint64(len(d.Mem)) {
		panic("virtqueuetest: out of fake guest memory")
	}
	off := addr - d.Base
	return addr, d.Mem[off : off+uint64(n) : off+uint64(n)]
}

// PDesc is one packed descriptor. Post and PostRaw add the AVAIL/USED
// bits for the slot it lands in to Flags.
type PDesc struct {
	Addr  uint64
	Len   uint32
	ID    uint16
	Flags uint16
}

func (d *PackedDriver) availBits(wrap bool) uint16 {
	if wrap {
		return PackedFAvail
	}
	return PackedFUsed
}

// WriteSlot writes descriptor desc into ring slot i exactly as given
// (flags included, nothing added), for hostile-ring tests.
func (d *PackedDriver) WriteSlot(i uint16, desc PDesc) {
	off := d.descAddr - d.Base + 16*uint64(i)
	b := d.Mem[off:]
	binary.LittleEndian.PutUint64(b[0:], desc.Addr)
	binary.LittleEndian.PutUint32(b[8:], desc.Len)
	binary.LittleEndian.PutUint16(b[12:], desc.ID)
	ringatomic.Store16(d.Mem, int(off+14), desc.Flags)
}

// Slot reads ring slot i.
func (d *PackedDriver) Slot(i uint16) PDesc {
	off := d.descAddr - d.Base + 16*uint64(i)
	b := d.Mem[off:]
	return PDesc{Addr: binary.LittleEndian.Uint64(b), Len: binary.LittleEndian.Uint32(b[8:]),
		ID: binary.LittleEndian.Uint16(b[12:]), Flags: ringatomic.Load16(d.Mem, int(off+14))}
}

// PostRaw makes descs available as one chain in the next slots, with the
// AVAIL/USED bits of each slot added to its flags and the first
// descriptor's flags written last, and records the chain under id (for
// Reap). NEXT and the id are taken from descs as given: a hostile chain
// is posted as it is.
func (d *PackedDriver) PostRaw(id uint16, descs []PDesc) {
	first := d.next
	var firstFlags uint16
	for i, ds := range descs {
		ds.Flags |= d.availBits(d.wrap)
		if i == 0 {
			firstFlags = ds.Flags
			ds.Flags = d.Slot(d.next).Flags // not yet
		}
		d.WriteSlot(d.next, ds)
		if d.next++; d.next == d.Size {
			d.next, d.wrap = 0, !d.wrap
		}
	}
	d.numFree -= len(descs)
	d.slots[id] = uint16(len(descs))
	// Release: the rest of the chain is visible before its first flags.
	ringatomic.Store16(d.Mem, int(d.descAddr-d.Base+16*uint64(first)+14), firstFlags)
}

// Post adds a chain whose device-readable part carries out split into
// pieces of outSizes bytes, followed by writable buffers of inSizes bytes,
// like Driver.Post. It returns the buffer id.
func (d *PackedDriver) Post(out []byte, outSizes []int, inSizes []int, indirect bool) (uint16, error) {
	var descs []PDesc
	var ch Chain
	rest := out
	for _, s := range outSizes {
		if s == 0 || s > len(rest) {
			s = len(rest)
		}
		addr, buf := d.Alloc(s)
		copy(buf, rest[:s])
		rest = rest[s:]
		descs = append(descs, PDesc{Addr: addr, Len: uint32(s)})
		ch.Out = append(ch.Out, buf)
	}
	if len(rest) > 0 {
		addr, buf := d.Alloc(len(rest))
		copy(buf, rest)
		descs = append(descs, PDesc{Addr: addr, Len: uint32(len(rest))})
		ch.Out = append(ch.Out, buf)
	}
	for _, s := range inSizes {
		addr, buf := d.Alloc(s)
		for i := range buf {
			buf[i] = 0xa5 // poison: the device must overwrite what it reports
		}
		descs = append(descs, PDesc{Addr: addr, Len: uint32(s), Flags: PackedFWrite})
		ch.In = append(ch.In, buf)
	}
	if len(descs) == 0 {
		return 0, fmt.Errorf("virtqueuetest: empty chain")
	}
	if indirect {
		taddr, tbl := d.Alloc(16 * len(descs))
		for i, ds := range descs {
			b := tbl[16*i:]
			binary.LittleEndian.PutUint64(b[0:], ds.Addr)
			binary.LittleEndian.PutUint32(b[8:], ds.Len)
			binary.LittleEndian.PutUint16(b[14:], ds.Flags)
		}
		descs = []PDesc{{Addr: taddr, Len: uint32(16 * len(descs)), Flags: PackedFIndirect}}
	}
	if len(descs) > d.numFree || len(d.freeIDs) == 0 {
		for _, a := range d.cur {
			d.free[a.n] = append(d.free[a.n], a.addr)
		}
		d.cur = nil
		return 0, fmt.Errorf("virtqueuetest: ring full")
	}
	id := d.freeIDs[len(d.freeIDs)-1]
	d.freeIDs = d.freeIDs[:len(d.freeIDs)-1]
	for i := range descs {
		descs[i].ID = id
		if i < len(descs)-1 {
			descs[i].Flags |= PackedFNext
		}
	}
	d.Chains[id] = ch
	d.allocs[id] = d.cur
	d.cur = nil
	d.PostRaw(id, descs)
	return id, nil
}

// Reap reads the used descriptors written since the last call, in ring
// order, and frees their slots and ids. An id the driver does not have in
// flight is a device bug: Reap panics, as Linux reports a BUG.
func (d *PackedDriver) Reap() []Used {
	var out []Used
	for {
		off := d.descAddr - d.Base + 16*uint64(d.usedNext)
		f := ringatomic.Load16(d.Mem, int(off+14))
		if (f&PackedFUsed != 0) != d.usedWrap || (f&PackedFAvail != 0) != d.usedWrap {
			break
		}
		b := d.Mem[off:]
		u := Used{Head: binary.LittleEndian.Uint16(b[12:]), Len: binary.LittleEndian.Uint32(b[8:])}
		n, ok := d.slots[u.Head]
		if !ok {
			panic(fmt.Sprintf("virtqueuetest: device used id %d, which is not in flight", u.Head))
		}
		delete(d.slots, u.Head)
		u.Chain = d.Chains[u.Head]
		delete(d.Chains, u.Head)
		for _, a := range d.allocs[u.Head] {
			d.free[a.n] = append(d.free[a.n], a.addr)
		}
		delete(d.allocs, u.Head)
		if u.Head < d.Size {
			d.freeIDs = append(d.freeIDs, u.Head)
		}
		d.numFree += int(n)
		next := uint32(d.usedNext) + uint32(n)
		if next >= uint32(d.Size) {
			next -= uint32(d.Size)
			d.usedWrap = !d.usedWrap
		}
		d.usedNext = uint16(next)
		out = append(out, u)
	}
	if d.EventIdx {
		// Like a driver re-enabling callbacks: interrupt me when the
		// device uses the next slot.
		d.SetDriverEvent(EventDesc, d.UsedState())
	}
	return out
}

// UsedState is the slot (bits 0-14) and wrap counter (bit 15) where the
// driver expects the next used descriptor.
func (d *PackedDriver) UsedState() uint16 { return state(d.usedNext, d.usedWrap) }

// AvailState is the slot and wrap counter of the next descriptor the
// driver will make available.
func (d *PackedDriver) AvailState() uint16 { return state(d.next, d.wrap) }

func state(slot uint16, wrap bool) uint16 {
	if wrap {
		return slot | 0x8000
	}
	return slot
}

// SetDriverEvent writes the driver event suppression structure: flags
// (EventEnable, EventDisable, EventDesc) and, for EventDesc, the slot and
// wrap counter whose use should interrupt.
func (d *PackedDriver) SetDriverEvent(flags, offWrap uint16) {
	off := int(d.drvAddr - d.Base)
	ringatomic.Store16(d.Mem, off, offWrap)
	ringatomic.Store16(d.Mem, off+2, flags)
}

// DeviceEvent reads the device event suppression structure as the device
// wrote it.
func (d *PackedDriver) DeviceEvent() (flags, offWrap uint16) {
	off := int(d.devAddr - d.Base)
	return ringatomic.Load16(d.Mem, off+2), ringatomic.Load16(d.Mem, off)
}

// NeedKick reports whether the device asked to be told of the slots made
// available since old (an AvailState): with EventDesc, when they include
// the slot it named (Linux's virtqueue_kick_prepare_packed); otherwise
// unless it disabled kicks.
func (d *PackedDriver) NeedKick(old uint16) bool {
	flags, ow := d.DeviceEvent()
	if flags != EventDesc {
		return flags != EventDisable
	}
	n := 2 * uint32(d.Size)
	lin := func(v uint16) uint32 {
		l := uint32(v & 0x7fff)
		if v&0x8000 == 0 {
			l += uint32(d.Size)
		}
		return l % n
	}
	nw, o, ev := lin(d.AvailState()), lin(old), lin(ow)
	return (nw+2*n-ev-1)%n < (nw+n-o)%n
}

// DescAddr, DriverAreaAddr and DeviceAreaAddr are the guest addresses of
// the ring's three parts.
func (d *PackedDriver) DescAddr() uint64       { return d.descAddr }
func (d *PackedDriver) DriverAreaAddr() uint64 { return d.drvAddr }
func (d *PackedDriver) DeviceAreaAddr() uint64 { return d.devAddr }

// Ring is what Driver and PackedDriver have in common, for tests and
// benchmarks that run on either ring format.
type Ring interface {
	Post(out []byte, outSizes []int, inSizes []int, indirect bool) (uint16, error)
	Reap() []Used
	Queue(notify func() error) *virtqueue.Queue
}

var (
	_ Ring = (*Driver)(nil)
	_ Ring = (*PackedDriver)(nil)
)

// NewRing returns a split (Driver) or packed (PackedDriver) ring driver.
func NewRing(packed bool, memSize int, size uint16, eventIdx bool) Ring {
	if packed {
		return NewPacked(memSize, size, eventIdx)
	}
	return New(memSize, size, eventIdx)
}
