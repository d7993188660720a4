package forward

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// CloseGuest tears down every NAT flow whose guest side is one of addrs
// (outbound and port-forwarded TCP connections, UDP flows, ICMP echo
// flows) and returns how many it closed. The appliance calls it when a
// guest's frontend goes away: otherwise the flows would hold host sockets
// and memory budget until they time out, and a guest that comes back with
// the same address and port would meet the stale connection (its SYN
// answered by a challenge ACK, the connection hanging for the better part
// of a minute). TCP connections are aborted (RST to the host peer).
func (f *Forwarder) CloseGuest(addrs []netip.Addr) int {
	if len(addrs) == 0 {
		return 0
	}
	gone := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		gone[a.Unmap()] = true
	}
	f.mu.Lock()
	var conns []*tcpSplice
	for c := range f.conns {
		if gone[guestAddrOf(c.gep)] {
			conns = append(conns, c)
		}
	}
	var flows []*udpFlow
	for fl := range f.udp {
		if gone[guestAddrOf(fl.ep)] {
			flows = append(flows, fl)
		}
	}
	var pings []*pingFlow
	for p := range f.pflows {
		if gone[p.key.guest.Unmap()] {
			pings = append(pings, p)
		}
	}
	f.mu.Unlock()
	for _, c := range conns {
		c.abort()
	}
	for _, fl := range flows {
		fl.close()
	}
	for _, p := range pings {
		p.close()
	}
	n := len(conns) + len(flows) + len(pings)
	f.c.GuestFlowsClosed.Add(uint64(n))
	return n
}

// guestAddrOf is the guest's address of a NAT flow's gVisor endpoint: its
// remote end, for outbound flows (the guest connected to it) and port
// forwards (it connected to the guest) alike.
func guestAddrOf(ep tcpip.Endpoint) netip.Addr {
	if ep == nil {
		return netip.Addr{}
	}
	info, ok := ep.Info().(*stack.TransportEndpointInfo)
	if !ok {
		return netip.Addr{}
	}
	a, _ := netip.AddrFromSlice(info.ID.RemoteAddress.AsSlice())
	return a.Unmap()
}
