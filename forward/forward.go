// Package forward is vunet's NAT: it splices the guest's TCP, UDP and ICMP
// echo traffic, as terminated by the gVisor stack built in package netstack,
// to ordinary host sockets, and it forwards host ports into the guest.
//
// Outbound, the package installs per-stack default handlers for TCP, UDP,
// ICMPv4 and ICMPv6. gVisor only consults those handlers after its endpoint
// demultiplexer found no matching endpoint, so services listening inside the
// stack (DNS on the DNS address, DHCP, ...) always take precedence. As a
// second line of defence the DNS addresses are never forwarded, whatever the
// port.
//
// See docs/forwarding.md for the design.
package forward

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/forward/egress"
	"github.com/vunet/vunet/internal/unixsock"
)

// Defaults applied by New to zero Options fields.
const (
	DefaultDialTimeout          = 15 * time.Second
	DefaultMaxInFlightDials     = 512
	DefaultMaxConns             = 16384
	DefaultMaxInboundConns      = 256
	DefaultMaxUDPFlows          = 4096
	DefaultMaxInboundUDPFlows   = 1024
	DefaultMaxUDPFlowsPerSource = 64
	DefaultMaxPingFlows         = 256
	DefaultUDPIdleTimeout       = 30 * time.Second
	DefaultUDPStreamIdleTimeout = 180 * time.Second
)

