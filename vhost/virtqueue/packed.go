package virtqueue

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vunet/vunet/vhost/internal/ringatomic"
	"github.com/vunet/vunet/vhost/memory"
)

// The packed ring (virtio 1.2, 2.8; VIRTIO_F_RING_PACKED). One ring of
// 16-byte descriptors {addr u64, len u32, id u16, flags u16} is shared by
// both sides: the driver makes descriptors available in ring order, the
// device reads them in ring order and overwrites them, in the order it
// completes buffers, with used descriptors {id, len, flags}. Which
// descriptors are which is told by the AVAIL and USED flag bits compared
// with each side's wrap counter, which starts at 1 and flips every time
// that side passes the end of the ring. A chain (NEXT) occupies
// consecutive slots and carries its buffer id in its last descriptor; the
// device writes one used descriptor per chain and skips as many slots as
// the chain had, and the driver, which remembers each id's chain length,
// skips the same. Two 4-byte event suppression structures replace the
// split ring's flags and EVENT_IDX fields: the driver's (read by us) says
// when it wants interrupts, the device's (written by us) when we want
// kicks.
//
// Positions are kept as one number in [0, 2·size): slot = lin mod size,
// wrap counter = 1 for lin < size. Advancing by n is (lin+n) mod 2·size,
// which flips the wrap counter exactly when the slot passes the end, and
// the distance between two positions that are at most size apart is their
// difference mod 2·size; the EVENT_IDX comparison works on the same
// numbers.
//
// Everything in the ring is guest-controlled. A chain whose buffers are
// bad is returned with length 0 (it has a usable id and a known length in
// the ring); a chain whose end or id cannot be trusted (longer than the
// free part of the ring, an id outside 0..size-1, an id already in
// flight) breaks the ring, as a bad head does on a split ring.

// Packed descriptor flags (virtio 1.2, 2.8.1).
const (
	descFAvail = 1 << 7
	descFUsed  = 1 << 15
)

// Event suppression flags (virtio 1.2, 2.8.10).
const (
	eventFlagsEnable  = 0
	eventFlagsDisable = 1
	eventFlagsDesc    = 2
)

// Packed-ring errors (see the list in queue.go).
var (
	ErrBadID       = errors.New("buffer id out of range")
	ErrDupID       = errors.New("buffer id already in flight")
	ErrChainLength = errors.New("descriptor chain longer than the free part of the ring")
	ErrBadBase     = errors.New("ring base out of range")
	ErrPushUnknown = errors.New("push of a buffer id that is not in flight")
)

// pendingUsed is a used descriptor written at the next Flush.
type pendingUsed struct {
	id     uint16
	n      uint16 // ring slots the chain occupied
	length uint32
}

// packedState is a Queue's packed-ring state; the Queue's ready, pending,
// skipped, flushes and signalled fields keep their split-ring meaning.
type packedState struct {
	driverEvt []byte // driver event suppression: the guest's interrupt wishes
	deviceEvt []byte // device event suppression: our kick wishes

	availLin uint32 // next slot to pop (position, see above)
	usedLin  uint32 // next slot a used descriptor goes to
	// inflight counts the slots between usedLin and availLin: popped
	// chains not yet published as used. It can never exceed the ring size;
	// a guest that makes more available than that is reusing slots we have
	// not returned.
	inflight uint32
	// ahead is how far past availLin we have seen: the slot at
	// availLin+ahead is the first one found not available (a Rewind moves
	// availLin back, not what we have seen). ArmKick asks for a kick there.
	ahead uint32

	// chainLen is, per buffer id, the ring slots of its chain while it is
	// in flight (popped, not pushed), else 0.
	chainLen []uint16
	// popLog records the ids of good chains in pop order (popSeq), so that
	// Rewind can take them out of flight again.
	popLog []uint16
	popSeq uint64
	pend   []pendingUsed
}

func (q *Queue) ring2() uint32 { return 2 * uint32(q.cfg.Size) }

