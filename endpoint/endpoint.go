// Package endpoint is a gVisor link endpoint whose packets live in virtio-net
// virtqueues. Frames from the guest are popped from the TX queue, their
// virtio-net header is read across however many descriptors it spans, and
// they are copied once into a PacketBuffer for the stack. Frames from the
// stack are written into as many RX elements as they need (mergeable
// buffers), padded to the Ethernet minimum across iovec boundaries, and
// returned with their explicit lengths and one interrupt per batch.
//
// The Endpoint is also the vhost.Backend for a virtio-net device: the
// control plane hands it queues as the frontend sets them up.
package endpoint

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/pcap"
	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// Virtio-net feature bits (virtio 1.2, 5.1.3).
const (
	FeatureCsum      = 0
	FeatureGuestCsum = 1
	FeatureMTU       = 3
	FeatureMAC       = 5
	FeatureGuestTSO4 = 7
	FeatureGuestTSO6 = 8
	FeatureGuestECN  = 9 // not offered: ECN-marked TSO frames are segmented for guests
	FeatureHostTSO4  = 11
	FeatureHostTSO6  = 12
	FeatureHostECN   = 13
	FeatureMrgRxbuf  = 15
	FeatureStatus    = 16
	// FeatureMQ (VIRTIO_NET_F_MQ) is offered with more than one queue
	// pair. The spec makes it depend on CTRL_VQ, which is not offered:
	// vhost-user frontends (QEMU, DPDK's virtio-user) keep the control
	// queue to themselves and tell the backend which pairs the driver
	// uses by SET_VRING_ENABLE (see docs/architecture.md, "Queue pairs").
	FeatureMQ       = 22
	featureVersion1 = 32
)

// Queue indices: virtio-net puts receiveqN at 2N and transmitqN at 2N+1.
const (
	rxQueue = 0
	txQueue = 1
)

// MaxQueuePairs bounds Options.QueuePairs. Each pair costs two goroutines
// and its own RX backlog (bounded by Options.RXBacklog and the memory
// budget); 16 covers every vCPU count this appliance is sized for.
const MaxQueuePairs = 16

const (
	// ethZLen is the minimum Ethernet frame length without FCS; shorter
	// frames are padded with zeros.
	ethZLen = 60
	// maxFrame bounds a frame from the guest: a 64 KiB GSO segment plus
	// its Ethernet header.
	maxFrame = 65535 + header.EthernetMinimumSize
	// txBatch is how many TX elements are returned with one flush.
	txBatch = 64
	// maxMergeBuffers bounds the RX elements one frame may use.
	maxMergeBuffers = 64
	// DefaultRXBacklog is how many packets wait when the guest has posted
	// no RX buffers.
	DefaultRXBacklog = 1024
	// MaxMTU is the largest MTU virtio-net can advertise (u16 in config
	// space) that still leaves room for the Ethernet header in 64 KiB.
	MaxMTU = 65520
)

// Options configure an Endpoint.
type Options struct {
	// MTU is the IP MTU offered to the stack and, with VIRTIO_NET_F_MTU,
	// advertised to the guest. 68..MaxMTU; default 1500.
	MTU uint32
	// LinkAddress is the MAC of our side of the link (the gateway).
	LinkAddress tcpip.LinkAddress
	// GuestMAC is the MAC placed in the virtio config space.
	GuestMAC tcpip.LinkAddress
	// RXBacklog bounds packets queued while the guest has no RX buffers;
	// default DefaultRXBacklog.
	RXBacklog int
	// Offloads offers CSUM and HOST_TSO4/6 (the guest may send partially
	// checksummed frames and 64 KiB TCP segments). Default on; set
	// NoOffloads to switch off.
	NoOffloads bool
	// ARPTargets are the IPv4 addresses the stack answers ARP requests
	// for (gateway, DNS). The stack is promiscuous, so without this it
	// would claim every address, including the guest's own, and a DHCP
	// client probing for conflicts (udhcpc -a, iPXE) would decline every
	// lease. Requests for other addresses are dropped. Empty: answer all.
	ARPTargets []netip.Addr
	// NDPTargets are the IPv6 addresses the stack answers neighbour
	// solicitations for (gateway, DNS, the router's link-local address),
	// for the same reason; solicitations for other targets are dropped
	// (another guest answers for its own). Empty: answer all.
	NDPTargets []netip.Addr
	// Memory, if set, accounts the packets waiting in the RX backlog; a
	// packet it has no room for is dropped (RXBacklogMemory) as if the
	// backlog were full. Nil: only RXBacklog bounds the backlog.
	Memory *budget.Budget
	// QueuePairs is the number of receive/transmit queue pairs offered
	// (VIRTIO_NET_F_MQ when above 1); 1..MaxQueuePairs, default 1.
	QueuePairs int
	// Pcap, if set, receives every frame in both directions.
	Pcap *pcap.Writer
	// Logger receives rate-limited warnings; nil discards.
	Logger *slog.Logger
}

