// Package dhcp4 is vunet's DHCPv4 server. It hands the guest its address
// (QEMU slirp compatible defaults: 10.0.2.15/24, router 10.0.2.2, DNS
// 10.0.2.3) and optional network-boot parameters for PXE and UEFI HTTP boot
// firmware. It runs on the appliance's gVisor stack, on the guest-facing NIC.
package dhcp4

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/services/internal/gnet"
)

// Ports of the DHCPv4 protocol.
const (
	ServerPort = 67
	ClientPort = 68
)

// Defaults, compatible with QEMU's slirp.
var (
	DefaultServerAddr = netip.MustParseAddr("10.0.2.2")
	DefaultPrefix     = netip.MustParsePrefix("10.0.2.0/24")
	DefaultDNS        = netip.MustParseAddr("10.0.2.3")
	DefaultPoolStart  = netip.MustParseAddr("10.0.2.15")
)

const (
	// DefaultLeaseTime is slirp's lease time.
	DefaultLeaseTime = 24 * time.Hour
	// MaxPoolSize bounds the lease table whatever the subnet size.
	MaxPoolSize = 4096
	// offerHold is how long an offered address stays reserved for the client
	// that was offered it.
	offerHold = 60 * time.Second
	// declineHold is how long a DECLINEd address is kept out of the pool.
	declineHold = 10 * time.Minute
	// maxPacket is the largest DHCP message read; DHCP messages are small
	// (576 bytes unless negotiated) and a larger read buffer costs nothing.
	maxPacket = 1500
)

// Boot configures network boot. With none of the fields set no boot options
// are sent.
type Boot struct {
	// NextServer is the TFTP server: sent as siaddr and option 66. Defaults to
	// the server address when a TFTP file is configured.
	NextServer netip.Addr
	// TFTPFile is the boot file name (option 67 and the BOOTP file field) for
	// PXE and other BOOTP-style clients. OVMF's PXE ignores offers without it.
	TFTPFile string
	// TFTPFileEFI, if set, replaces TFTPFile for clients whose architecture
	// (option 93) is a UEFI one, so one configuration can boot BIOS and UEFI
	// guests.
	TFTPFileEFI string
	// HTTPURL is the boot file URL given to UEFI HTTP boot clients (vendor
	// class "HTTPClient"); "HTTPClient" is echoed in option 60 as the UEFI
	// spec requires.
	HTTPURL string
	// IPXEURL, if set, is the boot file given to clients that identify as
	// iPXE (user class "iPXE"), so PXE can chainload iPXE which then fetches
	// a script over HTTP instead of looping on the TFTP file.
	IPXEURL string
}

// Options configures a Server. Zero fields take the defaults noted.
type Options struct {
	// Stack and NIC are the gVisor stack and the guest-facing NIC. The NIC
	// must have ServerAddr assigned (the caller does that).
	Stack *stack.Stack
	NIC   tcpip.NICID
	// Logger receives service logs; per-packet logs are at debug level.
	// Defaults to slog.Default().
	Logger *slog.Logger

	// ServerAddr is the server identifier and source of replies
	// (default 10.0.2.2).
	ServerAddr netip.Addr
	// Prefix is the guest subnet (default 10.0.2.0/24); it gives the subnet
	// mask and must contain ServerAddr and the pool.
	Prefix netip.Prefix
	// Router is the default gateway (default ServerAddr).
	Router netip.Addr
	// DNS are the name servers (default [10.0.2.3]).
	DNS []netip.Addr
	// PoolStart is the first address handed out (default 10.0.2.15); further
	// clients get the following addresses.
	PoolStart netip.Addr
	// PoolSize is the number of addresses in the pool (default: up to the
	// end of the subnet, at most MaxPoolSize).
	PoolSize int
	// Static are fixed leases by MAC: that client always gets its
	// address (inside the pool or anywhere else in Prefix except the
	// service addresses), and no other client gets it.
	Static map[[6]byte]netip.Addr
	// LeaseTime is the lease duration (default 24h).
	LeaseTime time.Duration
	// MTU, if non-zero, is sent as the interface MTU (option 26).
	MTU int
	// DomainName is sent as option 15 if set.
	DomainName string
	// DomainSearch is sent as option 119 if non-empty.
	DomainSearch []string
	// Hostname is sent as option 12 if set.
	Hostname string
	// Boot configures network boot.
	Boot Boot
	// Names, if set, is told the host name each client sends (option 81,
	// else 12) when its lease is bound or renewed, and when the lease is
	// released or declined, so the DNS server can resolve the guest by name.
	// The server passes the name unchecked: Names validates it.
	Names Names
}

