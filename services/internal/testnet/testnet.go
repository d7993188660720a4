// Package testnet builds a pair of gVisor stacks joined by an in-memory
// Ethernet link, for the services' tests: one "appliance" side configured the
// way vunet configures its stack (promiscuous, spoofing, gateway and DNS
// addresses assigned) and one bare "guest" side; and the logger, Serve
// goroutine and polling the service tests share.
package testnet

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

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
)

// NIC is the NIC id used on both stacks.
const NIC tcpip.NICID = 1

// MTU of the in-memory link.
const MTU = 1500

// Link addresses of the two sides.
var (
	ServerMAC = tcpip.LinkAddress("\x52\x55\x0a\x00\x02\x02")
	GuestMAC  = tcpip.LinkAddress("\x52\x54\x00\x12\x34\x56")
)

// Default vunet addresses assigned on the server NIC.
var (
	Gateway4 = netip.MustParseAddr("10.0.2.2")
	DNS4     = netip.MustParseAddr("10.0.2.3")
	Gateway6 = netip.MustParseAddr("fd00::2")
	DNS6     = netip.MustParseAddr("fd00::3")
)

// GuestOptions tunes the guest stack.
type GuestOptions struct {
	// IPv6 is passed to the guest's IPv6 protocol (SLAAC, RA handling...).
	IPv6 ipv6.Options
}

// Pair is a server stack and a guest stack on one link.
type Pair struct {
	Server *stack.Stack
	Guest  *stack.Stack
}

// New builds the pair and registers cleanup with t.
func New(t testing.TB, gopts GuestOptions) *Pair {
	t.Helper()
	a, b := pipe.New(ServerMAC, GuestMAC, MTU)

	srv := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{udp.NewProtocol, tcp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
		RawFactory:         raw.EndpointFactory{},
	})
	if err := srv.CreateNIC(NIC, ethernet.New(a)); err != nil {
		t.Fatalf("server CreateNIC: %v", err)
	}
	must(t, srv.SetPromiscuousMode(NIC, true))
	must(t, srv.SetSpoofing(NIC, true))
	for _, ap := range []struct {
		a    netip.Addr
		bits int
	}{{Gateway4, 24}, {DNS4, 24}, {Gateway6, 64}, {DNS6, 64}} {
		proto := ipv4.ProtocolNumber
		if ap.a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddressWithPrefix{
			Address: tcpip.AddrFromSlice(ap.a.AsSlice()), PrefixLen: ap.bits,
		}}
		must(t, srv.AddProtocolAddress(NIC, pa, stack.AddressProperties{}))
	}
	srv.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: NIC},
		{Destination: header.IPv6EmptySubnet, NIC: NIC},
	})

	guest := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocolWithOptions(gopts.IPv6), arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{udp.NewProtocol, tcp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
		RawFactory:         raw.EndpointFactory{},
	})
	if err := guest.CreateNIC(NIC, ethernet.New(b)); err != nil {
		t.Fatalf("guest CreateNIC: %v", err)
	}
	t.Cleanup(func() {
		srv.Close()
		guest.Close()
		srv.Wait()
		guest.Wait()
	})
	return &Pair{Server: srv, Guest: guest}
}

// ConfigureGuest assigns addr/bits to the guest NIC and routes everything of
// that family through the link, as a DHCP or SLAAC client would.
func (p *Pair) ConfigureGuest(t testing.TB, addr netip.Prefix) {
	t.Helper()
	proto := ipv4.ProtocolNumber
	if addr.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddressWithPrefix{
		Address: tcpip.AddrFromSlice(addr.Addr().AsSlice()), PrefixLen: addr.Bits(),
	}}
	must(t, p.Guest.AddProtocolAddress(NIC, pa, stack.AddressProperties{}))
	dst := header.IPv4EmptySubnet
	if addr.Addr().Is6() {
		dst = header.IPv6EmptySubnet
	}
	p.Guest.AddRoute(tcpip.Route{Destination: dst, NIC: NIC})
}

// FullAddr converts an AddrPort to a gVisor address on NIC.
func FullAddr(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: NIC, Addr: tcpip.AddrFromSlice(ap.Addr().AsSlice()), Port: ap.Port()}
}

// Logger returns a logger for a service under test: debug output through
// t.Log with -v, discarded otherwise.
func Logger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// Serve runs srv.Serve in a goroutine until the test ends; the cleanup
// cancels its context, waits for it to return and reports any error.
func Serve(t testing.TB, srv interface{ Serve(context.Context) error }) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
}

// WaitFor polls cond every 10ms and fails the test if it is still false
// after 5s.
func WaitFor(t testing.TB, cond func() bool) {
	t.Helper()
	for range 500 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not met in time")
}

func must(t testing.TB, err tcpip.Error) {
	t.Helper()
	if err != nil {
		t.Fatalf("stack setup: %v", err)
	}
}
