// Package netstacktest connects a vunet netstack to a simulated guest: a
// second gVisor stack on the other end of an in-memory Ethernet pipe. It is
// meant for tests in netstack, forward and the service packages.
package netstacktest

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/link/pipe"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/raw"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/vunet/vunet/netstack"
)

// Slirp-style addresses used by the test topology. Treat them as constants.
var (
	Gateway4 = netip.MustParsePrefix("10.0.2.2/24")
	DNS4     = netip.MustParseAddr("10.0.2.3")
	Guest4   = netip.MustParseAddr("10.0.2.15")
	Gateway6 = netip.MustParsePrefix("fd00::2/64")
	DNS6     = netip.MustParseAddr("fd00::3")
	Guest6   = netip.MustParseAddr("fd00::15")
)

// Link addresses of the two pipe ends.
const (
	HostMAC  = tcpip.LinkAddress("\x52\x55\x0a\x00\x02\x02")
	GuestMAC = tcpip.LinkAddress("\x52\x54\x00\x12\x34\x56")
)

// GuestNIC is the NIC id of the guest stack.
const GuestNIC tcpip.NICID = 1

// Pair is a vunet netstack wired to a guest stack.
type Pair struct {
	// Host is the vunet side under test.
	Host *netstack.Stack
	// Guest is the simulated guest.
	Guest *stack.Stack
}

// NewPair builds both stacks connected by an Ethernet pipe with the given
// MTU (0 means 1500) and registers their teardown with t.Cleanup.
func NewPair(tb testing.TB, mtu uint32) *Pair {
	tb.Helper()
	if mtu == 0 {
		mtu = 1500
	}
	hostLink, guestLink := pipe.New(HostMAC, GuestMAC, mtu)
	ns, err := netstack.New(netstack.Options{
		Endpoint: ethernet.New(hostLink),
		Gateway4: Gateway4,
		DNS4:     DNS4,
		Gateway6: Gateway6,
		DNS6:     DNS6,
	})
	if err != nil {
		tb.Fatalf("netstack.New: %v", err)
	}
	g, err := NewGuest(ethernet.New(guestLink))
	if err != nil {
		ns.Close()
		tb.Fatalf("guest stack: %v", err)
	}
	tb.Cleanup(func() {
		g.Destroy()
		ns.Close()
	})
	return &Pair{Host: ns, Guest: g}
}

// NewGuest builds a simulated guest stack (10.0.2.15/24, fd00::15/64, default
// routes via the gateways) on ep.
func NewGuest(ep stack.LinkEndpoint) (*stack.Stack, error) {
	s := stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocol, ipv6.NewProtocolWithOptions(ipv6.Options{}), arp.NewProtocol,
		},
		TransportProtocols: []stack.TransportProtocolFactory{
			tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6,
		},
		// Raw sockets, as a real guest has, let tests see ICMP it receives.
		RawFactory: raw.EndpointFactory{},
	})
	sack := tcpip.TCPSACKEnabled(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); err != nil {
		return nil, errorf("sack: %s", err)
	}
	buf := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: 4 << 20}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &buf); err != nil {
		return nil, errorf("rcvbuf: %s", err)
	}
	sbuf := tcpip.TCPSendBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: 4 << 20}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &sbuf); err != nil {
		return nil, errorf("sndbuf: %s", err)
	}
	if err := s.CreateNIC(GuestNIC, ep); err != nil {
		return nil, errorf("create NIC: %s", err)
	}
	for _, a := range []struct {
		addr netip.Addr
		bits int
	}{{Guest4, Gateway4.Bits()}, {Guest6, Gateway6.Bits()}} {
		proto := ipv4.ProtocolNumber
		if a.addr.Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddressWithPrefix{
			Address: tcpip.AddrFromSlice(a.addr.AsSlice()), PrefixLen: a.bits,
		}}
		if err := s.AddProtocolAddress(GuestNIC, pa, stack.AddressProperties{}); err != nil {
			return nil, errorf("add %s: %s", a.addr, err)
		}
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: subnet(Gateway4.Masked()), NIC: GuestNIC},
		{Destination: subnet(Gateway6.Masked()), NIC: GuestNIC},
		{Destination: header.IPv4EmptySubnet, Gateway: Addr(Gateway4.Addr()), NIC: GuestNIC},
		{Destination: header.IPv6EmptySubnet, Gateway: Addr(Gateway6.Addr()), NIC: GuestNIC},
	})
	return s, nil
}

func subnet(p netip.Prefix) tcpip.Subnet {
	sn, err := tcpip.NewSubnet(Addr(p.Addr()), tcpip.MaskFromBytes(netMask(p)))
	if err != nil {
		panic(err) // only reached with the constant prefixes above
	}
	return sn
}

func netMask(p netip.Prefix) []byte {
	m := make([]byte, p.Addr().BitLen()/8)
	for i := 0; i < p.Bits(); i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// Addr converts a netip address to a tcpip one.
func Addr(a netip.Addr) tcpip.Address { return tcpip.AddrFromSlice(a.Unmap().AsSlice()) }

// FullAddr converts a netip address and port to a tcpip.FullAddress on the
// guest NIC.
func FullAddr(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: GuestNIC, Addr: Addr(ap.Addr()), Port: ap.Port()}
}

// Proto returns the network protocol number for a.
func Proto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Unmap().Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}
