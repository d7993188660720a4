package forward

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// udpLoop reads client datagrams from the forward's host socket and relays
// each to its client's flow, creating flows as clients appear. Replies are
// sent by each flow's guestLoop from the same host socket, so clients see
// them coming from the address they sent to.
func (p *portForward) udpLoop() {
	f := p.f
	buf := make([]byte, maxDatagram)
	for {
		n, client, err := p.pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Errors queued by ICMP for earlier replies; keep serving.
			f.log.Debug("port forward read error", "forward", p.spec.String(), "err", err)
			continue
		}
		client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
		fl := p.flow(client)
		if fl == nil {
			continue
		}
		fl.deliver(buf[:n])
	}
}

// flow returns client's flow, creating it if needed; nil if it cannot.
func (p *portForward) flow(client netip.AddrPort) *udpFlow {
	f := p.f
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	if fl := p.flows[client]; fl != nil {
		p.mu.Unlock()
		return fl
	}
	// Only this goroutine (udpLoop) creates flows, so p.mu need not be
	// held while the flow is set up, and must not be: closing a flow
	// takes it.
	p.mu.Unlock()
	guest, ok := p.target()
	if !ok {
		f.c.InboundNoGuestUDP.Add(1)
		return nil
	}
	src, ok := f.guestSource(client, guest.Addr())
	if !ok {
		f.c.DropUnroutable.Add(1)
		return nil
	}
	// Per source address first, so one client hitting its own limit does
	// not also count against everyone's.
	if !p.takeSource(client.Addr()) {
		f.c.DropUDPSourceLimit.Add(1)
		return nil
	}
	if !reserve(&f.c.InboundUDPOpen, f.opts.MaxInboundUDPFlows) {
		p.giveSource(client.Addr())
		f.c.DropUDPInboundLimit.Add(1)
		return nil
	}
	fail := func() {
		f.c.InboundUDPOpen.Add(-1)
		p.giveSource(client.Addr())
	}
	ep, wq, err := f.dialGuestUDP(src, guest)
	if err != nil {
		fail()
		f.c.DropSendErrors.Add(1)
		f.log.Debug("inbound udp: guest socket failed", "client", client, "err", err)
		return nil
	}
	fl := &udpFlow{
		f:     f,
		guest: gonet.NewUDPConn(wq, ep),
		sendHost: func(b []byte) error {
			_, err := p.pc.WriteToUDPAddrPort(b, client)
			return err
		},
		desc:  client.String() + "->" + guest.String(),
		gauge: gauges{all: &f.c.InboundUDPOpen},
	}
	if !fl.attachGuest(ep, wq, f.memIn) {
		ep.Close()
		fail()
		f.c.DropUDPMemory.Add(1)
		return nil
	}
	fl.onClose = func() {
		p.mu.Lock()
		if p.flows[client] == fl {
			delete(p.flows, client)
		}
		p.giveSourceLocked(client.Addr())
		p.mu.Unlock()
	}
	fl.touch()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		fl.close()
		return nil
	}
	p.flows[client] = fl
	p.mu.Unlock()
	f.c.InboundUDPFlows.Add(1)
	f.log.Debug("inbound udp flow", "client", client, "as", src, "guest", guest)
	f.addUDPFlow(fl, fl.guestLoop)
	return fl
}

// takeSource counts one more flow for a client address, unless it has
// MaxUDPFlowsPerSource already.
func (p *portForward) takeSource(a netip.Addr) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sources[a] >= p.f.opts.MaxUDPFlowsPerSource {
		return false
	}
	p.sources[a]++
	return true
}

func (p *portForward) giveSource(a netip.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.giveSourceLocked(a)
}

func (p *portForward) giveSourceLocked(a netip.Addr) {
	if p.sources[a] <= 1 {
		delete(p.sources, a)
		return
	}
	p.sources[a]--
}

// dialGuestUDP creates a gVisor UDP socket bound to src (spoofed, like
// dialGuestTCP) and connected to dst.
func (f *Forwarder) dialGuestUDP(src, dst netip.AddrPort) (tcpip.Endpoint, *waiter.Queue, error) {
	var lastErr tcpip.Error
	for _, port := range []uint16{src.Port(), 0} {
		wq := new(waiter.Queue)
		ep, terr := f.s.NewEndpoint(udp.ProtocolNumber, netProto(dst.Addr()), wq)
		if terr != nil {
			return nil, nil, fmt.Errorf("new endpoint: %s", terr)
		}
		if terr := ep.Bind(f.full(netip.AddrPortFrom(src.Addr(), port))); terr != nil {
			ep.Close()
			lastErr = terr
			continue
		}
		if terr := ep.Connect(f.full(dst)); terr != nil {
			ep.Close()
			return nil, nil, fmt.Errorf("connect %s: %s", dst, terr)
		}
		return ep, wq, nil
	}
	return nil, nil, fmt.Errorf("bind %s: %s", src, lastErr)
}
