package forward

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/vunet/vunet/budget"
)

// maxDatagram is the largest UDP payload over IPv4 (65535 - 20 - 8); IPv6
// allows 65527 but guests cannot usefully send more than their IPv4 limit to
// arbitrary hosts, and the buffer covers both.
const maxDatagram = 65535

// udpFlow is one UDP conversation between a guest socket and a host peer.
// The guest side is a connected gVisor endpoint whose local address is the
// address the guest talks to, so replies carry it as their source. The host
// side is abstracted by sendHost (and closeHost), because outbound flows own
// a connected socket while inbound flows share the port-forward listener.
type udpFlow struct {
	f         *Forwarder
	guest     *gonet.UDPConn // for writes to the guest
	sendHost  func([]byte) error
	closeHost func()
	onClose   func() // removes the flow from its table
	desc      string
	gauge     gauges // the open-flows gauges it counts in

	// The guest endpoint, read by guestLoop only, with TTLs, into a
	// buffer borrowed per datagram.
	ep    tcpip.Endpoint
	wq    *waiter.Queue
	entry waiter.Entry
	ready chan struct{}
	timer *time.Timer
	stop  chan struct{} // closed by close

	// The receive buffer's budget (reserved at creation, grown when
	// gVisor had to drop datagrams for lack of room).
	mem       *budget.Budget
	rcvSize   int64
	overflows uint64 // gVisor's ReceiveBufferOverflow when last grown

	// out is set for outbound flows, which own their host socket: their
	// ICMP errors and hop limits are translated for the guest.
	out *udpOut

	last      atomic.Int64  // nanoseconds since f.epoch of the latest datagram
	fromGuest atomic.Uint64 // datagrams guest -> host
	toGuest   atomic.Uint64 // datagrams host -> guest

	closeOnce sync.Once
}

func (fl *udpFlow) touch() { fl.last.Store(int64(time.Since(fl.f.epoch))) }

// idleTimeout is the short timeout until the flow has carried
// StreamThreshold datagrams each way, the long one afterwards: one-shot
// exchanges such as DNS lookups are reaped quickly while long-lived
// conversations (VPNs, games, QUIC) survive pauses.
func (fl *udpFlow) idleTimeout() time.Duration {
	if fl.fromGuest.Load() >= StreamThreshold && fl.toGuest.Load() >= StreamThreshold {
		return fl.f.opts.UDPStreamIdleTimeout
	}
	return fl.f.opts.UDPIdleTimeout
}

// guestLoop relays guest datagrams to the host and enforces the idle
// timeout, using read deadlines on the guest side so that no timer or extra
// goroutine is needed per flow.
func (fl *udpFlow) guestLoop() {
	defer fl.close()
	for {
		deadline := fl.f.epoch.Add(time.Duration(fl.last.Load()) + fl.idleTimeout())
		if !time.Now().Before(deadline) {
			fl.f.c.UDPFlowsExpired.Add(1)
			fl.f.log.Debug("udp flow expired", "flow", fl.desc)
			return
		}
		bp, n, ttl, err := fl.readGuest(deadline)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue // re-check: the host side may have been active
			}
			return
		}
		fl.relayToHost((*bp)[:n], ttl)
		fl.f.bufs.Put(bp)
		fl.maybeGrow()
	}
}

// relayToHost sends one guest datagram on to the host.
func (fl *udpFlow) relayToHost(buf []byte, ttl uint8) {
	n := len(buf)
	fl.touch()
	fl.fromGuest.Add(1)
	if out := fl.out; out != nil {
		out.lastLen.Store(int32(n))
		if out.hop && ttl != 0 {
			if ttl == 1 {
				// Its last hop was vunet: it expires here, as at a router.
				fl.f.sendICMPError(fl.f.gateway(out.src.Addr().Is6()), kindTTL,
					udpInvoking(out.src, out.dst, n, buf))
				return
			}
			out.setHops(ttl - 1)
		}
	}
	err := fl.sendHost(buf)
	if err != nil && fl.hostErrors(err) {
		// The socket reported an ICMP error for an earlier datagram
		// instead of sending this one; the guest has been told, and
		// this datagram deserves its chance.
		err = fl.sendHost(buf)
	}
	if err != nil {
		fl.f.c.DropSendErrors.Add(1)
		fl.f.log.Debug("udp send to host failed", "flow", fl.desc, "err", err)
	}
}

