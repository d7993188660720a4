// Package endpointtest is the guest side of a virtio-net device for tests: a
// gVisor link endpoint that behaves like a guest's virtio-net driver. It
// posts frames on the TX ring and buffers on the RX ring of a mock vhost-user
// frontend, so that a gVisor "guest" stack can talk through vunet's real
// socket protocol, virtqueues and endpoint to the stack behind it.
package endpointtest

import (
	"encoding/binary"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/vhost/vhosttest"
)

const hdrLen = 12

// GuestLink is a stack.LinkEndpoint over a vhosttest.Frontend's queue
// pairs (2N = RX, 2N+1 = TX; as many pairs as the frontend has queues for).
// Frames are posted with the header and the frame split over several
// descriptors, as iPXE and Linux do. With several pairs it behaves like a
// multiqueue guest driver: it receives on every pair and transmits each
// flow on one pair (chosen by the stack's per-connection hash, as Linux
// chooses by the sending CPU).
type GuestLink struct {
	f       *vhosttest.Frontend
	mac     tcpip.LinkAddress
	mtu     uint32
	bufSize int
	pairs   int

	mu         sync.Mutex // guards the TX drivers
	dispatcher stack.NetworkDispatcher
	dmu        sync.RWMutex
	wg         sync.WaitGroup
	stop       chan struct{}
	// active is how many pairs the link transmits on (SetActivePairs).
	active atomic.Int32
	// Counters for test diagnostics.
	Delivered, Posted, RingFull, RXUsed atomic.Uint64
	// TXSplit is the descriptor layout for transmitted frames (sizes of
	// the leading pieces; the rest follows in one more descriptor).
	TXSplit []int
	// onRX is SetOnRX's function.
	onRX atomic.Pointer[func(pair int, frame []byte)]
}

var _ stack.LinkEndpoint = (*GuestLink)(nil)

// New returns a guest link on f (already Setup). It posts RX buffers of
// bufSize bytes on every pair and starts reaping received frames.
func New(f *vhosttest.Frontend, mac tcpip.LinkAddress, mtu uint32, bufSize int) *GuestLink {
	l := &GuestLink{f: f, mac: mac, mtu: mtu, bufSize: bufSize, pairs: max(len(f.Drivers)/2, 1), stop: make(chan struct{}), TXSplit: []int{5, 7}}
	l.active.Store(int32(l.pairs))
	for p := range l.pairs {
		rx := f.Drivers[2*p]
		for i := 0; i < int(rx.Size)/2; i++ {
			rx.Post(nil, nil, []int{bufSize}, false)
		}
		f.Kick(2 * p)
		l.wg.Add(1)
		go l.rxLoop(p)
	}
	return l
}

// SetOnRX sets a function called with each frame received and the pair it
// came on (from that pair's receive goroutine); nil removes it.
func (l *GuestLink) SetOnRX(fn func(pair int, frame []byte)) {
	if fn == nil {
		l.onRX.Store(nil)
		return
	}
	l.onRX.Store(&fn)
}

// SetActivePairs makes the link transmit on the first n pairs only, as a
// Linux guest does after `ethtool -L eth0 combined n`.
func (l *GuestLink) SetActivePairs(n int) { l.active.Store(int32(min(max(n, 1), l.pairs))) }

// Stop ends the receive loops.
func (l *GuestLink) Stop() {
	close(l.stop)
	for p := range l.pairs {
		l.f.Calls[2*p].Interrupt()
	}
	l.wg.Wait()
}

func (l *GuestLink) rxLoop(p int) {
	defer l.wg.Done()
	rx := l.f.Drivers[2*p]
	var pending []byte
	var hdr [hdrLen]byte
	need := 0
	for {
		used := rx.Reap()
		for _, u := range used {
			b := u.Chain.In[0][:u.Len]
			if need == 0 {
				n := int(binary.LittleEndian.Uint16(b[10:]))
				copy(hdr[:], b)
				pending = append(pending[:0], b[hdrLen:]...)
				need = n - 1
			} else {
				pending = append(pending, b...)
				need--
			}
			l.RXUsed.Add(1)
			if need == 0 {
				finishPartial(hdr[:], pending)
				if fn := l.onRX.Load(); fn != nil {
					(*fn)(p, pending)
				}
				l.deliver(pending)
			}
		}
		// Repost only after every reaped buffer was read: reposting
		// recycles (and poisons) the memory of the buffers just reaped.
		for range used {
			rx.Post(nil, nil, []int{l.bufSize}, false)
		}
		if len(used) > 0 {
			l.f.Kick(2 * p)
			continue
		}
		select {
		case <-l.stop:
			return
		default:
		}
		if _, err := l.f.Calls[2*p].Wait(); err != nil {
			return
		}
	}
}

