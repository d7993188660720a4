package forward

import (
	"sync/atomic"

	"github.com/vunet/vunet/budget"

	"github.com/vunet/vunet/forward/egress"
)

// Stats are the Forwarder's counters, updated atomically and declared for
// the metrics registry (internal/metrics). Gauges are current values.
type Stats struct {
	// Open flows (gauges): the guest's own (outbound) spliced TCP
	// connections and UDP flows, and host ping sockets; port forwards'
	// are InboundTCPOpen and InboundUDPOpen.
	TCPConns  atomic.Int64 `metric:"flows{proto=tcp}" kind:"gauge" help:"Open outbound NAT flows by protocol: spliced TCP connections, UDP flows, ICMP echo sockets (port forwards: vunet_forward_inbound_flows)."`
	UDPFlows  atomic.Int64 `metric:"flows{proto=udp}" kind:"gauge"`
	PingFlows atomic.Int64 `metric:"flows{proto=icmp}" kind:"gauge"`
	// Open connections and flows of port forwards (gauges), limited by
	// MaxInboundConns and MaxInboundUDPFlows apart from the guest's.
	InboundTCPOpen atomic.Int64 `metric:"forward_inbound_flows{proto=tcp}" kind:"gauge" help:"Open connections (tcp) and flows (udp) of port forwards."`
	InboundUDPOpen atomic.Int64 `metric:"forward_inbound_flows{proto=udp}" kind:"gauge"`
	// PortForwards is set by New: the number of active port forwards.
	PortForwards func() int64 `metric:"port_forwards" kind:"gauge" help:"Active port forwards."`

	TCPConnsTotal   atomic.Uint64 `metric:"flows_created_total{proto=tcp}" help:"NAT flows created by protocol (outbound and port-forwarded)."`
	UDPFlowsTotal   atomic.Uint64 `metric:"flows_created_total{proto=udp}"`
	InboundTCPConns atomic.Uint64 `metric:"forward_inbound_total{proto=tcp}" help:"Connections (tcp) and flows (udp) accepted by port forwards."`
	InboundUDPFlows atomic.Uint64 `metric:"forward_inbound_total{proto=udp}"`
	// InboundUnixConns counts the connections of unix port forwards
	// (--forward unix:PATH:PORT); they are in InboundTCPConns too.
	InboundUnixConns atomic.Uint64 `metric:"forward_inbound_unix_total" help:"Connections accepted by unix port forwards (also counted in vunet_forward_inbound_total{proto=tcp})."`
	// Port-forward connections and flows refused because the guest their
	// forward names (--forward tcp:2222:vm1:22) is not on the network.
	InboundNoGuestTCP atomic.Uint64 `metric:"forward_inbound_no_guest_total{proto=tcp}" help:"Port-forward connections (tcp, unix) and flows (udp) refused because the guest the forward names is not on the network now."`
	InboundNoGuestUDP atomic.Uint64 `metric:"forward_inbound_no_guest_total{proto=udp}"`
	// ExposeConns counts guest connections to an exposed gateway port
	// (--expose tcp:PORT:unix:PATH), and ExposeFailures those whose
	// connect to the host socket failed (the guest got a RST).
	ExposeConns    atomic.Uint64 `metric:"forward_expose_total{outcome=connected}" help:"Guest connections to exposed gateway ports (--expose), by outcome of the host socket connect."`
	ExposeFailures atomic.Uint64 `metric:"forward_expose_total{outcome=failed}"`

	// GuestFlowsClosed counts flows closed because their guest's
	// frontend went away (CloseGuest).
	GuestFlowsClosed atomic.Uint64 `metric:"forward_guest_gone_closed_total" help:"NAT flows closed because their guest's frontend went away (its VM stopped or disconnected)."`

	TCPDialsInFlight atomic.Int64 `metric:"forward_tcp_dials_in_flight" kind:"gauge" help:"Outbound host connects under way."`
	// Host connects that failed; the guest got a RST (or, for errors such
	// as an unreachable network, the ICMP error when there is one).
	TCPRefused    atomic.Uint64 `metric:"forward_tcp_dial_failures_total{reason=refused}" help:"Outbound host connects that failed (the guest got a RST), by reason."`
	TCPTimeouts   atomic.Uint64 `metric:"forward_tcp_dial_failures_total{reason=timeout}"`
	TCPDialErrors atomic.Uint64 `metric:"forward_tcp_dial_failures_total{reason=error}"`
	// SYNs refused because their guest had MaxInFlightDials connects
	// under way, and connections refused because it had MaxConns open
	// (which guest: GuestStats).
	TCPRejectedInFlight atomic.Uint64 `metric:"forward_tcp_rejected_total{limit=max_inflight_dials}" help:"Connections refused by a limit, by limit."`
	TCPRejectedConns    atomic.Uint64 `metric:"forward_tcp_rejected_total{limit=max_connections}"`
	// Port-forward connections refused because MaxInboundConns were open.
	TCPRejectedInbound atomic.Uint64 `metric:"forward_tcp_rejected_total{limit=max_inbound_connections}"`
	// TCPBudgetFloor counts connection directions that got no minimum
	// share because the memory budget was used up: they move data through
	// gVisor's smallest window until memory is released.
	TCPBudgetFloor atomic.Uint64 `metric:"forward_tcp_budget_floor_total" help:"TCP connection directions started at the smallest window because the memory budget was used up."`
	// TCPRecvShrinks counts idle receive buffers returned to the minimum
	// share because the memory budget was tight (shrinkRecv): each may
	// cost its guest part of its next flight.
	TCPRecvShrinks atomic.Uint64 `metric:"forward_tcp_recv_shrinks_total" help:"Idle TCP receive buffers returned to the minimum share because the memory budget was tight."`
	// TCPWakeups counts restarts of a parked splice direction: an idle
	// connection holds no goroutine, and each guest or host event that
	// gives a parked direction work starts one.
	TCPWakeups atomic.Uint64 `metric:"forward_tcp_wakeups_total" help:"Restarts of parked TCP splice directions (an idle connection holds no goroutine; a guest or host event that gives it work queues it for one of a bounded set of runners)."`
	// TCPRoomPolls counts reads from a host socket that a splice started
	// itself, looking for room in a full gVisor send buffer before gVisor
	// reported any (see tcpSplice.roomTimer).
	TCPRoomPolls atomic.Uint64 `metric:"forward_tcp_room_polls_total" help:"Host socket reads a TCP splice started by looking for room in a full send buffer itself, before gVisor reported half of it free."`
	// TCPSendLimited counts send buffers lowered to their share of the
	// guest link's receive capacity because more connections began
	// sending bulk data to that guest (sendLimit).
	TCPSendLimited atomic.Uint64 `metric:"forward_tcp_send_limited_total" help:"TCP send buffers lowered to their share of the guest link's receive backlog as more connections began sending to that guest."`
	// TCPLostReads counts connections aborted because a host socket
	// returned less than it announced (should never happen).
	TCPLostReads atomic.Uint64 `metric:"forward_tcp_lost_reads_total" help:"TCP connections aborted because a host socket returned less than it announced."`
	// AcceptErrors counts failed accepts of TCP port-forward listeners
	// (EMFILE, ENFILE, ...), each retried after a backoff.
	AcceptErrors atomic.Uint64 `metric:"forward_accept_errors_total" help:"Failed accepts on TCP port-forward listeners (EMFILE, ENFILE, ...), each retried after a backoff."`

	UDPFlowsExpired atomic.Uint64 `metric:"forward_udp_flows_expired_total" help:"UDP flows closed by an idle timeout."`
	// Live migration: UDP flows of the previous vunet whose host port
	// this one reused (kept) or could not bind, so the flow went on from
	// a new port (lost).
	UDPPortsKept atomic.Uint64 `metric:"forward_udp_migrated_ports_total{result=kept}" help:"UDP flows carried over from the vunet the guest migrated from: host port reused (kept) or taken by someone else (lost)."`
	UDPPortsLost atomic.Uint64 `metric:"forward_udp_migrated_ports_total{result=lost}"`

	// Established TCP connections in a live migration (tcpmove.go, with
	// --migrate-tcp): handed over by the source, or reset there by reason;
	// taken over by the destination, or not.
	TCPMoved           atomic.Uint64 `metric:"forward_tcp_moves_total{result=moved}" help:"Established TCP connections at a device-state save (--migrate-tcp): moved to the destination, or reset because data was in flight (busy), the connection was not established (state), host queues were over the limit (queue), too many moved (limit), the host side is a unix socket (not_tcp), it ended meanwhile (gone), or the freeze or TCP repair failed (failed)."`
	TCPMoveResetBusy   atomic.Uint64 `metric:"forward_tcp_moves_total{result=busy}"`
	TCPMoveResetState  atomic.Uint64 `metric:"forward_tcp_moves_total{result=state}"`
	TCPMoveResetQueue  atomic.Uint64 `metric:"forward_tcp_moves_total{result=queue}"`
	TCPMoveResetLimit  atomic.Uint64 `metric:"forward_tcp_moves_total{result=limit}"`
	TCPMoveResetNotTCP atomic.Uint64 `metric:"forward_tcp_moves_total{result=not_tcp}"`
	TCPMoveResetGone   atomic.Uint64 `metric:"forward_tcp_moves_total{result=gone}"`
	TCPMoveFailures    atomic.Uint64 `metric:"forward_tcp_moves_total{result=failed}"`
	TCPRestored        atomic.Uint64 `metric:"forward_tcp_restores_total{result=restored}" help:"TCP connections of a loaded device state: restored, failed (TCP repair or the guest-side handshake failed; reset), or refused (TCP moves off here, or the connection limit)."`
	TCPRestoreFailures atomic.Uint64 `metric:"forward_tcp_restores_total{result=failed}"`
	TCPRestoreRefused  atomic.Uint64 `metric:"forward_tcp_restores_total{result=refused}"`
	PingRequests       atomic.Uint64 `metric:"forward_ping_requests_total" help:"ICMP echo requests sent to the host."`
	PingReplies        atomic.Uint64 `metric:"forward_ping_replies_total" help:"ICMP echo replies delivered to the guest."`
	// Host ICMP errors translated for the guest, and those the stack's
	// ICMP rate limit held back.
	ICMPErrors        atomic.Uint64 `metric:"forward_icmp_errors_total{outcome=sent}" help:"Host ICMP errors (unreachable, time exceeded) translated for the guest, by outcome."`
	ICMPErrorsLimited atomic.Uint64 `metric:"forward_icmp_errors_total{outcome=rate_limited}"`

	// Drops by reason; see docs/forwarding.md.
	DropBroadcast    atomic.Uint64 `metric:"forward_drops_total{reason=broadcast}" help:"Packets and connections the forwarder refused, by reason."`
	DropDNSAddress   atomic.Uint64 `metric:"forward_drops_total{reason=dns_address}"`
	DropGateway      atomic.Uint64 `metric:"forward_drops_total{reason=gateway}"`
	DropUnroutable   atomic.Uint64 `metric:"forward_drops_total{reason=unroutable}"`
	DropUDPFlowLimit atomic.Uint64 `metric:"forward_drops_total{reason=udp_flow_limit}"`
	// DropNoGuest counts new flows (TCP: answered with RST) whose frame
	// came from no connected guest: it left while they were on the way,
	// so they have no guest's limits to count against.
	DropNoGuest atomic.Uint64 `metric:"forward_drops_total{reason=no_guest}"`
	// Client datagrams of UDP port forwards dropped: MaxInboundUDPFlows
	// flows were open, or their source address had MaxUDPFlowsPerSource.
	DropUDPInboundLimit atomic.Uint64 `metric:"forward_drops_total{reason=udp_inbound_limit}"`
	DropUDPSourceLimit  atomic.Uint64 `metric:"forward_drops_total{reason=udp_source_limit}"`
	// DropUDPMemory counts datagrams whose new flow found no room in the
	// memory budget for its receive buffer.
	DropUDPMemory       atomic.Uint64 `metric:"forward_drops_total{reason=udp_memory}"`
	DropPingFlowLimit   atomic.Uint64 `metric:"forward_drops_total{reason=ping_flow_limit}"`
	DropPingUnavailable atomic.Uint64 `metric:"forward_drops_total{reason=ping_unavailable}"`
	DropInvalid         atomic.Uint64 `metric:"forward_drops_total{reason=invalid}" hostile:"forward"`
	DropSendErrors      atomic.Uint64 `metric:"forward_drops_total{reason=send_error}"`
	DropClosed          atomic.Uint64 `metric:"forward_drops_total{reason=closed}"`
	// DropEgress counts flows the egress policy denied (per rule: the
	// policy's RuleCounters).
	DropEgress atomic.Uint64 `metric:"forward_drops_total{reason=egress}"`
}

// Stats returns the live counters.
func (f *Forwarder) Stats() *Stats { return &f.c }

// EgressRules returns the egress policy's rules and their counters, in
// evaluation order.
func (f *Forwarder) EgressRules() []egress.RuleStats { return f.egress.Stats() }

// countDrop records a destination rejected by target.
func (c *Stats) countDrop(r dropReason) {
	switch r {
	case dropBroadcast:
		c.DropBroadcast.Add(1)
	case dropDNS:
		c.DropDNSAddress.Add(1)
	case dropGateway:
		c.DropGateway.Add(1)
	case dropUnspecified:
		c.DropUnroutable.Add(1)
	}
}

// reserve increments g unless that would exceed max; it reports success.
func reserve(g *atomic.Int64, max int) bool {
	for {
		n := g.Load()
		if n >= int64(max) {
			return false
		}
		if g.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// MemoryShares returns the budget shares of outbound traffic and of
// inbound port forwards (nil without a budget).
func (f *Forwarder) MemoryShares() (outbound, inbound *budget.Budget) {
	return f.memOut, f.memIn
}
