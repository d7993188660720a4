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
	featureVersion1  = 32
)

// Queue indices: virtio-net puts receiveq1 at 0 and transmitq1 at 1.
const (
	rxQueue = 0
	txQueue = 1
)

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
	// Pcap, if set, receives every frame in both directions.
	Pcap *pcap.Writer
	// Logger receives rate-limited warnings; nil discards.
	Logger *slog.Logger
}

// Stats are the endpoint's counters, updated atomically and declared for
// the metrics registry (internal/metrics). tx is guest → host, rx host →
// guest; vunet serves one queue pair, receiveq 0 and transmitq 1.
type Stats struct {
	RXFrames atomic.Uint64 `metric:"link_frames_total{queue=0,direction=to_guest}" help:"Ethernet frames carried, by virtqueue and direction (to_guest, from_guest)."`
	TXFrames atomic.Uint64 `metric:"link_frames_total{queue=1,direction=from_guest}"`
	RXBytes  atomic.Uint64 `metric:"link_bytes_total{queue=0,direction=to_guest}" help:"Ethernet bytes carried, by virtqueue and direction (to_guest, from_guest)."`
	TXBytes  atomic.Uint64 `metric:"link_bytes_total{queue=1,direction=from_guest}"`

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

// Endpoint implements stack.LinkEndpoint over a virtio-net queue pair.
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

	rx rxState
	tx txState

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
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Endpoint{opts: opts, log: log, mtu: opts.MTU, linkAddr: opts.LinkAddress}
	e.Stats.RXBacklog = func() int64 { return int64(e.RXBacklog()) }
	e.hdrLen.Store(hdrLenLegacy)
	e.rx.backlogMax = opts.RXBacklog
	e.rx.mem = opts.Memory
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

// NumQueues implements vhost.Backend.NumQueues: one RX/TX pair.
func (e *Endpoint) NumQueues() int { return 2 }

// QueueNum implements vhost.QueueNumReporter: one receive/transmit pair.
// QEMU counts GET_QUEUE_NUM in pairs for virtio-net, so `queues=2` on the
// netdev is refused up front ("you are asking more queues than
// supported: 1") instead of failing on vring 2 later.
func (e *Endpoint) QueueNum() uint64 { return 1 }

// Config implements vhost.Backend.Config: the virtio-net config space
// (mac, status, max_virtqueue_pairs, mtu).
func (e *Endpoint) Config() []byte {
	c := make([]byte, 12)
	copy(c, e.opts.GuestMAC)
	binary.LittleEndian.PutUint16(c[6:], 1) // VIRTIO_NET_S_LINK_UP
	binary.LittleEndian.PutUint16(c[8:], 1)
	binary.LittleEndian.PutUint16(c[10:], uint16(e.opts.MTU))
	return c
}

// StartQueue implements vhost.Backend.StartQueue.
func (e *Endpoint) StartQueue(idx int, q *virtqueue.Queue, kick *virtqueue.EventFD) {
	switch idx {
	case rxQueue:
		e.rx.start(e, q, kick)
	case txQueue:
		e.tx.start(e, q, kick)
	}
}

// StopQueue implements vhost.Backend.StopQueue.
func (e *Endpoint) StopQueue(idx int) {
	switch idx {
	case rxQueue:
		e.rx.stop()
	case txQueue:
		e.tx.stop()
	}
}

// RingState returns the indexes of the receive (to the guest) or transmit
// queue, or a zero state when it is not running.
func (e *Endpoint) RingState(idx int) virtqueue.RingState {
	var q *virtqueue.Queue
	switch idx {
	case rxQueue:
		e.rx.mu.Lock()
		q = e.rx.q
		e.rx.mu.Unlock()
	case txQueue:
		q = e.tx.queue()
	}
	if q == nil {
		return virtqueue.RingState{}
	}
	return q.State()
}

// RXBacklog returns how many packets to the guest wait for receive buffers.
func (e *Endpoint) RXBacklog() int {
	e.rx.mu.Lock()
	defer e.rx.mu.Unlock()
	return len(e.rx.backlog)
}

// Reset implements vhost.Backend.Reset.
func (e *Endpoint) Reset() {
	e.rx.stop()
	e.tx.stop()
	e.rx.dropBacklog()
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
func (e *Endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	return e.rx.write(e, pkts), nil
}

// warn logs a problem with guest input. A hostile guest can produce one
// per frame: the bound is the appliance's log limiter
// (ratelimit.Handler), which every log line goes through, not a limiter of
// the endpoint's own.
func (e *Endpoint) warn(msg string, args ...any) {
	e.log.Warn(msg, args...)
}
