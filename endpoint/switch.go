package endpoint

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// MaxPorts bounds SwitchOptions.Ports (--max-guests).
const MaxPorts = 64

const (
	// udpChecksumOffset is where a UDP header keeps its checksum.
	udpChecksumOffset = 6
	// maxMACsPerPort bounds the source MACs one guest port may use (its
	// own plus, say, a bridge or nested VMs behind it); a guest cannot
	// grow the switch's table beyond Ports × maxMACsPerPort.
	maxMACsPerPort = 16
	// maxAddrsPerPort bounds the source IP addresses recorded per guest
	// (for Guests and for tearing its NAT flows down when it leaves).
	maxAddrsPerPort = 16
)

// SwitchOptions configure a Switch.
type SwitchOptions struct {
	// Ports is how many guests may be connected at once (--max-guests);
	// 1..MaxPorts, default 1.
	Ports int
	// Port configures every port's endpoint: MTU, the gateway's MAC
	// (LinkAddress), ARP and NDP targets, memory, pcap, logger.
	Port Options
	// PortMemory, if set, gives port i its own budget for frames waiting
	// for its guest's RX buffers (replacing Port.Memory), so a guest that
	// stops posting buffers cannot take the backlog memory of the others.
	PortMemory func(i int) *budget.Budget
	// Isolate drops frames between guest ports (--isolate-guests);
	// guests still reach the gateway and everything behind it.
	Isolate bool
	// OnPortDown, if set, is called once a guest's frontend has gone
	// away (its queues are stopped), with what the switch knew about it.
	// It runs on the vhost session's goroutine, before the port can be
	// given to a new frontend.
	OnPortDown func(Guest)
	// Logger receives guest connect, disconnect and refusal lines; nil
	// discards.
	Logger *slog.Logger
}

// SwitchStats are the switch's counters (see internal/metrics).
type SwitchStats struct {
	Unicast atomic.Uint64 `metric:"switch_frames_total{kind=unicast}" help:"Frames switched from one guest to another (not through the stack), by kind: unicast to a known guest MAC, or flooded (broadcast and multicast, one per receiving guest)."`
	Flooded atomic.Uint64 `metric:"switch_frames_total{kind=flood}"`

	Isolated   atomic.Uint64 `metric:"switch_drops_total{reason=isolated}" help:"Frames the switch dropped, by reason: isolated (guest to guest under --isolate-guests), hairpin (a guest's frame to its own MAC), unknown_destination (from the stack to a MAC no guest has), mac_conflict (a source MAC another guest uses), bad_source_mac (multicast, zero or the gateway's), mac_table_full (a guest using more MACs than allowed), bad_offload (checksum/TSO metadata that does not fit the frame)."`
	Hairpin    atomic.Uint64 `metric:"switch_drops_total{reason=hairpin}"`
	UnknownDst atomic.Uint64 `metric:"switch_drops_total{reason=unknown_destination}"`
	MACClash   atomic.Uint64 `metric:"switch_drops_total{reason=mac_conflict}" hostile:"switch"`
	BadSrcMAC  atomic.Uint64 `metric:"switch_drops_total{reason=bad_source_mac}" hostile:"switch"`
	MACsFull   atomic.Uint64 `metric:"switch_drops_total{reason=mac_table_full}"`
	BadOffload atomic.Uint64 `metric:"switch_drops_total{reason=bad_offload}" hostile:"switch"`

	MACInUse  atomic.Uint64 `metric:"switch_guests_refused_total{reason=mac_in_use}" help:"Guests refused (their frontend disconnected) by the switch, by reason: mac_in_use (their MAC is another connected guest's). Guests beyond --max-guests are vhost_frontends_refused_total{reason=busy}."`
	AddrsFull atomic.Uint64 `metric:"switch_guest_addresses_full_total" help:"Source addresses not recorded because the guest already has the most the switch keeps per guest."`
	// Connected is set by NewSwitch.
	Connected func() int64 `metric:"switch_guests" kind:"gauge" help:"Guests connected now."`
}

