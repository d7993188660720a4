package forward

import (
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/budget"
)

// Per-guest limits.
//
// With several guests on one network (--max-guests), every guest has the
// connection, in-flight dial, UDP flow and ping flow limits of Options for
// itself (a VM gets what one passt or gvproxy per VM would give it, and
// another VM joining does not shrink it), and its own share of the
// outbound memory (Options.GuestMemory). A new flow is charged to the
// guest whose frame opened it, named by Options.GuestOf from the frame's
// source MAC (which the switch does not let one guest take from another),
// not by its source address, which a guest can forge. The NAT's totals
// are then bounded by Guests times each limit.

// GuestStats are one guest's NAT counters, registered with its `guest`
// label: its open flows, each against its own limit, and the new flows
// its limits refused.
type GuestStats struct {
	TCPConns         atomic.Int64 `metric:"forward_guest_flows{proto=tcp}" kind:"gauge" help:"Open outbound NAT flows of one guest (label guest), by protocol; each guest has its own limits (max_connections, UDP and ping flows)."`
	UDPFlows         atomic.Int64 `metric:"forward_guest_flows{proto=udp}" kind:"gauge"`
	PingFlows        atomic.Int64 `metric:"forward_guest_flows{proto=icmp}" kind:"gauge"`
	TCPDialsInFlight atomic.Int64 `metric:"forward_guest_tcp_dials_in_flight" kind:"gauge" help:"Outbound host connects under way for one guest (limit max_inflight_dials per guest)."`
	// New flows refused because this guest had reached its limit: TCP
	// (answered with RST), UDP and ping flows (dropped). Each is also
	// counted in the NAT-wide counter of that limit.
	RejectedConns    atomic.Uint64 `metric:"forward_guest_refused_total{limit=max_connections}" help:"New flows of one guest refused because it reached its own limit, by limit (TCP gets a RST; UDP datagrams and pings are dropped)."`
	RejectedInFlight atomic.Uint64 `metric:"forward_guest_refused_total{limit=max_inflight_dials}"`
	UDPFlowLimit     atomic.Uint64 `metric:"forward_guest_refused_total{limit=udp_flows}"`
	PingFlowLimit    atomic.Uint64 `metric:"forward_guest_refused_total{limit=ping_flows}"`
	// UDPMemory counts new UDP flows refused because the guest's memory
	// share (or the budget) had no room for their receive buffer.
	UDPMemory atomic.Uint64 `metric:"forward_guest_refused_total{limit=memory}"`
}

// guestLimits is one guest's part of the NAT: its counters and its memory
// share (of the outbound share).
type guestLimits struct {
	id  int
	c   GuestStats
	mem *budget.Budget
	// senders counts this guest's bulk senders, sendBytes sums its
	// connections' send buffers (see tcpSplice.sendLimit).
	senders   atomic.Int32
	sendBytes atomic.Int64
}

// GuestCounters returns guest i's counters and its memory share, for the
// metrics registry (nil, nil for an i outside 0..Guests-1).
func (f *Forwarder) GuestCounters(i int) (*GuestStats, *budget.Budget) {
	if i < 0 || i >= len(f.guests) {
		return nil, nil
	}
	return &f.guests[i].c, f.guests[i].mem
}

// guestOf names the guest that sent pkt (the first packet of a new flow),
// or nil when none did: its guest has just left. With one guest every
// packet is its.
func (f *Forwarder) guestOf(pkt *stack.PacketBuffer) *guestLimits {
	if len(f.guests) == 1 || f.opts.GuestOf == nil {
		return f.guests[0]
	}
	i := f.opts.GuestOf(pkt)
	if i < 0 || i >= len(f.guests) {
		return nil
	}
	return f.guests[i]
}

// gauges is an open-flows gauge of the whole NAT and, for a guest's own
// flows, the same gauge of its guest; they move together.
type gauges struct{ all, guest *atomic.Int64 }

func (g gauges) add(d int64) {
	g.all.Add(d)
	if g.guest != nil {
		g.guest.Add(d)
	}
}

// reserveGuest takes one unit of a guest's gauge, limited to max, and of
// the NAT-wide one; it reports success.
func reserveGuest(g gauges, max int) bool {
	if !reserve(g.guest, max) {
		return false
	}
	g.all.Add(1)
	return true
}
