package forward

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/vunet/vunet/internal/tcprepair"
	"github.com/vunet/vunet/netstack"
)

// Moving established TCP connections with a live-migrated guest
// (docs/migration.md, "TCP connections"). Each connection has two halves:
// the guest's, an endpoint in gVisor (netstack.FreezeTCP/RestoreTCP), and
// the host socket, moved with the kernel's TCP repair mode (package
// tcprepair, CAP_NET_ADMIN). Only quiet connections move: nothing
// unacknowledged toward the guest, nothing from it not yet written to the
// host socket, host queues within the limits. The others are reset both
// ways, as they are without TCP moves, and counted by reason.

// TCPMover is the guest half of a move: netstack.Stack.
type TCPMover interface {
	FreezeTCP(tcpip.Endpoint) (netstack.TCPConnState, error)
	RestoreTCP(context.Context, netstack.TCPConnState, func(tcpip.Endpoint)) (tcpip.Endpoint, *waiter.Queue, error)
}

// TCPFlowState is one moved connection.
type TCPFlowState struct {
	Guest netstack.TCPConnState
	Host  tcprepair.State
}

// Bounds of one save: the device state carrying it has its own limits
// (package devstate), which these stay within.
const (
	// MaxTCPMoves is the most connections one save moves.
	MaxTCPMoves = 1024
	// MaxTCPMoveQueue bounds each host queue of a moved connection.
	MaxTCPMoveQueue = 64 << 10
	// maxTCPMoveQueued bounds the queued bytes of all moved connections.
	maxTCPMoveQueued = 512 << 10
	// detachTimeout bounds the wait for a splice to stop.
	detachTimeout = 2 * time.Second
	// restoreTimeout bounds one connection's restore.
	restoreTimeout = 3 * time.Second
)

// SaveTCP takes the connections over for a migration: each one that can
// move is frozen, its host socket dumped and closed silently, and its
// state returned; each one that cannot is reset. Every connection ends
// here either way: the guest has left. Without Options.MoveTCP it does
// nothing (the connections stay until the guest's next segment is reset
// on the destination, and the host sockets until this vunet stops).
func (f *Forwarder) SaveTCP() []TCPFlowState {
	mover := f.opts.MoveTCP
	if mover == nil {
		return nil
	}
	f.mu.Lock()
	conns := make([]*tcpSplice, 0, len(f.conns))
	for c := range f.conns {
		conns = append(conns, c)
	}
	f.mu.Unlock()
	// Stop them all first: the waits then overlap (a save has a deadline).
	for _, c := range conns {
		c.beginDetach()
	}
	var out []TCPFlowState
	queued := 0
	for _, c := range conns {
		fl, ok := f.saveOne(mover, c, len(out), queued)
		if ok {
			out = append(out, fl)
			queued += len(fl.Host.SndQueue) + len(fl.Host.RcvQueue)
		}
	}
	if len(conns) > 0 {
		f.log.Info("tcp connections handed over", "moved", len(out), "reset", len(conns)-len(out))
	}
	return out
}

// saveOne moves or resets one connection.
func (f *Forwarder) saveOne(mover TCPMover, c *tcpSplice, moved, queued int) (TCPFlowState, bool) {
	var fl TCPFlowState
	if !c.detach() {
		f.c.TCPMoveResetGone.Add(1)
		return fl, false
	}
	reset := func(n *atomic.Uint64) (TCPFlowState, bool) {
		n.Add(1)
		c.gep.Abort()
		if tc, ok := c.host.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = c.host.Close()
		return fl, false
	}
	hc, ok := c.host.(*net.TCPConn)
	if !ok {
		return reset(&f.c.TCPMoveResetNotTCP)
	}
	if moved >= MaxTCPMoves {
		return reset(&f.c.TCPMoveResetLimit)
	}
	gs, err := mover.FreezeTCP(c.gep)
	switch {
	case errors.Is(err, netstack.ErrTCPUnacked), errors.Is(err, netstack.ErrTCPUnread):
		return reset(&f.c.TCPMoveResetBusy)
	case errors.Is(err, netstack.ErrTCPNotEstablished):
		return reset(&f.c.TCPMoveResetState)
	case err != nil:
		f.log.Warn("tcp connection cannot move", "conn", c.desc, "err", err)
		return reset(&f.c.TCPMoveFailures)
	}
	limit := min(MaxTCPMoveQueue, (maxTCPMoveQueued-queued)/2)
	if limit <= 0 {
		return reset(&f.c.TCPMoveResetQueue)
	}
	hs, err := tcprepair.Dump(hc, limit)
	switch {
	case errors.Is(err, tcprepair.ErrQueueTooLarge):
		return reset(&f.c.TCPMoveResetQueue)
	case errors.Is(err, tcprepair.ErrNotEstablished):
		return reset(&f.c.TCPMoveResetState)
	case err != nil:
		f.log.Warn("tcp repair failed", "conn", c.desc, "err", err)
		return reset(&f.c.TCPMoveFailures)
	}
	// The host socket is gone without a trace; the guest's endpoint goes
	// too (its RST reaches a link whose guest has left).
	c.gep.Abort()
	f.c.TCPMoved.Add(1)
	return TCPFlowState{Guest: gs, Host: *hs}, true
}