// Guest describes one connected guest: a port of the switch.
type Guest struct {
	// Port is the port's index, 0..Ports-1: the `guest` label of its
	// counters. A port is reused by the next frontend once its guest left.
	Port int
	// Session numbers the frontends the switch accepted, from 1.
	Session uint64
	// Since is when its frontend connected.
	Since time.Time
	// MAC is the guest's own MAC: the source of its first frame (QEMU's
	// mac=). Nil until the guest has sent a frame.
	MAC net.HardwareAddr
	// Addrs are the source addresses (IPv4, then IPv6) of its frames, in
	// the order first seen; at most maxAddrsPerPort.
	Addrs []netip.Addr
	// Endpoint is its device: counters (Stats) and ring states
	// (RingState).
	Endpoint *Endpoint
}

// portState is an endpoint's state as a switch port. The identity fields
// are written under Switch.mu; the TX worker, the only writer while the
// port is in use, reads them without it.
type portState struct {
	id      int
	inUse   bool
	session uint64
	since   time.Time
	hangUp  func()
	mac     [6]byte
	known   bool // mac is learned
	refused bool // mac was in use: frames dropped until the session ends
	macs    int  // MACs this port has in the table
	addrs   []netip.Addr
	// Caches of the last recorded source addresses (TX worker only).
	last4 [4]byte
	last6 [16]byte
	// queues are this port's virtqueue counters (vhost.QueueStatser).
	queues []virtqueue.Stats
}

// macTable is an immutable snapshot: replaced whole under Switch.mu,
// read lock-free by the data path.
type macTable struct {
	macs  map[[6]byte]*Endpoint
	ports []*Endpoint // connected guests (not refused): floods reach them
}

// Switch is the network's L2 switch: one gVisor link endpoint (the
// gateway's port, for the stack) in front of up to Ports guest endpoints,
// each the device of one vhost-user frontend (it is the vhost.BackendPool).
// Frames from a guest to the gateway's MAC go to the stack as with a
// single endpoint; unicast to another guest's MAC is copied ring to ring
// with its virtio-net header (offloads kept when the receiver negotiated
// them); broadcast and multicast reach the other guests and the stack.
// Source MACs are learned per port; a guest whose MAC another connected
// guest has is refused.
type Switch struct {
	opts  SwitchOptions
	log   *slog.Logger
	ports []*Endpoint
	gw    [6]byte

	mu      sync.Mutex
	table   atomic.Pointer[macTable]
	session uint64

	dmu        sync.RWMutex
	dispatcher stack.NetworkDispatcher
	onClose    func()

	// Stats counts switching decisions.
	Stats SwitchStats
}

var (
	_ stack.LinkEndpoint = (*Switch)(nil)
	_ stack.GSOEndpoint  = (*Switch)(nil)
	_ vhost.BackendPool  = (*Switch)(nil)
	_ vhost.QueueStatser = (*Endpoint)(nil)
)

// NewSwitch creates the switch and its Ports endpoints.
func NewSwitch(opts SwitchOptions) (*Switch, error) {
	if opts.Ports == 0 {
		opts.Ports = 1
	}
	if opts.Ports < 1 || opts.Ports > MaxPorts {
		return nil, fmt.Errorf("endpoint: %d switch ports, want 1..%d", opts.Ports, MaxPorts)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Switch{opts: opts, log: log}
	s.Stats.Connected = func() int64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		n := 0
		for _, p := range s.ports {
			if p.port.inUse {
				n++
			}
		}
		return int64(n)
	}
	for i := range opts.Ports {
		po := opts.Port
		if opts.PortMemory != nil {
			po.Memory = opts.PortMemory(i)
		}
		e, err := New(po)
		if err != nil {
			return nil, err
		}
		e.sw = s
		e.port.id = i
		e.port.queues = make([]virtqueue.Stats, e.NumQueues())
		s.ports = append(s.ports, e)
	}
	copy(s.gw[:], opts.Port.LinkAddress)
	s.table.Store(&macTable{macs: map[[6]byte]*Endpoint{}})
	return s, nil
}

// Ports returns every port's endpoint, by port index.
func (s *Switch) Ports() []*Endpoint { return s.ports }