// Options configures a Forwarder.
type Options struct {
	// Stack is the gVisor stack built by package netstack. Its NIC must be
	// promiscuous and spoofing.
	Stack *stack.Stack
	// NIC is the guest-facing NIC of Stack.
	NIC tcpip.NICID

	// Gateway4 and Gateway6 are the stack's gateway addresses (e.g.
	// 10.0.2.2, fd00::2). They identify the host when MapHostLoopback is
	// set and stand in for loopback clients of inbound port forwards.
	Gateway4, Gateway6 netip.Addr
	// GuestIPv6, if set, returns the guest's current IPv6 address, or an
	// invalid one when it has none. A port forward listening on an IPv6
	// host address and aimed at an IPv4 guest address then reaches the
	// guest over IPv6 whenever it has an address (see PortForward.target).
	GuestIPv6 func() netip.Addr
	// ResolveGuest, if set, resolves a port forward's Select (a guest
	// named by host name, MAC or address) to the address of that guest to
	// reach now: an IPv6 one if ipv6 and it has one, else IPv4. ok is
	// false when no such guest is on the network.
	ResolveGuest func(sel string, ipv6 bool) (addr netip.Addr, ok bool)
	// DNS4 and DNS6 are the in-stack DNS service addresses. Traffic to them
	// is never forwarded to the host.
	DNS4, DNS6 netip.Addr

	// MoveTCP, if set, lets SaveTCP and RestoreTCP move established
	// connections in a live migration (the stack's half; the host half
	// needs CAP_NET_ADMIN). Nil: they are reset (--migrate-tcp off).
	MoveTCP TCPMover

	// MapHostLoopback makes the gateway addresses reach the host's loopback
	// (127.0.0.1 and ::1). Without it, connections to the gateway are
	// refused.
	MapHostLoopback bool

	// Expose maps gateway TCP ports to host Unix sockets: a guest
	// connection to Gateway4 or Gateway6 on such a port is spliced to a
	// connect(2) on the socket (--expose tcp:2375:unix:/run/podman.sock).
	// It takes precedence over MapHostLoopback for those ports, and the
	// egress policy does not apply: the mapping is the administrator's.
	Expose map[uint16]string
	// ListenUnix creates the listening socket of a unix port forward.
	// Nil means unixsock.Listen with its defaults (mode 0600, vunet's
	// group); the appliance passes --socket-mode and --socket-group.
	ListenUnix func(path string) (net.Listener, error)

	// Egress decides which destinations guest flows may reach. Nil means
	// egress.New's defaults (link-local and metadata addresses denied, the
	// gateway alias and everything else allowed).
	Egress *egress.Policy

	// DialTimeout bounds each outbound TCP connect to the host destination.
	// Zero means DefaultDialTimeout.
	DialTimeout time.Duration
	// Guests is how many guests may share the NAT (the switch's ports,
	// --max-guests). Each has the outbound limits below (MaxInFlightDials,
	// MaxConns, MaxUDPFlows, MaxPingFlows) for itself, and GuestMemory of
	// the outbound memory. Zero means 1.
	Guests int
	// GuestOf names the guest that sent pkt, the first packet of a new
	// flow: its index 0..Guests-1 (the switch port that owns the frame's
	// source MAC), or -1 when no connected guest did (it has just left;
	// the flow is refused). Nil, or Guests 1, charges every flow to
	// guest 0.
	GuestOf func(pkt *stack.PacketBuffer) int
	// GuestMemory bounds the part of OutboundMemory one guest's flows may
	// hold, so one guest pinning memory cannot leave another with none.
	// Zero means OutboundMemory / Guests (an equal share; with one guest,
	// all of it).
	GuestMemory int64
	// GuestRXCapacity, if set, returns how many bytes of TCP payload guest
	// i's link can hold queued toward it while the guest has no receive
	// buffers (endpoint.Endpoint.RXCapacity), or 0 for no bound. The
	// connections sending bulk data to that guest share rxShare of it as
	// the limit of their send buffers (sendLimit), so what they have in
	// flight fits in the link's backlog and a guest that falls behind
	// for a moment costs no drops. Nil: no bound but MaxTCPBuffer.
	GuestRXCapacity func(guest int) int64

	// MaxInFlightDials bounds one guest's concurrent outbound TCP
	// connects; SYNs beyond it are answered with RST. Zero means
	// DefaultMaxInFlightDials, negative means unlimited (as do the other
	// Max fields).
	MaxInFlightDials int
	// MaxConns bounds one guest's outbound TCP connections (including
	// those still dialing). Zero means DefaultMaxConns.
	MaxConns int
	// MaxInboundConns bounds connections accepted by TCP port forwards,
	// separately from MaxConns: a guest holding all its outbound
	// connections cannot lock the administrator out of --forward
	// tcp:2222:22. Zero means DefaultMaxInboundConns.
	MaxInboundConns int
	// MaxUDPFlows bounds one guest's outbound UDP flows. Zero means
	// DefaultMaxUDPFlows.
	MaxUDPFlows int
	// MaxInboundUDPFlows bounds flows created by UDP port forwards,
	// separately from MaxUDPFlows, so remote clients cannot use up the
	// guest's flows. Zero means DefaultMaxInboundUDPFlows.
	MaxInboundUDPFlows int
	// MaxUDPFlowsPerSource bounds the flows one remote address may have on
	// one UDP port forward, so one client cannot take them all. Zero means
	// DefaultMaxUDPFlowsPerSource.
	MaxUDPFlowsPerSource int
	// MaxPingFlows bounds one guest's ICMP echo flows (host ping
	// sockets). Zero means DefaultMaxPingFlows.
	MaxPingFlows int

	// UDPIdleTimeout expires UDP (and ICMP echo) flows that have been idle
	// this long. Zero means DefaultUDPIdleTimeout.
	UDPIdleTimeout time.Duration
	// UDPStreamIdleTimeout replaces UDPIdleTimeout once a flow has carried
	// at least StreamThreshold datagrams in each direction (a "stream", in
	// conntrack's terms). Zero means DefaultUDPStreamIdleTimeout.
	UDPStreamIdleTimeout time.Duration

	// Memory is the byte budget that TCP buffers and UDP flow buffers
	// are taken from (see package budget). Nil means unlimited.
	Memory *budget.Budget
	// OutboundMemory is the part of Memory the guest's own traffic may use;
	// inbound port forwards may use all of Memory, so what the guest and
	// other users of Memory (the link's backlog) cannot take is theirs.
	// Zero means seven eighths of Memory's limit.
	OutboundMemory int64

	// Logger receives forwarding messages; per-connection noise is logged
	// at Debug. Nil means slog.Default().
	Logger *slog.Logger

	// dial replaces the host dialer (tests use it to simulate slow dials).
	dial func(ctx context.Context, network, address string) (net.Conn, error)
	// dialUDP replaces the host UDP socket factory (tests use it to keep
	// every datagram on loopback whatever the guest's destination).
	// local is the host port to send from, 0 for any.
	dialUDP func(network string, local uint16, to netip.AddrPort) (*net.UDPConn, error)
	// openPing replaces the host ping socket factory (tests use it because
	// ping sockets are often forbidden by net.ipv4.ping_group_range).
	openPing func(v6 bool) (net.PacketConn, error)
	// listenTCP replaces the port-forward listener factory (tests inject
	// accept errors such as EMFILE).
	listenTCP func(addr netip.AddrPort) (net.Listener, error)
}

