// Package gnet holds the small amount of gVisor plumbing the services share:
// address conversion, creating UDP endpoints with the socket options that
// gonet's helpers do not expose (SO_BROADCAST, SO_REUSEADDR, SO_BINDTODEVICE,
// multicast membership) and reading from them; and the check of the domain
// names they hand out.
package gnet

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Addr converts a netip address to a gVisor address. The zero netip.Addr
// maps to the empty (unspecified) gVisor address. IPv4-mapped IPv6 addresses
// are unmapped so callers never hand gVisor a 16-byte IPv4 address.
func Addr(a netip.Addr) tcpip.Address {
	if !a.IsValid() {
		return tcpip.Address{}
	}
	return tcpip.AddrFromSlice(a.Unmap().AsSlice())
}

// FromAddr converts a gVisor address to a netip address; the empty address
// yields the zero netip.Addr.
func FromAddr(a tcpip.Address) netip.Addr {
	if a.Len() == 0 {
		return netip.Addr{}
	}
	n, _ := netip.AddrFromSlice(a.AsSlice())
	return n
}

// FullAddr builds a gVisor full address on nic.
func FullAddr(nic tcpip.NICID, ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: nic, Addr: Addr(ap.Addr()), Port: ap.Port()}
}

// AddrPort converts a gVisor full address to a netip.AddrPort.
func AddrPort(fa tcpip.FullAddress) netip.AddrPort {
	return netip.AddrPortFrom(FromAddr(fa.Addr), fa.Port)
}

// Proto returns the gVisor network protocol number of a.
func Proto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Unmap().Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

// UDPOptions are the socket options applied before binding.
type UDPOptions struct {
	// Broadcast enables SO_BROADCAST (needed to send to 255.255.255.255).
	Broadcast bool
	// ReuseAddr enables SO_REUSEADDR so a wildcard and an address-specific
	// endpoint can share a port.
	ReuseAddr bool
	// Groups are multicast groups joined on the NIC after binding.
	Groups []netip.Addr
}

// UDP is a bound gVisor UDP endpoint. Conn is the net.PacketConn view used
// for reading (it handles deadlines and waiting); EP is the raw endpoint for
// writes that need control messages (source address selection on IPv6).
type UDP struct {
	Conn *gonet.UDPConn
	EP   tcpip.Endpoint
}

// ListenUDP creates a UDP endpoint bound to local on nic (SO_BINDTODEVICE so
// that only that NIC's traffic is seen), with opts applied before the bind.
// proto selects the endpoint's family; it matters when local's address is
// unspecified.
func ListenUDP(s *stack.Stack, nic tcpip.NICID, proto tcpip.NetworkProtocolNumber, local netip.AddrPort, opts UDPOptions) (*UDP, error) {
	var wq waiter.Queue
	ep, terr := s.NewEndpoint(udp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, fmt.Errorf("create udp endpoint: %s", terr)
	}
	fail := func(what string, terr tcpip.Error) (*UDP, error) {
		ep.Close()
		return nil, fmt.Errorf("%s for udp %s on nic %d: %s", what, local, nic, terr)
	}
	so := ep.SocketOptions()
	so.SetBroadcast(opts.Broadcast)
	so.SetReuseAddress(opts.ReuseAddr)
	if proto == ipv6.ProtocolNumber {
		so.SetV6Only(true)
	}
	if terr := so.SetBindToDevice(int32(nic)); terr != nil {
		return fail("bind to device", terr)
	}
	fa := tcpip.FullAddress{NIC: nic, Addr: Addr(local.Addr()), Port: local.Port()}
	if local.Addr().IsUnspecified() {
		// gVisor only treats the empty address as the wildcard; a bound
		// 0.0.0.0 would be an exact (never matching) local address.
		fa.Addr = tcpip.Address{}
	}
	if terr := ep.Bind(fa); terr != nil {
		return fail("bind", terr)
	}
	for _, g := range opts.Groups {
		if terr := ep.SetSockOpt(&tcpip.AddMembershipOption{NIC: nic, MulticastAddr: Addr(g)}); terr != nil {
			return fail("join group "+g.String(), terr)
		}
	}
	return &UDP{Conn: gonet.NewUDPConn(&wq, ep), EP: ep}, nil
}

// ReadLoop reads datagrams from u and passes each to handle until a read
// fails. The buffer, of bufSize bytes, is reused: handle must be done with b
// when it returns. ReadLoop returns nil if closed is closed by the time the
// read fails (the owner shut down and closed u), the read error otherwise.
func (u *UDP) ReadLoop(bufSize int, closed <-chan struct{}, handle func(b []byte, from *net.UDPAddr)) error {
	buf := make([]byte, bufSize)
	for {
		n, from, err := u.Conn.ReadFrom(buf)
		if err != nil {
			select {
			case <-closed:
				return nil
			default:
				return err
			}
		}
		if ua, ok := from.(*net.UDPAddr); ok { // gonet always gives one
			handle(buf[:n], ua)
		}
	}
}

// CheckDomain accepts a DNS name of at most 253 characters whose labels are
// 1..63 characters (a trailing dot is allowed).
func CheckDomain(d string) error {
	d = strings.TrimSuffix(d, ".")
	if d == "" || len(d) > 253 {
		return fmt.Errorf("%q: not a valid domain name", d)
	}
	for _, l := range strings.Split(d, ".") {
		if l == "" || len(l) > 63 {
			return fmt.Errorf("%q: label %q must be 1..63 characters", d, l)
		}
	}
	return nil
}
