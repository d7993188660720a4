// Package dns is vunet's DNS forwarder. It listens on the DNS address of the
// guest link (10.0.2.3 and fd00::3 by default, UDP and TCP port 53), answers
// a few static names itself (such as host.vunet.internal) and forwards every
// other query, byte for byte, to the host's resolvers over ordinary host
// sockets.
package dns

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/services/internal/gnet"
	"github.com/vunet/vunet/services/names"
)

// Port is the DNS port.
const Port = 53

// Defaults.
var (
	DefaultListen = []netip.Addr{netip.MustParseAddr("10.0.2.3"), netip.MustParseAddr("fd00::3")}
)

// Default limits and timeouts.
const (
	DefaultTimeout     = 2 * time.Second
	DefaultStaticTTL   = 60 * time.Second
	DefaultMaxInFlight = 256
	DefaultMaxTCPConns = 64
	// tcpIdleTimeout closes guest TCP connections with no query for this
	// long (RFC 7766 suggests on the order of seconds).
	tcpIdleTimeout = 10 * time.Second
	// maxUDPRead is the largest query read from the guest or response read
	// from an upstream over UDP.
	maxUDPRead = 65535
)

// Options configures a Server. Zero fields take the defaults noted.
type Options struct {
	// Stack and NIC are the gVisor stack and the guest-facing NIC; the Listen
	// addresses must be assigned on it (the caller does that).
	Stack *stack.Stack
	NIC   tcpip.NICID
	// Logger receives service logs; per-query logs are at debug level.
	// Defaults to slog.Default().
	Logger *slog.Logger

	// Listen are the addresses served, UDP and TCP port 53
	// (default 10.0.2.3 and fd00::3).
	Listen []netip.Addr
	// Upstreams are the host resolvers, tried in order. With none, only
	// static names are answered and everything else gets SERVFAIL.
	Upstreams []netip.AddrPort
	// Static maps names to addresses answered locally (A and AAAA, PTR for
	// the reverse names). Names are case-insensitive, trailing dot optional.
	Static map[string][]netip.Addr
	// StaticTTL is the TTL of static answers (default 60s).
	StaticTTL time.Duration
	// StaticDenied, if set, reports static addresses the guest may not
	// reach (the egress policy's AddrDenied). They are left out of static
	// answers, so vunet never hands the guest an address it would then
	// refuse; a name left with no address gets NODATA. Asked per query, so
	// a policy that changes (host addresses) is followed. Upstream answers
	// are not filtered: they are the resolver's, not vunet's.
	StaticDenied func(netip.Addr) bool
	// Timeout is the time allowed for one upstream attempt (default 2s).
	Timeout time.Duration
	// Attempts is the number of upstream attempts per query, rotating
	// through Upstreams (default: one per upstream, at least 2).
	Attempts int
	// MaxInFlight bounds the queries being forwarded at once; UDP queries
	// beyond it are answered SERVFAIL at once (default 256).
	MaxInFlight int
	// MaxTCPConns bounds concurrent guest TCP connections (default 64).
	MaxTCPConns int
	// Zone, if set, is a domain the server owns (vunet.internal, see
	// services/names): its names come from Static and Guests, and any other
	// name under it gets NXDOMAIN instead of being forwarded, so a guest's
	// name never leaks to (or is answered by) the host's resolvers.
	Zone string
	// Guests, if set, resolves the guests' names: LABEL.Zone (A, AAAA) and
	// the reverse names of their addresses (PTR).
	Guests GuestNames
}

// GuestNames looks guests up by name and address (a *names.Registry).
type GuestNames interface {
	Lookup(label string) (names.Guest, bool)
	LookupAddr(a netip.Addr) (names.Guest, bool)
}

// guestTTL is the TTL of guest-name answers. Like dnsmasq's answers from
// its DHCP leases (local-ttl, default 0) it is zero: a guest's name follows
// its lease, and a released name must not linger in resolver caches.
const guestTTL = 0