// StreamThreshold is how many datagrams a UDP flow must have carried in each
// direction before UDPStreamIdleTimeout applies instead of UDPIdleTimeout.
const StreamThreshold = 2

// Forwarder is the NAT between the guest (through the gVisor stack) and the
// host's sockets. Create it with New before the link starts delivering guest
// frames, and stop it with Close.
type Forwarder struct {
	opts Options
	s    *stack.Stack
	log  *slog.Logger
	ctx  context.Context
	stop context.CancelFunc

	bcast4 []netip.Addr // subnet-directed broadcast addresses of the NIC

	egress *egress.Policy // opts.Egress, or the default policy

	ping *pinger
	poll *hostPoller // wakes splice directions parked on host sockets
	run  *runQueue   // runs woken splice directions on a bounded set of goroutines
	// starved: splices waiting for the budget, one goroutine for all.
	starved starvedSet
	syns    *synTable // guest SYNs being dialed, for ICMP errors
	epoch   time.Time // monotonic base for flow activity stamps
	c       Stats
	bufs    sync.Pool // *[]byte of maxDatagram, borrowed by UDP relays per datagram

	// Budget shares: outbound traffic cannot take memIn's reserve.
	memOut, memIn *budget.Budget
	// guests are the per-guest limits and counters, by guest index
	// (Options.Guests of them; each guest's memory is a share of memOut).
	guests []*guestLimits

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup // every goroutine started by the Forwarder
	conns  map[*tcpSplice]struct{}
	udp    map[*udpFlow]struct{}
	pfwds  map[pfKey]*portForward
	pflows map[*pingFlow]struct{}
	// udpPorts are the host ports of UDP flows carried over from the
	// vunet the guest migrated from (RestoreUDPPorts), until the flow's
	// next datagram takes its port or the entry expires.
	udpPorts map[udpFlowKey]udpPort

	// exposes maps gateway ports to host Unix sockets: Options.Expose,
	// then AddExpose and RemoveExpose. The map is never changed once
	// stored (copy on write under exposeMu), so the TCP handler reads it
	// without a lock.
	exposeMu sync.Mutex
	exposes  atomic.Pointer[map[uint16]string]
}

