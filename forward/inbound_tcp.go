package forward

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

func (p *portForward) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

// Accept backoff: after an accept error that may clear (out of file
// descriptors, kernel memory), the listener waits acceptBackoffMin, doubling
// up to acceptBackoffMax while the errors last, and tries again; the
// pending connections wait in the kernel's accept queue meanwhile.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// acceptLoop accepts host connections until the listener is closed. Errors
// other than closing (EMFILE, ENFILE, ENOBUFS, ...) never stop the forward:
// they are counted, logged (at the logger's bounded rate), and retried
// with backoff.
func (p *portForward) acceptLoop() {
	f := p.f
	backoff := time.Duration(0)
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			f.c.AcceptErrors.Add(1)
			backoff = min(max(2*backoff, acceptBackoffMin), acceptBackoffMax)
			// The logger's rate limit keeps an EMFILE storm to a few lines.
			f.log.Warn("port forward accept failed; retrying", "forward", p.spec.String(), "err", err, "backoff", backoff)
			select {
			case <-time.After(backoff):
			case <-f.ctx.Done():
				return
			case <-p.done:
				return
			}
			continue
		}
		backoff = 0
		if !f.enter() {
			_ = c.Close()
			return
		}
		go func() {
			defer f.wg.Done()
			p.serveTCP(c)
		}()
	}
}

// serveTCP connects an accepted host connection into the guest, from the
// client's own address when the guest can route to it (see guestSource).
func (p *portForward) serveTCP(c net.Conn) {
	f := p.f
	f.c.InboundTCPConns.Add(1)
	client := addrPortOf(c.RemoteAddr())
	if p.spec.Proto == "unix" {
		// A Unix client has no address: it enters the guest from the
		// gateway, like a loopback TCP client (guestSource), and from
		// an ephemeral port.
		client = netip.AddrPortFrom(netip.IPv6Loopback(), 0)
		f.c.InboundUnixConns.Add(1)
	}
	tc, _ := c.(*net.TCPConn)
	reject := func() {
		if tc != nil {
			_ = tc.SetLinger(0) // RST: the client learns at once
		}
		_ = c.Close()
	}
	if !reserve(&f.c.InboundTCPOpen, f.opts.MaxInboundConns) {
		f.c.TCPRejectedInbound.Add(1)
		f.log.Debug("inbound tcp rejected: inbound connection limit", "client", client, "max", f.opts.MaxInboundConns)
		reject()
		return
	}
	slot := &connSlot{n: gauges{all: &f.c.InboundTCPOpen}}
	defer slot.release()
	guest, ok := p.target()
	if !ok {
		f.c.InboundNoGuestTCP.Add(1)
		f.log.Debug("inbound tcp refused: the forward's guest is not on the network", "client", client, "guest", p.spec.Select)
		reject()
		return
	}
	src, ok := f.guestSource(client, guest.Addr())
	if !ok {
		f.log.Debug("inbound tcp: no gateway address for the guest's family", "client", client)
		reject()
		return
	}
	ctx, cancel := context.WithTimeout(f.ctx, f.opts.DialTimeout)
	ep, wq, err := f.dialGuestTCP(ctx, src, guest)
	cancel()
	if err != nil {
		f.log.Debug("inbound tcp: guest connect failed", "client", client, "guest", guest, "err", err)
		reject()
		return
	}
	if tc != nil {
		_ = tc.SetKeepAliveConfig(hostKeepAlive())
	}
	sp, err := f.newSplice(ep, wq, c, f.memIn, client.String()+"->"+guest.String())
	if err != nil {
		ep.Abort()
		reject()
		return
	}
	sp.owner = p
	sp.onEnd = slot.handOver()
	f.log.Debug("inbound tcp connection", "client", client, "as", src, "guest", guest)
	sp.run()
}

// dialGuestTCP connects to dst inside the stack from src. The NIC spoofs, so
// src may be any address: the endpoint binds to it as if it were local, and
// the guest's replies (to src, via its default route) are accepted by the
// promiscuous NIC and demultiplexed to this endpoint. If src's port is
// already in use inside the stack, an ephemeral port is used instead.
func (f *Forwarder) dialGuestTCP(ctx context.Context, src, dst netip.AddrPort) (tcpip.Endpoint, *waiter.Queue, error) {
	var lastErr tcpip.Error
	for _, port := range []uint16{src.Port(), 0} {
		wq := new(waiter.Queue)
		ep, terr := f.s.NewEndpoint(tcp.ProtocolNumber, netProto(dst.Addr()), wq)
		if terr != nil {
			return nil, nil, fmt.Errorf("new endpoint: %s", terr)
		}
		if terr := ep.Bind(f.full(netip.AddrPortFrom(src.Addr(), port))); terr != nil {
			ep.Close()
			lastErr = terr
			continue
		}
		setGuestKeepalive(ep)
		if err := connectEndpoint(ctx, ep, wq, f.full(dst)); err != nil {
			ep.Close()
			return nil, nil, err
		}
		return ep, wq, nil
	}
	return nil, nil, fmt.Errorf("bind %s: %s", src, lastErr)
}

// connectEndpoint runs a non-blocking gVisor connect to completion.
func connectEndpoint(ctx context.Context, ep tcpip.Endpoint, wq *waiter.Queue, to tcpip.FullAddress) error {
	we, ch := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	terr := ep.Connect(to)
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			return fmt.Errorf("connect %s: %w", to.Addr, ctx.Err())
		case <-ch:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		return fmt.Errorf("connect %s: %s", to.Addr, terr)
	}
	return nil
}