// QueueStats are one virtqueue's frame counters; the owner registers each
// with its queue's labels (queue, direction), as it does virtqueue.Stats.
type QueueStats struct {
	Frames atomic.Uint64 `metric:"link_frames_total" help:"Ethernet frames carried, by virtqueue and direction (to_guest, from_guest)."`
	Bytes  atomic.Uint64 `metric:"link_bytes_total" help:"Ethernet bytes carried, by virtqueue and direction (to_guest, from_guest)."`
}

// Stats are the endpoint's counters, updated atomically and declared for
// the metrics registry (internal/metrics). tx is guest → host, rx host →
// guest.
type Stats struct {
	// Queues are each virtqueue's frame counters, by virtqueue index
	// (receiveqN at 2N, transmitqN at 2N+1); the first NumQueues are used.
	Queues [2 * MaxQueuePairs]QueueStats `metric:"-"`

	// Drops by reason.
	TXBadHeader    atomic.Uint64 `metric:"link_drops_total{reason=tx_bad_header}" help:"Frames dropped by the virtio-net endpoint, by reason." hostile:"link"`
	TXShort        atomic.Uint64 `metric:"link_drops_total{reason=tx_short}" hostile:"link"`
	TXTooBig       atomic.Uint64 `metric:"link_drops_total{reason=tx_too_big}" hostile:"link"`
	TXBadGSO       atomic.Uint64 `metric:"link_drops_total{reason=tx_bad_gso}" hostile:"link"`
	RXNotConnected atomic.Uint64 `metric:"link_drops_total{reason=rx_not_connected}"`
	RXBacklogFull  atomic.Uint64 `metric:"link_drops_total{reason=rx_backlog_full}"`
	// RXBacklogMem: the memory budget had no room to queue the frame.
	RXBacklogMem   atomic.Uint64 `metric:"link_drops_total{reason=rx_backlog_memory}"`
	RXTooBig       atomic.Uint64 `metric:"link_drops_total{reason=rx_too_big}"`
	RXSegmentDrops atomic.Uint64 `metric:"link_drops_total{reason=rx_segment_no_buffer}"`

	RXBacklogged atomic.Uint64 `metric:"link_rx_backlogged_total" help:"Frames to the guest that waited for receive buffers."`
	// RXBacklog is set by New: it reads the backlog's length under its lock.
	RXBacklog  func() int64  `metric:"link_rx_backlog" kind:"gauge" help:"Frames to the guest waiting for receive buffers now."`
	ARPIgnored atomic.Uint64 `metric:"link_arp_ignored_total" help:"ARP requests from the guest for addresses vunet does not answer (neither the gateway nor the DNS address)."`
	NDPIgnored atomic.Uint64 `metric:"link_ndp_ignored_total" help:"IPv6 neighbour solicitations from the guest for addresses vunet does not answer (neither the gateway, the DNS nor the router's link-local address)."`
	TXFaults   atomic.Uint64 `metric:"link_guest_memory_faults_total{direction=from_guest}" help:"Guest memory faults while reading or writing frames (the frontend removed memory under a running queue)." hostile:"vhost_memory"`
	RXFaults   atomic.Uint64 `metric:"link_guest_memory_faults_total{direction=to_guest}" hostile:"vhost_memory"`
}

// ToGuest returns the frames and bytes written to every receive queue.
func (s *Stats) ToGuest() (frames, bytes uint64) { return s.sum(rxQueue) }

// FromGuest returns the frames and bytes read from every transmit queue.
func (s *Stats) FromGuest() (frames, bytes uint64) { return s.sum(txQueue) }

func (s *Stats) sum(first int) (frames, bytes uint64) {
	for i := first; i < len(s.Queues); i += 2 {
		frames += s.Queues[i].Frames.Load()
		bytes += s.Queues[i].Bytes.Load()
	}
	return frames, bytes
}

// pair is one receive/transmit queue pair (receiveqN and transmitqN) and
// its workers. Pairs share nothing but the endpoint's negotiated features
// and the stack: each queue has its own worker and lock.
type pair struct {
	rx rxState
	tx txState
}