// Stats are the server's counters, declared for the metrics registry
// (internal/metrics).
type Stats struct {
	UDPQueries     atomic.Uint64 `metric:"dns_queries_total{transport=udp}" help:"DNS queries received, by transport."`
	TCPQueries     atomic.Uint64 `metric:"dns_queries_total{transport=tcp}"`
	Static         atomic.Uint64 `metric:"dns_answers_total{source=static}" help:"DNS answers, by source."`
	Forwarded      atomic.Uint64 `metric:"dns_answers_total{source=upstream}"`
	Guests         atomic.Uint64 `metric:"dns_answers_total{source=guests}"`
	StaticDenied   atomic.Uint64 `metric:"dns_static_denied_total" help:"Static addresses left out of DNS answers because the egress policy denies them."`
	UpstreamErrors atomic.Uint64 `metric:"dns_upstream_errors_total" help:"Failed upstream attempts, including timeouts."`
	Timeouts       atomic.Uint64 `metric:"dns_upstream_timeouts_total" help:"Upstream attempts that timed out."`
	TCPFallbacks   atomic.Uint64 `metric:"dns_tcp_fallbacks_total" help:"Truncated upstream UDP answers retried over TCP."`
	Truncated      atomic.Uint64 `metric:"dns_truncated_total" help:"Answers truncated to fit the guest's UDP size."`
	ServFail       atomic.Uint64 `metric:"dns_servfail_total" help:"SERVFAIL answers generated by vunet."`
	Overloaded     atomic.Uint64 `metric:"dns_overloaded_total" help:"Queries refused because MaxInFlight were in flight."`
	Malformed      atomic.Uint64 `metric:"dns_malformed_total" help:"Malformed DNS queries." hostile:"dns"`
}

// Server is a DNS forwarder. Create it with New, run it with Serve.
type Server struct {
	opts    Options
	log     *slog.Logger
	static  *staticTable
	sem     chan struct{} // in-flight forwarded queries
	tcpSem  chan struct{} // guest TCP connections
	dialer  net.Dialer
	stats   Stats
	udp     []*gnet.UDP
	tcp     []*gonet.TCPListener
	wg      sync.WaitGroup
	closed  chan struct{}
	closeMu sync.Once
	connsMu sync.Mutex
	conns   map[net.Conn]struct{}
}

// New validates opts, applies defaults and binds the listeners (if opts.Stack
// is set).
func New(opts Options) (*Server, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Listen == nil {
		opts.Listen = DefaultListen
	}
	if opts.StaticTTL == 0 {
		opts.StaticTTL = DefaultStaticTTL
	}
	if opts.Timeout == 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.Attempts == 0 {
		opts.Attempts = max(len(opts.Upstreams), 2)
	}
	if opts.MaxInFlight == 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MaxTCPConns == 0 {
		opts.MaxTCPConns = DefaultMaxTCPConns
	}
	switch {
	case opts.Timeout < 0 || opts.Timeout > time.Minute:
		return nil, fmt.Errorf("dns: timeout %s: want 0..1m", opts.Timeout)
	case opts.Attempts < 1 || opts.Attempts > 16:
		return nil, fmt.Errorf("dns: attempts %d: want 1..16", opts.Attempts)
	case opts.MaxInFlight < 1:
		return nil, fmt.Errorf("dns: max in-flight %d: want at least 1", opts.MaxInFlight)
	case opts.MaxTCPConns < 1:
		return nil, fmt.Errorf("dns: max tcp connections %d: want at least 1", opts.MaxTCPConns)
	case opts.StaticTTL < time.Second || opts.StaticTTL > 24*time.Hour:
		return nil, fmt.Errorf("dns: static ttl %s: want 1s..24h", opts.StaticTTL)
	}
	for _, a := range opts.Listen {
		if !a.IsValid() || a.IsUnspecified() {
			return nil, fmt.Errorf("dns: listen address %v: want a specific address", a)
		}
	}
	for _, u := range opts.Upstreams {
		if !u.IsValid() || u.Port() == 0 || u.Addr().IsUnspecified() {
			return nil, fmt.Errorf("dns: upstream %v: want address:port", u)
		}
	}
	st, err := newStaticTable(opts.Static, opts.StaticDenied)
	if err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	if opts.Zone != "" {
		if _, ok := mdns.IsDomainName(opts.Zone); !ok || mdns.CountLabel(opts.Zone) == 0 {
			return nil, fmt.Errorf("dns: zone %q is not a valid domain name", opts.Zone)
		}
		opts.Zone = mdns.CanonicalName(opts.Zone)
	} else if opts.Guests != nil {
		return nil, errors.New("dns: guest names need a zone")
	}
	s := &Server{
		opts:   opts,
		log:    opts.Logger.With("service", "dns"),
		static: st,
		sem:    make(chan struct{}, opts.MaxInFlight),
		tcpSem: make(chan struct{}, opts.MaxTCPConns),
		closed: make(chan struct{}),
		conns:  make(map[net.Conn]struct{}),
	}
	if opts.Stack == nil {
		return s, nil
	}
	for _, a := range opts.Listen {
		ap := netip.AddrPortFrom(a, Port)
		u, err := gnet.ListenUDP(opts.Stack, opts.NIC, gnet.Proto(a), ap, gnet.UDPOptions{})
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("dns: %w", err)
		}
		s.udp = append(s.udp, u)
		l, err := gonet.ListenTCP(opts.Stack, gnet.FullAddr(opts.NIC, ap), gnet.Proto(a))
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("dns: listen tcp %s: %w", ap, err)
		}
		s.tcp = append(s.tcp, l)
	}
	return s, nil
}

