package forward

import (
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
)

// fromTCPIP converts a gVisor address; the zero Address becomes the zero
// netip.Addr.
func fromTCPIP(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip
}

// toTCPIP converts a netip address, unmapping v4-in-v6 first because gVisor
// keeps the families apart.
func toTCPIP(a netip.Addr) tcpip.Address {
	if !a.IsValid() {
		return tcpip.Address{}
	}
	return tcpip.AddrFromSlice(a.Unmap().AsSlice())
}

func netProto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Unmap().Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func (f *Forwarder) full(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: f.opts.NIC, Addr: toTCPIP(ap.Addr()), Port: ap.Port()}
}

// dropReason says why a guest destination is not forwarded.
type dropReason int

const (
	forwardOK       dropReason = iota
	dropBroadcast              // broadcast or multicast
	dropDNS                    // the in-stack DNS address
	dropGateway                // the gateway without MapHostLoopback
	dropUnspecified            // 0.0.0.0, ::, loopback: not routable
)

// target translates the destination the guest used into the address to
// dial on the host.
func (f *Forwarder) target(dst netip.Addr) (netip.Addr, dropReason) {
	dst = dst.Unmap()
	switch {
	case !dst.IsValid() || dst.IsUnspecified() || dst.IsLoopback():
		return netip.Addr{}, dropUnspecified
	case dst.IsMulticast() || f.isBroadcast(dst):
		return netip.Addr{}, dropBroadcast
	case dst == f.opts.DNS4 || dst == f.opts.DNS6:
		return netip.Addr{}, dropDNS
	case dst == f.opts.Gateway4 || dst == f.opts.Gateway6:
		if !f.opts.MapHostLoopback {
			return netip.Addr{}, dropGateway
		}
		if dst.Is4() {
			return netip.AddrFrom4([4]byte{127, 0, 0, 1}), forwardOK
		}
		return netip.IPv6Loopback(), forwardOK
	}
	return dst, forwardOK
}

func (f *Forwarder) isBroadcast(a netip.Addr) bool {
	if !a.Is4() {
		return false
	}
	if a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return true
	}
	for _, b := range f.bcast4 {
		if a == b {
			return true
		}
	}
	return false
}

// guestSource chooses the source address the guest sees for an inbound
// port-forward client. The real client address is kept whenever the guest
// can route back to it; loopback clients (and clients of the other family)
// are shown as the gateway, which the guest can reach and which the NAT maps
// back to the host.
func (f *Forwarder) guestSource(client netip.AddrPort, guest netip.Addr) (netip.AddrPort, bool) {
	a := client.Addr().Unmap()
	gw := f.opts.Gateway4
	if guest.Unmap().Is6() {
		gw = f.opts.Gateway6
	}
	if a.IsLoopback() || a.IsUnspecified() || a.Is4() != guest.Unmap().Is4() {
		if !gw.IsValid() {
			return netip.AddrPort{}, false
		}
		a = gw
	}
	return netip.AddrPortFrom(a, client.Port()), true
}

// addrPortOf returns the address of a TCP or UDP net.Addr.
func addrPortOf(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.AddrPort()
	case *net.UDPAddr:
		return a.AddrPort()
	}
	return netip.AddrPort{}
}