// Guests returns the connected guests, by port.
func (s *Switch) Guests() []Guest {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Guest
	for _, e := range s.ports {
		if e.port.inUse {
			out = append(out, e.guestLocked())
		}
	}
	return out
}

func (e *Endpoint) guestLocked() Guest {
	p := &e.port
	g := Guest{Port: p.id, Session: p.session, Since: p.since, Endpoint: e,
		Addrs: slices.Clone(p.addrs)}
	if p.known {
		g.MAC = net.HardwareAddr(slices.Clone(p.mac[:]))
	}
	return g
}

// --- vhost.BackendPool ---

// errPortsFull cannot normally happen: the vhost server admits at most
// Ports frontends.
var errPortsFull = errors.New("every guest port is in use")

// AcquireBackend implements vhost.BackendPool: a free port for a new
// frontend.
func (s *Switch) AcquireBackend(hangUp func()) (vhost.Backend, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.ports {
		p := &e.port
		if p.inUse {
			continue
		}
		s.session++
		p.inUse, p.session, p.since, p.hangUp = true, s.session, time.Now(), hangUp
		s.rebuildLocked(func(map[[6]byte]*Endpoint) {})
		s.log.Info("guest port opened", "guest", p.id, "session", p.session)
		return e, nil
	}
	return nil, errPortsFull
}

// ReleaseBackend implements vhost.BackendPool: the port's frontend is gone.
func (s *Switch) ReleaseBackend(b vhost.Backend) {
	e, ok := b.(*Endpoint)
	if !ok || e.sw != s {
		return
	}
	s.mu.Lock()
	p := &e.port
	if !p.inUse {
		s.mu.Unlock()
		return
	}
	g := e.guestLocked()
	// Reset field by field: id and queues never change and are read
	// without the lock (PortID, QueueStats, by Guests while a guest
	// leaves), so they must not be written, even with the same value.
	p.inUse, p.session, p.since, p.hangUp = false, 0, time.Time{}, nil
	p.mac, p.known, p.refused, p.macs, p.addrs = [6]byte{}, false, false, 0, nil
	p.last4, p.last6 = [4]byte{}, [16]byte{}
	s.rebuildLocked(func(m map[[6]byte]*Endpoint) {
		for k, v := range m {
			if v == e {
				delete(m, k)
			}
		}
	})
	s.mu.Unlock()
	s.log.Info("guest left", "guest", g.Port, "session", g.Session, "mac", macString(g.MAC), "addrs", g.Addrs)
	if s.opts.OnPortDown != nil {
		s.opts.OnPortDown(g)
	}
}

func macString(m net.HardwareAddr) string {
	if m == nil {
		return "none"
	}
	return m.String()
}

// rebuildLocked replaces the MAC table with a changed copy.
func (s *Switch) rebuildLocked(change func(map[[6]byte]*Endpoint)) {
	old := s.table.Load()
	m := make(map[[6]byte]*Endpoint, len(old.macs)+1)
	for k, v := range old.macs {
		m[k] = v
	}
	change(m)
	t := &macTable{macs: m}
	for _, e := range s.ports {
		if e.port.inUse && !e.port.refused {
			t.ports = append(t.ports, e)
		}
	}
	s.table.Store(t)
}

// QueueStats implements vhost.QueueStatser: a switch port counts its
// queues itself, labelled with its guest; a lone endpoint leaves them to
// the vhost server.
func (e *Endpoint) QueueStats(idx int) *virtqueue.Stats {
	if e.sw == nil || idx < 0 || idx >= len(e.port.queues) {
		return nil
	}
	return &e.port.queues[idx]
}

// PortOf names the guest port a packet from the switch's stack side came
// from (a frame a guest sent to the gateway, delivered to the stack): the
// port that owns its source MAC, which the switch enforced on the way in,
// so a guest cannot pass its flows off as another's. -1 when no connected
// guest has that MAC (it has just left) or the packet has no Ethernet
// header. The NAT uses it to charge a new flow to its guest's limits.
func (s *Switch) PortOf(pkt *stack.PacketBuffer) int {
	h := pkt.LinkHeader().Slice()
	if len(h) < header.EthernetMinimumSize {
		return -1
	}
	if e := s.table.Load().macs[[6]byte(h[6:12])]; e != nil {
		return e.port.id
	}
	return -1
}

