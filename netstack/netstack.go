// Package netstack builds the gVisor TCP/IP stack that terminates the guest's
// Ethernet link inside vunet.
//
// The stack owns exactly one NIC. That NIC is put in promiscuous and spoofing
// mode so that any destination the guest chooses is accepted locally (the NAT
// layer in package forward then splices it to a host socket) and so that
// replies can carry that original destination as their source address.
//
// Nothing in here has defaults: the slirp-compatible addresses live in the
// caller's configuration and are passed in explicitly through Options.
package netstack

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/raw"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// TCP buffer sizes. Endpoints start at InitialTCPBuffer per direction;
// whoever owns them (the NAT's splices) sets their sizes explicitly from the
// memory budget, which also turns gVisor's own buffer auto-tuning off, so
// gVisor never grows a buffer nobody accounted. The window scale of a
// handshake is still derived from the maximum (gVisor does so while
// auto-tuning is on), so a grown buffer can be used in full.
const (
	// InitialTCPBuffer is the send and receive buffer a new endpoint has;
	// it also bounds the window offered in a SYN-ACK.
	InitialTCPBuffer = 16 << 10
	// DefaultTCPBuffer is the default maximum: enough window for a fast
	// local pipe.
	DefaultTCPBuffer = 4 << 20
	// TimeWait is how long an endpoint that closed first stays in
	// TIME_WAIT (gVisor's default, like Linux's, is 60 s). On the link
	// to the guest, a memory copy that neither reorders nor duplicates,
	// TIME_WAIT has one job left: to answer a FIN the guest sends again
	// because our last ACK was lost (dropped by a full RX backlog) with
	// an ACK instead of a RST. The guest resends after its retransmission
	// timeout (at least 200 ms on Linux, doubling), so 2 s covers three
	// resends; past it the guest's socket, closed by its application
	// already, gets a RST, which nothing sees. Every endpoint in
	// TIME_WAIT is a whole gVisor endpoint that no limit counts (a guest
	// whose peers close first holds one per connection for the whole
	// interval, 10 000 of them after 10 000 closed together): 2 s instead
	// of 60 s keeps that 30 times smaller. (passt keeps no TIME_WAIT at
	// all; the host kernel keeps its own for the host sockets.) The port
	// reuse option (TCPTimeWaitReuseOption) stays at gVisor's default: it
	// only concerns connections our stack opens (port forwards to the
	// guest), whose ports a 2 s TIME_WAIT holds only briefly.
	TimeWait = 2 * time.Second
)

// NICID is the identifier of the single NIC created by New.
const NICID tcpip.NICID = 1

// Options configures New. Every field that names an address is explicit: a
// zero (invalid) value disables that address, and a zero Gateway disables the
// whole address family.
type Options struct {
	// Endpoint is the link endpoint carrying the guest's frames. In
	// production it is an Ethernet endpoint that requires link address
	// resolution, so ARP and NDP run over it.
	Endpoint stack.LinkEndpoint

	// Gateway4 is the IPv4 gateway address and on-link prefix, e.g.
	// 10.0.2.2/24. The prefix length is also used for DNS4.
	Gateway4 netip.Prefix
	// DNS4 is the IPv4 address of the in-stack DNS service, e.g. 10.0.2.3.
	DNS4 netip.Addr

	// Gateway6 is the IPv6 gateway address and on-link prefix, e.g.
	// fd00::2/64. The prefix length is also used for DNS6.
	Gateway6 netip.Prefix
	// DNS6 is the IPv6 address of the in-stack DNS service, e.g. fd00::3.
	DNS6 netip.Addr

	// TCPBuffer bounds the TCP send and receive buffers (bytes). Zero means
	// DefaultTCPBuffer.
	TCPBuffer int

	// Logger receives stack-level messages. Nil means slog.Default().
	Logger *slog.Logger
}

// Stack is a configured gVisor stack with its single guest-facing NIC.
type Stack struct {
	s    *stack.Stack
	opts Options
	log  *slog.Logger
	// link wraps opts.Endpoint for RestoreTCP (tcpmove.go).
	link *moveLink

	closeOnce sync.Once
}

