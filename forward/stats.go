package forward

import (
	"sync/atomic"

	"github.com/vunet/vunet/forward/egress"
)

// Stats are the Forwarder's counters, updated atomically and declared for
// the metrics registry (internal/metrics). Gauges are current values.
type Stats struct {
	// Open flows (gauges): spliced TCP connections and UDP flows, outbound
	// and inbound, and host ping sockets.
	TCPConns  atomic.Int64 `metric:"flows{proto=tcp}" kind:"gauge" help:"Open NAT flows by protocol: spliced TCP connections, UDP flows, ICMP echo sockets."`
	UDPFlows  atomic.Int64 `metric:"flows{proto=udp}" kind:"gauge"`
	PingFlows atomic.Int64 `metric:"flows{proto=icmp}" kind:"gauge"`
	// PortForwards is set by New: the number of active port forwards.
	PortForwards func() int64 `metric:"port_forwards" kind:"gauge" help:"Active port forwards."`

	TCPConnsTotal   atomic.Uint64 `metric:"flows_created_total{proto=tcp}" help:"NAT flows created by protocol (outbound and port-forwarded)."`
	UDPFlowsTotal   atomic.Uint64 `metric:"flows_created_total{proto=udp}"`
	InboundTCPConns atomic.Uint64 `metric:"forward_inbound_total{proto=tcp}" help:"Connections (tcp) and flows (udp) accepted by port forwards."`
	InboundUDPFlows atomic.Uint64 `metric:"forward_inbound_total{proto=udp}"`

	TCPDialsInFlight atomic.Int64 `metric:"forward_tcp_dials_in_flight" kind:"gauge" help:"Outbound host connects under way."`
	// Host connects that failed; the guest got a RST (or, for errors such
	// as an unreachable network, the ICMP error when there is one).
	TCPRefused    atomic.Uint64 `metric:"forward_tcp_dial_failures_total{reason=refused}" help:"Outbound host connects that failed (the guest got a RST), by reason."`
	TCPTimeouts   atomic.Uint64 `metric:"forward_tcp_dial_failures_total{reason=timeout}"`
	TCPDialErrors atomic.Uint64 `metric:"forward_tcp_dial_failures_total{reason=error}"`
	// SYNs refused because MaxInFlightDials connects were under way, and
	// connections refused because MaxConns were open.
	TCPRejectedInFlight atomic.Uint64 `metric:"forward_tcp_rejected_total{limit=max_inflight_dials}" help:"Guest connections refused by a limit, by limit."`
	TCPRejectedConns    atomic.Uint64 `metric:"forward_tcp_rejected_total{limit=max_connections}"`

	UDPFlowsExpired atomic.Uint64 `metric:"forward_udp_flows_expired_total" help:"UDP flows closed by an idle timeout."`
	PingRequests    atomic.Uint64 `metric:"forward_ping_requests_total" help:"ICMP echo requests sent to the host."`
	PingReplies     atomic.Uint64 `metric:"forward_ping_replies_total" help:"ICMP echo replies delivered to the guest."`
	// Host ICMP errors translated for the guest, and those the stack's
	// ICMP rate limit held back.
	ICMPErrors        atomic.Uint64 `metric:"forward_icmp_errors_total{outcome=sent}" help:"Host ICMP errors (unreachable, time exceeded) translated for the guest, by outcome."`
	ICMPErrorsLimited atomic.Uint64 `metric:"forward_icmp_errors_total{outcome=rate_limited}"`

	// Drops by reason; see docs/forwarding.md.
	DropBroadcast       atomic.Uint64 `metric:"forward_drops_total{reason=broadcast}" help:"Packets and connections the forwarder refused, by reason."`
	DropDNSAddress      atomic.Uint64 `metric:"forward_drops_total{reason=dns_address}"`
	DropGateway         atomic.Uint64 `metric:"forward_drops_total{reason=gateway}"`
	DropUnroutable      atomic.Uint64 `metric:"forward_drops_total{reason=unroutable}"`
	DropUDPFlowLimit    atomic.Uint64 `metric:"forward_drops_total{reason=udp_flow_limit}"`
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