// readGuest waits until deadline for the guest's next datagram and reads
// it, with its TTL (hop limit) when known, into a buffer borrowed from the
// Forwarder's pool: an idle flow holds no buffer. The caller returns it.
func (fl *udpFlow) readGuest(deadline time.Time) (*[]byte, int, uint8, error) {
	fl.timer.Reset(time.Until(deadline))
	defer fl.timer.Stop()
	for {
		bp := fl.f.bufs.Get().(*[]byte)
		w := tcpip.SliceWriter(*bp)
		res, terr := fl.ep.Read(&w, tcpip.ReadOptions{})
		if terr == nil {
			cm := res.ControlMessages
			switch {
			case cm.HasTTL:
				return bp, res.Count, cm.TTL, nil
			case cm.HasHopLimit:
				return bp, res.Count, uint8(cm.HopLimit), nil
			}
			return bp, res.Count, 0, nil
		}
		fl.f.bufs.Put(bp)
		if _, ok := terr.(*tcpip.ErrWouldBlock); !ok {
			return nil, 0, 0, fmt.Errorf("guest endpoint: %s", terr)
		}
		select {
		case <-fl.ready:
		case <-fl.timer.C:
			return nil, 0, 0, os.ErrDeadlineExceeded
		case <-fl.stop:
			return nil, 0, 0, net.ErrClosed
		}
	}
}

// UDP receive buffers (guest → host datagrams not yet relayed): every flow
// reserves udpMinRecv from the budget at creation and doubles, up to
// udpMaxRecv, each time gVisor had to drop a datagram for lack of room
// (the host side was briefly slower than a fast guest).
const (
	udpMinRecv = 64 << 10
	udpMaxRecv = hostUDPBuffer
)

// attachGuest prepares reading ep (with TTLs) and reserves its receive
// buffer; false if the budget has no room for a new flow.
func (fl *udpFlow) attachGuest(ep tcpip.Endpoint, wq *waiter.Queue, mem *budget.Budget) bool {
	if !mem.Take(udpMinRecv) {
		return false
	}
	fl.mem, fl.rcvSize = mem, udpMinRecv
	ep.SocketOptions().SetReceiveBufferSize(udpMinRecv, true)
	// Datagrams to the guest wait in the link's backlog, which the budget
	// accounts; this only bounds how many one flow may have in flight.
	ep.SocketOptions().SetSendBufferSize(hostUDPBuffer, true)
	ep.SocketOptions().SetReceiveTTL(true)
	ep.SocketOptions().SetReceiveHopLimit(true)
	fl.ep, fl.wq = ep, wq
	fl.entry, fl.ready = waiter.NewChannelEntry(waiter.ReadableEvents)
	wq.EventRegister(&fl.entry)
	fl.timer = time.NewTimer(time.Hour)
	fl.timer.Stop()
	fl.stop = make(chan struct{})
	return true
}

// maybeGrow doubles the receive buffer after gVisor dropped datagrams.
func (fl *udpFlow) maybeGrow() {
	st, ok := fl.ep.Stats().(*tcpip.TransportEndpointStats)
	if !ok || fl.rcvSize >= udpMaxRecv {
		return
	}
	if o := st.ReceiveErrors.ReceiveBufferOverflow.Value(); o != fl.overflows {
		fl.overflows = o
		n := min(2*fl.rcvSize, udpMaxRecv)
		if fl.mem.Grow(n - fl.rcvSize) {
			fl.rcvSize = n
			fl.ep.SocketOptions().SetReceiveBufferSize(n, true)
		}
	}
}

// deliver sends a host datagram to the guest.
func (fl *udpFlow) deliver(b []byte) {
	fl.touch()
	fl.toGuest.Add(1)
	if _, err := fl.guest.Write(b); err != nil {
		fl.f.c.DropSendErrors.Add(1)
		fl.f.log.Debug("udp send to guest failed", "flow", fl.desc, "err", err)
	}
}