// PortID is the endpoint's port index in its switch (0 for a lone one).
func (e *Endpoint) PortID() int { return e.port.id }

// --- guest → switch ---

// input switches one frame from guest port src (its TX worker, outside
// every queue lock). It takes over pkt's reference.
func (s *Switch) input(src *Endpoint, pkt *stack.PacketBuffer, h vnetHdr) {
	b, ok := pkt.Data().PullUp(header.EthernetMinimumSize)
	if !ok {
		src.deliver(pkt) // counts it as short
		return
	}
	p := &src.port
	if !p.known || [6]byte(b[6:12]) != p.mac {
		if !s.learn(src, [6]byte(b[6:12])) {
			pkt.DecRef()
			return
		}
	}
	s.learnAddr(src, pkt, header.Ethernet(b).Type())
	dst := [6]byte(b[:6])
	if dst == s.gw {
		src.deliver(pkt)
		return
	}
	t := s.table.Load()
	if dst[0]&1 != 0 { // broadcast or multicast
		if len(t.ports) > 1 {
			switch {
			case s.opts.Isolate:
				s.Stats.Isolated.Add(1)
			case !s.offloadFits(pkt, h):
				s.Stats.BadOffload.Add(1)
			default:
				for _, q := range t.ports {
					if q != src {
						s.Stats.Flooded.Add(1)
						q.sendSwitched(pkt, h)
					}
				}
			}
		}
		src.deliver(pkt)
		return
	}
	q := t.macs[dst]
	switch {
	case q == nil:
		// Not a guest's MAC: the stack answers for every address (it is
		// the NAT), as it does for a lone guest.
		src.deliver(pkt)
		return
	case q == src:
		s.Stats.Hairpin.Add(1)
	case s.opts.Isolate:
		s.Stats.Isolated.Add(1)
	case !s.offloadFits(pkt, h):
		s.Stats.BadOffload.Add(1)
	default:
		s.Stats.Unicast.Add(1)
		q.sendSwitched(pkt, h)
	}
	pkt.DecRef()
}

