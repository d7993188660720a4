// Package virtqueue implements the device side of a virtio virtqueue over
// guest memory, in either ring format (split, or packed with
// VIRTIO_F_RING_PACKED; packed.go): popping descriptor chains into iovec
// lists, returning them with explicit lengths, batching used-ring updates
// and deciding when the guest needs an interrupt. One Queue type serves
// both formats behind the same methods, so its users (the endpoint) never
// know which ring they drive; each method branches once on the format,
// which costs a predictable branch instead of an interface call that
// could not be inlined.
//
// Everything read from the rings is guest-controlled. Bad chains are
// returned to the guest with length 0 and counted; a ring whose indices make
// no sense is marked broken and stops being processed. Nothing here panics
// on guest input.
//
// A Queue is not safe for concurrent use: its owner (a queue worker) calls
// it from one goroutine at a time, and the control plane reconfigures it only
// while holding the queue's lock (Lock/Unlock).
package virtqueue

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"github.com/vunet/vunet/vhost/dirtylog"
	"github.com/vunet/vunet/vhost/internal/ringatomic"
	"github.com/vunet/vunet/vhost/memory"
)

// Descriptor flags (virtio 1.2, 2.7.5).
const (
	descFNext     = 1
	descFWrite    = 2
	descFIndirect = 4
)

// Ring flags.
const (
	availFNoInterrupt = 1
	usedFNoNotify     = 1
)

const descSize = 16

// MaxSize is the largest queue size either ring format allows.
const MaxSize = 32768

// MaxIovecs bounds the iovecs of one element. A chain can have at most
// queue-size descriptors (or an indirect table's worth); each descriptor may
// split at region boundaries, so this also bounds that splitting.
const MaxIovecs = 1024

// Errors. Chain errors are counted and the chain is returned with length 0;
// ErrBroken means the ring itself is unusable until it is reset.
var (
	ErrEmpty        = errors.New("virtqueue: no available elements")
	ErrNotReady     = errors.New("virtqueue: not ready")
	ErrBroken       = errors.New("virtqueue: ring broken")
	ErrAvailJump    = errors.New("avail index moved more than the queue size")
	ErrBadHead      = errors.New("descriptor head index out of range")
	ErrBadNext      = errors.New("descriptor next index out of range")
	ErrChainLoop    = errors.New("descriptor chain longer than the queue (loop)")
	ErrNestedIndir  = errors.New("nested indirect descriptor")
	ErrIndirectLen  = errors.New("indirect table length not a multiple of 16")
	ErrIndirectNext = errors.New("indirect descriptor with NEXT flag")
	ErrWriteOrder   = errors.New("readable descriptor after a writable one")
	ErrDescMemory   = errors.New("descriptor buffer outside guest memory")
	ErrIndirectOff  = errors.New("indirect descriptor without VIRTIO_F_INDIRECT_DESC negotiated")
	ErrChainFlood   = errors.New("more consecutive malformed chains than the queue size")
	ErrRewind       = errors.New("rewind across published used entries")
)

// Element is one popped descriptor chain. Out holds the device-readable
// buffers (guest → device), In the device-writable ones (device → guest).
// The slices alias guest memory; their backing arrays are reused by the
// next Pop into the same Element.
type Element struct {
	Head uint16
	Out  [][]byte
	In   [][]byte
	// InAddr holds the guest-physical address of each In slice while
	// the queue logs its writes (Config.Log, during live migration), so
	// that PushElement can mark the pages written; otherwise it is left
	// alone and costs nothing.
	InAddr []uint64
}