// Names receives clients' host names with their leases (services/names).
// It is called with the server's lock held and must not call back into the
// server.
type Names interface {
	// Bind records the name a client sent with its bound lease ("" when it
	// sent none); called on every ACK of a REQUEST.
	Bind(mac net.HardwareAddr, name string, addr netip.Addr, expiry time.Time)
	// Release drops the client's name: its lease ended early.
	Release(mac net.HardwareAddr)
}

// Stats are the server's counters, declared for the metrics registry
// (internal/metrics).
type Stats struct {
	Received  atomic.Uint64 `metric:"dhcp_packets_total" help:"DHCP packets received."`
	Malformed atomic.Uint64 `metric:"dhcp_malformed_total" help:"Packets that were not valid BOOTREQUESTs." hostile:"dhcp"`
	// Messages by type, received and sent.
	Discover atomic.Uint64 `metric:"dhcp_messages_total{type=discover}" help:"DHCP messages by type, received (discover, request, decline, release, inform) and sent (offer, ack, nak)."`
	Request  atomic.Uint64 `metric:"dhcp_messages_total{type=request}"`
	Decline  atomic.Uint64 `metric:"dhcp_messages_total{type=decline}"`
	Release  atomic.Uint64 `metric:"dhcp_messages_total{type=release}"`
	Inform   atomic.Uint64 `metric:"dhcp_messages_total{type=inform}"`
	Offer    atomic.Uint64 `metric:"dhcp_messages_total{type=offer}"`
	Ack      atomic.Uint64 `metric:"dhcp_messages_total{type=ack}"`
	Nak      atomic.Uint64 `metric:"dhcp_messages_total{type=nak}"`

	PoolExhausted atomic.Uint64 `metric:"dhcp_pool_exhausted_total" help:"DISCOVERs left unanswered because the pool was full."`
	SendErrors    atomic.Uint64 `metric:"dhcp_send_errors_total" help:"DHCP replies that could not be sent."`
	// ActiveLeases and PoolSize are set by New.
	ActiveLeases func() int64 `metric:"dhcp_leases" kind:"gauge" help:"Bound, unexpired DHCP leases."`
	PoolSize     func() int64 `metric:"dhcp_pool_size" kind:"gauge" help:"Addresses in the DHCP pool."`
}

// Server is a DHCPv4 server. Create it with New, run it with Serve.
type Server struct {
	opts Options
	log  *slog.Logger
	now  func() time.Time

	// anyConn (0.0.0.0:67) receives broadcasts; srvConn (ServerAddr:67)
	// receives unicast and sends every reply, so replies carry ServerAddr as
	// source whatever the NIC's primary address is.
	anyConn *gnet.UDP
	srvConn *gnet.UDP

	mu     sync.Mutex
	leases *leaseTable

	stats     Stats
	closeOnce sync.Once
	closed    chan struct{}
}

// New validates opts, applies defaults and binds the server's endpoints.
func New(opts Options) (*Server, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, fmt.Errorf("dhcp4: %w", err)
	}
	lt := newLeaseTable(opts.PoolStart, opts.PoolSize)
	for m, a := range opts.Static {
		lt.static[m] = a
		lt.reserved[a] = m
	}
	s := &Server{
		opts:   opts,
		log:    opts.Logger.With("service", "dhcp4"),
		now:    time.Now,
		leases: lt,
		closed: make(chan struct{}),
	}
	s.stats.ActiveLeases = func() int64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return int64(s.leases.expire(s.now()))
	}
	s.stats.PoolSize = func() int64 { return int64(s.opts.PoolSize) }
	if opts.Stack == nil {
		// Stackless servers are only built by tests and the fuzzer, which
		// drive handle directly.
		return s, nil
	}
	// Both endpoints need SO_REUSEADDR to share port 67. SO_BROADCAST is
	// needed on the sending one for 255.255.255.255.
	var err error
	s.anyConn, err = gnet.ListenUDP(opts.Stack, opts.NIC, ipv4.ProtocolNumber,
		netip.AddrPortFrom(netip.IPv4Unspecified(), ServerPort), gnet.UDPOptions{ReuseAddr: true, Broadcast: true})
	if err != nil {
		return nil, fmt.Errorf("dhcp4: %w", err)
	}
	s.srvConn, err = gnet.ListenUDP(opts.Stack, opts.NIC, ipv4.ProtocolNumber,
		netip.AddrPortFrom(opts.ServerAddr, ServerPort), gnet.UDPOptions{ReuseAddr: true, Broadcast: true})
	if err != nil {
		s.anyConn.Conn.Close()
		return nil, fmt.Errorf("dhcp4: %w", err)
	}
	return s, nil
}

