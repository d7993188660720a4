package forward

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/vunet/vunet/forward/egress"
)

// handleTCP runs, in its own goroutine started by gVisor's TCP forwarder,
// for every guest SYN that no in-stack listener claimed. It dials the host
// destination first and only then completes the guest's handshake, so the
// guest sees exactly what the host sees: a connection, a RST, or an ICMP
// unreachable.
func (f *Forwarder) handleTCP(r *tcp.ForwarderRequest) {
	if !f.enter() {
		f.c.DropClosed.Add(1)
		r.Complete(true)
		return
	}
	defer f.wg.Done()

	id := r.ID()
	defer f.syns.forget(id)
	src := netip.AddrPortFrom(fromTCPIP(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(fromTCPIP(id.LocalAddress), id.LocalPort)
	log := f.log.With("proto", "tcp", "src", src, "dst", dst)
	gi := f.syns.guest(id)
	if gi < 0 {
		// No connected guest sent it (it has just left), or its notes
		// were cleared under a SYN flood: it has no limits to count in.
		f.c.DropNoGuest.Add(1)
		log.Debug("tcp rejected: no guest")
		r.Complete(true)
		return
	}
	g := f.guests[gi]

	if path, ok := f.exposed(dst); ok {
		f.serveExposed(r, g, path, src, log)
		return
	}
	to, why := f.target(dst.Addr())
	if why != forwardOK {
		f.c.countDrop(why)
		log.Debug("tcp destination not forwarded", "reason", why.String())
		r.Complete(true)
		return
	}
	if !f.checkEgress(egress.TCP, src, dst) {
		f.denyTCP(r, src, dst)
		return
	}
	if !f.admitTCP(r, g, log) {
		return
	}
	slot := &connSlot{n: g.conns(f)}
	defer slot.release()
	target := netip.AddrPortFrom(to, dst.Port())
	ctx, cancel := context.WithTimeout(f.ctx, f.opts.DialTimeout)
	hc, err := f.opts.dial(ctx, tcpNetwork(to), target.String())
	cancel()
	g.dials(f).add(-1)
	if err != nil {
		f.countDialError(err)
		log.Debug("tcp dial failed", "target", target, "err", err)
		// "Unreachable" and "prohibited" reach the guest as the ICMP error
		// the host got, which aborts the guest's connect with the same
		// errno. Everything else (refused, timed out) becomes a RST: the
		// guest, retrying its own SYN, would otherwise hang for tens of
		// seconds.
		if k := kindFromErrno(err); k != kindNone {
			if seq, ok := f.syns.take(id); ok {
				f.sendICMPError(dst.Addr(), k, synInvoking(src, dst, seq))
				r.Complete(false)
				return
			}
		}
		r.Complete(true)
		return
	}

	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		// The guest gave up or the handshake failed; tell it, and the host.
		log.Debug("tcp guest handshake failed", "err", terr)
		r.Complete(true)
		_ = hc.Close()
		return
	}
	r.Complete(false)
	setGuestKeepalive(ep)
	log.Debug("tcp connection established", "target", target)
	sp, err := f.newSplice(ep, &wq, hc, g.mem, src.String()+"->"+target.String())
	if err != nil {
		log.Debug("tcp splice failed", "err", err)
		ep.Abort()
		_ = hc.Close()
		return
	}
	sp.g = g
	sp.onEnd = slot.handOver()
	sp.run()
}

func tcpNetwork(a netip.Addr) string {
	if a.Unmap().Is4() {
		return "tcp4"
	}
	return "tcp6"
}

// countDialError classifies a failed host connect.
func (f *Forwarder) countDialError(err error) {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		f.c.TCPRefused.Add(1)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		f.c.TCPTimeouts.Add(1)
	default:
		f.c.TCPDialErrors.Add(1)
	}
}

// String names a drop reason for logs.
func (r dropReason) String() string {
	switch r {
	case forwardOK:
		return "ok"
	case dropBroadcast:
		return "broadcast or multicast"
	case dropDNS:
		return "DNS address"
	case dropGateway:
		return "gateway (host loopback not mapped)"
	case dropUnspecified:
		return "unroutable"
	}
	return "unknown"
}

// serveExposed splices a guest connection to an exposed gateway port to a
// connect(2) on the host socket path. The egress policy does not apply (the
// mapping is the administrator's), the outbound connection and in-flight
// limits and memory share do, as for any guest connection.
func (f *Forwarder) serveExposed(r *tcp.ForwarderRequest, g *guestLimits, path string, src netip.AddrPort, log *slog.Logger) {
	if !f.admitTCP(r, g, log) {
		return
	}
	slot := &connSlot{n: g.conns(f)}
	defer slot.release()
	ctx, cancel := context.WithTimeout(f.ctx, f.opts.DialTimeout)
	var d net.Dialer
	hc, err := d.DialContext(ctx, "unix", path)
	cancel()
	g.dials(f).add(-1)
	if err != nil {
		f.c.ExposeFailures.Add(1)
		log.Debug("exposed socket connect failed", "socket", path, "err", err)
		r.Complete(true) // RST: the guest's connect fails at once
		return
	}
	f.c.ExposeConns.Add(1)
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		log.Debug("tcp guest handshake failed", "err", terr)
		r.Complete(true)
		_ = hc.Close()
		return
	}
	r.Complete(false)
	setGuestKeepalive(ep)
	log.Debug("exposed socket connection established", "socket", path)
	sp, err := f.newSplice(ep, &wq, hc, g.mem, src.String()+"->unix:"+path)
	if err != nil {
		ep.Abort()
		_ = hc.Close()
		return
	}
	sp.g = g
	sp.onEnd = slot.handOver()
	sp.run()
}

// admitTCP reserves a connection slot and an in-flight dial slot of guest
// g for its SYN, or answers it with RST and counts which of g's limits
// refused it. On success the caller gives the dial slot back when its dial
// returns and the connection slot when the connection ends.
func (f *Forwarder) admitTCP(r *tcp.ForwarderRequest, g *guestLimits, log *slog.Logger) bool {
	if !reserveGuest(g.conns(f), f.opts.MaxConns) {
		f.c.TCPRejectedConns.Add(1)
		g.c.RejectedConns.Add(1)
		log.Debug("tcp rejected: connection limit", "guest", g.id, "max", f.opts.MaxConns)
		r.Complete(true)
		return false
	}
	if !reserveGuest(g.dials(f), f.opts.MaxInFlightDials) {
		g.conns(f).add(-1)
		f.c.TCPRejectedInFlight.Add(1)
		g.c.RejectedInFlight.Add(1)
		log.Debug("tcp rejected: in-flight dial limit", "guest", g.id, "max", f.opts.MaxInFlightDials)
		r.Complete(true)
		return false
	}
	return true
}

// conns and dials are g's open-connection and in-flight-dial gauges with
// the NAT-wide ones.
func (g *guestLimits) conns(f *Forwarder) gauges { return gauges{&f.c.TCPConns, &g.c.TCPConns} }
func (g *guestLimits) dials(f *Forwarder) gauges {
	return gauges{&f.c.TCPDialsInFlight, &g.c.TCPDialsInFlight}
}

// connSlot is a reserved connection slot (gauges counted up by
// reserveGuest): released when the handler returns, unless a splice took
// it over and releases it when the connection ends.
type connSlot struct{ n gauges }

func (s *connSlot) release() {
	if s.n.all != nil {
		s.n.add(-1)
		s.n = gauges{}
	}
}

// handOver passes the slot to whoever calls the returned function.
func (s *connSlot) handOver() func() {
	n := s.n
	s.n = gauges{}
	return func() { n.add(-1) }
}