// Stats are the queue's counters, declared for the metrics registry
// (internal/metrics). They are updated atomically and may be read at any
// time. The owner of the queue registers them with its queue's labels.
type Stats struct {
	Popped     atomic.Uint64 `metric:"virtqueue_popped_total" help:"Descriptor chains taken from the available ring."`
	Used       atomic.Uint64 `metric:"virtqueue_used_total" help:"Descriptor chains returned to the guest on the used ring."`
	Notifies   atomic.Uint64 `metric:"virtqueue_notifies_total" help:"Interrupts sent to the guest."`
	Suppressed atomic.Uint64 `metric:"virtqueue_notifies_suppressed_total" help:"Interrupts skipped because the guest asked not to be interrupted (EVENT_IDX or NO_INTERRUPT)."`
	BadChains  atomic.Uint64 `metric:"virtqueue_bad_chains_total" help:"Malformed descriptor chains, returned with length 0 (hostile or buggy guest)." hostile:"virtqueue"`
	Broken     atomic.Uint64 `metric:"virtqueue_broken_total" help:"Times the ring was marked unusable (a head index out of range, an impossible available index)." hostile:"virtqueue"`
}

// Config describes where a ring lives, as set by SET_VRING_NUM/ADDR/BASE.
type Config struct {
	// Size is the number of descriptors: a power of two ≤ MaxSize for a
	// split ring, any number in 1..MaxSize for a packed one.
	Size uint16
	// DescAddr is the guest-physical address of the descriptor table
	// (packed: the descriptor ring).
	DescAddr uint64
	// AvailAddr is the available ring's (packed: the driver event
	// suppression structure's).
	AvailAddr uint64
	// UsedAddr is the used ring's (packed: the device event suppression
	// structure's).
	UsedAddr uint64
	EventIdx bool // VIRTIO_RING_F_EVENT_IDX negotiated
	Indirect bool // VIRTIO_RING_F_INDIRECT_DESC negotiated
	Packed   bool // VIRTIO_F_RING_PACKED negotiated
	// NextAvail is the ring's starting available index (SET_VRING_BASE);
	// for a packed ring the slot in bits 0-14 and the driver's wrap
	// counter in bit 15.
	NextAvail uint16
	// NextUsed is, for a packed ring only, the slot the next used
	// descriptor goes to and the device's wrap counter in bit 15 (bits
	// 16-31 of SET_VRING_BASE); 0 means "the same as NextAvail". A split
	// ring's used index is read from the ring itself.
	NextUsed uint16
	// Log, when set, is the dirty-page log of a live migration. With
	// LogBuffers (VHOST_F_LOG_ALL acked) the bytes PushElement reports
	// written into buffers are marked; with LogUsed (the ring's
	// VHOST_VRING_F_LOG) every write to the used ring is marked at
	// UsedLogAddr plus its offset in the ring.
	Log         *dirtylog.Log
	LogBuffers  bool
	LogUsed     bool
	UsedLogAddr uint64
}

// Queue is the device side of one split virtqueue.
type Queue struct {
	mu sync.Mutex

	mem   *memory.Table
	cfg   Config
	desc  []byte
	avail []byte
	used  []byte
	ready bool

	lastAvail uint16 // next available-ring slot to pop
	// seenAvail is the guest's available index as last read: every buffer
	// before it has been looked at (and possibly rewound as too few).
	seenAvail uint16
	usedIdx   uint16 // used index last published to the guest
	pending   uint16 // used entries written but not yet published
	// skipped counts the malformed chains Pop returned (pushed with length
	// 0) and flushes the Flushes that published something, so that Rewind
	// can tell exactly what happened since a Mark.
	skipped uint64
	flushes uint64

	// signalled is the used index at the last interrupt; valid says whether
	// it means anything (EVENT_IDX needs a reference point).
	signalled      uint16
	signalledValid bool

	// notify sends an interrupt to the guest (writes the call eventfd).
	notify func() error
	// onError reports chain and ring errors (rate-limited by the owner).
	onError func(error)

	// bufLog and usedLog are cfg.Log when buffer and used-ring writes
	// are logged, nil otherwise: logging off costs a nil check.
	bufLog, usedLog *dirtylog.Log

	broken atomic.Bool

	packed bool        // the ring is in the packed format (packed.go)
	pk     packedState // its state

	// Stats are the queue's counters; New allocates them, an owner that
	// wants them to outlive the queue (one per index across sessions)
	// points them elsewhere before the queue is used.
	Stats *Stats
}

