// Package appliance wires vunet together: the vhost-user device, the gVisor
// endpoint, the netstack, NAT forwarding and the network services. It holds
// no logic of its own beyond translating configuration and lifecycle.
package appliance

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/endpoint"
	"github.com/vunet/vunet/forward"
	"github.com/vunet/vunet/forward/egress"
	"github.com/vunet/vunet/internal/metrics"
	"github.com/vunet/vunet/internal/ratelimit"
	"github.com/vunet/vunet/internal/sandbox"
	"github.com/vunet/vunet/internal/tcprepair"
	"github.com/vunet/vunet/internal/unixsock"
	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/pcap"
	"github.com/vunet/vunet/services/dhcp4"
	"github.com/vunet/vunet/services/dns"
	"github.com/vunet/vunet/services/names"
	"github.com/vunet/vunet/services/ra"
	"github.com/vunet/vunet/services/tftp"
	"github.com/vunet/vunet/vhost"
)

// HostAlias is the name that always resolves to the gateway (the host).
const HostAlias = config.HostGatewayName

// Appliance is a running vunet instance.
type Appliance struct {
	cfg *config.Config
	log *slog.Logger
	// Link is the network's switch: the stack's link endpoint, with one
	// port (an endpoint.Endpoint) per guest, up to cfg.MaxGuests.
	Link    *endpoint.Switch
	Stack   *netstack.Stack
	Forward *forward.Forwarder
	DHCP    *dhcp4.Server
	DNS     *dns.Server
	// Names are the guests' DHCP host names (NAME.vunet.internal), written
	// by DHCP and read by DNS.
	Names  *names.Registry
	RA     *ra.Server
	DHCPv6 *ra.DHCPv6
	TFTP   *tftp.Server
	VHost  *vhost.Server
	// Memory is the byte budget (cfg.MaxMemory) that the forwarder and
	// the link take what the guest makes them hold from.
	Memory *budget.Budget

	// VHostListener, if set before Run, is used instead of creating
	// cfg.Socket: a socket inherited through systemd socket activation. Its
	// file belongs to the service manager and is not removed on exit.
	VHostListener *net.UnixListener
	linkMem       *budget.Budget // Memory's share for the RX backlog
	// portMem are linkMem's equal shares, one per guest port: a guest
	// that posts no RX buffers holds at most its own.
	portMem []*budget.Budget
	// Notify, if set, is told about readiness ("READY=1") and shutdown
	// ("STOPPING=1"), in sd_notify's format.
	Notify func(state string)
	// Confine, if set, is called by Run once every socket is bound and
	// before anything is served (the sandbox); an error stops Run. Once
	// Confine ran, Run leaves socket files in place at exit: a
	// confined process may not remove them, and the next start replaces a
	// stale socket.
	Confine func() error
	// OnReady, if set, is called once vunet serves: its vhost-user socket
	// listens, or (--connect) it starts dialling.
	OnReady func()

	// Sandbox shows what Confine enforced (set by the Confine hook); zero
	// values mean not confined.
	Sandbox sandbox.Gauges

	// confined is set once Confine ran.
	confined bool

	logLimit  *ratelimit.Handler // bounds every log line, see New
	egress    *egress.Policy
	hostAddrs *egress.HostAddrSet // nil unless cfg.Egress.HostAddresses is off
	started   time.Time
	socketGID int // group of the vhost-user socket, or -1
	// sockDir is --unix-forward-dir, where runtime unix forwards create
	// their sockets; nil without it.
	sockDir   *unixsock.SocketDir
	metrics   *metrics.Registry
	dialStats vhost.DialStats // --connect's dials and re-dials
	pcap      *pcap.Writer    // nil without cfg.PCAP
	pcapFile  *os.File
	closers   []func()

	// Live migration (state.go).
	runtime  runtimeForwards
	migStats MigrationStats
	stop     chan struct{}  // closed by Close: background work ends
	bg       sync.WaitGroup // background work (forward retries)
	bgMu     sync.Mutex     // orders goBackground against Close
	bgDone   bool           // Close began: no new background work
}

