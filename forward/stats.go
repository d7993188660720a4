package forward

import (
	"sync/atomic"

	"github.com/vunet/vunet/forward/egress"
)

// Stats is a snapshot of the Forwarder's counters. Gauges (current values)
// are int64, monotonic counters uint64.
type Stats struct {
	// TCPConns is the number of spliced TCP connections, outbound and
	// inbound (gauge).
	TCPConns int64
	// TCPConnsTotal counts spliced TCP connections ever established.
	TCPConnsTotal uint64
	// TCPDialsInFlight is the number of outbound host connects under way
	// (gauge).
	TCPDialsInFlight int64
	// TCPRefused counts host connects refused (guest got RST).
	TCPRefused uint64
	// TCPTimeouts counts host connects that timed out (guest got RST).
	TCPTimeouts uint64
	// TCPDialErrors counts other host connect failures, e.g. unreachable
	// networks (guest got the ICMP error, or a RST when there is none).
	TCPDialErrors uint64
	// TCPRejectedInFlight counts SYNs refused because MaxInFlightDials
	// connects were already under way.
	TCPRejectedInFlight uint64
	// TCPRejectedConns counts connections refused because MaxConns were
	// open (outbound SYNs and inbound accepts).
	TCPRejectedConns uint64

	// UDPFlows is the number of UDP flows, outbound and inbound (gauge).
	UDPFlows int64
	// UDPFlowsTotal counts UDP flows ever created.
	UDPFlowsTotal uint64
	// UDPFlowsExpired counts UDP flows closed by an idle timeout.
	UDPFlowsExpired uint64

	// PingFlows is the number of open host ping sockets (gauge).
	PingFlows int64
	// PingRequests counts echo requests sent to the host.
	PingRequests uint64
	// PingReplies counts echo replies delivered to the guest.
	PingReplies uint64

	// ICMPErrors counts host ICMP errors (unreachable, time exceeded)
	// translated and sent to the guest.
	ICMPErrors uint64
	// ICMPErrorsLimited counts ICMP errors not sent because of the stack's
	// ICMP rate limit.
	ICMPErrorsLimited uint64

	// InboundTCPConns counts connections accepted by TCP port forwards.
	InboundTCPConns uint64
	// InboundUDPFlows counts flows created by UDP port forwards.
	InboundUDPFlows uint64

	// Drops counts packets and connections dropped, by reason.
	Drops DropStats

	// Egress holds the egress policy's per-rule hit counters, in
	// evaluation order.
	Egress []egress.RuleStats
}

// DropStats counts what the Forwarder refused to forward, by reason.
type DropStats struct {
	// Broadcast counts packets to broadcast or multicast destinations,
	// which are never leaked to the host.
	Broadcast uint64
	// DNSAddress counts packets to the DNS address on ports no in-stack
	// service listens on.
	DNSAddress uint64
	// Gateway counts packets to the gateway while MapHostLoopback is off.
	Gateway uint64
	// Unroutable counts packets to unspecified or loopback destinations.
	Unroutable uint64
	// UDPFlowLimit counts datagrams dropped because MaxUDPFlows was reached.
	UDPFlowLimit uint64
	// PingFlowLimit counts echo requests dropped because MaxPingFlows was
	// reached.
	PingFlowLimit uint64
	// PingUnavailable counts echo requests not forwarded because the host
	// does not permit unprivileged ping sockets.
	PingUnavailable uint64
	// Invalid counts malformed guest packets.
	Invalid uint64
	// SendErrors counts datagrams the host or the stack refused to send.
	SendErrors uint64
	// Closed counts work refused because the Forwarder was closing.
	Closed uint64
	// Egress counts flows the egress policy denied (per rule: Stats.Egress).
	Egress uint64
}

// counters holds the live atomics behind Stats.
type counters struct {
	tcpConns, tcpDialsInFlight, udpFlows, pingFlows atomic.Int64

	tcpConnsTotal, tcpRefused, tcpTimeouts, tcpDialErrors     atomic.Uint64
	tcpRejectedInFlight, tcpRejectedConns                     atomic.Uint64
	udpFlowsTotal, udpFlowsExpired, pingRequests, pingReplies atomic.Uint64
	inboundTCP, inboundUDP                                    atomic.Uint64
	icmpErrors, icmpErrorsLimited                             atomic.Uint64
	dropBroadcast, dropDNS, dropGateway, dropUnroutable       atomic.Uint64
	dropUDPLimit, dropPingLimit, dropPingUnavail, dropInvalid atomic.Uint64
	dropSend, dropClosed, dropEgress                          atomic.Uint64
}

// Stats returns a snapshot of the counters. Fields are read one at a time,
// so the snapshot is not atomic as a whole.
func (f *Forwarder) Stats() Stats {
	c := &f.c
	return Stats{
		TCPConns:            c.tcpConns.Load(),
		TCPConnsTotal:       c.tcpConnsTotal.Load(),
		TCPDialsInFlight:    c.tcpDialsInFlight.Load(),
		TCPRefused:          c.tcpRefused.Load(),
		TCPTimeouts:         c.tcpTimeouts.Load(),
		TCPDialErrors:       c.tcpDialErrors.Load(),
		TCPRejectedInFlight: c.tcpRejectedInFlight.Load(),
		TCPRejectedConns:    c.tcpRejectedConns.Load(),
		UDPFlows:            c.udpFlows.Load(),
		UDPFlowsTotal:       c.udpFlowsTotal.Load(),
		UDPFlowsExpired:     c.udpFlowsExpired.Load(),
		PingFlows:           c.pingFlows.Load(),
		PingRequests:        c.pingRequests.Load(),
		PingReplies:         c.pingReplies.Load(),
		ICMPErrors:          c.icmpErrors.Load(),
		ICMPErrorsLimited:   c.icmpErrorsLimited.Load(),
		InboundTCPConns:     c.inboundTCP.Load(),
		InboundUDPFlows:     c.inboundUDP.Load(),
		Drops: DropStats{
			Broadcast:       c.dropBroadcast.Load(),
			DNSAddress:      c.dropDNS.Load(),
			Gateway:         c.dropGateway.Load(),
			Unroutable:      c.dropUnroutable.Load(),
			UDPFlowLimit:    c.dropUDPLimit.Load(),
			PingFlowLimit:   c.dropPingLimit.Load(),
			PingUnavailable: c.dropPingUnavail.Load(),
			Invalid:         c.dropInvalid.Load(),
			SendErrors:      c.dropSend.Load(),
			Closed:          c.dropClosed.Load(),
			Egress:          c.dropEgress.Load(),
		},
		Egress: f.egress.Stats(),
	}
}

// countDrop records a destination rejected by target.
func (c *counters) countDrop(r dropReason) {
	switch r {
	case dropBroadcast:
		c.dropBroadcast.Add(1)
	case dropDNS:
		c.dropDNS.Add(1)
	case dropGateway:
		c.dropGateway.Add(1)
	case dropUnspecified:
		c.dropUnroutable.Add(1)
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