// New returns an unconfigured queue. notify is called to interrupt the
// guest; onError (optional) is told about each malformed chain or ring.
func New(notify func() error, onError func(error)) *Queue {
	if onError == nil {
		onError = func(error) {}
	}
	return &Queue{notify: notify, onError: onError, Stats: new(Stats)}
}

// Lock takes the queue's lock: the data path holds it for each batch, the
// control plane to reconfigure the ring.
func (q *Queue) Lock() { q.mu.Lock() }

// Unlock releases the queue's lock.
func (q *Queue) Unlock() { q.mu.Unlock() }

// SetNotify replaces the interrupt function (the call eventfd changed)
// and, on a running queue, interrupts the guest once through the new one.
//
// QEMU replaces a ring's call eventfd while the queue runs (right after it
// starts, and when interrupts are masked or unmasked). An interrupt sent
// to the old descriptor in that window may never reach the guest, and
// with EVENT_IDX a lost interrupt is never sent again: the guest's
// used_event stays where it was, so every later used entry looks like one
// it asked not to be told about, and the guest's RX stalls for good (seen
// as a guest that never receives its DHCP offer). So the reference point
// for suppression is forgotten and the new descriptor is signalled; a
// spurious interrupt costs the guest one look at the used ring.
func (q *Queue) SetNotify(notify func() error) {
	q.notify = notify
	q.signalledValid = false
	if q.ready && notify != nil {
		q.Stats.Notifies.Add(1)
		notify()
	}
}

// Setup validates cfg against mem and makes the queue ready. The used index
// is taken from the ring itself so that a ring handed over from a previous
// backend (reconnect) continues where it was.
func (q *Queue) Setup(mem *memory.Table, cfg Config) error {
	q.ready = false
	q.packed = false
	q.bufLog, q.usedLog = nil, nil
	if cfg.Log != nil && cfg.LogBuffers {
		q.bufLog = cfg.Log
	}
	if cfg.Log != nil && cfg.LogUsed {
		q.usedLog = cfg.Log
	}
	if cfg.Packed {
		if err := q.setupPacked(mem, cfg); err != nil {
			return err
		}
		q.pending, q.skipped = 0, 0
		q.signalledValid = false
		q.broken.Store(false)
		q.ready = true
		return nil
	}
	if cfg.Size == 0 || cfg.Size > MaxSize || cfg.Size&(cfg.Size-1) != 0 {
		return fmt.Errorf("virtqueue: size %d is not a power of two in 1..%d", cfg.Size, MaxSize)
	}
	if cfg.DescAddr%16 != 0 || cfg.AvailAddr%2 != 0 || cfg.UsedAddr%4 != 0 {
		return fmt.Errorf("virtqueue: misaligned ring desc %#x avail %#x used %#x", cfg.DescAddr, cfg.AvailAddr, cfg.UsedAddr)
	}
	n := uint64(cfg.Size)
	desc, err := mem.Slice(cfg.DescAddr, n*descSize)
	if err != nil {
		return fmt.Errorf("virtqueue: descriptor table: %w", err)
	}
	avail, err := mem.Slice(cfg.AvailAddr, 6+2*n)
	if err != nil {
		return fmt.Errorf("virtqueue: available ring: %w", err)
	}
	used, err := mem.Slice(cfg.UsedAddr, 6+8*n)
	if err != nil {
		return fmt.Errorf("virtqueue: used ring: %w", err)
	}
	q.mem, q.cfg, q.desc, q.avail, q.used = mem, cfg, desc, avail, used
	q.lastAvail = cfg.NextAvail
	q.seenAvail = cfg.NextAvail
	q.usedIdx = ringatomic.Load16(used, 2)
	q.pending = 0
	q.signalledValid = false
	q.broken.Store(false)
	q.ready = true
	return nil
}

