package netstack

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Moving a guest's TCP connection from one stack to another (a live
// migration, see docs/migration.md). gVisor has no TCP_REPAIR, so:
//
//   - FreezeTCP reads what the guest knows of a connection from the source
//     endpoint: gVisor's next sequence number and the next one it expects
//     from the guest, the window and options both sides agreed on, gVisor's
//     timestamp clock and the guest's last timestamp. Only a quiet
//     connection can move: nothing unacknowledged or unsent toward the
//     guest, nothing unread from it.
//   - RestoreTCP builds an endpoint for the same four-tuple in another
//     stack: it connects toward the guest, swallows the SYN in the link
//     (the guest never sees it), answers it with a SYN-ACK as the guest
//     would, carrying the guest's sequence number and options, swallows
//     gVisor's ACK, and then moves the new endpoint's send-side sequence
//     numbers and timestamp clock to where the source's were. From there
//     the guest sees the same connection going on: no translation on the
//     data path.
//
// gVisor keeps those numbers in unexported fields, read and written here
// by reflection under the endpoint's lock, for the gVisor version in
// go.mod; TestMoveTCP fails when an upgrade moves them, and every
// field that is not where it was is an error (the connection is then
// reset, never half-moved).

// TCPConnState is one guest TCP connection as the guest knows it.
type TCPConnState struct {
	// Local is the stack's end (the address the guest connected to),
	// Remote the guest's.
	Local, Remote netip.AddrPort
	// GuestMAC is the guest's link address, so the restoring stack need
	// not resolve it (the guest may not run yet).
	GuestMAC tcpip.LinkAddress
	// SndNxt is the stack's next sequence number, RcvNxt the next it
	// expects from the guest.
	SndNxt, RcvNxt uint32
	// SndWnd is the guest's receive window (bytes), SndWndScale its
	// window scale and RcvWndScale the stack's; MaxPayload the largest
	// segment the stack sends.
	SndWnd                   uint32
	SndWndScale, RcvWndScale uint8
	MaxPayload               uint16
	// RcvWnd is the window the stack last offered the guest (bytes
	// beyond RcvNxt): the guest may send that much at once.
	RcvWnd uint32
	// SACK and Timestamps: the options the handshake agreed on.
	SACK, Timestamps bool
	// TSVal is the stack's timestamp clock at the freeze, RecentTS the
	// guest's last timestamp.
	TSVal, RecentTS uint32
}

// Reasons a connection cannot be frozen; the caller counts them.
var (
	ErrTCPNotEstablished = errors.New("netstack: connection not established")
	ErrTCPUnacked        = errors.New("netstack: data toward the guest not acknowledged")
	ErrTCPUnread         = errors.New("netstack: data from the guest not drained")
	ErrTCPLayout         = errors.New("netstack: gVisor's TCP state is not where this vunet expects it")
)

// moveLink sits between the stack's NIC and the real link endpoint. It
// lets a restore swallow the handshake it runs toward the guest and inject
// the guest's half of it. With no restore running, a write costs one
// atomic load; received packets do not pass through it at all (the link
// delivers them to the NIC directly).
type moveLink struct {
	stack.LinkEndpoint
	active atomic.Int32 // restores running

	mu         sync.Mutex
	pending    map[moveKey]*restoreWait
	dispatcher stack.NetworkDispatcher // the NIC, for injected packets
}

// moveKey names a connection from the stack's side.
type moveKey struct{ local, remote netip.AddrPort }

// restoreWait collects the segments a restore swallows.
type restoreWait struct {
	syn chan synSeen
	ack chan struct{}
}

// synSeen is the restoring stack's SYN: its initial sequence number and
// options (its timestamp, which the SYN-ACK echoes).
type synSeen struct {
	iss  uint32
	opts header.TCPSynOptions
}

func newMoveLink(child stack.LinkEndpoint) *moveLink {
	return &moveLink{LinkEndpoint: child, pending: make(map[moveKey]*restoreWait)}
}

// Attach implements stack.NetworkLinkEndpoint.
func (l *moveLink) Attach(d stack.NetworkDispatcher) {
	l.mu.Lock()
	l.dispatcher = d
	l.mu.Unlock()
	l.LinkEndpoint.Attach(d)
}

// GSOMaxSize and SupportedGSO pass the link's GSO through (the stack
// looks for them on its NIC's endpoint).
func (l *moveLink) GSOMaxSize() uint32 {
	if g, ok := l.LinkEndpoint.(stack.GSOEndpoint); ok {
		return g.GSOMaxSize()
	}
	return 0
}

