package endpoint

import (
	"net/netip"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/vhost/iov"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// txState is the guest → stack direction. Its worker goroutine is the only
// user of the queue between StartQueue and StopQueue.
type txState struct {
	q    *virtqueue.Queue
	kick *virtqueue.EventFD
	done chan struct{}
	// stats are this transmit queue's frames and bytes.
	stats *QueueStats
	// running is q for readers on other goroutines (RingState).
	running atomic.Pointer[virtqueue.Queue]
}

func (t *txState) queue() *virtqueue.Queue { return t.running.Load() }

func (t *txState) start(e *Endpoint, q *virtqueue.Queue, kick *virtqueue.EventFD) {
	t.stop()
	t.q, t.kick, t.done = q, kick, make(chan struct{})
	t.running.Store(q)
	go t.run(e, q, kick, t.done)
}

func (t *txState) stop() {
	if t.done == nil {
		return
	}
	t.kick.Interrupt()
	<-t.done
	t.running.Store(nil)
	t.q, t.kick, t.done = nil, nil, nil
}

// run pops batches of frames, returns their elements with one flush and one
// notify, then hands the frames to the stack outside the queue lock.
func (t *txState) run(e *Endpoint, q *virtqueue.Queue, kick *virtqueue.EventFD, done chan struct{}) {
	defer close(done)
	b := txBatchState{pkts: make([]*stack.PacketBuffer, 0, txBatch), hdrs: make([]vnetHdr, 0, txBatch), stats: t.stats}
	for {
		more := false
		if err := q.Guard(func() { more = b.pop(e, q) }); err != nil {
			// The ring is broken now (guest memory vanished); frames
			// copied before the fault are still good.
			e.Stats.TXFaults.Add(1)
			e.warn("TX queue broken", "err", err)
		}
		for i, pkt := range b.pkts {
			if sw := e.sw; sw != nil {
				sw.input(e, pkt, b.hdrs[i])
			} else {
				e.deliver(pkt)
			}
			b.pkts[i] = nil
		}
		b.pkts = b.pkts[:0]
		b.hdrs = b.hdrs[:0]
		// A guest that keeps the ring full must not keep StopQueue
		// waiting: the stop is checked after every batch.
		if more && !kick.Interrupted() {
			continue
		}
		if _, err := kick.Wait(); err != nil {
			return
		}
	}
}

// txBatchState is the TX worker's scratch, reused across batches.
type txBatchState struct {
	el   virtqueue.Element
	hdr  [hdrLenMrg]byte
	pkts []*stack.PacketBuffer
	// hdrs[i] is pkts[i]'s virtio-net header, which a switch carries
	// with frames to other guests (checksum and TSO metadata).
	hdrs  []vnetHdr
	stats *QueueStats
}

// pop takes up to txBatch frames off the ring and returns their elements
// with one flush and one notify. It reports whether more may be waiting.
func (b *txBatchState) pop(e *Endpoint, q *virtqueue.Queue) bool {
	q.Lock()
	defer q.Unlock()
	n := 0
	for ; n < txBatch; n++ {
		if q.Pop(&b.el) != nil {
			break
		}
		if pkt, h := e.readFrame(&b.el, b.hdr[:], b.stats); pkt != nil {
			b.pkts = append(b.pkts, pkt)
			b.hdrs = append(b.hdrs, h)
		}
		// TX buffers are only read: the used length is 0.
		q.Push(b.el.Head, 0)
	}
	if n > 0 {
		q.Flush()
		q.Notify()
	}
	return n == txBatch || q.EnableKicks()
}

// readFrame decodes one TX element: the virtio-net header, which may span
// descriptors, then the frame, copied once into a new packet buffer. It
// returns nil (and counts why) for frames it drops; the header is returned
// with the frame, and frames it returns are counted in stats (their
// transmit queue's).
func (e *Endpoint) readFrame(el *virtqueue.Element, scratch []byte, stats *QueueStats) (*stack.PacketBuffer, vnetHdr) {
	hl := int(e.hdrLen.Load())
	cur := iov.Tail{V: el.Out}
	hb := cur.Remove(hl, scratch)
	if hb == nil {
		e.Stats.TXBadHeader.Add(1)
		e.warn("guest frame shorter than its virtio-net header", "bytes", cur.Size(), "header", hl)
		return nil, vnetHdr{}
	}
	h := decodeHdr(hb)
	frameLen := cur.Size()
	switch {
	case frameLen < header.EthernetMinimumSize:
		e.Stats.TXShort.Add(1)
		e.warn("guest frame shorter than an Ethernet header", "bytes", frameLen)
		return nil, vnetHdr{}
	case frameLen > maxFrame:
		e.Stats.TXTooBig.Add(1)
		e.warn("guest frame too large", "bytes", frameLen, "max", maxFrame)
		return nil, vnetHdr{}
	}
	validated := h.Flags&(hdrFNeedsCsum|hdrFDataValid) != 0
	switch h.GSOType &^ gsoECN {
	case gsoNone:
	case gsoTCPv4, gsoTCPv6:
		if !e.has(FeatureHostTSO4) && !e.has(FeatureHostTSO6) {
			e.Stats.TXBadGSO.Add(1)
			e.warn("guest sent a TSO frame without negotiating HOST_TSO", "gso_type", h.GSOType)
			return nil, vnetHdr{}
		}
		// The stack takes the whole segment: TCP does not require
		// segments to be MSS-sized on receive, and the guest filled in
		// every header except the checksum (NEEDS_CSUM).
		validated = true
	default:
		e.Stats.TXBadGSO.Add(1)
		e.warn("guest frame with an unsupported GSO type", "gso_type", h.GSOType)
		return nil, vnetHdr{}
	}
	// One copy, into pooled chunks. gVisor pools chunks of up to
	// buffer.MaxChunkSize (64 KiB) and allocates anything larger afresh,
	// so a full TSO segment (up to 65549 bytes) is split in two views
	// rather than costing a 64 KiB allocation per frame.
	var payload buffer.Buffer
	var slices [2][]byte
	nv := 0
	for off := 0; off < frameLen; nv++ {
		v := buffer.NewViewSize(min(frameLen-off, buffer.MaxChunkSize))
		n := iov.CopyTo(v.AsSlice(), el.Out, cur.Off+off)
		if n != v.Size() { // cannot happen: frameLen is what the chain holds
			v.Release()
			payload.Release()
			e.Stats.TXShort.Add(1)
			return nil, vnetHdr{}
		}
		off += n
		if nv < len(slices) {
			slices[nv] = v.AsSlice()
		}
		_ = payload.Append(v) // a fresh view: cannot fail
	}
	if e.opts.Pcap != nil {
		e.opts.Pcap.Write(time.Now(), slices[:min(nv, len(slices))], 0, frameLen)
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload})
	// A partial checksum (NEEDS_CSUM) is one the guest left for the
	// device to finish; the frame never leaves this host as-is (the NAT
	// re-sends payloads through host sockets), so validating it is what
	// a NIC offload would do. (The stack's NIC also sets this from our
	// capabilities; see Capabilities.)
	pkt.RXChecksumValidated = validated
	stats.Frames.Add(1)
	stats.Bytes.Add(uint64(frameLen))
	return pkt, h
}