// Stop makes the queue not ready and returns the value GET_VRING_BASE
// reports: the next available index (split), or for a packed ring the
// next available slot and wrap counter in bits 0-15 and the next used
// slot and wrap counter in bits 16-31 (vhost-user, "Ring states").
// Unpublished used entries are published first.
func (q *Queue) Stop() uint32 {
	if q.ready && !q.broken.Load() {
		q.Guard(func() { q.Flush() })
	}
	q.ready = false
	if q.packed {
		return uint32(q.stateOf(q.pk.availLin)) | uint32(q.stateOf(q.pk.usedLin))<<16
	}
	return uint32(q.lastAvail)
}

// Packed reports whether the ring is in the packed format.
func (q *Queue) Packed() bool { return q.packed }

// Ready reports whether the queue is set up and not broken.
func (q *Queue) Ready() bool { return q.ready && !q.broken.Load() }

// Broken reports whether the ring was marked unusable.
func (q *Queue) Broken() bool { return q.broken.Load() }

// Size returns the queue size.
func (q *Queue) Size() uint16 { return q.cfg.Size }

func (q *Queue) markBroken(err error) error {
	if !q.broken.Swap(true) {
		q.Stats.Broken.Add(1)
		q.onError(err)
	}
	return fmt.Errorf("%w: %v", ErrBroken, err)
}

// availIdx reads the guest's available index and checks it is plausible.
func (q *Queue) pendingAvail() (uint16, error) {
	idx := ringatomic.Load16(q.avail, 2)
	n := idx - q.lastAvail
	if n > q.cfg.Size {
		return 0, q.markBroken(fmt.Errorf("%w: avail %d last %d size %d", ErrAvailJump, idx, q.lastAvail, q.cfg.Size))
	}
	q.seenAvail = idx
	return n, nil
}

// RingState is a snapshot of a ring's indexes, for diagnosing stalls: the
// guest's available index against the next one we pop shows buffers we
// have not taken; avail_event (EVENT_IDX) is where we asked for a kick.
type RingState struct {
	Ready      bool
	Size       uint16
	AvailIdx   uint16 // the guest's available index
	NextAvail  uint16 // the next available entry we will pop
	UsedIdx    uint16 // the used index we published
	AvailEvent uint16 // with EVENT_IDX: kick us when AvailIdx passes this
	UsedEvent  uint16 // with EVENT_IDX: the guest wants an interrupt past this
	EventIdx   bool
	// Packed: the indexes are ring positions, slot in bits 0-14 and wrap
	// counter in bit 15; AvailIdx is the position after the chains the
	// guest has made available, AvailEvent and UsedEvent are the two
	// event suppression structures' positions.
	Packed bool
}

// State returns the ring's indexes. It takes the queue's lock.
func (q *Queue) State() RingState {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.Ready() {
		return RingState{}
	}
	if q.packed {
		s := RingState{Ready: true, Size: q.cfg.Size, NextAvail: q.stateOf(q.pk.availLin), UsedIdx: q.stateOf(q.pk.usedLin),
			EventIdx: q.cfg.EventIdx, Packed: true}
		_ = q.Guard(func() {
			_, end := q.scanPacked()
			s.AvailIdx = q.stateOf(end)
			s.AvailEvent = ringatomic.Load16(q.pk.deviceEvt, 0)
			s.UsedEvent = ringatomic.Load16(q.pk.driverEvt, 0)
		})
		return s
	}
	s := RingState{Ready: true, Size: q.cfg.Size, NextAvail: q.lastAvail, UsedIdx: q.usedIdx, EventIdx: q.cfg.EventIdx}
	_ = q.Guard(func() {
		s.AvailIdx = ringatomic.Load16(q.avail, 2)
		if q.cfg.EventIdx {
			s.AvailEvent = ringatomic.Load16(q.used, 4+8*int(q.cfg.Size))
			s.UsedEvent = ringatomic.Load16(q.avail, 4+2*int(q.cfg.Size))
		}
	})
	return s
}

// Pending returns the number of elements the guest has made available and
// that have not been popped.
func (q *Queue) Pending() int {
	if !q.Ready() {
		return 0
	}
	if q.packed {
		n, _ := q.scanPacked()
		return n
	}
	n, err := q.pendingAvail()
	if err != nil {
		return 0
	}
	return int(n)
}