// Serve answers queries until ctx is done or Close is called; it returns nil
// on such a shutdown.
func (s *Server) Serve(ctx context.Context) error {
	if s.opts.Stack == nil {
		return errors.New("dns: server has no stack")
	}
	s.log.Info("dns forwarder listening", "addrs", s.opts.Listen, "upstreams", s.opts.Upstreams, "static", len(s.opts.Static))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-ctx.Done():
		case <-s.closed:
		}
		s.Close()
	}()
	errc := make(chan error, len(s.udp)+len(s.tcp))
	for _, u := range s.udp {
		go func() { errc <- s.serveUDP(ctx, u) }()
	}
	for _, l := range s.tcp {
		go func() { errc <- s.serveTCP(ctx, l) }()
	}
	var errs []error
	for range len(s.udp) + len(s.tcp) {
		errs = append(errs, <-errc)
	}
	s.wg.Wait()
	select {
	case <-s.closed:
		return nil
	default:
		return errors.Join(errs...)
	}
}

// Close stops the server; it is safe to call more than once.
func (s *Server) Close() {
	s.closeMu.Do(func() {
		close(s.closed)
		for _, u := range s.udp {
			u.Conn.Close()
		}
		for _, l := range s.tcp {
			l.Close()
		}
		s.connsMu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.connsMu.Unlock()
	})
}

func (s *Server) isClosed() bool {
	select {
	case <-s.closed:
		return true
	default:
		return false
	}
}

// Stats returns the live counters.
func (s *Server) Stats() *Stats { return &s.stats }

func (s *Server) serveUDP(ctx context.Context, u *gnet.UDP) error {
	err := u.ReadLoop(maxUDPRead, s.closed, func(b []byte, from *net.UDPAddr) {
		s.stats.UDPQueries.Add(1)
		q := append([]byte(nil), b...)
		select {
		case s.sem <- struct{}{}:
		default:
			// Answer at once rather than queueing: the guest's resolver
			// retries, and a backlog would only add latency.
			s.stats.Overloaded.Add(1)
			if r := s.errorReply(q, mdns.RcodeServerFailure); r != nil {
				u.Conn.WriteTo(r, from)
			}
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-s.sem }()
			resp := s.answer(ctx, q, false)
			if resp == nil {
				return
			}
			if _, err := u.Conn.WriteTo(resp, from); err != nil && !s.isClosed() {
				s.log.Debug("dns: write udp reply", "to", from, "err", err)
			}
		}()
	})
	if err != nil {
		return fmt.Errorf("dns: read udp: %w", err)
	}
	return nil
}

func (s *Server) serveTCP(ctx context.Context, l *gonet.TCPListener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			return fmt.Errorf("dns: accept: %w", err)
		}
		select {
		case s.tcpSem <- struct{}{}:
		default:
			s.stats.Overloaded.Add(1)
			c.Close()
			continue
		}
		s.connsMu.Lock()
		if s.isClosed() {
			s.connsMu.Unlock()
			c.Close()
			<-s.tcpSem
			continue
		}
		s.conns[c] = struct{}{}
		s.connsMu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.connsMu.Lock()
				delete(s.conns, c)
				s.connsMu.Unlock()
				c.Close()
				<-s.tcpSem
			}()
			s.serveTCPConn(ctx, c)
		}()
	}
}

// serveTCPConn answers length-prefixed queries on c one at a time until the
// guest closes it or it idles.
func (s *Server) serveTCPConn(ctx context.Context, c net.Conn) {
	for {
		c.SetReadDeadline(time.Now().Add(tcpIdleTimeout))
		q, err := readTCPMsg(c)
		if err != nil {
			return
		}
		s.stats.TCPQueries.Add(1)
		var resp []byte
		select {
		case s.sem <- struct{}{}:
			resp = s.answer(ctx, q, true)
			<-s.sem
		case <-ctx.Done():
			return
		}
		if resp == nil {
			return
		}
		c.SetWriteDeadline(time.Now().Add(tcpIdleTimeout))
		if err := writeTCPMsg(c, resp); err != nil {
			return
		}
	}
}