// deliver passes one frame to the stack and releases our reference.
func (e *Endpoint) deliver(pkt *stack.PacketBuffer) {
	defer pkt.DecRef()
	hdr, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	if !ok {
		e.Stats.TXShort.Add(1)
		return
	}
	eth := header.Ethernet(hdr)
	e.mu.RLock()
	d, self := e.dispatcher, e.linkAddr
	e.mu.RUnlock()
	if d == nil {
		return
	}
	switch dst := eth.DestinationAddress(); {
	case dst == header.EthernetBroadcastAddress:
		pkt.PktType = tcpip.PacketBroadcast
	case header.IsMulticastEthernetAddress(dst):
		pkt.PktType = tcpip.PacketMulticast
	case dst == self:
		pkt.PktType = tcpip.PacketHost
	default:
		pkt.PktType = tcpip.PacketOtherHost
	}
	switch eth.Type() {
	case header.ARPProtocolNumber:
		if !e.answersARP(pkt) {
			e.Stats.ARPIgnored.Add(1)
			return
		}
	case header.IPv6ProtocolNumber:
		if !e.answersNS(pkt) {
			e.Stats.NDPIgnored.Add(1)
			return
		}
	}
	d.DeliverNetworkPacket(eth.Type(), pkt)
}

// answersARP reports whether an ARP packet may reach the stack: replies
// always do; requests only for one of Options.ARPTargets.
func (e *Endpoint) answersARP(pkt *stack.PacketBuffer) bool {
	if len(e.opts.ARPTargets) == 0 {
		return true
	}
	b, ok := pkt.Data().PullUp(header.ARPSize)
	if !ok {
		return true // the ARP layer rejects it itself
	}
	arp := header.ARP(b)
	if !arp.IsValid() || arp.Op() != header.ARPRequest {
		return true
	}
	target, _ := netip.AddrFromSlice(arp.ProtocolAddressTarget())
	for _, a := range e.opts.ARPTargets {
		if a == target {
			return true
		}
	}
	return false
}

// answersNS reports whether an IPv6 packet may reach the stack: all do
// except neighbour solicitations for addresses other than
// Options.NDPTargets. The stack spoofs every address (it is the NAT), so
// it would answer a solicitation for another guest's address, or for the
// guest's own tentative one (failing its duplicate address detection),
// with the gateway's MAC.
func (e *Endpoint) answersNS(pkt *stack.PacketBuffer) bool {
	if len(e.opts.NDPTargets) == 0 {
		return true
	}
	const nsEnd = header.IPv6MinimumSize + header.ICMPv6NeighborSolicitMinimumSize
	b, ok := pkt.Data().PullUp(header.IPv6MinimumSize)
	if !ok || header.IPv6(b).NextHeader() != uint8(header.ICMPv6ProtocolNumber) {
		return true
	}
	if b, ok = pkt.Data().PullUp(nsEnd); !ok || header.ICMPv6(b[header.IPv6MinimumSize:]).Type() != header.ICMPv6NeighborSolicit {
		return true
	}
	target, _ := netip.AddrFromSlice(b[nsEnd-16 : nsEnd])
	for _, a := range e.opts.NDPTargets {
		if a == target {
			return true
		}
	}
	return false
}