// slot returns the ring slot and wrap counter of position lin.
func (q *Queue) slot(lin uint32) (int, bool) {
	n := uint32(q.cfg.Size)
	if lin < n {
		return int(lin), true
	}
	return int(lin - n), false
}

// linOf converts a 16-bit ring state (slot in bits 0-14, wrap counter in
// bit 15) to a position.
func (q *Queue) linOf(v uint16) (uint32, error) {
	pos := uint32(v & 0x7fff)
	if pos >= uint32(q.cfg.Size) {
		return 0, fmt.Errorf("%w: slot %d, size %d", ErrBadBase, pos, q.cfg.Size)
	}
	if v&0x8000 == 0 {
		pos += uint32(q.cfg.Size)
	}
	return pos, nil
}

// stateOf is linOf's inverse.
func (q *Queue) stateOf(lin uint32) uint16 {
	s, wrap := q.slot(lin)
	v := uint16(s)
	if wrap {
		v |= 0x8000
	}
	return v
}

func availFlags(flags uint16, wrap bool) bool {
	return (flags&descFAvail != 0) == wrap && (flags&descFUsed != 0) != wrap
}

func (q *Queue) setupPacked(mem *memory.Table, cfg Config) error {
	if cfg.Size == 0 || cfg.Size > MaxSize {
		return fmt.Errorf("virtqueue: packed ring size %d not in 1..%d", cfg.Size, MaxSize)
	}
	if cfg.DescAddr%16 != 0 || cfg.AvailAddr%4 != 0 || cfg.UsedAddr%4 != 0 {
		return fmt.Errorf("virtqueue: misaligned packed ring: descriptors %#x (align 16), driver area %#x (4), device area %#x (4)",
			cfg.DescAddr, cfg.AvailAddr, cfg.UsedAddr)
	}
	n := uint32(cfg.Size)
	desc, err := mem.Slice(cfg.DescAddr, uint64(n)*descSize)
	if err != nil {
		return fmt.Errorf("virtqueue: descriptor ring: %w", err)
	}
	drv, err := mem.Slice(cfg.AvailAddr, 4)
	if err != nil {
		return fmt.Errorf("virtqueue: driver event suppression area: %w", err)
	}
	dev, err := mem.Slice(cfg.UsedAddr, 4)
	if err != nil {
		return fmt.Errorf("virtqueue: device event suppression area: %w", err)
	}
	q.mem, q.cfg, q.desc, q.avail, q.used = mem, cfg, desc, nil, nil
	avail, err := q.linOf(cfg.NextAvail)
	if err != nil {
		return fmt.Errorf("virtqueue: available: %w", err)
	}
	usedState := cfg.NextUsed
	if usedState == 0 {
		// A frontend that sends only the 16-bit available state (or
		// nothing in flight): the used position is the same.
		usedState = cfg.NextAvail
	}
	used, err := q.linOf(usedState)
	if err != nil {
		return fmt.Errorf("virtqueue: used: %w", err)
	}
	// Chains the previous backend took and never returned stay in flight:
	// the driver does not reuse their slots either.
	inflight := (avail + 2*n - used) % (2 * n)
	if inflight > n {
		return fmt.Errorf("virtqueue: %w: used position %#x more than a ring behind available %#x", ErrBadBase, usedState, cfg.NextAvail)
	}
	p := &q.pk
	p.driverEvt, p.deviceEvt = drv, dev
	p.availLin, p.usedLin, p.inflight, p.ahead = avail, used, inflight, 0
	if len(p.chainLen) != int(n) {
		p.chainLen, p.popLog = make([]uint16, n), make([]uint16, n)
	} else {
		clear(p.chainLen)
	}
	p.popSeq, p.pend = 0, p.pend[:0]
	q.packed = true
	return nil
}

