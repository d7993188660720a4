package forward

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// hostUDPBuffer is the socket buffer requested for host UDP sockets, so
// bursts of large datagrams are not dropped while the relay is scheduled.
const hostUDPBuffer = 1 << 20

// handleUDP is called synchronously by gVisor for the first datagram of a
// guest 5-tuple that no in-stack socket claimed, sent by guest g (nil: no
// connected guest; the datagram is dropped). It creates the flow: a
// connected gVisor endpoint for that 5-tuple (later datagrams go straight to
// it) and a connected host socket. It returns false only for the DNS
// address, so that gVisor answers with ICMP port unreachable as a real host
// would; everything else not forwarded is dropped silently.
func (f *Forwarder) handleUDP(r *udp.ForwarderRequest, g *guestLimits) bool {
	id := r.ID()
	src := netip.AddrPortFrom(fromTCPIP(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(fromTCPIP(id.LocalAddress), id.LocalPort)

	to, why := f.target(dst.Addr())
	if why != forwardOK {
		f.c.countDrop(why)
		return why != dropDNS
	}
	if f.isClosed() {
		f.c.DropClosed.Add(1)
		return true
	}
	if g == nil {
		f.c.DropNoGuest.Add(1)
		return true
	}
	gauge := gauges{&f.c.UDPFlows, &g.c.UDPFlows}
	if !reserveGuest(gauge, f.opts.MaxUDPFlows) {
		f.c.DropUDPFlowLimit.Add(1)
		g.c.UDPFlowLimit.Add(1)
		return true
	}
	target := netip.AddrPortFrom(to, dst.Port())
	network := "udp4"
	if to.Is6() {
		network = "udp6"
	}
	// Creating a connected UDP socket does not block (no packets are
	// sent), so it is fine on gVisor's delivery path.
	local := f.takeUDPPort(src, dst)
	hc, err := f.opts.dialUDP(network, local, target)
	if local != 0 {
		if err != nil {
			// Someone else has the port (on one host, the source vunet
			// may still hold it): the flow goes on from a new one.
			f.c.UDPPortsLost.Add(1)
			f.log.Debug("udp flow: migrated host port taken", "src", src, "port", local, "err", err)
			hc, err = f.opts.dialUDP(network, 0, target)
		} else {
			f.c.UDPPortsKept.Add(1)
		}
	}
	if err != nil {
		gauge.add(-1)
		f.c.DropSendErrors.Add(1)
		f.log.Debug("udp host socket failed", "src", src, "target", target, "err", err)
		return true
	}
	_ = hc.SetReadBuffer(hostUDPBuffer)
	_ = hc.SetWriteBuffer(hostUDPBuffer)
	rc, err := hc.SyscallConn()
	if err != nil {
		_ = hc.Close()
		gauge.add(-1)
		f.c.DropSendErrors.Add(1)
		return true
	}
	// The gateway is the host itself, the destination; anything else is
	// reached through vunet as the guest's first router.
	hop := dst.Addr() != f.opts.Gateway4 && dst.Addr() != f.opts.Gateway6
	out := &udpOut{rc: rc, src: src, dst: dst, target: to, hop: hop, local: addrPortOf(hc.LocalAddr()).Port()}
	if err := enableRecvErr(rc, to.Is6()); err != nil {
		f.log.Debug("udp host socket: no IP_RECVERR", "err", err)
	}

	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		// Most likely a concurrent datagram of the same 5-tuple won the
		// race and owns the endpoint; this one is dropped.
		_ = hc.Close()
		gauge.add(-1)
		f.c.DropSendErrors.Add(1)
		f.log.Debug("udp guest endpoint failed", "src", src, "dst", dst, "err", terr)
		return true
	}
	fl := &udpFlow{
		f:         f,
		guest:     gonet.NewUDPConn(&wq, ep),
		sendHost:  func(b []byte) error { _, err := hc.Write(b); return err },
		closeHost: func() { _ = hc.Close() },
		desc:      src.String() + "->" + target.String(),
		out:       out,
		gauge:     gauge,
	}
	if !fl.attachGuest(ep, &wq, g.mem) {
		ep.Close()
		_ = hc.Close()
		gauge.add(-1)
		f.c.DropUDPMemory.Add(1)
		g.c.UDPMemory.Add(1)
		return true
	}
	fl.touch()
	f.log.Debug("udp flow created", "flow", fl.desc)
	f.addUDPFlow(fl, fl.guestLoop, func() { fl.hostLoop(rc) })
	return true
}

func (f *Forwarder) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}