// Pop takes the next available chain into e. Malformed chains are returned
// to the guest with length 0, counted, and skipped. It returns ErrEmpty when
// nothing is available, and an error wrapping ErrBroken or ErrNotReady when
// the ring cannot be used.
func (q *Queue) Pop(e *Element) error {
	if !q.ready {
		return ErrNotReady
	}
	if q.broken.Load() {
		return ErrBroken
	}
	if q.packed {
		return q.popPacked(e)
	}
	// A guest that keeps publishing malformed chains must not keep us in
	// this loop (holding the queue lock) for ever: a real driver never
	// sends one, so a queue's worth in a row breaks the ring.
	for bad := 0; ; bad++ {
		if bad > int(q.cfg.Size) {
			return q.markBroken(ErrChainFlood)
		}
		n, err := q.pendingAvail()
		if err != nil {
			return err
		}
		if n == 0 {
			return ErrEmpty
		}
		slot := 4 + 2*int(q.lastAvail%q.cfg.Size)
		head := binary.LittleEndian.Uint16(q.avail[slot:])
		if head >= q.cfg.Size {
			// There is no valid id to return; the ring is unusable.
			return q.markBroken(fmt.Errorf("%w: %d", ErrBadHead, head))
		}
		q.lastAvail++
		e.Head = head
		if err := q.walk(e, head); err != nil {
			q.Stats.BadChains.Add(1)
			q.onError(fmt.Errorf("virtqueue: chain %d: %w", head, err))
			q.Push(head, 0)
			q.skipped++
			continue
		}
		q.Stats.Popped.Add(1)
		return nil
	}
}

// walk collects chain head into e.
func (q *Queue) walk(e *Element, head uint16) error {
	e.Out, e.In = e.Out[:0], e.In[:0]
	if q.bufLog != nil {
		e.InAddr = e.InAddr[:0]
	}
	table := q.desc
	max := uint32(q.cfg.Size)
	i := uint32(head)
	indirect := false
	for count := uint32(0); ; count++ {
		if count >= max {
			return ErrChainLoop
		}
		d := table[i*descSize : i*descSize+descSize]
		addr := binary.LittleEndian.Uint64(d[0:])
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&descFIndirect != 0 {
			if !q.cfg.Indirect {
				return ErrIndirectOff
			}
			if indirect {
				return ErrNestedIndir
			}
			if flags&descFNext != 0 {
				return ErrIndirectNext
			}
			if length == 0 || length%descSize != 0 || length/descSize > MaxSize {
				return fmt.Errorf("%w: %d", ErrIndirectLen, length)
			}
			t, err := q.mem.Slice(addr, uint64(length))
			if err != nil {
				return fmt.Errorf("indirect table: %w", err)
			}
			table, max, i, count, indirect = t, length/descSize, 0, 0, true
			// The loop's count++ would make this 1; the table's first
			// descriptor is the chain's first.
			count--
			continue
		}
		if err := q.addBuffer(e, addr, length, flags&descFWrite != 0); err != nil {
			return err
		}
		if flags&descFNext == 0 {
			return nil
		}
		if uint32(next) >= max {
			return fmt.Errorf("%w: %d", ErrBadNext, next)
		}
		i = uint32(next)
	}
}

// Mark is a point in a queue's consumption that Rewind returns to.
type Mark struct {
	avail   uint16 // next available slot to pop
	pending uint16 // used entries written, not published
	skipped uint64 // malformed chains returned by Pop
	flushes uint64
	bad     uint64 // Stats.BadChains
	// packed ring: position, slots in flight and good chains popped
	lin, inflight uint32
	popSeq        uint64
}

// Mark returns the current position, for Rewind.
func (q *Queue) Mark() Mark {
	return Mark{avail: q.lastAvail, pending: q.pending, skipped: q.skipped, flushes: q.flushes, bad: q.Stats.BadChains.Load(),
		lin: q.pk.availLin, inflight: q.pk.inflight, popSeq: q.pk.popSeq}
}