// popPacked is Pop on a packed ring.
func (q *Queue) popPacked(e *Element) error {
	p := &q.pk
	n := uint32(q.cfg.Size)
	for bad := uint32(0); ; bad++ {
		if bad > n {
			return q.markBroken(ErrChainFlood)
		}
		s, wrap := q.slot(p.availLin)
		// Acquire: the chain's other descriptors were written before
		// its first one's flags.
		flags := ringatomic.Load16(q.desc, s*descSize+14)
		if !availFlags(flags, wrap) {
			p.ahead = 0
			return ErrEmpty
		}
		slots, id, chainErr := q.walkPacked(e, s, flags)
		if slots == 0 {
			return q.markBroken(chainErr)
		}
		if id >= q.cfg.Size {
			return q.markBroken(fmt.Errorf("%w: %d", ErrBadID, id))
		}
		if p.chainLen[id] != 0 {
			return q.markBroken(fmt.Errorf("%w: %d", ErrDupID, id))
		}
		p.availLin = (p.availLin + slots) % (2 * n)
		p.inflight += slots
		p.ahead -= min(p.ahead, slots)
		if chainErr != nil {
			q.Stats.BadChains.Add(1)
			q.onError(fmt.Errorf("virtqueue: chain %d: %w", id, chainErr))
			p.pend = append(p.pend, pendingUsed{id: id, n: uint16(slots)})
			q.pending++
			q.skipped++
			continue
		}
		p.chainLen[id] = uint16(slots)
		p.popLog[p.popSeq%uint64(n)] = id
		p.popSeq++
		e.Head = id
		q.Stats.Popped.Add(1)
		return nil
	}
}

// walkPacked collects the chain starting at slot s (whose flags the
// caller read) into e. It returns the ring slots the chain occupies and
// its buffer id (from its last descriptor), and the first error in its
// buffers, which makes it a bad chain to return with length 0. slots is 0
// when the chain's end is not within the free part of the ring: then
// neither the id nor where the next chain starts is known, and err says
// why the ring is broken.
func (q *Queue) walkPacked(e *Element, s int, flags uint16) (slots uint32, id uint16, err error) {
	e.Out, e.In = e.Out[:0], e.In[:0]
	if q.bufLog != nil {
		e.InAddr = e.InAddr[:0]
	}
	n := uint32(q.cfg.Size)
	room := n - q.pk.inflight
	for i := uint32(0); ; i++ {
		if i >= room {
			return 0, 0, fmt.Errorf("%w: more than %d descriptors", ErrChainLength, room)
		}
		d := q.desc[s*descSize : s*descSize+descSize]
		if i > 0 {
			flags = binary.LittleEndian.Uint16(d[14:])
		}
		if err == nil {
			err = q.packedDesc(e, d, flags, i)
		}
		if flags&descFNext == 0 {
			return i + 1, binary.LittleEndian.Uint16(d[12:]), err
		}
		if s++; s == int(n) {
			s = 0
		}
	}
}

// packedDesc adds the buffers of ring descriptor d (the i-th of its
// chain) to e.
func (q *Queue) packedDesc(e *Element, d []byte, flags uint16, i uint32) error {
	addr := binary.LittleEndian.Uint64(d[0:])
	length := binary.LittleEndian.Uint32(d[8:])
	if flags&descFIndirect == 0 {
		return q.addBuffer(e, addr, length, flags&descFWrite != 0)
	}
	if !q.cfg.Indirect {
		return ErrIndirectOff
	}
	// An indirect descriptor is a chain on its own (virtio 1.2, 2.8.20:
	// never linked by NEXT).
	if flags&descFNext != 0 || i > 0 {
		return ErrIndirectNext
	}
	if length == 0 || length%descSize != 0 || length/descSize > MaxSize {
		return fmt.Errorf("%w: %d", ErrIndirectLen, length)
	}
	t, err := q.mem.Slice(addr, uint64(length))
	if err != nil {
		return fmt.Errorf("indirect table: %w", err)
	}
	// Table entries follow each other; WRITE is their only flag (NEXT
	// and the id are ignored, 2.8.19), INDIRECT is forbidden.
	for off := 0; off < len(t); off += descSize {
		td := t[off : off+descSize]
		tf := binary.LittleEndian.Uint16(td[14:])
		if tf&descFIndirect != 0 {
			return ErrNestedIndir
		}
		if err := q.addBuffer(e, binary.LittleEndian.Uint64(td[0:]), binary.LittleEndian.Uint32(td[8:]), tf&descFWrite != 0); err != nil {
			return err
		}
	}
	return nil
}