// finishPartial completes a checksum the device left partial
// (VIRTIO_NET_HDR_F_NEEDS_CSUM), as a guest driver's stack does. GSO frames
// are delivered whole: the guest stack accepts large TCP segments.
func finishPartial(hdr, frame []byte) {
	if hdr[0]&1 == 0 {
		return
	}
	start := int(binary.LittleEndian.Uint16(hdr[6:]))
	at := start + int(binary.LittleEndian.Uint16(hdr[8:]))
	if start >= len(frame) || at+2 > len(frame) {
		return
	}
	binary.BigEndian.PutUint16(frame[at:], ^checksum.Checksum(frame[start:], 0))
}

func (l *GuestLink) deliver(frame []byte) {
	if len(frame) < header.EthernetMinimumSize {
		return
	}
	l.dmu.RLock()
	d := l.dispatcher
	l.dmu.RUnlock()
	if d == nil {
		return
	}
	l.Delivered.Add(1)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
	defer pkt.DecRef()
	hdr, _ := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	d.DeliverNetworkPacket(header.Ethernet(hdr).Type(), pkt)
}

// WritePackets implements stack.LinkWriter.WritePackets: each frame is
// posted on its flow's TX ring behind a zero virtio-net header.
func (l *GuestLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	kicked := uint64(0)
	n := 0
	for _, pkt := range pkts.AsSlice() {
		// The stack's hash is per connection (0 for ARP and the like).
		p := int(pkt.Hash % uint32(l.active.Load()))
		tx := l.f.Drivers[2*p+1]
		if kicked&(1<<p) == 0 {
			tx.Reap()
		}
		kicked |= 1 << p
		buf := make([]byte, hdrLen, hdrLen+pkt.Size())
		for _, s := range pkt.AsSlices() {
			buf = append(buf, s...)
		}
		if _, err := tx.Post(buf, l.TXSplit, nil, false); err != nil {
			l.RingFull.Add(1)
			break // ring full: the stack retransmits
		}
		l.Posted.Add(1)
		n++
	}
	for p := range l.pairs {
		if kicked&(1<<p) != 0 {
			l.f.Kick(2*p + 1)
		}
	}
	return n, nil
}

// MTU implements stack.LinkEndpoint.MTU.
func (l *GuestLink) MTU() uint32 { return l.mtu }

// SetMTU implements stack.LinkEndpoint.SetMTU.
func (l *GuestLink) SetMTU(mtu uint32) { l.mtu = mtu }

// MaxHeaderLength implements stack.LinkEndpoint.MaxHeaderLength.
func (l *GuestLink) MaxHeaderLength() uint16 { return header.EthernetMinimumSize }

// LinkAddress implements stack.LinkEndpoint.LinkAddress.
func (l *GuestLink) LinkAddress() tcpip.LinkAddress { return l.mac }

// SetLinkAddress implements stack.LinkEndpoint.SetLinkAddress.
func (l *GuestLink) SetLinkAddress(a tcpip.LinkAddress) { l.mac = a }

// Capabilities implements stack.LinkEndpoint.Capabilities.
func (l *GuestLink) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityResolutionRequired
}

// Attach implements stack.LinkEndpoint.Attach.
func (l *GuestLink) Attach(d stack.NetworkDispatcher) {
	l.dmu.Lock()
	l.dispatcher = d
	l.dmu.Unlock()
}

// IsAttached implements stack.LinkEndpoint.IsAttached.
func (l *GuestLink) IsAttached() bool {
	l.dmu.RLock()
	defer l.dmu.RUnlock()
	return l.dispatcher != nil
}

// Wait implements stack.LinkEndpoint.Wait.
func (l *GuestLink) Wait() {}

// ARPHardwareType implements stack.LinkEndpoint.ARPHardwareType.
func (l *GuestLink) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }

// AddHeader implements stack.LinkEndpoint.AddHeader.
func (l *GuestLink) AddHeader(pkt *stack.PacketBuffer) {
	eth := header.Ethernet(pkt.LinkHeader().Push(header.EthernetMinimumSize))
	eth.Encode(&header.EthernetFields{SrcAddr: l.mac, DstAddr: pkt.EgressRoute.RemoteLinkAddress, Type: pkt.NetworkProtocolNumber})
}

// ParseHeader implements stack.LinkEndpoint.ParseHeader.
func (l *GuestLink) ParseHeader(pkt *stack.PacketBuffer) bool {
	_, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	return ok
}

// Close implements stack.LinkEndpoint.Close.
func (l *GuestLink) Close() {}

// SetOnCloseAction implements stack.LinkEndpoint.SetOnCloseAction.
func (l *GuestLink) SetOnCloseAction(func()) {}