// New builds every layer from cfg (already validated) without serving yet.
//
// Every layer logs through log wrapped in a ratelimit.Handler: a guest or a
// remote peer can trigger log lines once per packet (DHCP with the pool
// exhausted, TFTP requests, malformed frames, denied flows), and this is the
// one place that bounds them all; what it holds back is counted in
// Stats().Log.
func New(cfg *config.Config, log *slog.Logger) (a *Appliance, err error) {
	lim := ratelimit.NewHandler(log.Handler(), ratelimit.LogBurst, ratelimit.LogEvery)
	log = slog.New(lim)
	a = &Appliance{cfg: cfg, log: log, logLimit: lim, started: time.Now(),
		Memory: budget.New(cfg.MaxMemory), stop: make(chan struct{})}
	defer func() {
		if err != nil {
			a.Close()
		}
	}()
	if cfg.PCAP != "" {
		f, err := os.OpenFile(cfg.PCAP, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return nil, fmt.Errorf("pcap: %w", err)
		}
		a.pcapFile = f
		if a.pcap, err = pcap.New(f, pcap.Options{MaxSize: cfg.PCAPMaxSize, Logger: log.With("layer", "pcap", "file", cfg.PCAP)}); err != nil {
			return nil, fmt.Errorf("pcap: %w", err)
		}
	}
	// Frames waiting for guest RX buffers may take an eighth of the
	// budget; TCP and UDP buffers are the forwarder's (its shares).
	a.linkMem = a.Memory.Share(cfg.MaxMemory / 8)
	for range cfg.MaxGuests {
		a.portMem = append(a.portMem, a.linkMem.Share(a.linkMem.Limit()/int64(cfg.MaxGuests)))
	}
	port := endpoint.Options{
		Memory:      a.linkMem,
		MTU:         uint32(cfg.MTU),
		QueuePairs:  cfg.Queues,
		LinkAddress: tcpip.LinkAddress(cfg.GatewayMAC),
		GuestMAC:    tcpip.LinkAddress(cfg.MAC),
		ARPTargets:  []netip.Addr{cfg.IPv4.Gateway, cfg.IPv4.DNS},
		Pcap:        a.pcap,
		Logger:      log.With("layer", "endpoint"),
	}
	if cfg.IPv6.Enable {
		port.NDPTargets = []netip.Addr{cfg.IPv6.Gateway, cfg.IPv6.DNS, ra.DefaultRouterAddr}
	}
	a.Link, err = endpoint.NewSwitch(endpoint.SwitchOptions{
		Ports: cfg.MaxGuests, Port: port, Isolate: cfg.IsolateGuests,
		PortMemory: func(i int) *budget.Budget { return a.portMem[i] },
		OnPortDown: a.guestLeft,
		Logger:     log.With("layer", "switch"),
	})
	if err != nil {
		return nil, err
	}
	nsOpts := netstack.Options{
		Endpoint: a.Link,
		Gateway4: netip.PrefixFrom(cfg.IPv4.Gateway, cfg.IPv4.Subnet.Bits()),
		DNS4:     cfg.IPv4.DNS,
		Logger:   log.With("layer", "netstack"),
	}
	if cfg.IPv6.Enable {
		nsOpts.Gateway6 = netip.PrefixFrom(cfg.IPv6.Gateway, cfg.IPv6.Subnet.Bits())
		nsOpts.DNS6 = cfg.IPv6.DNS
	}
	if a.Stack, err = netstack.New(nsOpts); err != nil {
		return nil, err
	}
	a.closers = append(a.closers, a.Stack.Close)
	s, nic := a.Stack.Stack(), a.Stack.NIC()

	// The egress policy first: the DNS server consults it too.
	if err := a.buildEgress(); err != nil {
		return nil, err
	}
	a.Names = names.New(names.Options{Reserved: zoneLabels(staticHosts(cfg)), Addrs6: a.guestAddrs6,
		Logger: log})
	// Services bind their ports first, so that the forwarder (which sees
	// whatever no local endpoint claimed) never steals DNS or DHCP.
	if err := a.startDNS(s, nic); err != nil {
		return nil, err
	}
	if a.DHCP, err = dhcp4.New(dhcp4.Options{
		Stack: s, NIC: nic, Logger: log,
		ServerAddr: cfg.IPv4.Gateway, Prefix: cfg.IPv4.Subnet, Router: cfg.IPv4.Gateway,
		DNS: []netip.Addr{cfg.IPv4.DNS}, PoolStart: cfg.IPv4.Guest, Static: staticLeases(cfg),
		LeaseTime: cfg.Boot.DHCPLeaseTime, MTU: cfg.MTU,
		DomainName: cfg.Boot.Domain, DomainSearch: cfg.DNSSearch, Hostname: cfg.Boot.Hostname,
		Names: a.Names,
		Boot: dhcp4.Boot{TFTPFile: cfg.Boot.BootFile, TFTPFileEFI: cfg.Boot.BootFileEFI,
			HTTPURL: cfg.Boot.HTTPBootURL, IPXEURL: cfg.Boot.IPXEScriptURL},
	}); err != nil {
		return nil, err
	}
	a.closers = append(a.closers, a.DHCP.Close)
	if err := a.startIPv6Services(s, nic); err != nil {
		return nil, err
	}
	if cfg.Boot.TFTPRoot != "" {
		if a.TFTP, err = tftp.New(tftp.Options{Stack: s, NIC: nic, Logger: log,
			Addr: cfg.IPv4.Gateway, Root: cfg.Boot.TFTPRoot}); err != nil {
			return nil, err
		}
		a.closers = append(a.closers, a.TFTP.Close)
	}

	if a.socketGID, err = lookupGroup(cfg.SocketGroup); err != nil {
		return nil, err
	}
	if cfg.UnixForwardDir != "" {
		// Given to the user vunet switches to, which creates the sockets.
		uid := -1
		if cfg.Sandbox != config.SandboxOff {
			if uid, err = sandbox.RunAsUID(cfg.RunAs); err != nil {
				return nil, err
			}
		}
		if a.sockDir, err = unixsock.PrepareSocketDir(cfg.UnixForwardDir, unixsock.SocketDirOptions{
			Mode: cfg.SocketMode, GID: a.socketGID, UID: uid}); err != nil {
			return nil, err
		}
	}
	var mover forward.TCPMover
	if cfg.MigrateTCP {
		// Checked now, while it can still stop the start-up: a switch that
		// cannot work would lose every connection at the first migration.
		if err := tcprepair.Available(); err != nil {
			return nil, fmt.Errorf("--migrate-tcp: %w", err)
		}
		mover = a.Stack
	}
	expose := map[uint16]string{}
	for _, e := range cfg.Expose {
		expose[e.Port] = e.Path
	}
	fo := forward.Options{
		Stack: s, NIC: nic,
		Expose:  expose,
		MoveTCP: mover,
		// Unix forwards' sockets get the vhost-user socket's permissions;
		// in --unix-forward-dir, the only way that works once confined.
		ListenUnix: func(path string) (net.Listener, error) {
			if a.sockDir != nil && a.sockDir.Holds(path) {
				return a.sockDir.Listen(path, "unix forward socket")
			}
			return unixsock.Listen(path, unixsock.Options{Name: "unix forward socket", Mode: cfg.SocketMode, GID: a.socketGID})
		},
		Gateway4: cfg.IPv4.Gateway, DNS4: cfg.IPv4.DNS,
		MapHostLoopback:      cfg.MapHostLoopback,
		Egress:               a.egress,
		DialTimeout:          cfg.DialTimeout,
		MaxInFlightDials:     unlimitedIfZero(cfg.MaxInflightDials),
		MaxConns:             unlimitedIfZero(cfg.MaxConnections),
		MaxInboundConns:      unlimitedIfZero(cfg.MaxInboundConnections),
		MaxUDPFlowsPerSource: unlimitedIfZero(cfg.MaxUDPFlowsPerSource),
		// Each guest has the limits above for itself and an equal share
		// of the outbound memory (or --max-guest-memory), charged by the
		// switch port its frames came in on.
		Guests:      cfg.MaxGuests,
		GuestOf:     a.Link.PortOf,
		GuestMemory: cfg.MaxGuestMemory,
		// What the NAT's connections to a guest have in flight is
		// bounded by its port's receive backlog (forward's rxShareNum).
		GuestRXCapacity: func(i int) int64 {
			if ports := a.Link.Ports(); i >= 0 && i < len(ports) {
				return ports[i].RXCapacity()
			}
			return 0
		},
		Memory: a.Memory,
		// The guest's traffic may take three quarters; with the link's
		// eighth, the last eighth is kept for port forwards.
		OutboundMemory:       cfg.MaxMemory - cfg.MaxMemory/8 - cfg.MaxMemory/8,
		UDPIdleTimeout:       cfg.UDPIdleTimeout,
		UDPStreamIdleTimeout: cfg.UDPStreamTimeout,
		Logger:               log.With("layer", "forward"),
	}
	if cfg.IPv6.Enable {
		fo.Gateway6, fo.DNS6 = cfg.IPv6.Gateway, cfg.IPv6.DNS
		fo.GuestIPv6 = a.guestIPv6
	}
	fo.ResolveGuest = a.resolveGuest
	if a.Forward, err = forward.New(fo); err != nil {
		return nil, err
	}
	a.closers = append(a.closers, func() { a.Forward.Close() })
	// Runs before the forwarder closes: retries of carried-over forwards
	// end first.
	a.closers = append(a.closers, a.stopBackground)
	for _, f := range cfg.Forwards {
		pf, err := a.Forward.AddPortForward(forward.PortForward{
			Proto: f.Proto, Host: f.Host, Path: f.Path, Guest: netip.AddrPortFrom(cfg.IPv4.Guest, f.GuestPort),
			Select: f.Guest.String(),
		})
		if err != nil {
			return nil, fmt.Errorf("forward %s: %w", f, err)
		}
		log.Info("port forward", "forward", pf.String())
	}

	peers := vhost.PeerPolicy{UIDs: []uint32{uint32(os.Geteuid())}}
	if a.socketGID >= 0 {
		peers.GIDs = []uint32{uint32(a.socketGID)}
	}
	if a.VHost, err = vhost.NewServer(vhost.Options{Backend: a.Link.Ports()[0], Backends: a.Link,
		MaxSessions: cfg.MaxGuests, Logger: log.With("layer", "vhost"),
		SetupTimeout: cfg.SetupTimeout, Peers: peers, State: deviceState{a}}); err != nil {
		return nil, err
	}
	if a.metrics, err = a.registerMetrics(); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *Appliance) startIPv6Services(s *stack.Stack, nic tcpip.NICID) error {
	cfg := a.cfg
	if !cfg.IPv6.Enable {
		return nil
	}
	var err error
	stateful := cfg.IPv6.DHCPv6 == config.DHCPv6Stateful
	// The DHCPv6 server goes first: its pool is checked against the
	// gateway and DNS addresses before the M flag promises it to guests.
	if a.DHCPv6, err = ra.NewDHCPv6(ra.DHCPv6Options{Stack: s, NIC: nic, Logger: a.log,
		DNS: []netip.Addr{cfg.IPv6.DNS}, DomainSearch: cfg.DNSSearch,
		Stateful: stateful, Prefix: cfg.IPv6.Subnet, Reserved: []netip.Addr{cfg.IPv6.Gateway},
		LeaseTime: cfg.Boot.DHCPLeaseTime}); err != nil {
		return err
	}
	a.closers = append(a.closers, a.DHCPv6.Close)
	if a.RA, err = ra.New(ra.Options{Stack: s, NIC: nic, Logger: a.log,
		Prefix: cfg.IPv6.Subnet, DNS: []netip.Addr{cfg.IPv6.DNS},
		DomainSearch: cfg.DNSSearch, MTU: cfg.MTU, Managed: stateful}); err != nil {
		return err
	}
	a.closers = append(a.closers, a.RA.Close)
	return nil
}

