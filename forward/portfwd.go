package forward

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/vunet/vunet/internal/unixsock"
)

// PortForward describes an inbound forward: a host socket whose traffic is
// relayed into the guest.
type PortForward struct {
	// Proto is "tcp", "udp" or "unix". A unix forward listens on the Unix
	// socket Path (Host is unused) and relays each connection to the
	// guest's TCP port like a tcp forward, from the gateway address.
	Proto string
	// Path is the Unix socket a unix forward creates (absolute), with
	// Options.ListenUnix's permissions; removing the forward unlinks it.
	Path string
	// Host is the host address to listen on. A zero address means
	// 127.0.0.1; port 0 lets the kernel choose (AddPortForward reports the
	// port it got).
	Host netip.AddrPort
	// Guest is the guest address and port that connections and datagrams
	// are relayed to.
	Guest netip.AddrPort
	// Select, if set, names the guest instead (its host name, MAC or an
	// address, as Options.ResolveGuest reads it): each new connection or
	// flow goes to that guest's address of the moment, on Guest's port,
	// and is refused and counted when the guest is not there. Guest's
	// address is then unused.
	Select string
}

// String formats the forward like "tcp 127.0.0.1:2222->10.0.2.15:22", or
// "tcp 127.0.0.1:2222->vm1:22" with Select.
func (pf PortForward) String() string {
	to := pf.Guest.String()
	if pf.Select != "" {
		to = pf.Select + ":" + strconv.Itoa(int(pf.Guest.Port()))
	}
	if pf.Proto == "unix" {
		return fmt.Sprintf("unix %s->%s", pf.Path, to)
	}
	return fmt.Sprintf("%s %s->%s", pf.Proto, pf.Host, to)
}