// SupportedGSO implements stack.GSOEndpoint.
func (l *moveLink) SupportedGSO() stack.SupportedGSO {
	if g, ok := l.LinkEndpoint.(stack.GSOEndpoint); ok {
		return g.SupportedGSO()
	}
	return stack.GSONotSupported
}

// inject delivers a packet to the stack as if the guest had sent it.
func (l *moveLink) inject(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) bool {
	l.mu.Lock()
	d := l.dispatcher
	l.mu.Unlock()
	if d == nil {
		return false
	}
	d.DeliverNetworkPacket(proto, pkt)
	return true
}

// WritePackets implements stack.LinkWriter.
func (l *moveLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	if l.active.Load() == 0 {
		return l.LinkEndpoint.WritePackets(pkts)
	}
	var pass stack.PacketBufferList
	swallowed := 0
	for _, pkt := range pkts.AsSlice() {
		if l.swallow(pkt) {
			swallowed++
			continue
		}
		pass.PushBack(pkt)
	}
	if pass.Len() == 0 {
		return swallowed, nil
	}
	n, err := l.LinkEndpoint.WritePackets(pass)
	return n + swallowed, err
}

// swallow reports whether pkt is a handshake segment of a restore, and
// hands it over if so.
func (l *moveLink) swallow(pkt *stack.PacketBuffer) bool {
	if pkt.TransportProtocolNumber != tcp.ProtocolNumber {
		return false
	}
	var src, dst netip.Addr
	nh := pkt.NetworkHeader().Slice()
	switch pkt.NetworkProtocolNumber {
	case ipv4.ProtocolNumber:
		if len(nh) < header.IPv4MinimumSize {
			return false
		}
		ip := header.IPv4(nh)
		src, dst = addrOf(ip.SourceAddress()), addrOf(ip.DestinationAddress())
	case ipv6.ProtocolNumber:
		if len(nh) < header.IPv6MinimumSize {
			return false
		}
		ip := header.IPv6(nh)
		src, dst = addrOf(ip.SourceAddress()), addrOf(ip.DestinationAddress())
	default:
		return false
	}
	th := header.TCP(pkt.TransportHeader().Slice())
	if len(th) < header.TCPMinimumSize || int(th.DataOffset()) > len(th) || th.DataOffset() < header.TCPMinimumSize {
		return false
	}
	k := moveKey{netip.AddrPortFrom(src, th.SourcePort()), netip.AddrPortFrom(dst, th.DestinationPort())}
	l.mu.Lock()
	w := l.pending[k]
	l.mu.Unlock()
	if w == nil {
		return false
	}
	flags := th.Flags()
	switch {
	case flags&(header.TCPFlagSyn|header.TCPFlagAck) == header.TCPFlagSyn:
		select {
		case w.syn <- synSeen{th.SequenceNumber(), header.ParseSynOptions(th.Options(), false)}:
		default: // a retransmitted SYN
		}
	case flags&header.TCPFlagAck != 0 && flags&header.TCPFlagSyn == 0:
		select {
		case w.ack <- struct{}{}:
		default:
		}
	}
	// Anything of a connection being restored is the restore's: the guest
	// must see none of it.
	return true
}

func addrOf(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip
}

