package endpoint

import (
	"encoding/binary"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/vhost/iov"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// rxItem is one packet on its way to the guest: from the stack, or
// switched from another guest with that guest's virtio-net header.
type rxItem struct {
	pkt      *stack.PacketBuffer
	hdr      vnetHdr // the sending guest's header (switched only)
	switched bool
}

// rxState is the stack → guest direction. WritePackets (from any stack
// goroutine) and the worker (woken by guest kicks when it adds buffers)
// share it under mu; the queue's own lock is taken inside mu.
type rxState struct {
	mu         sync.Mutex
	q          *virtqueue.Queue
	kick       *virtqueue.EventFD
	done       chan struct{}
	backlog    []rxItem
	backlogMax int
	mem        *budget.Budget // accounts each backlogged packet's MemSize
	stats      *QueueStats    // this receive queue's frames and bytes
	// leaving is set while the queue is being stopped: it is no longer
	// steered to, though packets already on their way may still land.
	leaving bool
	// Scratch for collecting one frame's elements; owned by whoever holds mu.
	elems []virtqueue.Element
	iovs  [][]byte
	// pktSlices holds the packet being written as slices of its views
	// (packetSlices); one[0] the single slice of a software segment.
	// Reused, so writing a frame allocates nothing.
	pktSlices [][]byte
	one       [1][]byte
	flat      []byte // a GSO packet flattened for software segmentation
	seg       []byte // one software segment
}

func (r *rxState) start(e *Endpoint, q *virtqueue.Queue, kick *virtqueue.EventFD) {
	r.stop()
	r.mu.Lock()
	r.q, r.kick, r.done, r.leaving = q, kick, make(chan struct{}), false
	done := r.done
	r.mu.Unlock()
	go r.run(e, q, kick, done)
}

func (r *rxState) stop() {
	r.mu.Lock()
	kick, done := r.kick, r.done
	r.mu.Unlock()
	if done == nil {
		return
	}
	kick.Interrupt()
	<-done
	r.mu.Lock()
	r.q, r.kick, r.done, r.leaving = nil, nil, nil, false
	r.mu.Unlock()
}

// stopping marks the queue as about to stop, so that it is steered around.
func (r *rxState) stopping() {
	r.mu.Lock()
	r.leaving = r.q != nil
	r.mu.Unlock()
}

// steerable reports whether flows may be steered to this queue: it runs
// and is not being stopped.
func (r *rxState) steerable() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.q != nil && !r.leaving
}

func (r *rxState) dropBacklog() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, it := range r.backlog {
		r.mem.Release(int64(it.pkt.MemSize()))
		it.pkt.DecRef()
		r.backlog[i] = rxItem{}
	}
	r.backlog = r.backlog[:0]
}

// run waits for the guest to add RX buffers and drains the backlog into
// them.
func (r *rxState) run(e *Endpoint, q *virtqueue.Queue, kick *virtqueue.EventFD, done chan struct{}) {
	defer close(done)
	for {
		if _, err := kick.Wait(); err != nil {
			return
		}
		// The stop is checked after every batch, not only when the
		// guest stops adding buffers.
		for again := true; again && !kick.Interrupted(); {
			again = false
			if err := q.Guard(func() { again = r.drainLocked(e, q) }); err != nil {
				e.Stats.RXFaults.Add(1)
				e.warn("RX queue broken", "err", err)
			}
		}
	}
}

// drainLocked takes the locks and drains; it reports whether buffers
// arrived meanwhile and it should run again. Locks are released by defer
// so that a fault on guest memory (see Queue.Guard) cannot leave them held.
func (r *rxState) drainLocked(e *Endpoint, q *virtqueue.Queue) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	q.Lock()
	defer q.Unlock()
	r.drain(e, q)
	// Ask for a kick only while packets wait; then re-check, or a kick
	// that raced with the drain would be lost. ArmKick, not EnableKicks:
	// buffers may be available but too few for the next frame, and then
	// only the guest's next addition can help.
	return len(r.backlog) > 0 && q.ArmKick()
}