func (o *Options) setDefaults() error {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if !o.ServerAddr.IsValid() {
		o.ServerAddr = DefaultServerAddr
	}
	if !o.Prefix.IsValid() {
		o.Prefix = DefaultPrefix
	}
	o.Prefix = o.Prefix.Masked()
	if !o.Router.IsValid() {
		o.Router = o.ServerAddr
	}
	if o.DNS == nil {
		o.DNS = []netip.Addr{DefaultDNS}
	}
	if !o.PoolStart.IsValid() {
		o.PoolStart = DefaultPoolStart
	}
	if o.LeaseTime == 0 {
		o.LeaseTime = DefaultLeaseTime
	}

	if !o.Prefix.Addr().Is4() || o.Prefix.Bits() < 8 || o.Prefix.Bits() > 30 {
		return fmt.Errorf("prefix %s: want an IPv4 prefix between /8 and /30", o.Prefix)
	}
	bcast := broadcastOf(o.Prefix)
	for _, a := range []struct {
		name string
		a    netip.Addr
	}{{"server address", o.ServerAddr}, {"pool start", o.PoolStart}} {
		if !a.a.Is4() || !o.Prefix.Contains(a.a) || a.a == o.Prefix.Addr() || a.a == bcast {
			return fmt.Errorf("%s %s: want a host address in %s", a.name, a.a, o.Prefix)
		}
	}
	if !o.Router.Is4() {
		return fmt.Errorf("router %s: want an IPv4 address", o.Router)
	}
	for _, d := range o.DNS {
		if !d.Is4() {
			return fmt.Errorf("dns server %s: want an IPv4 address", d)
		}
	}
	room := int(ipToUint(bcast) - ipToUint(o.PoolStart)) // addresses before broadcast
	if o.PoolSize == 0 {
		o.PoolSize = min(room, MaxPoolSize)
	}
	if o.PoolSize < 1 || o.PoolSize > room || o.PoolSize > MaxPoolSize {
		return fmt.Errorf("pool size %d: want 1..%d (from %s to the end of %s, at most %d)",
			o.PoolSize, min(room, MaxPoolSize), o.PoolStart, o.Prefix, MaxPoolSize)
	}
	pool := newLeaseTable(o.PoolStart, o.PoolSize)
	for _, a := range append([]netip.Addr{o.ServerAddr, o.Router}, o.DNS...) {
		if pool.inPool(a) {
			return fmt.Errorf("pool %s+%d contains service address %s", o.PoolStart, o.PoolSize, a)
		}
	}
	taken := map[netip.Addr]bool{o.ServerAddr: true, o.Router: true}
	for _, d := range o.DNS {
		taken[d] = true
	}
	for m, a := range o.Static {
		hw := net.HardwareAddr(m[:]).String()
		switch {
		case m[0]&1 != 0 || m == [6]byte{}:
			return fmt.Errorf("static lease for %s: not a unicast MAC", hw)
		case !a.Is4() || !o.Prefix.Contains(a) || a == o.Prefix.Addr() || a == bcast:
			return fmt.Errorf("static lease %s for %s: want a host address in %s", a, hw, o.Prefix)
		case taken[a]:
			return fmt.Errorf("static lease %s for %s: a service address or another static lease's", a, hw)
		}
		taken[a] = true
	}
	if o.LeaseTime < time.Minute || o.LeaseTime > 365*24*time.Hour {
		return fmt.Errorf("lease time %s: want 1m..8760h", o.LeaseTime)
	}
	if o.MTU != 0 && (o.MTU < 68 || o.MTU > 65535) {
		return fmt.Errorf("mtu %d: want 68..65535", o.MTU)
	}
	if len(o.DNS) > 63 {
		return fmt.Errorf("%d dns servers: at most 63 fit in option 6", len(o.DNS))
	}
	for name, v := range map[string]string{"hostname": o.Hostname, "domain name": o.DomainName,
		"tftp file": o.Boot.TFTPFile, "efi tftp file": o.Boot.TFTPFileEFI, "http boot url": o.Boot.HTTPURL, "ipxe url": o.Boot.IPXEURL} {
		if len(v) > 255 {
			return fmt.Errorf("%s: %d bytes, at most 255 fit in a DHCP option", name, len(v))
		}
	}
	if o.Hostname != "" {
		if err := gnet.CheckDomain(o.Hostname); err != nil {
			return fmt.Errorf("hostname: %w", err)
		}
	}
	if o.DomainName != "" {
		if err := gnet.CheckDomain(o.DomainName); err != nil {
			return fmt.Errorf("domain name: %w", err)
		}
	}
	total := 0
	for _, d := range o.DomainSearch {
		if err := gnet.CheckDomain(d); err != nil {
			return fmt.Errorf("domain search: %w", err)
		}
		total += len(d) + 2
	}
	// RFC 3397 allows splitting option 119 across several option instances,
	// but the encoder used here emits one, so keep the list within 255 bytes.
	if total > 255 {
		return fmt.Errorf("domain search list too long (%d bytes encoded, at most 255)", total)
	}
	if u := o.Boot.HTTPURL; u != "" && !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
		return fmt.Errorf("http boot url %q: want an http:// or https:// URL", u)
	}
	if o.Boot.TFTPFile != "" || o.Boot.TFTPFileEFI != "" {
		if !o.Boot.NextServer.IsValid() {
			o.Boot.NextServer = o.ServerAddr
		}
	}
	if o.Boot.NextServer.IsValid() && !o.Boot.NextServer.Is4() {
		return fmt.Errorf("boot next server %s: want an IPv4 address", o.Boot.NextServer)
	}
	return nil
}