// learn records mac as a source MAC of port e (the slow path: the port's
// first frame, or a MAC other than its own). It reports whether the frame
// may pass.
func (s *Switch) learn(e *Endpoint, mac [6]byte) bool {
	if t := s.table.Load(); e.port.known && t.macs[mac] == e {
		return true // one of its additional MACs
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := &e.port
	if p.refused {
		s.Stats.MACClash.Add(1)
		return false
	}
	if mac[0]&1 != 0 || mac == ([6]byte{}) || mac == s.gw {
		s.Stats.BadSrcMAC.Add(1)
		return false
	}
	owner := s.table.Load().macs[mac]
	switch {
	case owner == e:
		return true
	case owner != nil && !p.known:
		p.refused = true
		s.rebuildLocked(func(map[[6]byte]*Endpoint) {})
		s.Stats.MACInUse.Add(1)
		s.log.Warn("guest refused: its MAC is already in use by another guest (give each VM its own mac=)",
			"guest", p.id, "session", p.session, "mac", net.HardwareAddr(mac[:]).String(), "in_use_by", owner.port.id)
		if p.hangUp != nil {
			p.hangUp()
		}
		return false
	case owner != nil:
		s.Stats.MACClash.Add(1)
		return false
	case p.macs >= maxMACsPerPort:
		s.Stats.MACsFull.Add(1)
		return false
	}
	if !p.known {
		p.mac, p.known = mac, true
		s.log.Info("guest connected", "guest", p.id, "session", p.session, "mac", net.HardwareAddr(mac[:]).String())
	}
	p.macs++
	s.rebuildLocked(func(m map[[6]byte]*Endpoint) { m[mac] = e })
	return true
}

// learnAddr records the frame's source IP address for the port; the last
// one is cached, so a steady flow costs one compare.
func (s *Switch) learnAddr(e *Endpoint, pkt *stack.PacketBuffer, et tcpip.NetworkProtocolNumber) {
	p := &e.port
	switch et {
	case header.IPv4ProtocolNumber:
		b, ok := pkt.Data().PullUp(header.EthernetMinimumSize + header.IPv4MinimumSize)
		if !ok {
			return
		}
		a := [4]byte(b[header.EthernetMinimumSize+12:])
		if a == p.last4 {
			return
		}
		p.last4 = a
		s.addAddr(e, netip.AddrFrom4(a))
	case header.IPv6ProtocolNumber:
		b, ok := pkt.Data().PullUp(header.EthernetMinimumSize + header.IPv6MinimumSize)
		if !ok {
			return
		}
		a := [16]byte(b[header.EthernetMinimumSize+8:])
		if a == p.last6 {
			return
		}
		p.last6 = a
		s.addAddr(e, netip.AddrFrom16(a))
	}
}

func (s *Switch) addAddr(e *Endpoint, a netip.Addr) {
	if a.IsUnspecified() || a.IsMulticast() || !a.IsValid() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := &e.port
	if slices.Contains(p.addrs, a) {
		return
	}
	if len(p.addrs) >= maxAddrsPerPort {
		s.Stats.AddrsFull.Add(1)
		return
	}
	p.addrs = append(p.addrs, a)
	slices.SortStableFunc(p.addrs, func(x, y netip.Addr) int {
		switch {
		case x.Is4() && !y.Is4():
			return -1
		case !x.Is4() && y.Is4():
			return 1
		}
		return 0
	})
}

// offloadFits checks a guest's checksum and TSO metadata against the
// frame before another guest (or the software fallback) relies on it:
// the stack ignores it, a receiving guest or segment would not.
func (s *Switch) offloadFits(pkt *stack.PacketBuffer, h vnetHdr) bool {
	gso := h.GSOType &^ gsoECN
	needs := h.Flags&hdrFNeedsCsum != 0
	if !needs && gso == gsoNone {
		return true
	}
	n := pkt.Size()
	cs, co := int(h.CsumStart), int(h.CsumOffset)
	if !needs || cs < header.EthernetMinimumSize || cs+co+2 > n {
		return false
	}
	if gso == gsoNone {
		return true
	}
	b, ok := pkt.Data().PullUp(min(n, cs+header.TCPMinimumSize))
	if !ok {
		return false
	}
	_, ok = switchedLayout(b, n, h)
	return ok
}

// switchedLayout finds the headers of a guest's TCP GSO frame, checked
// against the frame (n bytes; b holds at least its first csum_start+20):
// an untagged IPv4 or IPv6 frame whose csum_start is the TCP header.
func switchedLayout(b []byte, n int, h vnetHdr) (gsoLayout, bool) {
	const eth = header.EthernetMinimumSize
	cs := int(h.CsumStart)
	if h.GSOSize == 0 || h.CsumOffset != header.TCPChecksumOffset || cs+header.TCPMinimumSize > n || cs+header.TCPMinimumSize > len(b) {
		return gsoLayout{}, false
	}
	v6 := h.GSOType&^gsoECN == gsoTCPv6
	et := header.Ethernet(b).Type()
	switch {
	case !v6 && (et != header.IPv4ProtocolNumber || b[eth]>>4 != 4 || eth+int(b[eth]&0xf)*4 != cs || cs < eth+header.IPv4MinimumSize):
		return gsoLayout{}, false
	case v6 && (et != header.IPv6ProtocolNumber || b[eth]>>4 != 6 || cs < eth+header.IPv6MinimumSize):
		return gsoLayout{}, false
	}
	doff := int(b[cs+12]>>4) * 4
	if doff < header.TCPMinimumSize || cs+doff > n {
		return gsoLayout{}, false
	}
	return gsoLayout{l4Start: cs, hdrLen: cs + doff, payload: n - cs - doff, v6: v6}, true
}

// --- switch → guest ---

// sendSwitched queues a frame from another guest, with that guest's
// virtio-net header, for this port's guest.
func (e *Endpoint) sendSwitched(pkt *stack.PacketBuffer, h vnetHdr) {
	r := e.rxFor(pkt) // the flow's receive queue, as for the stack's packets
	if r == nil {
		e.Stats.RXNotConnected.Add(1)
		return
	}
	r.mu.Lock()
	q := r.q
	r.mu.Unlock()
	if q == nil {
		e.Stats.RXNotConnected.Add(1)
		return
	}
	if err := q.Guard(func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		q := r.q
		if q == nil || !q.Ready() {
			e.Stats.RXNotConnected.Add(1)
			return
		}
		q.Lock()
		defer q.Unlock()
		r.put(e, q, rxItem{pkt: pkt, hdr: h, switched: true})
		r.flushLocked(q)
	}); err != nil {
		e.Stats.RXFaults.Add(1)
		e.warn("RX queue broken", "err", err)
	}
}

