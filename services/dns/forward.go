package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"time"

	mdns "github.com/miekg/dns"
)

// errNoUpstream is returned by forward when no upstream is configured.
var errNoUpstream = errors.New("no upstream resolvers configured")

// forward sends the query q (whose ID is id) to the upstreams, trying up to
// Attempts of them in order, and returns the first usable answer. An answer
// with a truncated flag is fetched again over TCP from the same upstream.
// SERVFAIL and REFUSED move on to the next upstream but are returned if no
// upstream does better.
func (s *Server) forward(ctx context.Context, q []byte, id uint16) ([]byte, error) {
	ups := s.opts.Upstreams
	if len(ups) == 0 {
		return nil, errNoUpstream
	}
	var (
		fallback []byte
		errs     []error
	)
	for i := 0; i < s.opts.Attempts; i++ {
		up := ups[i%len(ups)]
		resp, err := s.exchange(ctx, up, q, id)
		if err != nil {
			s.stats.UpstreamErrors.Add(1)
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
				s.stats.Timeouts.Add(1)
			}
			errs = append(errs, fmt.Errorf("upstream %s: %w", up, err))
			if ctx.Err() != nil {
				break
			}
			continue
		}
		if rc := resp[3] & 0xf; rc == mdns.RcodeServerFailure || rc == mdns.RcodeRefused {
			s.stats.UpstreamErrors.Add(1)
			fallback = resp
			errs = append(errs, fmt.Errorf("upstream %s: %s", up, mdns.RcodeToString[int(rc)]))
			continue
		}
		return resp, nil
	}
	if fallback != nil {
		return fallback, nil
	}
	return nil, errors.Join(errs...)
}

// exchange does one attempt against up: UDP, then TCP if truncated.
func (s *Server) exchange(ctx context.Context, up netip.AddrPort, q []byte, id uint16) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	resp, err := s.exchangeUDP(ctx, up, q, id)
	if err != nil {
		return nil, err
	}
	if resp[2]&0x02 == 0 { // TC clear
		return resp, nil
	}
	s.stats.TCPFallbacks.Add(1)
	return s.exchangeTCP(ctx, up, q, id)
}

func (s *Server) exchangeUDP(ctx context.Context, up netip.AddrPort, q []byte, id uint16) ([]byte, error) {
	c, err := s.dialer.DialContext(ctx, "udp", up.String())
	if err != nil {
		return nil, fmt.Errorf("dial udp: %w", err)
	}
	defer c.Close()
	setDeadline(ctx, c)
	if _, err := c.Write(q); err != nil {
		return nil, fmt.Errorf("write udp: %w", err)
	}
	buf := make([]byte, maxUDPRead)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, fmt.Errorf("read udp: %w", err)
		}
		// A connected socket only sees the upstream's datagrams, but a late
		// answer to an earlier query could still arrive: match the ID and
		// require a response header.
		if resp := buf[:n]; isResponseTo(resp, id) {
			return append([]byte(nil), resp...), nil
		}
	}
}

func (s *Server) exchangeTCP(ctx context.Context, up netip.AddrPort, q []byte, id uint16) ([]byte, error) {
	c, err := s.dialer.DialContext(ctx, "tcp", up.String())
	if err != nil {
		return nil, fmt.Errorf("dial tcp: %w", err)
	}
	defer c.Close()
	setDeadline(ctx, c)
	if err := writeTCPMsg(c, q); err != nil {
		return nil, fmt.Errorf("write tcp: %w", err)
	}
	var l [2]byte
	if _, err := io.ReadFull(c, l[:]); err != nil {
		return nil, fmt.Errorf("read tcp: %w", err)
	}
	resp := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(c, resp); err != nil {
		return nil, fmt.Errorf("read tcp: %w", err)
	}
	if !isResponseTo(resp, id) {
		return nil, errors.New("tcp answer does not match the query")
	}
	return resp, nil
}

func isResponseTo(b []byte, id uint16) bool {
	return len(b) >= 12 && binary.BigEndian.Uint16(b) == id && b[2]&0x80 != 0
}

func setDeadline(ctx context.Context, c net.Conn) {
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	} else {
		c.SetDeadline(time.Now().Add(DefaultTimeout))
	}
}