// New builds the stack: IPv4, IPv6, ARP, ICMPv4/v6, TCP and UDP, one NIC on
// opts.Endpoint (promiscuous and spoofing), the gateway and DNS addresses and
// default routes for both families pointing at the NIC.
func New(opts Options) (*Stack, error) {
	if opts.Endpoint == nil {
		return nil, errors.New("netstack: Options.Endpoint is nil")
	}
	if err := validateFamily(opts.Gateway4, opts.DNS4, false); err != nil {
		return nil, err
	}
	if err := validateFamily(opts.Gateway6, opts.DNS6, true); err != nil {
		return nil, err
	}
	if !opts.Gateway4.IsValid() && !opts.Gateway6.IsValid() {
		return nil, errors.New("netstack: neither Gateway4 nor Gateway6 is set")
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}

	s := stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocol,
			// DAD is disabled (zero DADConfigs): our addresses are
			// authoritative on a point-to-point link with one guest, and
			// waiting for DAD would only delay the first IPv6 packets.
			ipv6.NewProtocolWithOptions(ipv6.Options{}),
			arp.NewProtocol,
		},
		TransportProtocols: []stack.TransportProtocolFactory{
			tcp.NewProtocol,
			udp.NewProtocol,
			icmp.NewProtocol4,
			icmp.NewProtocol6,
		},
		// HandleLocal would loop packets between our own addresses inside
		// the stack; every packet here comes from or goes to the guest.
		HandleLocal: false,
		// Raw endpoints let the router-advertisement service see router
		// solicitations, which the IPv6 layer would otherwise consume.
		RawFactory: raw.EndpointFactory{},
		// Timer functions run on a bounded set of goroutines (clock.go).
		Clock: newTimerClock(),
	})
	ns := &Stack{s: s, opts: opts, log: log, link: newMoveLink(opts.Endpoint)}
	if err := ns.configure(); err != nil {
		s.Destroy()
		return nil, err
	}
	return ns, nil
}

// validateFamily checks that gw and dns belong to the expected family.
func validateFamily(gw netip.Prefix, dns netip.Addr, v6 bool) error {
	fam := "4"
	if v6 {
		fam = "6"
	}
	if gw.IsValid() && gw.Addr().Is6() != v6 {
		return fmt.Errorf("netstack: Gateway%s %s has the wrong address family", fam, gw)
	}
	if gw.IsValid() && gw.Addr().Is4In6() {
		return fmt.Errorf("netstack: Gateway%s %s is a v4-mapped address", fam, gw)
	}
	if dns.IsValid() {
		if !gw.IsValid() {
			return fmt.Errorf("netstack: DNS%s %s set without Gateway%s", fam, dns, fam)
		}
		if dns.Is6() != v6 || dns.Is4In6() {
			return fmt.Errorf("netstack: DNS%s %s has the wrong address family", fam, dns)
		}
		if dns == gw.Addr() {
			return fmt.Errorf("netstack: DNS%s equals Gateway%s (%s)", fam, fam, dns)
		}
	}
	return nil
}

func (ns *Stack) configure() error {
	s := ns.s
	if err := ns.setTCPOptions(); err != nil {
		return err
	}
	if err := s.CreateNICWithOptions(NICID, ns.link, stack.NICOptions{Name: "guest0"}); err != nil {
		return fmt.Errorf("netstack: create NIC: %s", err)
	}
	// Promiscuous: accept packets for any destination (the NAT forwards
	// them). Spoofing: allow endpoints and routes to use any of those
	// destinations as their source, so replies and inbound port-forwarded
	// connections carry the address the guest expects.
	if err := s.SetPromiscuousMode(NICID, true); err != nil {
		return fmt.Errorf("netstack: promiscuous mode: %s", err)
	}
	if err := s.SetSpoofing(NICID, true); err != nil {
		return fmt.Errorf("netstack: spoofing: %s", err)
	}

	var routes []tcpip.Route
	type fam struct {
		gw    netip.Prefix
		dns   netip.Addr
		proto tcpip.NetworkProtocolNumber
		def   tcpip.Subnet
	}
	for _, f := range []fam{
		{ns.opts.Gateway4, ns.opts.DNS4, ipv4.ProtocolNumber, header.IPv4EmptySubnet},
		{ns.opts.Gateway6, ns.opts.DNS6, ipv6.ProtocolNumber, header.IPv6EmptySubnet},
	} {
		if !f.gw.IsValid() {
			continue
		}
		addrs := []netip.Addr{f.gw.Addr()}
		if f.dns.IsValid() {
			addrs = append(addrs, f.dns)
		}
		for _, a := range addrs {
			pa := tcpip.ProtocolAddress{
				Protocol: f.proto,
				AddressWithPrefix: tcpip.AddressWithPrefix{
					Address:   tcpip.AddrFromSlice(a.AsSlice()),
					PrefixLen: f.gw.Bits(),
				},
			}
			if err := s.AddProtocolAddress(NICID, pa, stack.AddressProperties{}); err != nil {
				return fmt.Errorf("netstack: add address %s: %s", a, err)
			}
		}
		routes = append(routes, tcpip.Route{Destination: f.def, NIC: NICID})
	}
	s.SetRouteTable(routes)
	return nil
}