// FreezeTCP reads a connection's state for a move. The caller stops
// using ep first (no reads or writes in flight) and, once the state is
// saved, aborts it: the stack must not go on with it.
func (ns *Stack) FreezeTCP(ep tcpip.Endpoint) (TCPConnState, error) {
	var st TCPConnState
	tep, ok := ep.(*tcp.Endpoint)
	if !ok {
		return st, ErrTCPLayout
	}
	if n, err := ep.GetSockOptInt(tcpip.ReceiveQueueSizeOption); err != nil || n != 0 {
		return st, ErrTCPUnread
	}
	info, ok := ep.Info().(*stack.TransportEndpointInfo)
	if !ok {
		return st, ErrTCPLayout
	}
	st.Local = netip.AddrPortFrom(addrOf(info.ID.LocalAddress), info.ID.LocalPort)
	st.Remote = netip.AddrPortFrom(addrOf(info.ID.RemoteAddress), info.ID.RemotePort)
	if mac, ok := ns.neighbor(info.NetProto, info.ID.RemoteAddress); ok {
		st.GuestMAC = mac
	}

	tep.LockUser()
	defer tep.UnlockUser()
	if tep.EndpointState() != tcp.StateEstablished {
		return st, ErrTCPNotEstablished
	}
	f, err := fieldsOf(tep)
	if err != nil {
		return st, err
	}
	if f.snd.SndUna != f.snd.SndNxt || !f.writeNext.IsNil() {
		return st, ErrTCPUnacked
	}
	st.SndNxt, st.RcvNxt = uint32(f.snd.SndNxt), uint32(f.rcv.RcvNxt)
	st.SndWnd = uint32(f.snd.SndWnd)
	if f.rcv.RcvNxt.LessThan(f.rcv.RcvAcc) {
		st.RcvWnd = uint32(f.rcv.RcvAcc - f.rcv.RcvNxt)
	}
	st.SndWndScale, st.RcvWndScale = f.snd.SndWndScale, f.rcv.RcvWndScale
	if f.snd.MaxPayloadSize <= 0 || f.snd.MaxPayloadSize > 0xffff {
		return st, ErrTCPLayout
	}
	st.MaxPayload = uint16(f.snd.MaxPayloadSize)
	st.SACK, st.Timestamps = tep.SACKPermitted, tep.SendTSOk
	st.TSVal = tep.TSOffset.TSVal(ns.s.Clock().NowMonotonic())
	st.RecentTS = tep.RecentTS
	return st, nil
}

// neighbor returns the link address the stack has for a.
func (ns *Stack) neighbor(proto tcpip.NetworkProtocolNumber, a tcpip.Address) (tcpip.LinkAddress, bool) {
	entries, err := ns.s.Neighbors(NICID, proto)
	if err != nil {
		return "", false
	}
	for _, e := range entries {
		if e.Addr == a && e.LinkAddr != "" {
			return e.LinkAddr, true
		}
	}
	return "", false
}

// tcpFields are the parts of a tcp.Endpoint a move reads and writes.
type tcpFields struct {
	snd       *tcp.TCPSenderState
	rcv       *tcp.TCPReceiverState
	writeNext reflect.Value // *segment: the next segment to send, nil when all is sent
	tlpHigh   *seqnum.Value // sender.rc.tlpHighRxt
	maxSACKED *seqnum.Value // scoreboard.maxSACKED
	cubicEnd  *seqnum.Value // cubicState.EndSeq, nil for another congestion control
	gsoMSS    *uint16       // Endpoint.gso.MSS, when the sender uses GSO
	tsOffset  *uint32       // Endpoint.TSOffset's milliseconds
	rack      *tcp.TCPRACKState
	rcvWnd    *seqnum.Size  // receiver.rcvWnd: the window last offered, from rcvWUP
	rcvWUP    *seqnum.Value // receiver.rcvWUP: RcvNxt when it was offered
}