// writeSwitched writes a frame from another guest: its offloads handed on
// when this guest negotiated them, else the checksum finished or the TSO
// frame segmented here (Switch.input checked the metadata). Callers hold
// mu and the queue lock.
func (r *rxState) writeSwitched(e *Endpoint, q *virtqueue.Queue, pkt *stack.PacketBuffer, in vnetHdr) (ok, retry bool) {
	slices := pkt.AsSlices()
	frameLen := pkt.Size()
	gso := in.GSOType &^ gsoECN
	if in.Flags&hdrFNeedsCsum == 0 {
		return r.writeFrame(e, q, slices, frameLen, vnetHdr{}, -1, 0)
	}
	partial := vnetHdr{Flags: hdrFNeedsCsum, CsumStart: in.CsumStart, CsumOffset: in.CsumOffset}
	if gso == gsoNone {
		if e.has(FeatureGuestCsum) {
			return r.writeFrame(e, q, slices, frameLen, partial, -1, 0)
		}
		c := finishChecksum(slices, int(in.CsumStart))
		if c == 0 && in.CsumOffset == udpChecksumOffset {
			c = 0xffff // UDP's "no checksum" is 0; a computed 0 is sent as all ones
		}
		return r.writeFrame(e, q, slices, frameLen, vnetHdr{}, int(in.CsumStart)+int(in.CsumOffset), c)
	}
	v6 := gso == gsoTCPv6
	tso := (!v6 && e.has(FeatureGuestTSO4)) || (v6 && e.has(FeatureGuestTSO6))
	ecnOK := in.GSOType&gsoECN == 0 || e.has(FeatureGuestECN)
	if e.has(FeatureGuestCsum) && tso && ecnOK {
		h := partial
		h.GSOType, h.GSOSize, h.HdrLen = in.GSOType, in.GSOSize, in.HdrLen
		if ok, retry = r.writeFrame(e, q, slices, frameLen, h, -1, 0); ok || retry {
			return ok, retry
		}
		// More buffers than one frame may use: segment it here.
	}
	r.flat = r.flat[:0]
	for _, s := range slices {
		r.flat = append(r.flat, s...)
	}
	l, valid := switchedLayout(r.flat, len(r.flat), in)
	if !valid { // checked by Switch.input; cannot happen
		e.Stats.RXSegmentDrops.Add(1)
		return false, false
	}
	ok = true
	segment(r.flat, l, int(in.GSOSize), r.seg, func(seg []byte) bool {
		r.seg = seg
		if w, _ := r.writeFrame(e, q, [][]byte{seg}, len(seg), vnetHdr{}, -1, 0); !w {
			e.Stats.RXSegmentDrops.Add(1)
			ok = false
		}
		return ok
	})
	return ok, false
}

// --- stack.LinkEndpoint: the gateway's port ---

// WritePackets implements stack.LinkWriter: frames from the stack go to
// the guest whose MAC they are addressed to, or to every guest
// (broadcast, multicast). With one port, everything goes to it, as with a
// lone endpoint.
func (s *Switch) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	list := pkts.AsSlice()
	if len(s.ports) == 1 {
		s.ports[0].writeSlice(list)
		return len(list), nil
	}
	t := s.table.Load()
	for i := 0; i < len(list); {
		dst := linkDst(list[i])
		j := i + 1
		for j < len(list) && linkDst(list[j]) == dst {
			j++
		}
		run := list[i:j]
		switch q := t.macs[dst]; {
		case dst[0]&1 != 0:
			for _, q := range t.ports {
				q.writeSlice(run)
			}
		case q != nil:
			q.writeSlice(run)
		default:
			s.Stats.UnknownDst.Add(uint64(len(run)))
		}
		i = j
	}
	return len(list), nil
}