// addBuffer appends one descriptor's buffer to e's readable or writable
// list (both ring formats).
func (q *Queue) addBuffer(e *Element, addr uint64, length uint32, write bool) error {
	var err error
	if write {
		n0 := len(e.In)
		e.In, err = q.mem.Translate(e.In, addr, uint64(length), MaxIovecs-len(e.In)-len(e.Out))
		if q.bufLog != nil {
			// For PushElement's dirty logging: a descriptor split at
			// region boundaries is still one guest-physical range.
			for _, b := range e.In[n0:] {
				e.InAddr = append(e.InAddr, addr)
				addr += uint64(len(b))
			}
		}
	} else {
		if len(e.In) > 0 {
			return ErrWriteOrder
		}
		e.Out, err = q.mem.Translate(e.Out, addr, uint64(length), MaxIovecs-len(e.In)-len(e.Out))
	}
	if err != nil {
		return fmt.Errorf("%w: %v", ErrDescMemory, err)
	}
	return nil
}

// pushPacked is Push on a packed ring.
func (q *Queue) pushPacked(id uint16, length uint32) {
	p := &q.pk
	if id >= q.cfg.Size || p.chainLen[id] == 0 {
		// A device bug, never guest input: we only push what we popped.
		q.markBroken(fmt.Errorf("%w: %d", ErrPushUnknown, id))
		return
	}
	p.pend = append(p.pend, pendingUsed{id: id, n: p.chainLen[id], length: length})
	p.chainLen[id] = 0
	q.pending++
}

// flushPacked writes the pending used descriptors in ring order. The
// first one's flags are stored last: the driver reads used descriptors in
// order and stops at the first that is not used, so it sees the whole
// batch at once or none of it (the split ring's single index update).
func (q *Queue) flushPacked() bool {
	p := &q.pk
	if !q.ready || len(p.pend) == 0 {
		return false
	}
	n2 := q.ring2()
	lin := p.usedLin
	var firstOff int
	var firstFlags uint16
	for i, u := range p.pend {
		s, wrap := q.slot(lin)
		off := s * descSize
		binary.LittleEndian.PutUint32(q.desc[off+8:], u.length)
		binary.LittleEndian.PutUint16(q.desc[off+12:], u.id)
		var f uint16
		if wrap {
			f = descFAvail | descFUsed
		}
		if u.length > 0 {
			f |= descFWrite // the device wrote into the buffer (2.8.3)
		}
		if i == 0 {
			firstOff, firstFlags = off, f
		} else {
			ringatomic.Store16(q.desc, off+14, f)
		}
		lin = (lin + uint32(u.n)) % n2
		p.inflight -= uint32(u.n)
	}
	// Release: everything above is visible before this.
	ringatomic.Store16(q.desc, firstOff+14, firstFlags)
	if q.usedLog != nil {
		// A packed ring's used entries are written into the
		// descriptor ring itself, so they are logged at its own
		// address (log_guest_addr names a split ring's used ring),
		// after every store above.
		l := p.usedLin
		for _, u := range p.pend {
			s, _ := q.slot(l)
			q.usedLog.Mark(q.cfg.DescAddr+uint64(s*descSize)+8, 8)
			l = (l + uint32(u.n)) % n2
		}
	}
	if l := cmp.Or(q.usedLog, q.bufLog); l != nil {
		l.Notify()
	}
	p.usedLin = lin
	q.Stats.Used.Add(uint64(len(p.pend)))
	p.pend = p.pend[:0]
	q.pending = 0
	q.flushes++
	return true
}