// fieldsOf finds the fields; tep is locked.
func fieldsOf(tep *tcp.Endpoint) (f tcpFields, err error) {
	// reflect panics on a field of the wrong kind; a layout this code does
	// not know is an error, never a crash.
	defer func() {
		if recover() != nil {
			f, err = tcpFields{}, ErrTCPLayout
		}
	}()
	ev := reflect.ValueOf(tep).Elem()
	snd := field(ev, "snd")
	rcv := field(ev, "rcv")
	if snd.Kind() != reflect.Pointer || snd.IsNil() || rcv.Kind() != reflect.Pointer || rcv.IsNil() {
		return f, ErrTCPLayout
	}
	sv, rv := snd.Elem(), rcv.Elem()
	var ok bool
	if f.snd, ok = ptrTo[tcp.TCPSenderState](field(sv, "TCPSenderState")); !ok {
		return f, ErrTCPLayout
	}
	if f.rcv, ok = ptrTo[tcp.TCPReceiverState](field(rv, "TCPReceiverState")); !ok {
		return f, ErrTCPLayout
	}
	if f.rcvWnd, ok = ptrTo[seqnum.Size](field(rv, "rcvWnd")); !ok {
		return f, ErrTCPLayout
	}
	if f.rcvWUP, ok = ptrTo[seqnum.Value](field(rv, "rcvWUP")); !ok {
		return f, ErrTCPLayout
	}
	if f.writeNext = field(sv, "writeNext"); f.writeNext.Kind() != reflect.Pointer {
		return f, ErrTCPLayout
	}
	rc := field(sv, "rc")
	if f.rack, ok = ptrTo[tcp.TCPRACKState](field(rc, "TCPRACKState")); !ok {
		return f, ErrTCPLayout
	}
	if f.tlpHigh, ok = ptrTo[seqnum.Value](field(rc, "tlpHighRxt")); !ok {
		return f, ErrTCPLayout
	}
	sb := field(ev, "scoreboard")
	if sb.Kind() != reflect.Pointer || sb.IsNil() {
		return f, ErrTCPLayout
	}
	if f.maxSACKED, ok = ptrTo[seqnum.Value](field(sb.Elem(), "maxSACKED")); !ok {
		return f, ErrTCPLayout
	}
	if cc := field(sv, "cc"); cc.Kind() == reflect.Interface && !cc.IsNil() {
		if c := cc.Elem(); c.Kind() == reflect.Pointer && !c.IsNil() {
			if cs := field(c.Elem(), "TCPCubicState"); cs.IsValid() {
				if f.cubicEnd, ok = ptrTo[seqnum.Value](field(cs, "EndSeq")); !ok {
					return f, ErrTCPLayout
				}
			}
		}
	}
	if gso := field(sv, "gso"); gso.Kind() == reflect.Bool && gso.Bool() {
		if f.gsoMSS, ok = ptrTo[uint16](field(field(ev, "gso"), "MSS")); !ok {
			return f, ErrTCPLayout
		}
	}
	ts := reflect.ValueOf(&tep.TSOffset).Elem()
	if ts.Kind() != reflect.Struct || ts.NumField() != 1 || ts.Field(0).Kind() != reflect.Uint32 {
		return f, ErrTCPLayout
	}
	f.tsOffset = (*uint32)(unsafe.Pointer(ts.Field(0).UnsafeAddr()))
	return f, nil
}

// field returns v's field name (the zero Value if v is not a struct or
// has none).
func field(v reflect.Value, name string) reflect.Value {
	if v.Kind() != reflect.Struct {
		return reflect.Value{}
	}
	return v.FieldByName(name)
}

// ptrTo returns a pointer to an addressable field of type T.
func ptrTo[T any](v reflect.Value) (*T, bool) {
	if !v.IsValid() || !v.CanAddr() || v.Type() != reflect.TypeFor[T]() {
		return nil, false
	}
	return (*T)(unsafe.Pointer(v.UnsafeAddr())), true
}

// MaxRestoreWindow bounds the receive window a restore honours (a window
// scale of 14 allows 1 GiB; vunet's buffers are far smaller).
const MaxRestoreWindow = 64 << 20

// RestoreReceiveBuffer is the receive buffer RestoreTCP gives the
// endpoint of st: room for the whole window the guest was offered, as
// gVisor accounts it. Whoever sizes the endpoint's buffers afterwards
// keeps at least this much until the guest has sent into that window.
func RestoreReceiveBuffer(st TCPConnState) int64 {
	return 2 * int64(st.RcvWnd)
}

// handshakeTimeout bounds a restore's swallowed handshake; it runs inside
// one process and takes microseconds.
const handshakeTimeout = 2 * time.Second