// linkDst is the destination MAC of a packet from the stack (AddHeader
// has run).
func linkDst(pkt *stack.PacketBuffer) [6]byte {
	if h := pkt.LinkHeader().Slice(); len(h) >= header.EthernetMinimumSize {
		return [6]byte(h[:6])
	}
	var m [6]byte
	copy(m[:], pkt.EgressRoute.RemoteLinkAddress)
	return m
}

// SupportedGSO implements stack.GSOEndpoint: 64 KiB segments when any
// connected guest takes them; a guest that does not gets them segmented
// in software (the stack asks once per connection, not per guest).
func (s *Switch) SupportedGSO() stack.SupportedGSO {
	if len(s.ports) == 1 {
		return s.ports[0].SupportedGSO()
	}
	for _, e := range s.ports {
		if e.SupportedGSO() == stack.HostGSOSupported {
			return stack.HostGSOSupported
		}
	}
	return stack.GSONotSupported
}

// GSOMaxSize implements stack.GSOEndpoint.
func (s *Switch) GSOMaxSize() uint32 { return gsoMaxSize }

// MTU implements stack.LinkEndpoint.
func (s *Switch) MTU() uint32 { return s.ports[0].MTU() }

// SetMTU implements stack.LinkEndpoint.
func (s *Switch) SetMTU(mtu uint32) {
	for _, e := range s.ports {
		e.SetMTU(mtu)
	}
}

// MaxHeaderLength implements stack.LinkEndpoint.
func (s *Switch) MaxHeaderLength() uint16 { return s.ports[0].MaxHeaderLength() }

// LinkAddress implements stack.LinkEndpoint: the gateway's MAC.
func (s *Switch) LinkAddress() tcpip.LinkAddress { return s.ports[0].LinkAddress() }

// SetLinkAddress implements stack.LinkEndpoint. The switch keeps
// forwarding by the MAC it was created with.
func (s *Switch) SetLinkAddress(a tcpip.LinkAddress) {
	for _, e := range s.ports {
		e.SetLinkAddress(a)
	}
}

// Capabilities implements stack.LinkEndpoint (see Endpoint.Capabilities).
func (s *Switch) Capabilities() stack.LinkEndpointCapabilities { return s.ports[0].Capabilities() }

// Attach implements stack.LinkEndpoint: every port delivers to the stack.
func (s *Switch) Attach(d stack.NetworkDispatcher) {
	s.dmu.Lock()
	s.dispatcher = d
	s.dmu.Unlock()
	for _, e := range s.ports {
		e.Attach(d)
	}
}

// IsAttached implements stack.LinkEndpoint.
func (s *Switch) IsAttached() bool {
	s.dmu.RLock()
	defer s.dmu.RUnlock()
	return s.dispatcher != nil
}

// Wait implements stack.LinkEndpoint.
func (s *Switch) Wait() {}

// ARPHardwareType implements stack.LinkEndpoint.
func (s *Switch) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }

// AddHeader implements stack.LinkEndpoint.
func (s *Switch) AddHeader(pkt *stack.PacketBuffer) { s.ports[0].AddHeader(pkt) }

// ParseHeader implements stack.LinkEndpoint.
func (s *Switch) ParseHeader(pkt *stack.PacketBuffer) bool { return s.ports[0].ParseHeader(pkt) }

// Close implements stack.LinkEndpoint.
func (s *Switch) Close() {
	s.dmu.RLock()
	f := s.onClose
	s.dmu.RUnlock()
	if f != nil {
		f()
	}
}

// SetOnCloseAction implements stack.LinkEndpoint.
func (s *Switch) SetOnCloseAction(f func()) {
	s.dmu.Lock()
	defer s.dmu.Unlock()
	s.onClose = f
}