// New validates opts, applies defaults and installs the forwarding handlers
// on opts.Stack. Handlers are stack-wide and must be installed while no
// packets are flowing, i.e. before the link endpoint is started.
func New(opts Options) (*Forwarder, error) {
	if opts.Stack == nil {
		return nil, errors.New("forward: Options.Stack is nil")
	}
	if !opts.Stack.HasNIC(opts.NIC) {
		return nil, fmt.Errorf("forward: stack has no NIC %d", opts.NIC)
	}
	for _, a := range []struct {
		name string
		addr netip.Addr
		v6   bool
	}{{"Gateway4", opts.Gateway4, false}, {"DNS4", opts.DNS4, false}, {"Gateway6", opts.Gateway6, true}, {"DNS6", opts.DNS6, true}} {
		if a.addr.IsValid() && (a.addr.Is6() != a.v6 || a.addr.Is4In6()) {
			return nil, fmt.Errorf("forward: %s %s has the wrong address family", a.name, a.addr)
		}
	}
	if opts.Guests <= 0 {
		opts.Guests = 1
	}
	setDefault(&opts.DialTimeout, DefaultDialTimeout)
	setLimit(&opts.MaxInFlightDials, DefaultMaxInFlightDials)
	setLimit(&opts.MaxConns, DefaultMaxConns)
	setLimit(&opts.MaxInboundConns, DefaultMaxInboundConns)
	setLimit(&opts.MaxUDPFlows, DefaultMaxUDPFlows)
	setLimit(&opts.MaxInboundUDPFlows, DefaultMaxInboundUDPFlows)
	setLimit(&opts.MaxUDPFlowsPerSource, DefaultMaxUDPFlowsPerSource)
	setLimit(&opts.MaxPingFlows, DefaultMaxPingFlows)
	setDefault(&opts.UDPIdleTimeout, DefaultUDPIdleTimeout)
	setDefault(&opts.UDPStreamIdleTimeout, DefaultUDPStreamIdleTimeout)
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.dial == nil {
		d := &net.Dialer{
			Timeout:         opts.DialTimeout,
			KeepAliveConfig: hostKeepAlive(),
		}
		opts.dial = d.DialContext
	}
	if opts.dialUDP == nil {
		opts.dialUDP = func(network string, local uint16, to netip.AddrPort) (*net.UDPConn, error) {
			var laddr *net.UDPAddr
			if local != 0 {
				laddr = &net.UDPAddr{Port: int(local)}
			}
			return net.DialUDP(network, laddr, net.UDPAddrFromAddrPort(to))
		}
	}
	if opts.openPing == nil {
		opts.openPing = openPingSocket
	}
	if opts.listenTCP == nil {
		opts.listenTCP = func(a netip.AddrPort) (net.Listener, error) {
			return net.ListenTCP("tcp", net.TCPAddrFromAddrPort(a))
		}
	}
	if opts.ListenUnix == nil {
		opts.ListenUnix = func(path string) (net.Listener, error) {
			return unixsock.Listen(path, unixsock.Options{Name: "unix forward socket", GID: -1})
		}
	}
	for port, path := range opts.Expose {
		if err := checkExpose(Expose{Port: port, Path: path}); err != nil {
			return nil, err
		}
	}
	if opts.OutboundMemory <= 0 {
		opts.OutboundMemory = opts.Memory.Limit() - opts.Memory.Limit()/8
	}

	ctx, stop := context.WithCancel(context.Background())
	f := &Forwarder{
		opts:   opts,
		s:      opts.Stack,
		log:    opts.Logger.With("component", "forward"),
		ctx:    ctx,
		stop:   stop,
		epoch:  time.Now(),
		bcast4: subnetBroadcasts(opts.Stack, opts.NIC),
		conns:  make(map[*tcpSplice]struct{}),
		udp:    make(map[*udpFlow]struct{}),
		pfwds:  make(map[pfKey]*portForward),
		pflows: make(map[*pingFlow]struct{}),

		udpPorts: make(map[udpFlowKey]udpPort),
	}
	ex := maps.Clone(opts.Expose)
	f.exposes.Store(&ex)
	opts.Expose = nil // f.exposes is the one copy
	f.egress = opts.Egress
	if f.egress == nil {
		f.egress = egress.New(egress.Options{Gateways: []netip.Addr{opts.Gateway4, opts.Gateway6}})
	}
	f.c.PortForwards = func() int64 {
		f.mu.Lock()
		defer f.mu.Unlock()
		return int64(len(f.pfwds))
	}
	f.bufs.New = func() any { b := make([]byte, maxDatagram); return &b }
	f.memOut = opts.Memory.Share(opts.OutboundMemory)
	f.memIn = opts.Memory.Share(opts.Memory.Limit())
	if opts.GuestMemory <= 0 {
		opts.GuestMemory = f.memOut.Limit() / int64(opts.Guests)
	}
	for i := range opts.Guests {
		f.guests = append(f.guests, &guestLimits{id: i, mem: f.memOut.Share(opts.GuestMemory)})
	}
	f.opts = opts
	f.ping = newPinger(f)
	poll, err := newHostPoller()
	if err != nil {
		stop()
		return nil, fmt.Errorf("forward: %w", err)
	}
	f.poll = poll
	f.run = newRunQueue(f)
	f.syns = newSYNTable(opts.Guests, max(4*opts.MaxInFlightDials, 1024))

	// gVisor's forwarder drops SYNs silently beyond its own in-flight
	// limit. Give it twice the guests' together, so that normally a
	// guest's limit is hit first and it gets a prompt RST instead of
	// retrying for seconds.
	tcpFwd := tcp.NewForwarder(f.s, 0, min(2*opts.Guests*opts.MaxInFlightDials, unlimited), f.handleTCP)
	f.s.SetTransportProtocolHandler(tcp.ProtocolNumber, func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		// The SYN's guest is named here, where its frame is at hand;
		// handleTCP (gVisor's goroutine, given only the 4-tuple) looks
		// it up in the table.
		noted := f.syns.note(id, pkt, f.guestOf(pkt))
		if !tcpFwd.HandlePacket(id, pkt) {
			if noted {
				f.syns.forget(id)
			}
			return false
		}
		return true
	})
	f.s.SetTransportProtocolHandler(udp.ProtocolNumber, func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		if f.udpEgress(id, pkt) {
			return true
		}
		// What gVisor's udp.Forwarder does, with the datagram's guest:
		// the handler runs synchronously, on this packet. The endpoint
		// it may create queues a clone of its own.
		c := pkt.Clone()
		defer c.DecRef()
		return f.handleUDP(udp.NewForwarderRequest(f.s, id, c), f.guestOf(pkt))
	})
	f.s.SetTransportProtocolHandler(icmp.ProtocolNumber4, f.handleICMP)
	f.s.SetTransportProtocolHandler(icmp.ProtocolNumber6, f.handleICMP)
	return f, nil
}

