package forward

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/vunet/vunet/forward/egress"
)

// Egress policy at the points where flows are created.
//
// The policy is asked once per flow, before any host socket exists: for
// TCP on the guest's SYN (in handleTCP, before the dial), for UDP on the datagram that would
// start a flow, for ICMP on each echo request. A denial is answered the
// way a filtering router answers, from the gateway: ICMP "administratively
// prohibited" (type 3 code 13, ICMPv6 type 1 code 1), subject to the
// stack's ICMP rate limit. For TCP that makes the guest's connect fail at
// once with "no route to host" / "permission denied", which says "policy"
// rather than the "connection refused" of a RST, which would suggest the
// service is down; when the limiter (or a missing SYN) stops the ICMP
// error, the SYN gets a RST instead, so a denied connect never hangs.

// checkEgress asks the policy about a flow to dst that target accepted. A
// denial is counted, and the first one by each rule logged (later ones at
// Debug, which the appliance's log limiter bounds).
func (f *Forwarder) checkEgress(proto egress.Proto, src, dst netip.AddrPort) bool {
	v := f.egress.Check(egress.Flow{Proto: proto, Dst: dst})
	if v.Allowed {
		return true
	}
	f.c.DropEgress.Add(1)
	if v.FirstDenial {
		f.log.Info("egress denied by policy (first denial by this rule; later ones are counted in stats)",
			"rule", v.Rule, "proto", proto.String(), "src", src, "dst", dst)
	} else {
		f.log.Debug("egress denied by policy", "rule", v.Rule, "proto", proto.String(), "src", src, "dst", dst)
	}
	return false
}

// denyTCP answers a denied guest SYN (see the top of this file). It runs
// in the TCP forwarder's goroutine for the SYN, before any dial; the SYN's
// sequence number, which the ICMP error must quote, was noted on the way in.
func (f *Forwarder) denyTCP(r *tcp.ForwarderRequest, src, dst netip.AddrPort) {
	if seq, ok := f.syns.take(r.ID()); ok &&
		f.sendICMPError(f.gateway(dst.Addr().Is6()), kindProhibited, synInvoking(src, dst, seq)) {
		r.Complete(false)
		return
	}
	r.Complete(true)
}

// udpEgress decides a guest datagram that would start a flow. Denied
// datagrams are answered with an ICMP error (rate limited) and dropped.
func (f *Forwarder) udpEgress(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	src := netip.AddrPortFrom(fromTCPIP(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(fromTCPIP(id.LocalAddress), id.LocalPort)
	if _, why := f.target(dst.Addr()); why != forwardOK || f.checkEgress(egress.UDP, src, dst) {
		return false
	}
	data := pkt.Data()
	quote := data.AsRange().Capped(maxQuote6).ToSlice()
	f.sendICMPError(f.gateway(dst.Addr().Is6()), kindProhibited, udpInvoking(src, dst, data.Size(), quote))
	return true
}
