package forward

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

func (p *portForward) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

// acceptLoop accepts host connections until the listener is closed.
func (p *portForward) acceptLoop() {
	f := p.f
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				f.log.Warn("port forward accept failed; forward stopped", "forward", p.spec.String(), "err", err)
			}
			return
		}
		if !f.enter() {
			_ = c.Close()
			return
		}
		go func() {
			defer f.wg.Done()
			p.serveTCP(c.(*net.TCPConn))
		}()
	}
}

// serveTCP connects an accepted host connection into the guest, from the
// client's own address when the guest can route to it (see guestSource).
func (p *portForward) serveTCP(c *net.TCPConn) {
	f := p.f
	f.c.InboundTCPConns.Add(1)
	client := addrPortOf(c.RemoteAddr())
	reject := func() {
		_ = c.SetLinger(0) // RST: the client learns at once
		_ = c.Close()
	}
	if !reserve(&f.c.TCPConns, f.opts.MaxConns) {
		f.c.TCPRejectedConns.Add(1)
		f.log.Debug("inbound tcp rejected: connection limit", "client", client)
		reject()
		return
	}
	defer f.c.TCPConns.Add(-1)
	src, ok := f.guestSource(client, p.spec.Guest.Addr())
	if !ok {
		f.log.Debug("inbound tcp: no gateway address for the guest's family", "client", client)
		reject()
		return
	}
	ctx, cancel := context.WithTimeout(f.ctx, f.opts.DialTimeout)
	ep, wq, err := f.dialGuestTCP(ctx, src, p.spec.Guest)
	cancel()
	if err != nil {
		f.log.Debug("inbound tcp: guest connect failed", "client", client, "guest", p.spec.Guest, "err", err)
		reject()
		return
	}
	_ = c.SetKeepAliveConfig(hostKeepAlive())
	sp := f.newSplice(ep, wq, c, client.String()+"->"+p.spec.Guest.String())
	sp.owner = p
	f.log.Debug("inbound tcp connection", "client", client, "as", src, "guest", p.spec.Guest)
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