// guestIPv6 is the guest's IPv6 address for port forwards on IPv6 host
// addresses, or invalid when it has none: its DHCPv6 lease (stateful mode;
// the one expiring last, vunet serving one guest), else a global address
// of the guest's MAC that the stack has seen in neighbour discovery (the
// guest sends neighbour solicitations from it as soon as it talks IPv6),
// the SLAAC EUI-64 address of the MAC first.
func (a *Appliance) guestIPv6() netip.Addr {
	var best netip.Addr
	if a.DHCPv6 != nil {
		var exp time.Time
		for _, l := range a.DHCPv6.Leases() {
			if l.Expiry.After(exp) {
				best, exp = l.Addr, l.Expiry
			}
		}
		if best.IsValid() {
			return best
		}
	}
	if addrs := a.neighbourAddrs6(a.cfg.MAC); len(addrs) > 0 {
		return addrs[0]
	}
	return netip.Addr{}
}

// guestAddrs6 are the IPv6 addresses of the guest with mac, for its DNS
// name: its DHCPv6 leases whose DUID carries the MAC, then the global
// addresses of the MAC seen in neighbour discovery (SLAAC EUI-64 first),
// then those in the subnet the switch saw it send from. The last matter
// with several guests: one that talks IPv6 only to the other guests
// (through the switch) never enters the stack's neighbour table.
func (a *Appliance) guestAddrs6(mac net.HardwareAddr) []netip.Addr {
	if !a.cfg.IPv6.Enable {
		return nil
	}
	var out []netip.Addr
	if a.DHCPv6 != nil {
		for _, l := range a.DHCPv6.Leases() {
			if l.MAC == mac.String() && !slices.Contains(out, l.Addr) {
				out = append(out, l.Addr)
			}
		}
	}
	for _, n := range a.neighbourAddrs6(mac) {
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	for _, g := range a.Link.Guests() {
		if !bytes.Equal(g.MAC, mac) {
			continue
		}
		for _, ad := range g.Addrs {
			if ad.Is6() && a.cfg.IPv6.Subnet.Contains(ad) && !slices.Contains(out, ad) {
				out = append(out, ad)
			}
		}
	}
	return out
}

// neighbourAddrs6 are the addresses in the IPv6 subnet that the stack's
// neighbour table holds for mac (live entries), the SLAAC EUI-64 address
// of the MAC first.
func (a *Appliance) neighbourAddrs6(mac net.HardwareAddr) []netip.Addr {
	ns, terr := a.Stack.Stack().Neighbors(a.Stack.NIC(), ipv6.ProtocolNumber)
	if terr != nil {
		return nil
	}
	link := tcpip.LinkAddress(mac)
	slaac := eui64(a.cfg.IPv6.Subnet, mac)
	var out []netip.Addr
	for _, n := range ns {
		addr, ok := netip.AddrFromSlice(n.Addr.AsSlice())
		if !ok || n.LinkAddr != link || !a.cfg.IPv6.Subnet.Contains(addr) || slices.Contains(out, addr) {
			continue
		}
		switch n.State {
		case stack.Reachable, stack.Stale, stack.Delay, stack.Probe, stack.Static:
		default:
			continue
		}
		if addr == slaac {
			out = slices.Insert(out, 0, addr)
		} else {
			out = append(out, addr)
		}
	}
	return out
}

// eui64 is the SLAAC address of mac in the /64 prefix p (RFC 4291 appendix A).
func eui64(p netip.Prefix, mac net.HardwareAddr) netip.Addr {
	if len(mac) != 6 {
		return netip.Addr{}
	}
	b := p.Masked().Addr().As16()
	b[8], b[9], b[10] = mac[0]^0x02, mac[1], mac[2]
	b[11], b[12] = 0xff, 0xfe
	b[13], b[14], b[15] = mac[3], mac[4], mac[5]
	return netip.AddrFrom16(b)
}

func (a *Appliance) startDNS(s *stack.Stack, nic tcpip.NICID) error {
	cfg := a.cfg
	upstreams := cfg.DNSUpstream
	if len(upstreams) == 0 {
		// The host's resolvers, read now: a loopback resolver such as
		// 127.0.0.53 works because the forwarder runs on the host.
		ups, _, err := dns.ReadResolvConf("/etc/resolv.conf")
		if err != nil {
			a.log.Warn("no upstream DNS servers: only static names will resolve", "err", err)
		}
		upstreams = ups
	}
	listen := []netip.Addr{cfg.IPv4.DNS}
	if cfg.IPv6.Enable {
		listen = append(listen, cfg.IPv6.DNS)
	}
	var err error
	a.DNS, err = dns.New(dns.Options{
		Stack: s, NIC: nic, Logger: a.log,
		Listen: listen, Upstreams: upstreams, Static: staticHosts(cfg),
		StaticDenied: a.egress.AddrDenied,
		Zone:         names.Domain, Guests: a.Names,
	})
	if err != nil {
		return err
	}
	a.closers = append(a.closers, a.DNS.Close)
	return nil
}

// buildEgress builds the egress policy from cfg.Egress, watching the host's
// addresses if they are to be denied.
func (a *Appliance) buildEgress() error {
	cfg := a.cfg
	opts := egress.Options{
		Rules: cfg.Egress.Rules, Mode: cfg.Egress.Mode, AllowMetadata: cfg.Egress.AllowMetadata,
		// The gateway is vunet itself; where MapHostLoopback is off the
		// forwarder refuses it before the policy is asked.
		Gateways: []netip.Addr{cfg.IPv4.Gateway},
	}
	if cfg.IPv6.Enable {
		opts.Gateways = append(opts.Gateways, cfg.IPv6.Gateway)
	}
	if !cfg.Egress.HostAddresses {
		h, err := egress.WatchHostAddrs(a.log.With("layer", "egress"))
		if err != nil {
			return fmt.Errorf("egress: host addresses: %w", err)
		}
		a.hostAddrs = h
		a.closers = append(a.closers, h.Close)
		opts.HostAddrs = h
	}
	a.egress = egress.New(opts)
	for name, addrs := range staticHosts(cfg) {
		for _, ad := range addrs {
			if a.egress.AddrDenied(ad) {
				a.log.Warn("static DNS name points at an address the egress policy denies; it is left out of answers",
					"name", name, "addr", ad)
			}
		}
	}
	a.log.Info("egress policy", "mode", cfg.Egress.Mode.String(), "rules", len(cfg.Egress.Rules),
		"allow_metadata", cfg.Egress.AllowMetadata, "host_addresses", cfg.Egress.HostAddresses)
	return nil
}

// Run serves until ctx is done (or, with cfg.Once, until the frontend
// disconnects), then closes everything.
func (a *Appliance) Run(ctx context.Context) error {
	// The sockets first: failing to create one must stop the appliance
	// before anything is served, and the sandbox comes after them.
	apiL, err := a.listenAPI()
	if err != nil {
		return err
	}
	cfg := a.cfg
	l := a.VHostListener
	if cfg.Connect == "" && l == nil {
		if l, err = unixsock.Listen(cfg.Socket, unixsock.Options{Name: "vhost-user socket", Mode: cfg.SocketMode, GID: a.socketGID}); err != nil {
			if apiL != nil {
				apiL.Close()
				a.removeSocket(cfg.API)
			}
			return err
		}
		defer a.removeSocket(cfg.Socket)
	}
	if a.Confine != nil {
		// Even a failed Confine may have confined the process in part.
		a.confined = true
		if err := a.Confine(); err != nil {
			if l != nil {
				l.Close()
			}
			if apiL != nil {
				apiL.Close()
			}
			return err
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	serve := func(name string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(ctx); err != nil && ctx.Err() == nil {
				errc <- fmt.Errorf("%s: %w", name, err)
			}
		}()
	}
	serve("dhcp4", a.DHCP.Serve)
	serve("dns", a.DNS.Serve)
	if a.RA != nil {
		serve("ra", a.RA.Serve)
		serve("dhcpv6", a.DHCPv6.Serve)
	}
	if a.TFTP != nil {
		serve("tftp", a.TFTP.Serve)
	}
	if apiL != nil {
		serve("api", func(ctx context.Context) error { return a.serveAPI(ctx, apiL) })
	}

	a.log.Info("vunet ready", "socket", firstNonEmpty(cfg.Socket, cfg.Connect), "mode", mode(cfg),
		"guest", netip.PrefixFrom(cfg.IPv4.Guest, cfg.IPv4.Subnet.Bits()).String(), "gateway", cfg.IPv4.Gateway.String(),
		"dns", cfg.IPv4.DNS.String(), "ipv6", ipv6Summary(cfg), "mtu", cfg.MTU)
	if a.OnReady != nil {
		a.OnReady()
	}
	if cfg.Connect != "" {
		a.notify(systemdReady)
		err = a.VHost.DialLoop(ctx, cfg.Connect, vhost.DialOptions{Once: cfg.Once, Stats: &a.dialStats})
	} else {
		a.notify(systemdReady)
		err = a.VHost.Serve(ctx, l, cfg.Once)
	}
	a.notify(systemdStopping)
	cancel()
	wg.Wait()
	close(errc)
	for e := range errc {
		err = errors.Join(err, e)
	}
	return err
}

// removeSocket removes a socket file vunet created, unless the process is
// confined (see Confine).
func (a *Appliance) removeSocket(path string) {
	if a.confined {
		a.log.Debug("leaving socket file in place (sandboxed)", "path", path)
		return
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("removing socket", "path", path, "err", err)
	}
}

// sd_notify states sent through Notify.
const (
	systemdReady    = "READY=1"
	systemdStopping = "STOPPING=1"
)

func (a *Appliance) notify(state string) {
	if a.Notify != nil {
		a.Notify(state)
	}
}

// Close releases every layer. It is safe to call more than once.
func (a *Appliance) Close() {
	for i := len(a.closers) - 1; i >= 0; i-- {
		a.closers[i]()
	}
	a.closers = nil
	if a.pcap != nil {
		// The endpoint has stopped writing (the closers above); what is
		// buffered reaches the file before it is closed.
		a.pcap.Close()
		a.pcap = nil
	}
	if a.pcapFile != nil {
		a.pcapFile.Close()
		a.pcapFile = nil
	}
}

// Run builds an appliance from cfg and runs it until ctx is cancelled.
func Run(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	a, err := New(cfg, log)
	if err != nil {
		return err
	}
	defer a.Close()
	return a.Run(ctx)
}

// lookupGroup resolves --socket-group (a name or a number); -1 without.
// It runs at start-up, before any sandbox hides /etc/group.
func lookupGroup(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	if gid, err := strconv.Atoi(name); err == nil && gid >= 0 {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, fmt.Errorf("socket group: %w", err)
	}
	return strconv.Atoi(g.Gid)
}

func mode(cfg *config.Config) string {
	if cfg.Connect != "" {
		return "client"
	}
	return "server"
}

func ipv6Summary(cfg *config.Config) string {
	if !cfg.IPv6.Enable {
		return "off"
	}
	return fmt.Sprintf("%s gw %s dns %s", cfg.IPv6.Subnet, cfg.IPv6.Gateway, cfg.IPv6.DNS)
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// unlimitedIfZero maps the configuration's "0 means unlimited" to the
// forwarder's "negative means unlimited" (its 0 means "default").
func unlimitedIfZero(v int) int {
	if v == 0 {
		return -1
	}
	return v
}

// zoneLabels are the labels directly under names.Domain that static names
// use (host, and user names such as db.vunet.internal): no guest may take
// them, the static table answers them first.
func zoneLabels(static map[string][]netip.Addr) []string {
	var out []string
	for name := range static {
		rest, ok := strings.CutSuffix(strings.TrimSuffix(strings.ToLower(name), "."), "."+names.Domain)
		if !ok {
			continue
		}
		out = append(out, rest[strings.LastIndexByte(rest, '.')+1:])
	}
	return out
}

// staticHosts is the DNS static table: the host alias plus user names.
func staticHosts(cfg *config.Config) map[string][]netip.Addr {
	m := map[string][]netip.Addr{HostAlias: {cfg.IPv4.Gateway}}
	if cfg.IPv6.Enable {
		m[HostAlias] = append(m[HostAlias], cfg.IPv6.Gateway)
	}
	for name, addr := range cfg.Hosts {
		name = strings.TrimSuffix(strings.ToLower(name), ".")
		m[name] = append(m[name], addr)
	}
	return m
}

// staticLeases is cfg's ipv4.static_leases for the DHCP server.
func staticLeases(cfg *config.Config) map[[6]byte]netip.Addr {
	m := map[[6]byte]netip.Addr{}
	for _, l := range cfg.IPv4.StaticLeases {
		if len(l.MAC) == 6 { // validated; never panic on a hand-built config
			m[[6]byte(l.MAC)] = l.Addr
		}
	}
	return m
}