// beginDetach tells c's directions to stop and leave both sides open.
func (c *tcpSplice) beginDetach() {
	c.detaching.Store(true)
	c.stopOnce.Do(func() { close(c.stop) })
	for _, d := range []*direction{&c.tg, &c.th} {
		c.wake(d, dirParkedGuest)
		c.wake(d, dirParkedHost)
	}
}

// detach stops c's directions and waits until it has ended, leaving both
// sides open. False if the connection ended or failed meanwhile.
func (c *tcpSplice) detach() bool {
	c.beginDetach()
	select {
	case <-c.detached:
	case <-time.After(detachTimeout):
		// A direction is stuck in a call it cannot leave; the connection
		// cannot be taken over safely.
		c.abort()
		return false
	}
	return !c.aborted.Load()
}

// RestoreTCP takes over connections saved by another vunet's SaveTCP: the
// host socket is rebuilt in repair mode and the guest's endpoint in this
// stack, and the two are spliced as if the guest had just connected. A
// connection that cannot be restored is left to the guest's next segment,
// which gets a RST. It returns how many were restored.
func (f *Forwarder) RestoreTCP(flows []TCPFlowState) int {
	mover := f.opts.MoveTCP
	if mover == nil {
		if len(flows) > 0 {
			f.c.TCPRestoreRefused.Add(uint64(len(flows)))
			f.log.Warn("tcp connections in the device state not restored: TCP moves are off (--migrate-tcp)", "count", len(flows))
		}
		return 0
	}
	n := 0
	for i := range flows {
		if f.restoreOne(mover, &flows[i]) {
			n++
		}
	}
	return n
}

func (f *Forwarder) restoreOne(mover TCPMover, fl *TCPFlowState) bool {
	log := f.log.With("proto", "tcp", "guest", fl.Guest.Remote, "dst", fl.Guest.Local, "host", fl.Host.Remote)
	if !f.enter() {
		return false
	}
	defer f.wg.Done()
	// A connection that came in through a port forward belongs to this
	// vunet's forward with the same listening address: it counts as that
	// forward's (inbound limit and memory) and ends with it. Any other
	// counts against the guest's limits and memory: TCP moves need one
	// guest (--migrate-tcp refuses max_guests above 1).
	owner := f.inboundForward(fl.Host.Local)
	var slot *connSlot
	mem := f.memIn
	if owner != nil {
		if !reserve(&f.c.InboundTCPOpen, f.opts.MaxInboundConns) {
			f.c.TCPRestoreRefused.Add(1)
			log.Debug("tcp restore refused: inbound connection limit")
			return false
		}
		slot = &connSlot{n: gauges{all: &f.c.InboundTCPOpen}}
	} else {
		g := f.guests[0]
		if !reserveGuest(g.conns(f), f.opts.MaxConns) {
			f.c.TCPRestoreRefused.Add(1)
			log.Debug("tcp restore refused: connection limit")
			return false
		}
		slot = &connSlot{n: g.conns(f)}
		mem = g.mem
	}
	defer slot.release()
	hc, err := tcprepair.Restore(&fl.Host)
	if err != nil {
		f.c.TCPRestoreFailures.Add(1)
		log.Warn("tcp restore of the host socket failed", "err", err)
		return false
	}
	ctx, cancel := context.WithTimeout(f.ctx, restoreTimeout)
	ep, wq, err := mover.RestoreTCP(ctx, fl.Guest, setGuestKeepalive)
	cancel()
	if err != nil {
		f.c.TCPRestoreFailures.Add(1)
		log.Warn("tcp restore of the guest endpoint failed", "err", err)
		_ = hc.SetLinger(0) // the host peer gets a RST: the guest's side is gone
		_ = hc.Close()
		return false
	}
	if err := hc.SetKeepAliveConfig(hostKeepAlive()); err != nil {
		log.Debug("host keepalive", "err", err)
	}
	sp, err := f.newSplice(ep, wq, hc, mem, fl.Guest.Remote.String()+"->"+fl.Host.Remote.String())
	if err != nil {
		f.c.TCPRestoreFailures.Add(1)
		ep.Abort()
		_ = hc.Close()
		return false
	}
	sp.owner = owner
	sp.restoredRcv = netstack.RestoreReceiveBuffer(fl.Guest)
	if owner == nil {
		sp.g = f.guests[0] // its send buffer is bounded by the guest's link
	}
	sp.onEnd = slot.handOver()
	f.c.TCPRestored.Add(1)
	log.Debug("tcp connection restored")
	f.wg.Add(1) // within our own count
	go func() {
		defer f.wg.Done()
		sp.run()
	}()
	return true
}

// inboundForward returns the TCP port forward listening on local, the
// host address of a connection it accepted, or nil.
func (f *Forwarder) inboundForward(local netip.AddrPort) *portForward {
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.pfwds {
		h := p.spec.Host
		if p.spec.Proto != "tcp" || h.Port() != local.Port() {
			continue
		}
		if a := h.Addr().Unmap(); a == local.Addr() || a.IsUnspecified() && a.Is4() == local.Addr().Is4() ||
			h.Addr() == netip.IPv6Unspecified() {
			return p
		}
	}
	return nil
}