// drain writes backlogged packets while buffers last. Callers hold mu and
// the queue lock.
func (r *rxState) drain(e *Endpoint, q *virtqueue.Queue) {
	sent := 0
	for sent < len(r.backlog) {
		ok, retry := r.writeOne(e, q, r.backlog[sent])
		if !ok && retry {
			break
		}
		r.mem.Release(int64(r.backlog[sent].pkt.MemSize()))
		r.backlog[sent].pkt.DecRef()
		r.backlog[sent] = rxItem{}
		sent++
	}
	if sent > 0 {
		n := copy(r.backlog, r.backlog[sent:])
		clear(r.backlog[n:])
		r.backlog = r.backlog[:n]
	}
	// Flush whatever was pushed, including segments of a packet that was
	// only partly written.
	if q.Flush() {
		q.Notify()
	}
}

// writeSlice writes packets from the stack (WritePackets, or a switch's
// run of packets to this port), each to its flow's receive queue
// (steer.go).
func (e *Endpoint) writeSlice(list []*stack.PacketBuffer) { e.steer(list) }

// write writes the packets steered to this queue: it copies each packet
// into guest buffers, or queues it (with a reference) while the guest has
// none. A fault on guest memory breaks the ring (Queue.Guard) instead of
// the process.
func (r *rxState) write(e *Endpoint, list []*stack.PacketBuffer) {
	r.mu.Lock()
	q := r.q
	r.mu.Unlock()
	if q == nil {
		e.Stats.RXNotConnected.Add(uint64(len(list)))
		return
	}
	if err := q.Guard(func() { r.writeList(e, list) }); err != nil {
		e.Stats.RXFaults.Add(1)
		e.warn("RX queue broken", "err", err)
	}
}

func (r *rxState) writeList(e *Endpoint, list []*stack.PacketBuffer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	q := r.q
	if q == nil || !q.Ready() {
		e.Stats.RXNotConnected.Add(uint64(len(list)))
		return
	}
	q.Lock()
	defer q.Unlock()
	for _, pkt := range list {
		r.put(e, q, rxItem{pkt: pkt})
	}
	r.flushLocked(q)
}

// put writes one item, or backlogs it (with a reference) while the guest
// has no buffers. Callers hold mu and the queue lock.
func (r *rxState) put(e *Endpoint, q *virtqueue.Queue, it rxItem) {
	if len(r.backlog) == 0 {
		if ok, retry := r.writeOne(e, q, it); ok || !retry {
			return
		}
	}
	if len(r.backlog) >= r.backlogMax {
		e.Stats.RXBacklogFull.Add(1)
		return
	}
	if !r.mem.Take(int64(it.pkt.MemSize())) {
		e.Stats.RXBacklogMem.Add(1)
		return
	}
	e.Stats.RXBacklogged.Add(1)
	it.pkt.IncRef()
	r.backlog = append(r.backlog, it)
}

// flushLocked publishes what was pushed and arms the kick while packets
// wait. Callers hold mu and the queue lock.
func (r *rxState) flushLocked(q *virtqueue.Queue) {
	// Flush whatever was pushed (a partly segmented packet included).
	if q.Flush() {
		q.Notify()
	}
	if len(r.backlog) > 0 && q.ArmKick() {
		// Buffers arrived while we were queueing: wake the worker
		// through its own kick so that it drains now.
		r.kick.Signal()
	}
}

// writeOne delivers pkt to the guest: as is, with its checksum or
// segmentation offloaded to the guest, with the checksum finished here, or
// segmented here, depending on what the guest negotiated. ok means it was
// written; otherwise retry says whether waiting for buffers can help (the
// ring is empty) or the packet was dropped (it can never fit).
func (r *rxState) writeOne(e *Endpoint, q *virtqueue.Queue, it rxItem) (ok, retry bool) {
	if it.switched {
		return r.writeSwitched(e, q, it.pkt, it.hdr)
	}
	pkt := it.pkt
	var h vnetHdr
	plan, l := e.plan(pkt, &h)
	r.pktSlices = packetSlices(r.pktSlices[:0], pkt)
	slices := r.pktSlices
	frameLen := pkt.Size()
	switch plan {
	case planOffload:
		ok, retry = r.writeFrame(e, q, slices, frameLen, h, -1, 0)
		if ok || retry || h.GSOType == gsoNone {
			return ok, retry
		}
		// A 64 KiB segment can need more buffers than one frame may use
		// (small mergeable buffers): segment it here instead.
		plan = planSegment
	}
	switch plan {
	case planComplete:
		return r.writeFrame(e, q, slices, frameLen, h, l.l4Start+header.TCPChecksumOffset, finishChecksum(slices, l.l4Start))
	case planSegment:
		r.flat = r.flat[:0]
		for _, s := range slices {
			r.flat = append(r.flat, s...)
		}
		// A GSO packet reaches us for a guest without TSO for its family
		// only when the stack chose GSO before the guest renegotiated;
		// rare, so segments that find no buffer are dropped (TCP resends).
		ok = true
		segment(r.flat, l, int(pkt.GSOOptions.MSS), r.seg, func(seg []byte) bool {
			r.seg = seg
			r.one[0] = seg
			if w, _ := r.writeFrame(e, q, r.one[:], len(seg), vnetHdr{}, -1, 0); !w {
				e.Stats.RXSegmentDrops.Add(1)
				ok = false
			}
			return ok
		})
		return ok, false
	}
	return r.writeFrame(e, q, slices, frameLen, h, -1, 0)
}