// Endpoint implements stack.LinkEndpoint over one or more virtio-net queue
// pairs.
type Endpoint struct {
	opts Options
	log  *slog.Logger

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher
	mtu        uint32
	linkAddr   tcpip.LinkAddress
	onClose    func()

	features atomic.Uint64
	hdrLen   atomic.Int32

	pairs []pair
	// ctl serialises queue starts and stops with the rebuild of activeRX.
	ctl sync.Mutex
	// activeRX are the receive queues that run now, in pair order: the
	// queues WritePackets steers flows over (see steer.go).
	activeRX atomic.Pointer[[]*rxState]

	// sw is the switch this endpoint is a port of, or nil (a lone
	// endpoint, attached to a stack itself); port is its state there.
	sw   *Switch
	port portState

	// Stats counts frames, bytes and drops.
	Stats Stats
}

// The endpoint is the virtio-net device behind the vhost-user control
// plane and a gVisor link endpoint; a signature drift in any of these
// interfaces fails to compile here rather than silently losing a method
// the control plane looks up by assertion (QueueNumReporter).
var (
	_ stack.LinkEndpoint     = (*Endpoint)(nil)
	_ vhost.Backend          = (*Endpoint)(nil)
	_ vhost.QueueNumReporter = (*Endpoint)(nil)
)

