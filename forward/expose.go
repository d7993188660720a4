package forward

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"

	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/vunet/vunet/internal/unixsock"
)

// Expose is a gateway TCP port mapped to a host Unix socket: a guest
// connection to the gateway address (Options.Gateway4 or Gateway6) on
// Port is spliced to a connect(2) on Path (--expose
// tcp:PORT:unix:PATH). Every guest reaches the same mapping: the port is
// the gateway's, not a guest's.
type Expose struct {
	Port uint16
	Path string
}

// String formats e like "tcp:2375:unix:/run/podman.sock", the --expose
// syntax.
func (e Expose) String() string { return fmt.Sprintf("tcp:%d:unix:%s", e.Port, e.Path) }

// Errors of AddExpose and RemoveExpose, wrapped with the details.
var (
	// ErrExposed: the gateway port is exposed already.
	ErrExposed = errors.New("gateway port already exposed")
	// ErrGatewayPortInUse: a listener of vunet's own stack holds the
	// port on a gateway address, and would take the guests' connections
	// before the mapping saw them.
	ErrGatewayPortInUse = errors.New("gateway port in use in the stack")
	// ErrNotExposed: no mapping on the port.
	ErrNotExposed = errors.New("gateway port not exposed")
)

func checkExpose(e Expose) error {
	if e.Port == 0 || !filepath.IsAbs(e.Path) || len(e.Path) >= unixsock.MaxPath {
		return fmt.Errorf("forward: expose %s: need a port and an absolute socket path shorter than %d bytes", e, unixsock.MaxPath)
	}
	return nil
}

// exposed returns the host Unix socket dst is mapped to: one of the
// gateway addresses on an exposed port.
func (f *Forwarder) exposed(dst netip.AddrPort) (string, bool) {
	m := *f.exposes.Load()
	a := dst.Addr()
	if len(m) == 0 || a != f.opts.Gateway4 && a != f.opts.Gateway6 || !a.IsValid() {
		return "", false
	}
	path, ok := m[dst.Port()]
	return path, ok
}

// AddExpose maps e.Port on the gateway addresses to the socket e.Path
// from the next guest connection on. The socket need not exist yet: it is
// connected to per guest connection, and a connect that fails resets the
// guest's. A port exposed already (ErrExposed) or held by a listener
// in the stack (ErrGatewayPortInUse) is refused. An exposed port takes
// precedence over Options.MapHostLoopback for that port.
func (f *Forwarder) AddExpose(e Expose) error {
	e.Path = filepath.Clean(e.Path)
	if err := checkExpose(e); err != nil {
		return err
	}
	f.exposeMu.Lock()
	defer f.exposeMu.Unlock()
	cur := *f.exposes.Load()
	if p, ok := cur[e.Port]; ok {
		return fmt.Errorf("forward: expose %s: %w (to unix:%s)", e, ErrExposed, p)
	}
	if a, ok := f.stackListener(e.Port); ok {
		return fmt.Errorf("forward: expose %s: %w (something in vunet listens on %s)", e, ErrGatewayPortInUse, netip.AddrPortFrom(a, e.Port))
	}
	m := maps.Clone(cur)
	if m == nil {
		m = map[uint16]string{}
	}
	m[e.Port] = e.Path
	f.exposes.Store(&m)
	f.log.Info("gateway port exposed", "expose", e.String())
	return nil
}

// RemoveExpose ends the mapping on port and returns it. New guest
// connections to the port are then treated as if it had never been
// exposed (the host loopback mapping, or a RST); connections already
// spliced to the socket go on until either side closes them.
func (f *Forwarder) RemoveExpose(port uint16) (Expose, error) {
	f.exposeMu.Lock()
	defer f.exposeMu.Unlock()
	cur := *f.exposes.Load()
	p, ok := cur[port]
	if !ok {
		return Expose{}, fmt.Errorf("forward: tcp:%d: %w", port, ErrNotExposed)
	}
	m := maps.Clone(cur)
	delete(m, port)
	f.exposes.Store(&m)
	e := Expose{Port: port, Path: p}
	f.log.Info("gateway port no longer exposed", "expose", e.String())
	return e, nil
}

// Exposes returns the exposed gateway ports, sorted by port.
func (f *Forwarder) Exposes() []Expose {
	m := *f.exposes.Load()
	out := make([]Expose, 0, len(m))
	for port, path := range m {
		out = append(out, Expose{Port: port, Path: path})
	}
	slices.SortFunc(out, func(a, b Expose) int { return int(a.Port) - int(b.Port) })
	return out
}

// stackListener reports a TCP endpoint of the stack bound to port on a
// gateway address (or on any address): gVisor hands a SYN to it before
// the forwarder, so an expose there would never be reached.
func (f *Forwarder) stackListener(port uint16) (netip.Addr, bool) {
	for _, gw := range []netip.Addr{f.opts.Gateway4, f.opts.Gateway6} {
		if !gw.IsValid() {
			continue
		}
		id := stack.TransportEndpointID{LocalAddress: toTCPIP(gw), LocalPort: port}
		if f.s.FindTransportEndpoint(netProto(gw), tcp.ProtocolNumber, id, f.opts.NIC) != nil {
			return gw, true
		}
	}
	return netip.Addr{}, false
}
