// Package ra makes the guest's IPv6 work without a DHCPv6 client: it sends
// ICMPv6 router advertisements on the guest link (periodically and in answer
// to router solicitations) carrying the SLAAC prefix (fd00::/64 by default),
// the MTU, the DNS server (RDNSS, fd00::3) and search list (DNSSL), with the
// O flag set (and the M flag when DHCPv6 is stateful); and it runs a DHCPv6
// server (see DHCPv6): stateless by default, for guests that ask for the
// same information over DHCPv6, or stateful, leasing addresses (IA_NA).
package ra

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vunet/vunet/services/internal/gnet"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Defaults, matching QEMU slirp's IPv6 configuration.
var (
	DefaultPrefix     = netip.MustParsePrefix("fd00::/64")
	DefaultDNS        = netip.MustParseAddr("fd00::3")
	DefaultRouterAddr = netip.MustParseAddr("fe80::2")
	allNodes          = netip.MustParseAddr("ff02::1")
)

const (
	// DefaultInterval is the period of unsolicited advertisements.
	DefaultInterval = 120 * time.Second
	// DefaultRouterLifetime is how long the guest keeps the default route
	// without hearing from us.
	DefaultRouterLifetime = 30 * time.Minute
	// minGap is RFC 4861's MIN_DELAY_BETWEEN_RAS: solicitations arriving
	// faster than this are coalesced into one advertisement.
	minGap = 3 * time.Second
)

// Options configures the router advertisement Server. Zero fields take the
// defaults noted.
type Options struct {
	// Stack and NIC are the gVisor stack and the guest-facing NIC. The NIC
	// must be in spoofing mode (vunet's is) so the stack answers neighbour
	// solicitations for RouterAddr. Answering router solicitations needs a
	// raw endpoint, i.e. the stack created with RawFactory set
	// (raw.EndpointFactory{}); without one only periodic advertisements
	// are sent.
	Stack *stack.Stack
	NIC   tcpip.NICID
	// Logger receives service logs; per-packet logs are at debug level.
	Logger *slog.Logger

	// Prefix is the SLAAC prefix (default fd00::/64); it must be a /64.
	Prefix netip.Prefix
	// RouterAddr is the link-local source of the advertisements, which
	// becomes the guest's default gateway (default fe80::2). Hosts ignore
	// advertisements from non-link-local sources.
	RouterAddr netip.Addr
	// DNS are advertised in RDNSS options (default [fd00::3]).
	DNS []netip.Addr
	// DomainSearch is advertised in a DNSSL option if non-empty.
	DomainSearch []string
	// MTU, if non-zero, is advertised in an MTU option (1280..65535).
	MTU int
	// Interval is the period of unsolicited advertisements
	// (default 120s; 4s..1800s).
	Interval time.Duration
	// RouterLifetime is the default route lifetime (default 30m, at most
	// 9000s).
	RouterLifetime time.Duration
	// Managed sets the M flag, telling guests to get an address over
	// stateful DHCPv6. Only set it if DHCPv6 runs with Stateful. The
	// prefix keeps its A flag, so guests without a DHCPv6 client still
	// configure a SLAAC address.
	Managed bool
}

// Stats are the server's counters, declared for the metrics registry
// (internal/metrics).
type Stats struct {
	Sent          atomic.Uint64 `metric:"ra_sent_total" help:"Router advertisements sent."`
	Solicitations atomic.Uint64 `metric:"ra_solicitations_total" help:"Router solicitations received."`
	SendErrors    atomic.Uint64 `metric:"ra_send_errors_total" help:"Router advertisements that could not be sent."`
}

// Server sends router advertisements. Create it with New, run it with Serve.
type Server struct {
	opts   Options
	log    *slog.Logger
	params raParams
	mac    tcpip.LinkAddress

	// ep is the raw ICMPv6 endpoint receiving solicitations, nil if the
	// stack has no raw factory.
	ep tcpip.Endpoint
	wq waiter.Queue

	mu     sync.Mutex
	lastRA time.Time
	minGap time.Duration // minGap, shortened by tests

	stats Stats

	closeOnce sync.Once
	closed    chan struct{}
}