// New returns an endpoint; it carries traffic once a frontend starts its
// queues.
func New(opts Options) (*Endpoint, error) {
	if opts.MTU == 0 {
		opts.MTU = 1500
	}
	if opts.MTU < 68 || opts.MTU > MaxMTU {
		return nil, fmt.Errorf("endpoint: MTU %d out of range 68..%d", opts.MTU, MaxMTU)
	}
	if len(opts.LinkAddress) != header.EthernetAddressSize || len(opts.GuestMAC) != header.EthernetAddressSize {
		return nil, errors.New("endpoint: LinkAddress and GuestMAC must be 6-byte MACs")
	}
	if opts.RXBacklog <= 0 {
		opts.RXBacklog = DefaultRXBacklog
	}
	if opts.QueuePairs == 0 {
		opts.QueuePairs = 1
	}
	if opts.QueuePairs < 1 || opts.QueuePairs > MaxQueuePairs {
		return nil, fmt.Errorf("endpoint: %d queue pairs out of range 1..%d", opts.QueuePairs, MaxQueuePairs)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Endpoint{opts: opts, log: log, mtu: opts.MTU, linkAddr: opts.LinkAddress}
	e.Stats.RXBacklog = func() int64 { return int64(e.RXBacklog()) }
	e.hdrLen.Store(hdrLenLegacy)
	e.pairs = make([]pair, opts.QueuePairs)
	for i := range e.pairs {
		p := &e.pairs[i]
		p.rx.backlogMax = opts.RXBacklog
		p.rx.mem = opts.Memory
		p.rx.stats = &e.Stats.Queues[2*i+rxQueue]
		p.tx.stats = &e.Stats.Queues[2*i+txQueue]
	}
	e.activeRX.Store(&[]*rxState{})
	return e, nil
}

// --- vhost.Backend ---

// Features implements vhost.Backend.Features.
func (e *Endpoint) Features() uint64 {
	f := uint64(1<<FeatureMrgRxbuf | 1<<FeatureMAC | 1<<FeatureStatus | 1<<FeatureMTU)
	if !e.opts.NoOffloads {
		f |= 1<<FeatureCsum | 1<<FeatureHostTSO4 | 1<<FeatureHostTSO6 | 1<<FeatureHostECN |
			1<<FeatureGuestCsum | 1<<FeatureGuestTSO4 | 1<<FeatureGuestTSO6
	}
	if len(e.pairs) > 1 {
		f |= 1 << FeatureMQ
	}
	return f
}

// SetFeatures implements vhost.Backend.SetFeatures.
func (e *Endpoint) SetFeatures(acked uint64) error {
	e.features.Store(acked)
	// The 12-byte header (with num_buffers) is used by VERSION_1 devices
	// and by legacy ones that negotiated mergeable buffers.
	if acked&(1<<featureVersion1|1<<FeatureMrgRxbuf) != 0 {
		e.hdrLen.Store(hdrLenMrg)
	} else {
		e.Stats.RXBacklog = func() int64 { return int64(e.RXBacklog()) }
		e.hdrLen.Store(hdrLenLegacy)
	}
	return nil
}

func (e *Endpoint) has(bit uint) bool { return e.features.Load()&(1<<bit) != 0 }

// NumQueues implements vhost.Backend.NumQueues: a receive and a transmit
// queue per pair.
func (e *Endpoint) NumQueues() int { return 2 * len(e.pairs) }

// QueuePairs returns the number of queue pairs offered.
func (e *Endpoint) QueuePairs() int { return len(e.pairs) }

// QueueNum implements vhost.QueueNumReporter: the number of queue pairs.
// QEMU counts GET_QUEUE_NUM in pairs for virtio-net and refuses a netdev
// with more (`queues=3` against 2: "you are asking more queues than
// supported: 2") up front instead of failing on a vring later.
func (e *Endpoint) QueueNum() uint64 { return uint64(len(e.pairs)) }

// Config implements vhost.Backend.Config: the virtio-net config space
// (mac, status, max_virtqueue_pairs, mtu).
func (e *Endpoint) Config() []byte {
	c := make([]byte, 12)
	copy(c, e.opts.GuestMAC)
	binary.LittleEndian.PutUint16(c[6:], 1) // VIRTIO_NET_S_LINK_UP
	binary.LittleEndian.PutUint16(c[8:], uint16(len(e.pairs)))
	binary.LittleEndian.PutUint16(c[10:], uint16(e.opts.MTU))
	return c
}

// queue returns the pair of virtqueue idx and whether idx is its receive
// queue; nil for an index the device does not have (the control plane
// range-checks indexes against NumQueues, so only a bug gets here).
func (e *Endpoint) queue(idx int) (p *pair, rx bool) {
	if idx < 0 || idx >= 2*len(e.pairs) {
		return nil, false
	}
	return &e.pairs[idx/2], idx%2 == rxQueue
}

// StartQueue implements vhost.Backend.StartQueue.
func (e *Endpoint) StartQueue(idx int, q *virtqueue.Queue, kick *virtqueue.EventFD) {
	p, rx := e.queue(idx)
	if p == nil {
		return
	}
	e.ctl.Lock()
	defer e.ctl.Unlock()
	if rx {
		p.rx.start(e, q, kick)
		e.updateActiveRX()
	} else {
		p.tx.start(e, q, kick)
	}
}

// StopQueue implements vhost.Backend.StopQueue.
func (e *Endpoint) StopQueue(idx int) {
	p, rx := e.queue(idx)
	if p == nil {
		return
	}
	e.ctl.Lock()
	defer e.ctl.Unlock()
	if rx {
		// Steer away first, so that WritePackets stops choosing it.
		p.rx.stopping()
		e.updateActiveRX()
		p.rx.stop()
	} else {
		p.tx.stop()
	}
}

// updateActiveRX republishes the running receive queues. Callers hold ctl.
func (e *Endpoint) updateActiveRX() {
	act := make([]*rxState, 0, len(e.pairs))
	for i := range e.pairs {
		if e.pairs[i].rx.steerable() {
			act = append(act, &e.pairs[i].rx)
		}
	}
	e.activeRX.Store(&act)
}

// RingState returns the indexes of virtqueue idx (receiveqN at 2N,
// transmitqN at 2N+1), or a zero state when it is not running.
func (e *Endpoint) RingState(idx int) virtqueue.RingState {
	p, rx := e.queue(idx)
	if p == nil {
		return virtqueue.RingState{}
	}
	var q *virtqueue.Queue
	if rx {
		p.rx.mu.Lock()
		q = p.rx.q
		p.rx.mu.Unlock()
	} else {
		q = p.tx.queue()
	}
	if q == nil {
		return virtqueue.RingState{}
	}
	return q.State()
}

// RXBacklog returns how many packets to the guest wait for receive
// buffers, over every receive queue.
func (e *Endpoint) RXBacklog() int {
	n := 0
	for i := range e.pairs {
		r := &e.pairs[i].rx
		r.mu.Lock()
		n += len(r.backlog)
		r.mu.Unlock()
	}
	return n
}

// RXCapacity returns how many bytes of TCP payload toward the guest one
// receive queue holds while the guest has posted no buffers: the backlog
// (Options.RXBacklog packets) times what one packet carries, a GSO
// segment (gsoMaxSize) when the stack hands this guest those, else one
// frame of the MTU less IPv6, TCP and timestamp headers (the smallest
// payload of a full-sized segment). One queue's, not the sum of all: a
// connection's packets all take one queue (steer.go), and several
// connections may hash to the same one. The NAT bounds what its
// connections have in flight to the guest by it
// (forward.Options.GuestRXCapacity; see forward's rxShareNum).
func (e *Endpoint) RXCapacity() int64 {
	per := int64(gsoMaxSize)
	if e.SupportedGSO() != stack.HostGSOSupported {
		per = int64(e.MTU()) - header.IPv6MinimumSize - header.TCPMinimumSize - rxTimestampOption
	}
	return max(per, 1) * int64(e.opts.RXBacklog)
}

// rxTimestampOption is the TCP timestamp option padded to 4 bytes, as
// gVisor and Linux send it on every segment.
const rxTimestampOption = 12

// Reset implements vhost.Backend.Reset.
func (e *Endpoint) Reset() {
	e.ctl.Lock()
	for i := range e.pairs {
		p := &e.pairs[i]
		p.rx.stopping()
		e.updateActiveRX()
		p.rx.stop()
		p.tx.stop()
		p.rx.dropBacklog()
	}
	e.ctl.Unlock()
	e.features.Store(0)
	e.Stats.RXBacklog = func() int64 { return int64(e.RXBacklog()) }
	e.hdrLen.Store(hdrLenLegacy)
}

// --- stack.LinkEndpoint ---

// MTU implements stack.LinkEndpoint.MTU.
func (e *Endpoint) MTU() uint32 {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.mtu
}

// SetMTU implements stack.LinkEndpoint.SetMTU.
func (e *Endpoint) SetMTU(mtu uint32) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.mtu = mtu
}

