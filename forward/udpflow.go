package forward

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
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
	guest     *gonet.UDPConn
	sendHost  func([]byte) error
	closeHost func()
	onClose   func() // removes the flow from its table
	desc      string

	// icmp is set for flows with their own host socket, whose ICMP errors
	// are translated for the guest.
	icmp *udpICMP

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
	buf := make([]byte, maxDatagram)
	for {
		deadline := fl.f.epoch.Add(time.Duration(fl.last.Load()) + fl.idleTimeout())
		if !time.Now().Before(deadline) {
			fl.f.c.udpFlowsExpired.Add(1)
			fl.f.log.Debug("udp flow expired", "flow", fl.desc)
			return
		}
		_ = fl.guest.SetReadDeadline(deadline)
		n, err := fl.guest.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue // re-check: the host side may have been active
			}
			return
		}
		fl.touch()
		fl.fromGuest.Add(1)
		if fl.icmp != nil {
			fl.icmp.lastLen.Store(int32(n))
		}
		err = fl.sendHost(buf[:n])
		if err != nil && fl.hostErrors(err) {
			// The socket reported an ICMP error for an earlier datagram
			// instead of sending this one; the guest has been told, and
			// this datagram deserves its chance.
			err = fl.sendHost(buf[:n])
		}
		if err != nil {
			fl.f.c.dropSend.Add(1)
			fl.f.log.Debug("udp send to host failed", "flow", fl.desc, "err", err)
		}
	}
}

// deliver sends a host datagram to the guest.
func (fl *udpFlow) deliver(b []byte) {
	fl.touch()
	fl.toGuest.Add(1)
	if _, err := fl.guest.Write(b); err != nil {
		fl.f.c.dropSend.Add(1)
		fl.f.log.Debug("udp send to guest failed", "flow", fl.desc, "err", err)
	}
}

// hostLoop relays datagrams from a connected host socket to the guest until
// the socket is closed.
func (fl *udpFlow) hostLoop(hc net.Conn) {
	defer fl.close()
	buf := make([]byte, maxDatagram)
	for {
		n, err := hc.Read(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
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
		fl.deliver(buf[:n])
	}
}

// udpICMP is what a flow needs to translate its host socket's ICMP errors:
// the socket, and the guest's view of the conversation.
type udpICMP struct {
	rc       syscall.RawConn
	src, dst netip.AddrPort // as the guest sent its datagrams
	target   netip.Addr     // the host-side destination dst stands for
	lastLen  atomic.Int32   // payload size of the latest guest datagram
}

// hostErrors handles err from the flow's host socket. If it is the report
// of an ICMP error, the errors queued on the socket are sent on to the
// guest and hostErrors returns true: the socket is still usable.
func (fl *udpFlow) hostErrors(err error) bool {
	if fl.icmp == nil || !icmpErrno(err) {
		return false
	}
	ic := fl.icmp
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
		_ = fl.guest.Close()
		if fl.closeHost != nil {
			fl.closeHost()
		}
		fl.f.c.udpFlows.Add(-1)
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
	f.c.udpFlowsTotal.Add(1)
	for _, loop := range loops {
		go func() {
			defer f.wg.Done()
			loop()
		}()
	}
}
