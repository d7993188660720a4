package appliance

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/forward"
	"github.com/vunet/vunet/internal/version"
)

// Virtqueue indices of the virtio-net queue pair.
const (
	rxQueue = 0 // receiveq: to the guest
	txQueue = 1 // transmitq: from the guest
)

// maxQueueErrors is how many queue indices countQueueError tracks; vunet
// serves one queue pair, anything beyond is lumped into the last slot.
const maxQueueErrors = 2

// The appliance is the API's backend.
var _ api.Backend = (*Appliance)(nil)

// countQueueError is the vhost OnQueueError hook: malformed chains and
// broken rings, per queue, for the API's hostile-input counters.
func (a *Appliance) countQueueError(idx int, _ error) {
	a.queueErrors[min(max(idx, 0), maxQueueErrors-1)].Add(1)
}

// Health implements api.Backend.
func (a *Appliance) Health() api.Health {
	return api.Health{Status: "ok", Version: version.Version, Started: a.started,
		UptimeSeconds: time.Since(a.started).Seconds()}
}

// Stats implements api.Backend: a snapshot of every layer's counters.
func (a *Appliance) Stats() api.Stats {
	ls := &a.Link.Stats
	vs := &a.VHost.Stats
	st := api.Stats{
		Version: version.Version, Started: a.started, UptimeSeconds: time.Since(a.started).Seconds(),
		Link: api.LinkStats{
			Queues: []api.QueueStats{
				{Queue: rxQueue, Direction: api.ToGuest, Frames: ls.RXFrames.Load(), Bytes: ls.RXBytes.Load(),
					Errors: a.queueErrors[rxQueue].Load()},
				{Queue: txQueue, Direction: api.FromGuest, Frames: ls.TXFrames.Load(), Bytes: ls.TXBytes.Load(),
					Errors: a.queueErrors[txQueue].Load()},
			},
			Drops: map[string]uint64{
				"tx_bad_header":    ls.TXBadHeader.Load(),
				"tx_short":         ls.TXShort.Load(),
				"tx_too_big":       ls.TXTooBig.Load(),
				"tx_bad_gso":       ls.TXBadGSO.Load(),
				"rx_not_connected": ls.RXNotConnected.Load(),
				"rx_backlog_full":  ls.RXBacklogFull.Load(),
				"rx_too_big":       ls.RXTooBig.Load(),
			},
			RXBacklogged: ls.RXBacklogged.Load(),
		},
		VHost: api.VHostStats{
			Messages: vs.Messages.Load(), BadMessages: vs.BadMessages.Load(), Sessions: vs.Sessions.Load(),
			MapFailures: vs.MapFailures.Load(), QueueStarts: vs.QueueStarts.Load(), BadFDs: vs.BadFDs.Load(),
		},
	}

	st.Link.Queues[rxQueue].Backlog = a.Link.RXBacklog()
	for i := range st.Link.Queues {
		if rs := a.Link.RingState(st.Link.Queues[i].Queue); rs.Ready {
			st.Link.Queues[i].Ring = &api.RingState{Size: rs.Size, AvailIdx: rs.AvailIdx, NextAvail: rs.NextAvail,
				UsedIdx: rs.UsedIdx, EventIdx: rs.EventIdx, AvailEvent: rs.AvailEvent, UsedEvent: rs.UsedEvent}
		}
	}

	fs := a.Forward.Stats()
	st.Forward = api.ForwardStats{
		PortForwards: len(a.Forward.ListPortForwards()),
		TCPConns:     fs.TCPConns, TCPConnsTotal: fs.TCPConnsTotal, TCPDialsInFlight: fs.TCPDialsInFlight,
		TCPRefused: fs.TCPRefused, TCPTimeouts: fs.TCPTimeouts, TCPDialErrors: fs.TCPDialErrors,
		TCPRejectedInFlight: fs.TCPRejectedInFlight, TCPRejectedConns: fs.TCPRejectedConns,
		UDPFlows: fs.UDPFlows, UDPFlowsTotal: fs.UDPFlowsTotal, UDPFlowsExpired: fs.UDPFlowsExpired,
		PingFlows: fs.PingFlows, PingRequests: fs.PingRequests, PingReplies: fs.PingReplies,
		ICMPErrors: fs.ICMPErrors, ICMPErrorsLimited: fs.ICMPErrorsLimited,
		InboundTCPConns: fs.InboundTCPConns, InboundUDPFlows: fs.InboundUDPFlows,
		Drops: map[string]uint64{
			"broadcast":        fs.Drops.Broadcast,
			"dns_address":      fs.Drops.DNSAddress,
			"gateway":          fs.Drops.Gateway,
			"unroutable":       fs.Drops.Unroutable,
			"udp_flow_limit":   fs.Drops.UDPFlowLimit,
			"ping_flow_limit":  fs.Drops.PingFlowLimit,
			"ping_unavailable": fs.Drops.PingUnavailable,
			"invalid":          fs.Drops.Invalid,
			"send_error":       fs.Drops.SendErrors,
			"closed":           fs.Drops.Closed,
			"egress":           fs.Drops.Egress,
		},
	}
	st.Log.Suppressed = a.logLimit.Suppressed()
	st.Egress = api.EgressStats{Mode: a.cfg.Egress.Mode.String(), Rules: []api.EgressRule{}}
	for _, r := range fs.Egress {
		st.Egress.Rules = append(st.Egress.Rules, api.EgressRule{Index: r.Index, Rule: r.Rule, Action: r.Action, Hits: r.Hits})
	}
	if h := a.hostAddrs; h != nil {
		n := h.Len()
		st.Egress.HostAddresses, st.Egress.HostAddressRefreshes = &n, h.Refreshes()
	}

	ds := a.DHCP.Stats()
	st.DHCP = api.DHCPStats{
		Received: ds.Received, Malformed: ds.Malformed,
		Messages: map[string]uint64{
			"discover": ds.Discover, "request": ds.Request, "decline": ds.Decline,
			"release": ds.Release, "inform": ds.Inform,
			"offer": ds.Offer, "ack": ds.Ack, "nak": ds.Nak,
		},
		PoolExhausted: ds.PoolExhausted, SendErrors: ds.SendErrors,
		ActiveLeases: ds.ActiveLeases, PoolSize: ds.PoolSize,
		Leases: []api.Lease{},
	}
	for _, l := range a.DHCP.Leases() {
		st.DHCP.Leases = append(st.DHCP.Leases, api.Lease{MAC: l.MAC, Addr: l.Addr, Expiry: l.Expiry})
	}

	ns := a.DNS.Stats()
	st.DNS = api.DNSStats{
		Queries: ns.Queries, TCPQueries: ns.TCPQueries, Static: ns.Static, StaticDenied: ns.StaticDenied, Forwarded: ns.Forwarded,
		UpstreamErrors: ns.UpstreamErrors, Timeouts: ns.Timeouts, TCPFallbacks: ns.TCPFallbacks,
		Truncated: ns.Truncated, ServFail: ns.ServFail, Overloaded: ns.Overloaded, Malformed: ns.Malformed,
	}
	if a.RA != nil {
		rs := a.RA.Stats()
		st.RA = &api.RAStats{Sent: rs.Sent, Solicitations: rs.Solicitations, SendErrors: rs.SendErrors}
	}
	if a.DHCPv6 != nil {
		d6 := a.DHCPv6.Stats()
		st.DHCPv6 = &api.DHCPv6Stats{Received: d6.Received, Malformed: d6.Malformed,
			InformationRequest: d6.InformationRequest, Replies: d6.Replies,
			Unsupported: d6.Unsupported, SendErrors: d6.SendErrors}
	}
	if a.TFTP != nil {
		ts := a.TFTP.Stats()
		st.TFTP = &api.TFTPStats{Requests: ts.Requests, Malformed: ts.Malformed, Completed: ts.Completed,
			Failed: ts.Failed, NotFound: ts.NotFound, Denied: ts.Denied, Busy: ts.Busy,
			Retransmissions: ts.Retransmissions, BytesSent: ts.BytesSent, Active: ts.Active}
	}
	return st
}