// rewindPacked returns to m (Rewind checked that it can be exact).
func (q *Queue) rewindPacked(m Mark) {
	p := &q.pk
	n := uint32(q.cfg.Size)
	back := (p.availLin + 2*n - m.lin) % (2 * n)
	for s := m.popSeq; s != p.popSeq; s++ {
		p.chainLen[p.popLog[s%uint64(n)]] = 0
	}
	p.availLin, p.inflight, p.popSeq = m.lin, m.inflight, m.popSeq
	p.ahead = min(p.ahead+back, n)
	p.pend = p.pend[:m.pending]
}

// needsNotifyPacked decides, after a Flush, whether the guest wants an
// interrupt: its event suppression structure says always (ENABLE), never
// (DISABLE), or, with EVENT_IDX, once the used position passes a given
// slot (DESC). The reserved value 3, or DESC without EVENT_IDX, is taken
// as ENABLE: an interrupt too many costs the guest a look at the ring, one
// too few can stall it for good.
func (q *Queue) needsNotifyPacked() bool {
	p := &q.pk
	n2 := q.ring2()
	old, valid := uint32(q.signalled), q.signalledValid
	// The reference point moves on every decision, whatever the mode, so
	// that a guest switching to DESC is compared with the last interrupt
	// decision and not one from long ago.
	q.signalled, q.signalledValid = uint16(p.usedLin), true
	flags := ringatomic.Load16(p.driverEvt, 2) & 3
	switch {
	case flags == eventFlagsDisable:
		return false
	case flags != eventFlagsDesc || !q.cfg.EventIdx:
		return true
	case !valid:
		return true
	}
	ow := ringatomic.Load16(p.driverEvt, 0)
	event := uint32(ow & 0x7fff)
	if ow&0x8000 == 0 {
		event += uint32(q.cfg.Size)
	}
	event %= n2 // an offset past the ring is nonsense, but must not matter
	nw := p.usedLin
	// vring_need_event on positions mod 2·size: the guest wants to hear
	// when the used descriptor at event is written, i.e. event in [old, new).
	return (nw+2*n2-event-1)%n2 < (nw+n2-old)%n2
}

// armPacked writes the device event suppression structure: kicks wanted
// from slot lin on (EVENT_IDX), or every time. It reports whether that
// slot is available already.
func (q *Queue) armPacked(lin uint32) bool {
	p := &q.pk
	if q.cfg.EventIdx {
		ringatomic.Store16(p.deviceEvt, 0, q.stateOf(lin))
		ringatomic.Store16(p.deviceEvt, 2, eventFlagsDesc)
	} else {
		ringatomic.Store16(p.deviceEvt, 2, eventFlagsEnable)
	}
	if q.usedLog != nil {
		// The device event suppression structure (at UsedAddr).
		q.usedLog.Mark(q.cfg.UsedAddr, 4)
	}
	// The atomics order the stores above before this reload.
	s, wrap := q.slot(lin)
	return availFlags(ringatomic.Load16(q.desc, s*descSize+14), wrap)
}

// scanPacked counts the chains made available past our position (at
// most a ring's worth) and returns the position after them.
func (q *Queue) scanPacked() (chains int, end uint32) {
	p := &q.pk
	n := uint32(q.cfg.Size)
	lin := p.availLin
	for used := p.inflight; used < n; {
		s, wrap := q.slot(lin)
		if !availFlags(ringatomic.Load16(q.desc, s*descSize+14), wrap) {
			break
		}
		// Skip the chain: flags of its other descriptors, up to the free
		// part of the ring.
		k := uint32(1)
		for f := ringatomic.Load16(q.desc, s*descSize+14); f&descFNext != 0 && used+k < n; k++ {
			if s++; s == int(n) {
				s = 0
			}
			f = binary.LittleEndian.Uint16(q.desc[s*descSize+14:])
		}
		used += k
		lin = (lin + k) % (2 * n)
		chains++
	}
	return chains, lin
}
