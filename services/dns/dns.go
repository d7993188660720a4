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
}

// Stats are the server's counters.
type Stats struct {
	Queries        uint64 // queries received (UDP and TCP)
	TCPQueries     uint64
	Static         uint64 // answered from the static table
	StaticDenied   uint64 // static addresses left out because the egress policy denies them
	Forwarded      uint64 // answered from an upstream
	UpstreamErrors uint64 // failed upstream attempts (including timeouts)
	Timeouts       uint64 // upstream attempts that timed out
	TCPFallbacks   uint64 // truncated upstream UDP answers retried over TCP
	Truncated      uint64 // answers truncated to fit the guest's UDP size
	ServFail       uint64 // SERVFAILs generated here
	Overloaded     uint64 // queries refused because MaxInFlight was reached
	Malformed      uint64
}

type counters struct {
	queries, tcpQueries, static, forwarded, upstreamErrors, timeouts atomic.Uint64
	tcpFallbacks, truncated, servFail, overloaded, malformed         atomic.Uint64
	staticDenied                                                     atomic.Uint64
}

// Server is a DNS forwarder. Create it with New, run it with Serve.
type Server struct {
	opts    Options
	log     *slog.Logger
	static  *staticTable
	sem     chan struct{} // in-flight forwarded queries
	tcpSem  chan struct{} // guest TCP connections
	dialer  net.Dialer
	stats   counters
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

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	c := &s.stats
	return Stats{
		Queries: c.queries.Load(), TCPQueries: c.tcpQueries.Load(), Static: c.static.Load(), StaticDenied: c.staticDenied.Load(),
		Forwarded: c.forwarded.Load(), UpstreamErrors: c.upstreamErrors.Load(), Timeouts: c.timeouts.Load(),
		TCPFallbacks: c.tcpFallbacks.Load(), Truncated: c.truncated.Load(), ServFail: c.servFail.Load(),
		Overloaded: c.overloaded.Load(), Malformed: c.malformed.Load(),
	}
}

func (s *Server) serveUDP(ctx context.Context, u *gnet.UDP) error {
	err := u.ReadLoop(maxUDPRead, s.closed, func(b []byte, from *net.UDPAddr) {
		s.stats.queries.Add(1)
		q := append([]byte(nil), b...)
		select {
		case s.sem <- struct{}{}:
		default:
			// Answer at once rather than queueing: the guest's resolver
			// retries, and a backlog would only add latency.
			s.stats.overloaded.Add(1)
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
			s.stats.overloaded.Add(1)
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
		s.stats.queries.Add(1)
		s.stats.tcpQueries.Add(1)
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
		s.stats.malformed.Add(1)
		s.log.Debug("dns: malformed query", "err", err)
		return s.errorReply(q, mdns.RcodeFormatError)
	}
	if req.Response {
		s.stats.malformed.Add(1)
		return nil // never answer answers (loops)
	}
	if req.Opcode != mdns.OpcodeQuery {
		return s.errorReply(q, mdns.RcodeNotImplemented)
	}
	if len(req.Question) != 1 {
		s.stats.malformed.Add(1)
		return s.errorReply(q, mdns.RcodeFormatError)
	}
	qq := req.Question[0]
	log := s.log.With("name", qq.Name, "type", mdns.TypeToString[qq.Qtype], "tcp", tcp)

	if resp := s.static.answer(req, uint32(s.opts.StaticTTL/time.Second), &s.stats.staticDenied); resp != nil {
		s.stats.static.Add(1)
		log.Debug("dns: static answer", "rcode", mdns.RcodeToString[resp.Rcode], "answers", len(resp.Answer))
		return s.fit(resp, req, tcp)
	}

	raw, err := s.forward(ctx, q, req.Id)
	if err != nil {
		log.Debug("dns: forward failed", "err", err)
		return s.errorReply(q, mdns.RcodeServerFailure)
	}
	s.stats.forwarded.Add(1)
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
			s.stats.truncated.Add(1)
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
		s.stats.servFail.Add(1)
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