// toAPI converts a running forward.
func toAPI(pf forward.PortForward) api.Forward {
	return api.Forward{Proto: pf.Proto, Host: pf.Host, GuestPort: pf.Guest.Port(), Guest: pf.Guest}
}

// Forwards implements api.Backend.
func (a *Appliance) Forwards() []api.Forward {
	var out []api.Forward
	for _, pf := range a.Forward.ListPortForwards() {
		out = append(out, toAPI(pf))
	}
	return out
}

// AddForward implements api.Backend. Like --forward, the target is the
// guest's IPv4 address: the guest's IPv6 address comes from SLAAC and is
// not known here. The host address may be IPv4 or IPv6.
func (a *Appliance) AddForward(f api.Forward) (api.Forward, error) {
	if f.Host.Port() != 0 {
		// The forwarder checks too, but its error does not say which kind
		// it is; an API client deserves a 409.
		if _, ok := a.findForward(f); ok {
			return api.Forward{}, api.Errorf(api.ErrConflict, "a %s port forward already listens on %s", f.Proto, f.Host)
		}
	}
	pf, err := a.Forward.AddPortForward(forward.PortForward{
		Proto: f.Proto, Host: f.Host, Guest: netip.AddrPortFrom(a.cfg.IPv4.Guest, f.GuestPort),
	})
	switch {
	case err == nil:
		return toAPI(pf), nil
	case errors.Is(err, syscall.EADDRINUSE):
		return api.Forward{}, api.Errorf(api.ErrConflict, "%w", err)
	case errors.Is(err, syscall.EADDRNOTAVAIL), errors.Is(err, syscall.EACCES):
		// Not a local address, or a privileged port: the request, not
		// vunet, is at fault.
		return api.Forward{}, api.Errorf(api.ErrInvalid, "%w", err)
	}
	return api.Forward{}, err
}