// Rewind gives back every element popped since m, which were collected
// but not used: the next Pops return them again. Malformed chains Pop
// skipped since m are taken back too (their used entries are not yet
// published), so that each is returned exactly once, when it is met again.
// Moving the available index back by the number of good elements instead
// would re-return a skipped chain and never return the first good one.
//
// Between m and Rewind the caller must not Push or Flush; if it did, the
// rollback cannot be exact and the ring is marked broken (a device bug,
// never guest input).
func (q *Queue) Rewind(m Mark) error {
	if !q.ready {
		return ErrNotReady
	}
	skipped := q.skipped - m.skipped
	if q.flushes != m.flushes || uint64(q.pending-m.pending) != skipped {
		return q.markBroken(ErrRewind)
	}
	if q.packed {
		q.rewindPacked(m)
	}
	q.lastAvail, q.pending, q.skipped = m.avail, m.pending, m.skipped
	q.Stats.BadChains.Store(m.bad)
	return nil
}

// Push writes a used-ring entry returning chain head with length bytes
// written by the device. The entry becomes visible to the guest at the
// next Flush. The length is always explicit: it is the number of bytes of
// the frame in this element, never the element's buffer size.
func (q *Queue) Push(head uint16, length uint32) {
	if !q.ready || q.cfg.Size == 0 {
		return
	}
	if q.packed {
		q.pushPacked(head, length)
		return
	}
	slot := 4 + 8*int((q.usedIdx+q.pending)%q.cfg.Size)
	binary.LittleEndian.PutUint32(q.used[slot:], uint32(head))
	binary.LittleEndian.PutUint32(q.used[slot+4:], length)
	q.pending++
	if q.usedLog != nil {
		q.usedLog.Mark(q.cfg.UsedLogAddr+uint64(slot), 8)
	}
}

// PushElement is Push for an element the device wrote length bytes into
// (its In buffers, in order). While the queue logs buffer writes, the
// pages of exactly those bytes are marked dirty first; a device that
// writes into buffers must return them this way.
func (q *Queue) PushElement(e *Element, length uint32) {
	if l := q.bufLog; l != nil && q.ready {
		rem := uint64(length)
		// InAddr was filled by the Pop that made e (logging only
		// changes while the queue is stopped, between batches).
		for i := 0; i < len(e.In) && i < len(e.InAddr) && rem > 0; i++ {
			c := min(uint64(len(e.In[i])), rem)
			l.Mark(e.InAddr[i], c)
			rem -= c
		}
	}
	q.Push(e.Head, length)
}

// Flush publishes all pushed entries with a single used-index update and
// reports whether there were any.
func (q *Queue) Flush() bool {
	if q.packed {
		return q.flushPacked()
	}
	if !q.ready || q.pending == 0 {
		return false
	}
	q.usedIdx += q.pending
	q.Stats.Used.Add(uint64(q.pending))
	q.pending = 0
	q.flushes++
	// Atomic store: the entries written above are visible before the index.
	ringatomic.Store16(q.used, 2, q.usedIdx)
	if q.usedLog != nil {
		q.usedLog.Mark(q.cfg.UsedLogAddr+2, 2)
	}
	if l := cmp.Or(q.usedLog, q.bufLog); l != nil {
		l.Notify()
	}
	return true
}

// needsNotify decides, after a Flush, whether the guest wants an interrupt.
func (q *Queue) needsNotify() bool {
	if q.packed {
		return q.needsNotifyPacked()
	}
	if !q.cfg.EventIdx {
		return ringatomic.Load16(q.avail, 0)&availFNoInterrupt == 0
	}
	old, valid := q.signalled, q.signalledValid
	q.signalled, q.signalledValid = q.usedIdx, true
	if !valid {
		return true
	}
	// used_event lives after the available ring. The guest wants an
	// interrupt when the used index moves past it (virtio 2.7.10).
	event := ringatomic.Load16(q.avail, 4+2*int(q.cfg.Size))
	return q.usedIdx-event-1 < q.usedIdx-old
}