// New validates opts, applies defaults and opens the endpoint.
func New(opts Options) (*Server, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, fmt.Errorf("ra: %w", err)
	}
	s := &Server{opts: opts, log: opts.Logger.With("service", "ra"), closed: make(chan struct{}), minGap: minGap}
	if opts.Stack == nil {
		return nil, errors.New("ra: no stack")
	}
	info, ok := opts.Stack.NICInfo()[opts.NIC]
	if !ok {
		return nil, fmt.Errorf("ra: no nic %d", opts.NIC)
	}
	s.mac = info.LinkAddress
	s.params = raParams{
		src:            opts.RouterAddr,
		srcMAC:         s.mac,
		prefix:         opts.Prefix,
		routerLifetime: opts.RouterLifetime,
		validLifetime:  24 * time.Hour,
		prefLifetime:   4 * time.Hour,
		mtu:            opts.MTU,
		dns:            opts.DNS,
		search:         opts.DomainSearch,
		// RFC 8106 5.1: at least MaxRtrAdvInterval, 3x recommended.
		dnsLifetime: 3 * opts.Interval,
		managed:     opts.Managed,
	}
	ep, terr := opts.Stack.NewRawEndpoint(header.ICMPv6ProtocolNumber, ipv6.ProtocolNumber, &s.wq, true)
	if terr != nil {
		if _, perm := terr.(*tcpip.ErrNotPermitted); !perm {
			return nil, fmt.Errorf("ra: open raw icmpv6 endpoint: %s", terr)
		}
		s.log.Warn("stack has no raw endpoint factory: sending periodic router advertisements only, not answering solicitations")
		return s, nil
	}
	if terr := ep.SocketOptions().SetBindToDevice(int32(opts.NIC)); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("ra: bind raw endpoint to nic %d: %s", opts.NIC, terr)
	}
	// Only router solicitations are of interest.
	var filter tcpip.ICMPv6Filter
	for i := range filter.DenyType {
		filter.DenyType[i] = ^uint32(0)
	}
	t := uint8(header.ICMPv6RouterSolicit)
	filter.DenyType[t/32] &^= 1 << (t % 32)
	if terr := ep.SetSockOpt(&filter); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("ra: set icmpv6 filter: %s", terr)
	}
	ep.SocketOptions().SetReceiveHopLimit(true)
	s.ep = ep
	return s, nil
}

func (o *Options) setDefaults() error {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if !o.Prefix.IsValid() {
		o.Prefix = DefaultPrefix
	}
	if !o.RouterAddr.IsValid() {
		o.RouterAddr = DefaultRouterAddr
	}
	if o.DNS == nil {
		o.DNS = []netip.Addr{DefaultDNS}
	}
	if o.Interval == 0 {
		o.Interval = DefaultInterval
	}
	if o.RouterLifetime == 0 {
		o.RouterLifetime = DefaultRouterLifetime
	}
	switch {
	case !o.Prefix.Addr().Is6() || o.Prefix.Addr().Is4In6() || o.Prefix.Bits() != 64:
		return fmt.Errorf("prefix %s: SLAAC needs an IPv6 /64", o.Prefix)
	case !o.RouterAddr.Is6() || !o.RouterAddr.IsLinkLocalUnicast():
		return fmt.Errorf("router address %s: want an IPv6 link-local address", o.RouterAddr)
	case o.MTU != 0 && (o.MTU < header.IPv6MinimumMTU || o.MTU > 65535):
		return fmt.Errorf("mtu %d: want %d..65535", o.MTU, header.IPv6MinimumMTU)
	case o.Interval < 4*time.Second || o.Interval > 1800*time.Second:
		return fmt.Errorf("interval %s: want 4s..30m (RFC 4861 MaxRtrAdvInterval)", o.Interval)
	case o.RouterLifetime < 0 || o.RouterLifetime > 9000*time.Second:
		return fmt.Errorf("router lifetime %s: want 0..9000s", o.RouterLifetime)
	case len(o.DNS) > 127:
		return fmt.Errorf("%d dns servers: too many for one RDNSS option", len(o.DNS))
	}
	for _, d := range o.DNS {
		if !d.Is6() || d.Is4In6() {
			return fmt.Errorf("dns server %s: want an IPv6 address", d)
		}
	}
	total := 8
	for _, d := range o.DomainSearch {
		if err := gnet.CheckDomain(d); err != nil {
			return fmt.Errorf("domain search: %w", err)
		}
		total += len(d) + 2
	}
	if total > 255*8 {
		return errors.New("domain search list too long for one DNSSL option")
	}
	return nil
}