// hostLoop relays datagrams from a connected host socket to the guest until
// the socket is closed. It waits for the socket without a buffer and
// borrows one per datagram.
func (fl *udpFlow) hostLoop(rc syscall.RawConn) {
	defer fl.close()
	var (
		bp   *[]byte
		n    int
		rerr error
	)
	recv := func(fd uintptr) bool {
		bp = fl.f.bufs.Get().(*[]byte)
		for {
			n, rerr = unix.Read(int(fd), *bp)
			if rerr != unix.EINTR {
				break
			}
		}
		if rerr == unix.EAGAIN {
			fl.f.bufs.Put(bp)
			bp = nil
			return false
		}
		return true
	}
	for {
		err := rc.Read(recv)
		if err == nil && rerr != nil {
			fl.f.bufs.Put(bp)
			err = rerr
		}
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// ECONNREFUSED and friends report an ICMP error for an earlier
			// datagram; the flow itself is still usable.
			if fl.hostErrors(err) {
				continue
			}
			fl.f.log.Debug("udp host socket failed", "flow", fl.desc, "err", err)
			return
		}
		fl.deliver((*bp)[:max(n, 0)])
		fl.f.bufs.Put(bp)
	}
}

// udpOut is what an outbound flow keeps besides the gonet conn: its host
// socket, the guest's view of the conversation, and its own reader of the
// guest endpoint, which (unlike gonet's) returns each datagram's TTL.
type udpOut struct {
	rc       syscall.RawConn
	src, dst netip.AddrPort // as the guest sent its datagrams
	target   netip.Addr     // the host-side destination dst stands for
	hop      bool           // vunet is a router on the way (dst is not the gateway)
	lastLen  atomic.Int32   // payload size of the latest guest datagram
	hops     uint8          // hop limit set on the host socket; 0: the default
	local    uint16         // the host port it sends from
}

// setHops sets the host socket's TTL (hop limit) if it differs from the
// last one: applications repeat theirs, traceroute raises it step by step.
func (o *udpOut) setHops(h uint8) {
	if h == o.hops {
		return
	}
	var serr error
	_ = o.rc.Control(func(fd uintptr) {
		if o.target.Is6() {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS, int(h))
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, int(h))
		}
	})
	if serr == nil {
		o.hops = h
	}
}

// hostErrors handles err from the flow's host socket. If it is the report
// of an ICMP error, the errors queued on the socket are sent on to the
// guest and hostErrors returns true: the socket is still usable.
func (fl *udpFlow) hostErrors(err error) bool {
	if fl.out == nil || !icmpErrno(err) {
		return false
	}
	ic := fl.out
	n := drainErrQueue(ic.rc, func(e hostError) {
		from := e.offender
		if from == ic.target {
			from = ic.dst.Addr()
		}
		// The queued payload is the start of the datagram's payload.
		fl.f.sendICMPError(from, e.kind, udpInvoking(ic.src, ic.dst, int(ic.lastLen.Load()), e.payload))
	})
	if n == 0 && errors.Is(err, syscall.ECONNREFUSED) {
		// No queued details (IP_RECVERR unavailable): the errno alone says
		// the peer's port is closed.
		fl.f.sendICMPError(ic.dst.Addr(), kindPort, udpInvoking(ic.src, ic.dst, int(ic.lastLen.Load()), nil))
	}
	fl.f.log.Debug("udp host socket reported an ICMP error", "flow", fl.desc, "err", err, "queued", n)
	return true
}

// close tears the flow down once; safe from any goroutine.
func (fl *udpFlow) close() {
	fl.closeOnce.Do(func() {
		// A past deadline makes a blocked guest Read return at once.
		_ = fl.guest.SetReadDeadline(time.Unix(1, 0))
		if fl.stop != nil {
			close(fl.stop)
			fl.wq.EventUnregister(&fl.entry)
		}
		_ = fl.guest.Close()
		fl.mem.Release(fl.rcvSize)
		if fl.closeHost != nil {
			fl.closeHost()
		}
		fl.gauge.add(-1)
		if fl.onClose != nil {
			fl.onClose()
		}
	})
}

// addUDPFlow registers fl for Close and starts the given loops in tracked
// goroutines. If the Forwarder is closing the flow is closed instead.
func (f *Forwarder) addUDPFlow(fl *udpFlow, loops ...func()) {
	// Set before the flow becomes visible to Close or to its loops.
	prev := fl.onClose
	fl.onClose = func() {
		f.mu.Lock()
		delete(f.udp, fl)
		f.mu.Unlock()
		if prev != nil {
			prev()
		}
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		fl.close()
		return
	}
	f.udp[fl] = struct{}{}
	f.wg.Add(len(loops))
	f.mu.Unlock()
	f.c.UDPFlowsTotal.Add(1)
	for _, loop := range loops {
		go func() {
			defer f.wg.Done()
			loop()
		}()
	}
}