// Notify interrupts the guest if it asked for one since the last call.
// Call it once per batch, after Flush.
func (q *Queue) Notify() error {
	if !q.ready || q.notify == nil {
		return nil
	}
	if !q.needsNotify() {
		q.Stats.Suppressed.Add(1)
		return nil
	}
	q.Stats.Notifies.Add(1)
	return q.notify()
}

// EnableKicks asks the guest to notify us when it adds buffers, and
// reports whether buffers arrived meanwhile (the caller must then process
// them instead of sleeping, or a kick can be lost).
func (q *Queue) EnableKicks() bool {
	if !q.Ready() {
		return false
	}
	if q.packed {
		return q.armPacked(q.pk.availLin)
	}
	if q.cfg.EventIdx {
		// avail_event lives after the used ring.
		q.storeUsed16(4+8*int(q.cfg.Size), q.lastAvail)
	} else {
		q.storeUsed16(0, ringatomic.Load16(q.used, 0)&^usedFNoNotify)
	}
	// The atomics order the store above before this reload.
	return q.Pending() > 0
}

// ArmKick asks the guest to notify us when it adds anything beyond what we
// last looked at, and reports whether it already did. Unlike EnableKicks it
// does not count buffers we have seen but could not use: an RX frame that
// needs more buffers than are available must wait for the next addition.
//
// The reference point is the index we last read (seenAvail), not the
// guest's index now. With EVENT_IDX the guest kicks only when its index
// crosses avail_event, and it reads avail_event after publishing its
// index; arming at its current index would let a guest that published
// between our last look and now read an avail_event equal to its own index
// and not kick, while we, comparing against that same index, would see
// nothing new: a lost wakeup, and an RX queue that stays stalled with a
// full ring of buffers and a backlog of packets.
func (q *Queue) ArmKick() bool {
	if !q.Ready() {
		return false
	}
	if q.packed {
		// The first slot we found not available, even if a Rewind took
		// us back before it.
		return q.armPacked((q.pk.availLin + q.pk.ahead) % q.ring2())
	}
	seen := q.seenAvail
	if q.cfg.EventIdx {
		q.storeUsed16(4+8*int(q.cfg.Size), seen)
	} else {
		q.storeUsed16(0, ringatomic.Load16(q.used, 0)&^usedFNoNotify)
	}
	// The atomics order the store above before this reload.
	return ringatomic.Load16(q.avail, 2) != seen
}

// DisableKicks tells the guest that we are polling and need no kicks. With
// EVENT_IDX this is implicit (avail_event is left behind), so nothing is
// written.
func (q *Queue) DisableKicks() {
	if q.packed && q.Ready() {
		ringatomic.Store16(q.pk.deviceEvt, 2, eventFlagsDisable)
		if q.usedLog != nil {
			q.usedLog.Mark(q.cfg.UsedAddr+2, 2)
		}
		return
	}
	if !q.Ready() || q.cfg.EventIdx {
		return
	}
	q.storeUsed16(0, ringatomic.Load16(q.used, 0)|usedFNoNotify)
}

// storeUsed16 writes a 16-bit field of the used ring (flags,
// avail_event) and logs the write during a migration.
func (q *Queue) storeUsed16(off int, v uint16) {
	ringatomic.Store16(q.used, off, v)
	if q.usedLog != nil {
		q.usedLog.Mark(q.cfg.UsedLogAddr+uint64(off), 2)
	}
}

// ErrFault is returned by Guard when guest memory could not be accessed.
var ErrFault = errors.New("virtqueue: fault accessing guest memory")

// Guard runs f, turning a memory fault on guest memory into an error and a
// broken ring instead of a crash. A frontend that truncates the memory file
// under our mapping makes every access raise SIGBUS; a daemon serving many
// VMs must survive that. f must release its locks with defer, since a
// fault unwinds it.
func (q *Queue) Guard(f func()) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		r := recover()
		if r == nil {
			return
		}
		fault, ok := r.(interface{ Addr() uintptr })
		if !ok {
			panic(r)
		}
		err = fmt.Errorf("%w at %#x", ErrFault, fault.Addr())
		q.markBroken(err)
	}()
	f()
	return nil
}