func setDefault(v *time.Duration, def time.Duration) {
	if *v <= 0 {
		*v = def
	}
}

// unlimited stands for "no limit"; it still keeps arithmetic on limits
// (such as doubling for gVisor's in-flight bound) from overflowing.
const unlimited = math.MaxInt32

// setLimit applies def to a zero limit and turns a negative one into
// unlimited.
func setLimit(v *int, def int) {
	switch {
	case *v == 0:
		*v = def
	case *v < 0 || *v > unlimited:
		*v = unlimited
	}
}

// subnetBroadcasts returns the directed broadcast address of every IPv4
// prefix on the NIC, so that datagrams to them are never sent to the host.
func subnetBroadcasts(s *stack.Stack, nic tcpip.NICID) []netip.Addr {
	var out []netip.Addr
	for _, pa := range s.AllAddresses()[nic] {
		if pa.Protocol != ipv4.ProtocolNumber {
			continue
		}
		a := fromTCPIP(pa.AddressWithPrefix.Address)
		p, err := a.Prefix(pa.AddressWithPrefix.PrefixLen)
		if err != nil || p.Bits() >= 31 {
			continue
		}
		b := p.Addr().As4()
		for i := p.Bits(); i < 32; i++ {
			b[i/8] |= 0x80 >> (i % 8)
		}
		out = append(out, netip.AddrFrom4(b))
	}
	return out
}

// enter registers a goroutine about to start with the Forwarder's wait
// group. It returns false once Close has begun, in which case the caller
// must not start the work.
func (f *Forwarder) enter() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.wg.Add(1)
	return true
}

// Close stops all forwarding: port-forward listeners, spliced connections,
// UDP and ICMP flows. Handlers stay installed on the stack (gVisor does not
// support removing them while running) but refuse new work. Close waits for
// every goroutine the Forwarder started.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	f.stop()
	pfs := make([]*portForward, 0, len(f.pfwds))
	for k, pf := range f.pfwds {
		pfs = append(pfs, pf)
		delete(f.pfwds, k)
	}
	conns := make([]*tcpSplice, 0, len(f.conns))
	for c := range f.conns {
		conns = append(conns, c)
	}
	flows := make([]*udpFlow, 0, len(f.udp))
	for fl := range f.udp {
		flows = append(flows, fl)
	}
	pings := make([]*pingFlow, 0, len(f.pflows))
	for p := range f.pflows {
		pings = append(pings, p)
	}
	f.mu.Unlock()

	for _, pf := range pfs {
		pf.close()
	}
	for _, c := range conns {
		c.abort()
	}
	for _, fl := range flows {
		fl.close()
	}
	for _, p := range pings {
		p.close()
	}
	f.wg.Wait()
	f.poll.close() // after every splice ended: none can arm it any more
	return nil
}