// answer returns the wire response to the wire query q, or nil to drop it.
func (s *Server) answer(ctx context.Context, q []byte, tcp bool) []byte {
	req := new(mdns.Msg)
	if err := req.Unpack(q); err != nil {
		s.stats.Malformed.Add(1)
		s.log.Debug("dns: malformed query", "err", err)
		return s.errorReply(q, mdns.RcodeFormatError)
	}
	if req.Response {
		s.stats.Malformed.Add(1)
		return nil // never answer answers (loops)
	}
	if req.Opcode != mdns.OpcodeQuery {
		return s.errorReply(q, mdns.RcodeNotImplemented)
	}
	if len(req.Question) != 1 {
		s.stats.Malformed.Add(1)
		return s.errorReply(q, mdns.RcodeFormatError)
	}
	qq := req.Question[0]
	log := s.log.With("name", qq.Name, "type", mdns.TypeToString[qq.Qtype], "tcp", tcp)

	if resp := s.static.answer(req, uint32(s.opts.StaticTTL/time.Second), &s.stats.StaticDenied); resp != nil {
		s.stats.Static.Add(1)
		log.Debug("dns: static answer", "rcode", mdns.RcodeToString[resp.Rcode], "answers", len(resp.Answer))
		return s.fit(resp, req, tcp)
	}
	if resp := s.zoneAnswer(req); resp != nil {
		s.stats.Guests.Add(1)
		log.Debug("dns: guest-name answer", "rcode", mdns.RcodeToString[resp.Rcode], "answers", len(resp.Answer))
		return s.fit(resp, req, tcp)
	}

	raw, err := s.forward(ctx, q, req.Id)
	if err != nil {
		log.Debug("dns: forward failed", "err", err)
		return s.errorReply(q, mdns.RcodeServerFailure)
	}
	s.stats.Forwarded.Add(1)
	if tcp || len(raw) <= guestUDPSize(req) {
		return raw // unchanged
	}
	// The upstream answered (over TCP) with more than the guest can take
	// over UDP: truncate properly so it retries over TCP.
	resp := new(mdns.Msg)
	if err := resp.Unpack(raw); err != nil {
		return s.errorReply(q, mdns.RcodeServerFailure)
	}
	return s.fit(resp, req, false)
}

// fit packs resp, truncating it to the guest's UDP size when needed.
func (s *Server) fit(resp, req *mdns.Msg, tcp bool) []byte {
	if !tcp {
		if size := guestUDPSize(req); resp.Len() > size {
			s.stats.Truncated.Add(1)
			resp.Truncate(size)
		}
	}
	b, err := resp.Pack()
	if err != nil {
		s.log.Warn("dns: pack response", "err", err)
		return nil
	}
	return b
}

// guestUDPSize is the largest UDP response the guest accepts (RFC 6891).
func guestUDPSize(req *mdns.Msg) int {
	if o := req.IsEdns0(); o != nil && o.UDPSize() > mdns.MinMsgSize {
		return int(o.UDPSize())
	}
	return mdns.MinMsgSize
}

// errorReply builds a header-only error response to q (which may not parse:
// only its 12-byte header is needed). It returns nil when q is too short to
// have an ID or is itself a response.
func (s *Server) errorReply(q []byte, rcode int) []byte {
	if len(q) < 12 || q[2]&0x80 != 0 {
		return nil
	}
	if rcode == mdns.RcodeServerFailure {
		s.stats.ServFail.Add(1)
	}
	r := new(mdns.Msg)
	r.Id = uint16(q[0])<<8 | uint16(q[1])
	r.Response = true
	r.Opcode = int(q[2]>>3) & 0xf
	r.RecursionDesired = q[2]&1 != 0
	r.RecursionAvailable = true
	r.Rcode = rcode
	// Echo the question when it parses, which resolvers use to match.
	var full mdns.Msg
	if full.Unpack(q) == nil && len(full.Question) == 1 {
		r.Question = full.Question
	}
	b, err := r.Pack()
	if err != nil {
		return nil
	}
	return b
}

func readTCPMsg(c net.Conn) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(c, l[:]); err != nil {
		return nil, err
	}
	n := int(l[0])<<8 | int(l[1])
	if n < 12 {
		return nil, fmt.Errorf("dns message of %d bytes", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		return nil, err
	}
	return b, nil
}

func writeTCPMsg(c net.Conn, b []byte) error {
	if len(b) > 0xffff {
		return fmt.Errorf("dns message of %d bytes", len(b))
	}
	out := make([]byte, 2+len(b))
	out[0], out[1] = byte(len(b)>>8), byte(len(b))
	copy(out[2:], b)
	_, err := c.Write(out)
	return err
}