// RemoveForward implements api.Backend.
func (a *Appliance) RemoveForward(f api.Forward) error {
	cur, ok := a.findForward(f)
	if !ok {
		return api.Errorf(api.ErrNotFound, "no %s port forward on %s", f.Proto, f.Host)
	}
	if f.GuestPort != 0 && cur.Guest.Port() != f.GuestPort {
		return api.Errorf(api.ErrNotFound, "the %s port forward on %s goes to guest port %d, not %d",
			f.Proto, f.Host, cur.Guest.Port(), f.GuestPort)
	}
	if err := a.Forward.RemovePortForward(cur); err != nil {
		// Lost a race with another remove.
		return api.Errorf(api.ErrNotFound, "%w", err)
	}
	return nil
}

// findForward returns the running forward on f.Proto and f.Host.
func (a *Appliance) findForward(f api.Forward) (forward.PortForward, bool) {
	host := netip.AddrPortFrom(f.Host.Addr().Unmap(), f.Host.Port())
	for _, pf := range a.Forward.ListPortForwards() {
		if pf.Proto == f.Proto && pf.Host == host {
			return pf, true
		}
	}
	return forward.PortForward{}, false
}

// listenAPI creates the API socket (mode 0600) if configured; nil without
// cfg.API.
func (a *Appliance) listenAPI() (*net.UnixListener, error) {
	if a.cfg.API == "" {
		return nil, nil
	}
	return api.Listen(a.cfg.API)
}

// serveAPI serves the API on l until ctx is done and then removes the
// socket file.
func (a *Appliance) serveAPI(ctx context.Context, l *net.UnixListener) error {
	defer func() {
		if err := os.Remove(a.cfg.API); err != nil && !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("removing API socket", "path", a.cfg.API, "err", err)
		}
	}()
	a.log.Info("control API listening", "socket", a.cfg.API)
	if err := api.NewServer(a, a.log.With("layer", "api")).Serve(ctx, l); err != nil {
		return fmt.Errorf("serving %s: %w", a.cfg.API, err)
	}
	return nil
}