// RestoreTCP opens an endpoint in this stack that carries on the
// connection st describes, toward the guest, without the guest seeing a
// handshake. configure, if set, runs on the new endpoint before it
// connects (buffer sizes, keepalive).
func (ns *Stack) RestoreTCP(ctx context.Context, st TCPConnState, configure func(tcpip.Endpoint)) (tcpip.Endpoint, *waiter.Queue, error) {
	if !st.Local.IsValid() || !st.Remote.IsValid() || st.Local.Addr().Is4() != st.Remote.Addr().Is4() ||
		st.Local.Port() == 0 || st.Remote.Port() == 0 || st.MaxPayload < header.TCPMinimumMSS/2 ||
		st.SndWndScale > header.MaxWndScale || st.RcvWndScale > header.MaxWndScale || st.RcvWnd > MaxRestoreWindow {
		return nil, nil, errors.New("netstack: restore: invalid connection state")
	}
	proto := ipv4.ProtocolNumber
	if st.Local.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	remote := tcpip.AddrFromSlice(st.Remote.Addr().AsSlice())
	if st.GuestMAC != "" {
		if _, known := ns.neighbor(proto, remote); !known {
			if err := ns.s.AddStaticNeighbor(NICID, proto, remote, st.GuestMAC); err == nil {
				// Only for the handshake: from then on the guest answers
				// ARP and NDP as usual.
				defer func() { _ = ns.s.RemoveNeighbor(NICID, proto, remote) }()
			}
		}
	}

	k := moveKey{st.Local, st.Remote}
	w := &restoreWait{syn: make(chan synSeen, 1), ack: make(chan struct{}, 1)}
	l := ns.link
	l.mu.Lock()
	if l.pending[k] != nil {
		l.mu.Unlock()
		return nil, nil, errors.New("netstack: restore: connection already being restored")
	}
	l.pending[k] = w
	l.mu.Unlock()
	l.active.Add(1)
	defer func() {
		l.mu.Lock()
		delete(l.pending, k)
		l.mu.Unlock()
		l.active.Add(-1)
	}()

	wq := new(waiter.Queue)
	ep, terr := ns.s.NewEndpoint(tcp.ProtocolNumber, proto, wq)
	if terr != nil {
		return nil, nil, fmt.Errorf("netstack: restore: endpoint: %s", terr)
	}
	ok := false
	defer func() {
		if !ok {
			ep.Abort() // swallowed: the guest sees nothing of a failed restore
		}
	}()
	if configure != nil {
		configure(ep)
	}
	// Room for the window the guest was offered: a new endpoint starts
	// with a small buffer, and a guest that sends into the window it knows
	// would see its segments dropped until it backs off. gVisor offers
	// half its free buffer as window (tcp.wndFromSpace: the other half is
	// for the segments' own memory), so the source held at least twice
	// RcvWnd; so does this endpoint, or its window closes with half of
	// what the guest may send still on the way.
	if so := ep.SocketOptions(); so.GetReceiveBufferSize() < RestoreReceiveBuffer(st) {
		so.SetReceiveBufferSize(RestoreReceiveBuffer(st), true)
	}
	if terr := ep.Bind(tcpip.FullAddress{NIC: NICID, Addr: tcpip.AddrFromSlice(st.Local.Addr().AsSlice()), Port: st.Local.Port()}); terr != nil {
		return nil, nil, fmt.Errorf("netstack: restore: bind %s: %s", st.Local, terr)
	}
	we, established := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	switch terr := ep.Connect(tcpip.FullAddress{NIC: NICID, Addr: remote, Port: st.Remote.Port()}); terr.(type) {
	case nil, *tcpip.ErrConnectStarted:
	default:
		return nil, nil, fmt.Errorf("netstack: restore: connect: %s", terr)
	}
	ctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	var syn synSeen
	select {
	case syn = <-w.syn:
	case <-ctx.Done():
		return nil, nil, errors.New("netstack: restore: the stack sent no SYN")
	}
	pkt := synAck(st, syn.iss, syn.opts)
	injected := l.inject(proto, pkt)
	pkt.DecRef()
	if !injected {
		return nil, nil, errors.New("netstack: restore: the link is not attached")
	}
	select {
	case <-w.ack:
	case <-ctx.Done():
		return nil, nil, errors.New("netstack: restore: the handshake did not complete")
	}
	for tep := ep.(*tcp.Endpoint); tep.EndpointState() != tcp.StateEstablished; {
		select {
		case <-established:
		case <-ctx.Done():
			return nil, nil, errors.New("netstack: restore: the endpoint is not established")
		}
	}
	if err := ns.moveNumbers(ep.(*tcp.Endpoint), st); err != nil {
		return nil, nil, err
	}
	ok = true
	return ep, wq, nil
}