// MaxHeaderLength implements stack.LinkEndpoint.MaxHeaderLength. The
// virtio-net header is written straight into guest buffers, so only the
// Ethernet header is reserved.
func (e *Endpoint) MaxHeaderLength() uint16 { return header.EthernetMinimumSize }

// LinkAddress implements stack.LinkEndpoint.LinkAddress.
func (e *Endpoint) LinkAddress() tcpip.LinkAddress {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.linkAddr
}

// SetLinkAddress implements stack.LinkEndpoint.SetLinkAddress.
func (e *Endpoint) SetLinkAddress(addr tcpip.LinkAddress) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.linkAddr = addr
}

// Capabilities implements stack.LinkEndpoint.Capabilities. Resolution is
// required so that ARP and NDP run on the link.
//
// RX checksum offload is claimed: frames reach us by memory copy from the
// guest, with no wire to corrupt them, and a guest that negotiated CSUM
// sends partial checksums (NEEDS_CSUM) that the stack must not reject. The
// NIC applies this per link, not per packet, which is why it is here.
//
// TX checksum offload is not claimed: the guest may not have negotiated
// GUEST_CSUM (iPXE verifies every checksum), so the stack computes them.
func (e *Endpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityResolutionRequired | stack.CapabilityRXChecksumOffload
}

// Attach implements stack.LinkEndpoint.Attach.
func (e *Endpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dispatcher = d
}

// IsAttached implements stack.LinkEndpoint.IsAttached.
func (e *Endpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Wait implements stack.LinkEndpoint.Wait. Queue workers belong to the
// vhost session and are stopped through StopQueue.
func (e *Endpoint) Wait() {}

// ARPHardwareType implements stack.LinkEndpoint.ARPHardwareType.
func (e *Endpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }

// AddHeader implements stack.LinkEndpoint.AddHeader.
func (e *Endpoint) AddHeader(pkt *stack.PacketBuffer) {
	eth := header.Ethernet(pkt.LinkHeader().Push(header.EthernetMinimumSize))
	f := header.EthernetFields{
		SrcAddr: pkt.EgressRoute.LocalLinkAddress,
		DstAddr: pkt.EgressRoute.RemoteLinkAddress,
		Type:    pkt.NetworkProtocolNumber,
	}
	if f.SrcAddr == "" {
		f.SrcAddr = e.LinkAddress()
	}
	eth.Encode(&f)
}

// ParseHeader implements stack.LinkEndpoint.ParseHeader.
func (e *Endpoint) ParseHeader(pkt *stack.PacketBuffer) bool {
	_, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	return ok
}

// Close implements stack.LinkEndpoint.Close.
func (e *Endpoint) Close() {
	e.mu.RLock()
	f := e.onClose
	e.mu.RUnlock()
	if f != nil {
		f()
	}
}

// SetOnCloseAction implements stack.LinkEndpoint.SetOnCloseAction.
func (e *Endpoint) SetOnCloseAction(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.onClose = f
}

// WritePackets implements stack.LinkWriter.WritePackets.
// Packets are steered over the running receive queues by flow (steer.go).
func (e *Endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	list := pkts.AsSlice()
	e.writeSlice(list)
	return len(list), nil
}

// warn logs a problem with guest input. A hostile guest can produce one
// per frame: the bound is the appliance's log limiter
// (ratelimit.Handler), which every log line goes through, not a limiter of
// the endpoint's own.
func (e *Endpoint) warn(msg string, args ...any) {
	e.log.Warn(msg, args...)
}
