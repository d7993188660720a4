// Package virtqueuetest is a mock virtio driver: it lays out split rings in a
// plain byte slice that stands in for guest memory, posts descriptor chains
// the way real drivers do (headers in their own descriptor, frames split into
// arbitrary pieces, indirect tables), and reads back what the device used.
// It lets every layer above the virtqueue be tested without a VMM.
package virtqueuetest

import (
	"encoding/binary"
	"fmt"

	"github.com/vunet/vunet/vhost/internal/ringatomic"
	"github.com/vunet/vunet/vhost/memory"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// GuestBase is the guest-physical address of the fake memory. It is not 0
// so that address arithmetic bugs show.
const GuestBase = 0x10000

// Driver owns fake guest memory and one split ring in it.
type Driver struct {
	Mem      []byte
	Base     uint64 // guest-physical address of Mem[0]
	Table    *memory.Table
	Size     uint16
	EventIdx bool

	descAddr, availAddr, usedAddr uint64
	heap                          uint64 // next free guest address for buffers
	freeHead                      []uint16
	availIdx                      uint16
	lastUsed                      uint16
	// Chains maps a head to the buffers it was posted with.
	Chains map[uint16]Chain
	ids    map[uint16][]uint16
	// Buffers are recycled by size once the device returns their chain, so
	// long-running tests do not exhaust the fake memory.
	free   map[int][]uint64
	allocs map[uint16][]alloc
	cur    []alloc
}

type alloc struct {
	addr uint64
	n    int
}

// Chain is what the driver posted for one head.
type Chain struct {
	Out [][]byte // device-readable buffers, in order
	In  [][]byte // device-writable buffers, in order
}

// Used is one used-ring entry read back from the device.
type Used struct {
	Head  uint16
	Len   uint32
	Chain Chain
}

// New returns a driver with memSize bytes of fresh memory at GuestBase and
// a ring of size entries (a power of two).
func New(memSize int, size uint16, eventIdx bool) *Driver {
	return NewOn(make([]byte, memSize), GuestBase, size, eventIdx)
}

// NewOn returns a driver that lays out its ring and buffers in mem, which
// the guest sees at guest-physical address base (for example a memfd
// shared with a backend through the mock frontend).
func NewOn(mem []byte, base uint64, size uint16, eventIdx bool) *Driver {
	d := &Driver{Mem: mem, Base: base, Table: &memory.Table{}, Size: size, EventIdx: eventIdx,
		Chains: map[uint16]Chain{}, ids: map[uint16][]uint16{}, free: map[int][]uint64{}, allocs: map[uint16][]alloc{}}
	if err := d.Table.Add(memory.NewRegion(base, 0x7f0000000000+base, d.Mem)); err != nil {
		panic(err)
	}
	n := uint64(size)
	d.descAddr = base
	d.availAddr = d.descAddr + 16*n
	d.usedAddr = align(d.availAddr+6+2*n, 4096)
	d.heap = align(d.usedAddr+6+8*n, 4096)
	for i := int(size) - 1; i >= 0; i-- {
		d.freeHead = append(d.freeHead, uint16(i))
	}
	return d
}

func align(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

// Config returns the ring configuration for virtqueue.Queue.Setup.
func (d *Driver) Config() virtqueue.Config {
	return virtqueue.Config{Size: d.Size, DescAddr: d.descAddr, AvailAddr: d.availAddr, UsedAddr: d.usedAddr, EventIdx: d.EventIdx, Indirect: true}
}

// Queue returns a queue set up on this driver's ring.
func (d *Driver) Queue(notify func() error) *virtqueue.Queue {
	q := virtqueue.New(notify, nil)
	if err := q.Setup(d.Table, d.Config()); err != nil {
		panic(err)
	}
	return q
}

// Alloc reserves n bytes of guest memory and returns its guest address and
// the slice.
func (d *Driver) Alloc(n int) (uint64, []byte) {
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

// Desc is one raw descriptor, for tests that build hostile chains.
type Desc struct {
	Addr  uint64
	Len   uint32
	Flags uint16
	Next  uint16
}

// WriteDesc writes a raw descriptor into slot i of the table.
func (d *Driver) WriteDesc(i uint16, desc Desc) {
	off := d.descAddr - d.Base + 16*uint64(i)
	b := d.Mem[off:]
	binary.LittleEndian.PutUint64(b[0:], desc.Addr)
	binary.LittleEndian.PutUint32(b[8:], desc.Len)
	binary.LittleEndian.PutUint16(b[12:], desc.Flags)
	binary.LittleEndian.PutUint16(b[14:], desc.Next)
}

// PublishRaw puts head in the next avail slot and bumps the avail index.
func (d *Driver) PublishRaw(head uint16) {
	off := d.availAddr - d.Base
	binary.LittleEndian.PutUint16(d.Mem[off+4+2*uint64(d.availIdx%d.Size):], head)
	d.availIdx++
	// Atomic, like a real driver's release store: descriptors and the
	// ring entry written above are visible before the index.
	ringatomic.Store16(d.Mem, int(off+2), d.availIdx)
}

// SetAvailIdx writes the avail index directly (for hostile-ring tests).
func (d *Driver) SetAvailIdx(v uint16) {
	d.availIdx = v
	ringatomic.Store16(d.Mem, int(d.availAddr-d.Base+2), v)
}

// Post adds a chain whose device-readable part carries out split into
// pieces of outSizes bytes, followed by writable buffers of inSizes bytes.
// A zero entry in outSizes means "the rest". With indirect, the chain is
// placed in an indirect table. It returns the head.
func (d *Driver) Post(out []byte, outSizes []int, inSizes []int, indirect bool) (uint16, error) {
	var descs []Desc
	var ch Chain
	rest := out
	for _, s := range outSizes {
		if s == 0 || s > len(rest) {
			s = len(rest)
		}
		addr, buf := d.Alloc(s)
		copy(buf, rest[:s])
		rest = rest[s:]
		descs = append(descs, Desc{Addr: addr, Len: uint32(s)})
		ch.Out = append(ch.Out, buf)
	}
	if len(rest) > 0 {
		addr, buf := d.Alloc(len(rest))
		copy(buf, rest)
		descs = append(descs, Desc{Addr: addr, Len: uint32(len(rest))})
		ch.Out = append(ch.Out, buf)
	}
	for _, s := range inSizes {
		addr, buf := d.Alloc(s)
		for i := range buf {
			buf[i] = 0xa5 // poison: the device must overwrite what it reports
		}
		descs = append(descs, Desc{Addr: addr, Len: uint32(s), Flags: 2})
		ch.In = append(ch.In, buf)
	}
	if len(descs) == 0 {
		return 0, fmt.Errorf("virtqueuetest: empty chain")
	}
	if indirect {
		taddr, tbl := d.Alloc(16 * len(descs))
		for i, ds := range descs {
			if i < len(descs)-1 {
				ds.Flags |= 1
				ds.Next = uint16(i + 1)
			}
			b := tbl[16*i:]
			binary.LittleEndian.PutUint64(b[0:], ds.Addr)
			binary.LittleEndian.PutUint32(b[8:], ds.Len)
			binary.LittleEndian.PutUint16(b[12:], ds.Flags)
			binary.LittleEndian.PutUint16(b[14:], ds.Next)
		}
		descs = []Desc{{Addr: taddr, Len: uint32(16 * len(descs)), Flags: 4}}
	}
	if len(descs) > len(d.freeHead) {
		for _, a := range d.cur {
			d.free[a.n] = append(d.free[a.n], a.addr)
		}
		d.cur = nil
		return 0, fmt.Errorf("virtqueuetest: ring full")
	}
	ids := make([]uint16, len(descs))
	for i := range ids {
		ids[i] = d.freeHead[len(d.freeHead)-1]
		d.freeHead = d.freeHead[:len(d.freeHead)-1]
	}
	for i, ds := range descs {
		if i < len(descs)-1 {
			ds.Flags |= 1
			ds.Next = ids[i+1]
		}
		d.WriteDesc(ids[i], ds)
	}
	d.Chains[ids[0]] = ch
	d.chainIDs(ids)
	d.allocs[ids[0]] = d.cur
	d.cur = nil
	d.PublishRaw(ids[0])
	return ids[0], nil
}

func (d *Driver) chainIDs(ids []uint16) { d.ids[ids[0]] = ids }

// Reap reads the used entries published since the last call and frees
// their descriptors.
func (d *Driver) Reap() []Used {
	off := d.usedAddr - d.Base
	idx := ringatomic.Load16(d.Mem, int(off+2))
	var out []Used
	for ; d.lastUsed != idx; d.lastUsed++ {
		e := d.Mem[off+4+8*uint64(d.lastUsed%d.Size):]
		u := Used{Head: uint16(binary.LittleEndian.Uint32(e)), Len: binary.LittleEndian.Uint32(e[4:])}
		u.Chain = d.Chains[u.Head]
		delete(d.Chains, u.Head)
		for _, a := range d.allocs[u.Head] {
			d.free[a.n] = append(d.free[a.n], a.addr)
		}
		delete(d.allocs, u.Head)
		if ids, ok := d.ids[u.Head]; ok {
			d.freeHead = append(d.freeHead, ids...)
			delete(d.ids, u.Head)
		}
		out = append(out, u)
	}
	if d.EventIdx {
		// Like a driver re-enabling callbacks: interrupt me when the
		// device uses the next entry.
		ringatomic.Store16(d.Mem, int(d.availAddr-d.Base+4+2*uint64(d.Size)), d.lastUsed)
	}
	return out
}

// SetNoInterrupt sets or clears VRING_AVAIL_F_NO_INTERRUPT.
func (d *Driver) SetNoInterrupt(on bool) {
	var v uint16
	if on {
		v = 1
	}
	ringatomic.Store16(d.Mem, int(d.availAddr-d.Base), v)
}

// SetUsedEvent writes used_event (EVENT_IDX): the guest wants an interrupt
// once the used index passes v.
func (d *Driver) SetUsedEvent(v uint16) {
	ringatomic.Store16(d.Mem, int(d.availAddr-d.Base+4+2*uint64(d.Size)), v)
}

// AvailEvent reads avail_event (EVENT_IDX) as written by the device.
func (d *Driver) AvailEvent() uint16 {
	return ringatomic.Load16(d.Mem, int(d.usedAddr-d.Base+4+8*uint64(d.Size)))
}

// UsedFlags reads the used ring's flags as written by the device.
func (d *Driver) UsedFlags() uint16 {
	return ringatomic.Load16(d.Mem, int(d.usedAddr-d.Base))
}

// The methods below are an allocation-free driver for a frontend that owns
// a fixed buffer per descriptor (e2e/tapfront): it writes descriptors with
// WriteDesc once or per frame, publishes heads with PublishRaw and takes
// used entries one by one. They do not touch Chains or the buffer pools,
// so they must not be mixed with Post and Reap on the same ring.

// Reserve carves n bytes of guest memory for the rest of the driver's life
// (never recycled) and returns their guest address and slice.
func (d *Driver) Reserve(n int) (uint64, []byte, error) {
	addr := d.heap
	end := align(addr+uint64(n), 16)
	if end-d.Base > uint64(len(d.Mem)) {
		return 0, nil, fmt.Errorf("virtqueuetest: %d bytes do not fit in the %d bytes of ring memory", n, len(d.Mem))
	}
	d.heap = end
	off := addr - d.Base
	return addr, d.Mem[off : off+uint64(n) : off+uint64(n)], nil
}

// AvailIdx is the driver's available index (what PublishRaw last stored).
func (d *Driver) AvailIdx() uint16 { return d.availIdx }

// LastUsed is the index of the next used entry the driver will take.
func (d *Driver) LastUsed() uint16 { return d.lastUsed }

// UsedPending is how many used entries the device published that the
// driver has not taken yet. A device that moves the used index more than
// the ring size ahead is broken; the count is reported as is and the
// caller must check it against Size.
func (d *Driver) UsedPending() uint16 {
	return ringatomic.Load16(d.Mem, int(d.usedAddr-d.Base+2)) - d.lastUsed
}

// PeekUsed returns the i-th pending used entry (0 is the next) without
// taking it. The caller checks i < UsedPending().
func (d *Driver) PeekUsed(i uint16) (head uint16, length uint32) {
	e := d.Mem[d.usedAddr-d.Base+4+8*uint64((d.lastUsed+i)%d.Size):]
	return uint16(binary.LittleEndian.Uint32(e)), binary.LittleEndian.Uint32(e[4:])
}

// TakeUsed consumes n pending used entries.
func (d *Driver) TakeUsed(n uint16) { d.lastUsed += n }

// NeedKick reports whether the device asked to be notified of the buffers
// published since the available index was old: with EVENT_IDX, when the
// index crossed avail_event (virtio 1.2, 2.7.10); otherwise unless the
// device set VRING_USED_F_NO_NOTIFY. It must be called after PublishRaw
// (whose atomic store orders the index before this load).
func (d *Driver) NeedKick(old uint16) bool {
	if d.EventIdx {
		return NeedEvent(d.AvailEvent(), d.availIdx, old)
	}
	return d.UsedFlags()&1 == 0
}

// NeedEvent is vring_need_event: whether moving an index from old to new
// crosses event.
func NeedEvent(event, new, old uint16) bool { return new-event-1 < new-old }

// EnableInterrupts asks the device to interrupt once n (≥ 1) entries past
// LastUsed are used (used_event = LastUsed+n-1 with EVENT_IDX; without it,
// NO_INTERRUPT is cleared and every flush interrupts). The caller must look
// at UsedPending again afterwards before it sleeps: an entry used before
// the request took effect sends nothing.
func (d *Driver) EnableInterrupts(n uint16) {
	if d.EventIdx {
		d.SetUsedEvent(d.lastUsed + n - 1)
		return
	}
	d.SetNoInterrupt(false)
}

// DisableInterrupts tells the device the driver is polling. With EVENT_IDX
// it leaves used_event behind (the device interrupts only when the used
// index crosses it again, 65536 entries on).
func (d *Driver) DisableInterrupts() {
	if d.EventIdx {
		d.SetUsedEvent(d.lastUsed - 1)
		return
	}
	d.SetNoInterrupt(true)
}