// packetSlices appends the bytes of pkt, from its first header on, to dst
// as slices of the views that hold them. It is PacketBuffer.AsSlices
// without the allocation of a new slice per packet.
func packetSlices(dst [][]byte, pkt *stack.PacketBuffer) [][]byte {
	vl, skip := pkt.AsViewList()
	for v := vl.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		dst = append(dst, b[skip:])
		skip = 0
	}
	return dst
}

// writeFrame copies one frame (frameLen bytes in slices) into as many RX
// elements as it needs, behind header h. If csumAt ≥ 0, the 16-bit value
// csum is stored (big-endian) at that frame offset in guest memory.
func (r *rxState) writeFrame(e *Endpoint, q *virtqueue.Queue, slices [][]byte, frameLen int, h vnetHdr, csumAt int, csum uint16) (ok, retry bool) {
	hl := int(e.hdrLen.Load())
	mrg := e.has(FeatureMrgRxbuf)
	// Room for padding is always reserved: short frames are padded to
	// ETH_ZLEN, centrally, here.
	total := hl + max(frameLen, ethZLen)
	maxElems := 1
	if mrg {
		maxElems = maxMergeBuffers
	}
	if cap(r.elems) < maxElems {
		r.elems = make([]virtqueue.Element, maxElems)
	}
	elems := r.elems[:maxElems]
	count, have := 0, 0
	mark := q.Mark()
	for have < total {
		if count == maxElems {
			q.Rewind(mark)
			e.Stats.RXTooBig.Add(1)
			e.warn("guest RX buffers too small for a frame", "frame", frameLen, "buffers", count, "bytes", have)
			return false, false
		}
		if err := q.Pop(&elems[count]); err != nil {
			q.Rewind(mark)
			return false, true
		}
		have += iov.Size(elems[count].In)
		count++
	}
	r.iovs = r.iovs[:0]
	for i := 0; i < count; i++ {
		r.iovs = append(r.iovs, elems[i].In...)
	}
	// The header is written once, here, with num_buffers = elements used
	// (1 without mergeable buffers, as VERSION_1 requires).
	var hb [hdrLenMrg]byte
	h.NumBuffers = uint16(count)
	h.encode(hb[:hl])
	iov.CopyFrom(r.iovs, 0, hb[:hl])
	off := hl
	for _, s := range slices {
		off += iov.CopyFrom(r.iovs, off, s)
	}
	if csumAt >= 0 {
		var cb [2]byte
		binary.BigEndian.PutUint16(cb[:], csum)
		iov.CopyFrom(r.iovs, hl+csumAt, cb[:])
	}
	iov.Fill(r.iovs, hl+frameLen, 0, total-hl-frameLen)
	// Each element reports exactly the bytes of this frame it holds; any
	// element past the end would report 0.
	rem := total
	for i := 0; i < count; i++ {
		c := min(iov.Size(elems[i].In), rem)
		q.PushElement(&elems[i], uint32(c)) // marks the pages written during a migration
		rem -= c
	}
	if e.opts.Pcap != nil {
		e.opts.Pcap.Write(time.Now(), r.iovs, hl, frameLen)
	}
	r.stats.Frames.Add(1)
	r.stats.Bytes.Add(uint64(frameLen))
	return true, false
}