func broadcastOf(p netip.Prefix) netip.Addr {
	n := ipToUint(p.Masked().Addr()) | (1<<(32-p.Bits()) - 1)
	return netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
}

// Serve answers DHCP requests until ctx is done or Close is called. It
// returns nil on such a shutdown.
func (s *Server) Serve(ctx context.Context) error {
	if s.anyConn == nil {
		return errors.New("dhcp4: server has no stack")
	}
	s.log.Info("dhcp4 server listening", "nic", s.opts.NIC, "server", s.opts.ServerAddr,
		"pool", fmt.Sprintf("%s+%d", s.opts.PoolStart, s.opts.PoolSize))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-ctx.Done():
		case <-s.closed:
		}
		s.Close()
	}()
	errc := make(chan error, 2)
	for _, c := range []*gnet.UDP{s.anyConn, s.srvConn} {
		go func() { errc <- s.readLoop(c) }()
	}
	err := errors.Join(<-errc, <-errc)
	select {
	case <-s.closed:
		return nil
	default:
		return err
	}
}

func (s *Server) readLoop(c *gnet.UDP) error {
	err := c.ReadLoop(maxPacket, s.closed, func(b []byte, from *net.UDPAddr) {
		s.handlePacket(b, from.String())
	})
	if err != nil {
		return fmt.Errorf("dhcp4: read: %w", err)
	}
	return nil
}

// Close stops the server and releases its endpoints. It is safe to call more
// than once.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		close(s.closed)
		if s.anyConn != nil {
			s.anyConn.Conn.Close()
			s.srvConn.Conn.Close()
		}
	})
}

// Stats returns the live counters.
func (s *Server) Stats() *Stats { return &s.stats }

// Lease describes one bound lease.
type Lease struct {
	MAC    string
	Addr   netip.Addr
	Expiry time.Time
}

// Leases returns the bound, unexpired leases (for status pages and tests).
func (s *Server) Leases() []Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	s.leases.expire(now)
	var out []Lease
	for _, l := range s.leases.byMAC {
		if l.bound {
			out = append(out, Lease{MAC: l.mac.String(), Addr: l.addr, Expiry: l.expiry})
		}
	}
	return out
}

// RestoreLease binds addr to the client mac until expiry: a lease the
// guest got from the vunet it was live-migrated from. The address must be
// in the pool and not bound to another client; a lease the client already
// has here is replaced (the source's view is the newer one).
func (s *Server) RestoreLease(mac net.HardwareAddr, addr netip.Addr, expiry time.Time) error {
	if len(mac) != 6 {
		return fmt.Errorf("dhcp4: restored lease: MAC %v is not 6 bytes", mac)
	}
	var m [6]byte
	copy(m[:], mac)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if !expiry.After(now) {
		return fmt.Errorf("dhcp4: restored lease %s for %s: already expired", addr, mac)
	}
	// free knows static leases: a client with one may have only it (in
	// the pool or not), others only unreserved pool addresses.
	if !s.leases.free(addr, m, now) {
		why := fmt.Sprintf("not in the pool %s+%d", s.opts.PoolStart, s.opts.PoolSize)
		if st, ok := s.leases.static[m]; ok {
			why = fmt.Sprintf("this client's static lease is %s", st)
		} else if _, ok := s.leases.reserved[addr]; ok {
			why = "another client's static lease"
		} else if o := s.leases.owner(addr, now); o != nil {
			why = "held by " + o.mac.String()
		}
		return fmt.Errorf("dhcp4: restored lease %s for %s: %s", addr, mac, why)
	}
	s.leases.set(m, addr, expiry, true)
	return nil
}