// target is where a new connection or flow of the forward goes: Guest,
// except that a forward listening on an IPv6 host address (such as
// tcp:[::1]:2222:22) reaches the guest's IPv6 address when it has one
// (Options.GuestIPv6), so the connection stays IPv6 end to end; over IPv4
// otherwise. Forwards on IPv4 host addresses always use Guest.
// With Select, the resolver picks the guest's address; ok is false when
// the guest is not there.
func (p *portForward) target() (netip.AddrPort, bool) {
	g := p.spec.Guest
	if p.spec.Select != "" {
		if p.f.opts.ResolveGuest == nil {
			return netip.AddrPort{}, false
		}
		a, ok := p.f.opts.ResolveGuest(p.spec.Select, p.spec.Host.Addr().Is6())
		if !ok || !a.IsValid() {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(a.Unmap(), g.Port()), true
	}
	return p.fixedTarget(), true
}

func (p *portForward) fixedTarget() netip.AddrPort {
	g := p.spec.Guest
	if p.f.opts.GuestIPv6 == nil || !g.Addr().Is4() || !p.spec.Host.Addr().Is6() {
		return g
	}
	if a := p.f.opts.GuestIPv6(); a.IsValid() && a.Is6() && !a.Is4In6() {
		return netip.AddrPortFrom(a, g.Port())
	}
	return g
}

// pfKey identifies a forward: one host socket.
type pfKey struct {
	proto string
	host  netip.AddrPort
	path  string // unix
}

func (pf PortForward) key() pfKey { return pfKey{pf.Proto, pf.Host, pf.Path} }

// portForward is a running PortForward.
type portForward struct {
	f    *Forwarder
	spec PortForward
	ln   net.Listener // tcp, unix
	pc   *net.UDPConn // udp

	done chan struct{} // closed by close

	mu      sync.Mutex
	closed  bool
	flows   map[netip.AddrPort]*udpFlow // udp, by client
	sources map[netip.Addr]int          // udp, flows per client address
}

// normalize validates pf and fills in the default host address.
func (pf PortForward) normalize() (PortForward, error) {
	pf.Proto = strings.ToLower(pf.Proto)
	if pf.Proto != "tcp" && pf.Proto != "udp" && pf.Proto != "unix" {
		return pf, fmt.Errorf("forward: port forward %s: protocol must be tcp, udp or unix", pf)
	}
	if (pf.Proto == "unix") != (pf.Path != "") {
		return pf, fmt.Errorf("forward: port forward %s: a socket path goes with unix, and only with unix", pf)
	}
	if pf.Proto == "unix" {
		if !filepath.IsAbs(pf.Path) || len(pf.Path) >= unixsock.MaxPath {
			return pf, fmt.Errorf("forward: port forward %s: socket path must be absolute and shorter than %d bytes", pf, unixsock.MaxPath)
		}
		pf.Path = filepath.Clean(pf.Path)
		pf.Host = netip.AddrPort{}
	}
	if pf.Select != "" && pf.Guest.Port() != 0 && !pf.Guest.Addr().IsValid() {
		// A guest by selector needs only the port.
		pf.Guest = netip.AddrPortFrom(netip.IPv4Unspecified(), pf.Guest.Port())
	} else if !pf.Guest.IsValid() || pf.Guest.Port() == 0 || pf.Guest.Addr().IsUnspecified() {
		return pf, fmt.Errorf("forward: port forward %s: guest address and port required", pf)
	}
	pf.Guest = netip.AddrPortFrom(pf.Guest.Addr().Unmap(), pf.Guest.Port())
	host := pf.Host.Addr()
	if !host.IsValid() {
		host = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	if pf.Proto != "unix" {
		pf.Host = netip.AddrPortFrom(host.Unmap(), pf.Host.Port())
	}
	return pf, nil
}

// AddPortForward starts listening on pf.Host and relays to pf.Guest. It
// returns the effective forward (default address and chosen port filled
// in). It is safe for concurrent use.
func (f *Forwarder) AddPortForward(pf PortForward) (PortForward, error) {
	pf, err := pf.normalize()
	if err != nil {
		return pf, err
	}
	if pf.Host.Port() != 0 || pf.Proto == "unix" {
		f.mu.Lock()
		_, dup := f.pfwds[pf.key()]
		f.mu.Unlock()
		if dup {
			return pf, fmt.Errorf("forward: port forward %s: already exists", pf)
		}
	}
	p := &portForward{f: f, done: make(chan struct{}), flows: make(map[netip.AddrPort]*udpFlow),
		sources: make(map[netip.Addr]int)}
	switch pf.Proto {
	case "tcp":
		ln, err := f.opts.listenTCP(pf.Host)
		if err != nil {
			return pf, fmt.Errorf("forward: port forward %s: %w", pf, err)
		}
		p.ln = ln
		pf.Host = addrPortOf(ln.Addr())
	case "udp":
		pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(pf.Host))
		if err != nil {
			return pf, fmt.Errorf("forward: port forward %s: %w", pf, err)
		}
		_ = pc.SetReadBuffer(hostUDPBuffer)
		_ = pc.SetWriteBuffer(hostUDPBuffer)
		p.pc = pc
		pf.Host = addrPortOf(pc.LocalAddr())
	case "unix":
		ln, err := f.opts.ListenUnix(pf.Path)
		if err != nil {
			return pf, fmt.Errorf("forward: port forward %s: %w", pf, err)
		}
		p.ln = ln
	}
	if pf.Proto != "unix" {
		pf.Host = netip.AddrPortFrom(pf.Host.Addr().Unmap(), pf.Host.Port())
	}
	p.spec = pf

	k := pf.key()
	f.mu.Lock()
	if f.closed || f.pfwds[k] != nil {
		closed := f.closed
		f.mu.Unlock()
		p.closeSocket()
		if closed {
			return pf, errors.New("forward: closed")
		}
		return pf, fmt.Errorf("forward: port forward %s: already exists", pf)
	}
	f.pfwds[k] = p
	f.wg.Add(1)
	f.mu.Unlock()

	go func() {
		defer f.wg.Done()
		if p.ln != nil {
			p.acceptLoop()
		} else {
			p.udpLoop()
		}
	}()
	f.log.Info("port forward added", "forward", pf.String())
	return pf, nil
}

// RemovePortForward stops the forward listening on pf.Proto and pf.Host
// (pf.Guest is ignored) and closes its connections and flows.
func (f *Forwarder) RemovePortForward(pf PortForward) error {
	pf, err := pf.normalize()
	if err != nil && pf.Proto != "tcp" && pf.Proto != "udp" && pf.Proto != "unix" {
		return err
	}
	k := pf.key()
	f.mu.Lock()
	p := f.pfwds[k]
	delete(f.pfwds, k)
	f.mu.Unlock()
	if p == nil {
		if pf.Proto == "unix" {
			return fmt.Errorf("forward: no unix port forward on %s", pf.Path)
		}
		return fmt.Errorf("forward: no %s port forward on %s", pf.Proto, pf.Host)
	}
	p.close()
	f.log.Info("port forward removed", "forward", p.spec.String())
	return nil
}

// ListPortForwards returns the active forwards, sorted by protocol and host
// address.
func (f *Forwarder) ListPortForwards() []PortForward {
	f.mu.Lock()
	out := make([]PortForward, 0, len(f.pfwds))
	for _, p := range f.pfwds {
		out = append(out, p.spec)
	}
	f.mu.Unlock()
	slices.SortFunc(out, func(a, b PortForward) int {
		if c := strings.Compare(a.Proto, b.Proto); c != 0 {
			return c
		}
		if c := strings.Compare(a.Path, b.Path); c != 0 {
			return c
		}
		return a.Host.Compare(b.Host)
	})
	return out
}

func (p *portForward) closeSocket() {
	if p.ln != nil {
		_ = p.ln.Close()
	}
	if p.spec.Proto == "unix" {
		// The file is ours (ListenUnix made it); a stale one would make
		// the next vunet's Listen check for a live server first.
		_ = os.Remove(p.spec.Path)
	}
	if p.pc != nil {
		_ = p.pc.Close()
	}
}

// close stops the listener and ends everything that came through it.
func (p *portForward) close() {
	p.mu.Lock()
	if !p.closed {
		close(p.done)
	}
	p.closed = true
	flows := make([]*udpFlow, 0, len(p.flows))
	for _, fl := range p.flows {
		flows = append(flows, fl)
	}
	p.mu.Unlock()
	p.closeSocket()
	for _, fl := range flows {
		fl.close()
	}
	f := p.f
	f.mu.Lock()
	var conns []*tcpSplice
	for c := range f.conns {
		if c.owner == p {
			conns = append(conns, c)
		}
	}
	f.mu.Unlock()
	for _, c := range conns {
		c.abort()
	}
}