// synAck is the guest's answer to the restoring stack's SYN: the guest's
// sequence number and the options it agreed with the source.
func synAck(st TCPConnState, iss uint32, syn header.TCPSynOptions) *stack.PacketBuffer {
	var opts [40]byte
	n := header.EncodeMSSOption(uint32(min(int(st.MaxPayload)+header.TCPOptionsMaximumSize, 0xffff)), opts[:])
	if st.SndWndScale > 0 || st.RcvWndScale > 0 {
		n += header.EncodeWSOption(int(st.SndWndScale), opts[n:])
	}
	if st.SACK {
		n += header.EncodeSACKPermittedOption(opts[n:])
	}
	if st.Timestamps {
		n += header.EncodeTSOption(st.RecentTS, syn.TSVal, opts[n:])
	}
	for n%4 != 0 {
		n += header.EncodeNOP(opts[n:])
	}
	tcpLen := header.TCPMinimumSize + n
	src := tcpip.AddrFromSlice(st.Remote.Addr().AsSlice())
	dst := tcpip.AddrFromSlice(st.Local.Addr().AsSlice())
	ipLen := header.IPv4MinimumSize
	if st.Local.Addr().Is6() {
		ipLen = header.IPv6MinimumSize
	}
	b := make([]byte, ipLen+tcpLen)
	if ipLen == header.IPv4MinimumSize {
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(tcp.ProtocolNumber),
			SrcAddr: src, DstAddr: dst})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(tcpLen), TransportProtocol: tcp.ProtocolNumber,
			HopLimit: 64, SrcAddr: src, DstAddr: dst})
	}
	t := header.TCP(b[ipLen:])
	t.Encode(&header.TCPFields{SrcPort: st.Remote.Port(), DstPort: st.Local.Port(),
		SeqNum: st.RcvNxt - 1, AckNum: iss + 1, DataOffset: uint8(tcpLen),
		Flags: header.TCPFlagSyn | header.TCPFlagAck, WindowSize: uint16(min(st.SndWnd, 0xffff))})
	copy(t[header.TCPMinimumSize:], opts[:n])
	xsum := header.PseudoHeaderChecksum(tcp.ProtocolNumber, src, dst, uint16(tcpLen))
	t.SetChecksum(^checksum.Checksum(t, xsum))
	return stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
}

// moveNumbers shifts a freshly established endpoint's send side onto the
// source's sequence numbers and timestamp clock, and takes the guest's
// window and both scales as the source had them.
func (ns *Stack) moveNumbers(tep *tcp.Endpoint, st TCPConnState) error {
	tep.LockUser()
	defer tep.UnlockUser()
	f, err := fieldsOf(tep)
	if err != nil {
		return err
	}
	if f.snd.SndUna != f.snd.SndNxt || !f.writeNext.IsNil() || f.rcv.RcvNxt != seqnum.Value(st.RcvNxt) {
		return errors.New("netstack: restore: the new endpoint is not where the handshake left it")
	}
	d := seqnum.Size(seqnum.Value(st.SndNxt) - f.snd.SndNxt)
	for _, v := range []*seqnum.Value{&f.snd.SndUna, &f.snd.SndNxt, &f.snd.RTTMeasureSeqNum,
		&f.snd.FastRecovery.First, &f.snd.FastRecovery.Last, &f.snd.FastRecovery.HighRxt,
		&f.snd.FastRecovery.RescueRxt, &f.rack.FACK, &f.rack.EndSequence, &f.rack.RTTSeq,
		f.tlpHigh, f.maxSACKED, f.cubicEnd} {
		if v != nil {
			*v = v.Add(d)
		}
	}
	f.snd.SndWnd = seqnum.Size(st.SndWnd)
	f.snd.SndWndScale = st.SndWndScale
	f.rcv.RcvWndScale = st.RcvWndScale
	// The window the guest holds is the source's, not the one of the
	// swallowed handshake (about 29 KiB, from this endpoint's SYN). gVisor
	// measures what is left of its offer from rcvWUP + rcvWnd and never
	// shrinks it: left at the handshake's, the offer looks used up once
	// the guest has sent that much before the reader catches up, the next
	// ACK offers a zero window, and every segment the guest still had in
	// flight within the source's window is dropped as out of window (a
	// guest without SACK information then recovers one segment per RTO).
	wnd := seqnum.Size(st.RcvWnd)
	if most := seqnum.Size(0xffff) << st.RcvWndScale; wnd > most {
		wnd = most
	}
	*f.rcvWnd, *f.rcvWUP = wnd, f.rcv.RcvNxt
	f.rcv.RcvAcc = f.rcv.RcvNxt.Add(wnd)
	if int(st.MaxPayload) < f.snd.MaxPayloadSize || f.snd.MaxPayloadSize == 0 {
		f.snd.MaxPayloadSize = int(st.MaxPayload)
		if f.gsoMSS != nil {
			*f.gsoMSS = st.MaxPayload
		}
	}
	if st.Timestamps {
		// The guest discards a segment whose timestamp is older than the
		// last it saw (PAWS): the clock goes on from the source's.
		now := tep.TSOffset.TSVal(ns.s.Clock().NowMonotonic()) - *f.tsOffset
		*f.tsOffset = st.TSVal + 1 - now
	}
	return nil
}