// Serve sends advertisements until ctx is done or Close is called; it
// returns nil on such a shutdown.
func (s *Server) Serve(ctx context.Context) error {
	s.log.Info("router advertisements on", "nic", s.opts.NIC, "prefix", s.opts.Prefix, "router", s.opts.RouterAddr,
		"dns", s.opts.DNS, "interval", s.opts.Interval, "solicitations", s.ep != nil)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	solicited := make(chan struct{}, 1)
	readDone := make(chan error, 1)
	if s.ep != nil {
		go func() { readDone <- s.readLoop(solicited) }()
	} else {
		readDone <- nil
	}

	// A burst at start (RFC 4861 6.2.4 sends up to 3 initial
	// advertisements more often) helps guests that booted before us.
	initial := 3
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			s.Close()
			return <-readDone
		case <-s.closed:
			return <-readDone
		case <-timer.C:
			s.send("periodic")
			next := s.opts.Interval
			if initial > 0 {
				initial--
				next = min(next, 16*time.Second)
			}
			timer.Reset(next)
		case <-solicited:
			s.mu.Lock()
			wait := s.minGap - time.Since(s.lastRA)
			s.mu.Unlock()
			if wait > 0 {
				// Coalesce: the periodic timer is pulled in instead.
				timer.Reset(wait)
				continue
			}
			s.send("solicited")
		}
	}
}

// send multicasts one advertisement to all nodes. The IPv6 packet is built
// here and handed to the NIC directly: this needs neither a raw endpoint nor
// the router's link-local address to be assigned on the NIC.
func (s *Server) send(why string) {
	pkt := ipv6Packet(s.opts.RouterAddr, allNodes, buildRA(&s.params))
	dst := header.EthernetAddressFromMulticastIPv6Address(tcpip.AddrFrom16(allNodes.As16()))
	if terr := s.opts.Stack.WritePacketToRemote(s.opts.NIC, dst, ipv6.ProtocolNumber, buffer.MakeWithData(pkt)); terr != nil {
		s.stats.SendErrors.Add(1)
		s.log.Warn("ra: send router advertisement", "err", terr)
		return
	}
	s.mu.Lock()
	s.lastRA = time.Now()
	s.mu.Unlock()
	s.stats.Sent.Add(1)
	s.log.Debug("ra: sent router advertisement", "why", why)
}

// readLoop waits for router solicitations and signals solicited.
func (s *Server) readLoop(solicited chan<- struct{}) error {
	we, ch := waiter.NewChannelEntry(waiter.EventIn)
	s.wq.EventRegister(&we)
	defer s.wq.EventUnregister(&we)
	var buf bytes.Buffer
	for {
		buf.Reset()
		res, terr := s.ep.Read(&buf, tcpip.ReadOptions{NeedRemoteAddr: true})
		if _, ok := terr.(*tcpip.ErrWouldBlock); ok {
			select {
			case <-ch:
				continue
			case <-s.closed:
				return nil
			}
		}
		if terr != nil {
			select {
			case <-s.closed:
				return nil
			default:
				return fmt.Errorf("ra: read: %s", terr)
			}
		}
		if !validRS(buf.Bytes(), res) {
			s.log.Debug("ra: ignoring invalid router solicitation", "from", res.RemoteAddr.Addr)
			continue
		}
		s.stats.Solicitations.Add(1)
		s.log.Debug("ra: router solicitation", "from", res.RemoteAddr.Addr)
		select {
		case solicited <- struct{}{}:
		default:
		}
	}
}

// validRS applies RFC 4861 6.1.1's checks that matter for deciding to
// answer: type, code, length and hop limit 255 (proof it is on-link).
func validRS(b []byte, res tcpip.ReadResult) bool {
	if len(b) < header.ICMPv6HeaderSize+header.NDPRSMinimumSize {
		return false
	}
	if b[0] != byte(header.ICMPv6RouterSolicit) || b[1] != 0 {
		return false
	}
	cm := res.ControlMessages
	return !cm.HasHopLimit || cm.HopLimit == header.NDPHopLimit
}

// Close stops the server; it is safe to call more than once.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		close(s.closed)
		if s.ep != nil {
			s.ep.Close()
		}
	})
}

// Stats returns the live counters.
func (s *Server) Stats() *Stats { return &s.stats }