func (ns *Stack) setTCPOptions() error {
	buf := ns.opts.TCPBuffer
	if buf <= 0 {
		buf = DefaultTCPBuffer
	}
	opts := []tcpip.SettableTransportProtocolOption{
		// SACK matters on a lossy guest virtio queue more than anywhere.
		ptr(tcpip.TCPSACKEnabled(true)),
		// Small initial buffers, a large maximum: with moderation on at
		// handshake time gVisor scales the window for the maximum, and
		// nothing is committed to a connection until it moves data.
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: 4096, Default: InitialTCPBuffer, Max: buf},
		&tcpip.TCPSendBufferSizeRangeOption{Min: 4096, Default: InitialTCPBuffer, Max: buf},
		ptr(tcpip.TCPModerateReceiveBufferOption(true)),
		// No RACK, and with it no tail loss probes: gVisor's probe
		// timeout is twice the smoothed RTT with no floor, and a guest
		// whose ACKs stall for a few milliseconds (an emulated vCPU, a
		// busy host) had every such stall answered with a spurious
		// retransmission of a full segment (about 180 per 10 s download
		// at MTU 65520, each one a duplicate the guest discards). The
		// link to the guest is a memory copy that neither reorders nor
		// loses anything except what our own RX backlog drops, and
		// those are counted; classic SACK recovery (three duplicate
		// ACKs, then the 200 ms minimum RTO) covers them.
		ptr(tcpip.TCPRecovery(0)),
		ptr(tcpip.TCPTimeWaitTimeoutOption(TimeWait)),
	}
	for _, o := range opts {
		if err := ns.s.SetTransportProtocolOption(tcp.ProtocolNumber, o); err != nil {
			return fmt.Errorf("netstack: set TCP option %T: %s", o, err)
		}
	}
	return nil
}

func ptr[T any](v T) *T { return &v }

// Stack returns the underlying gVisor stack, for the NAT and service layers.
func (ns *Stack) Stack() *stack.Stack { return ns.s }

// NIC returns the id of the guest-facing NIC.
func (ns *Stack) NIC() tcpip.NICID { return NICID }

// Gateway4 returns the configured IPv4 gateway prefix (invalid if disabled).
func (ns *Stack) Gateway4() netip.Prefix { return ns.opts.Gateway4 }

// Gateway6 returns the configured IPv6 gateway prefix (invalid if disabled).
func (ns *Stack) Gateway6() netip.Prefix { return ns.opts.Gateway6 }

// DNS4 returns the configured IPv4 DNS address (invalid if disabled).
func (ns *Stack) DNS4() netip.Addr { return ns.opts.DNS4 }

// DNS6 returns the configured IPv6 DNS address (invalid if disabled).
func (ns *Stack) DNS6() netip.Addr { return ns.opts.DNS6 }

// Close aborts every endpoint, removes the NIC (closing the link endpoint)
// and waits for the stack's goroutines. It is safe to call more than once.
func (ns *Stack) Close() {
	ns.closeOnce.Do(func() {
		ns.s.Destroy()
	})
}
