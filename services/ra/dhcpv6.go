package ra

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/iana"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/services/internal/gnet"
)

// DHCPv6 ports and the All_DHCP_Relay_Agents_and_Servers group.
const (
	DHCPv6ServerPort = 547
	DHCPv6ClientPort = 546
)

var allDHCPServers = netip.MustParseAddr("ff02::1:2")

// DHCPv6 defaults for the stateful mode. The pool is fd00::100-fd00::1ff in
// the default prefix: clear of the gateway (::2) and DNS server (::3), and
// of every SLAAC address derived from a MAC (their interface identifiers
// have ff:fe in the middle, pool addresses do not; NewDHCPv6 checks both).
const (
	DefaultDHCPv6PoolOffset = 0x100
	DefaultDHCPv6PoolSize   = 256
	// MaxDHCPv6PoolSize bounds the lease table.
	MaxDHCPv6PoolSize = 4096
	// DefaultDHCPv6LeaseTime is the valid lifetime of a lease, as DHCPv4's
	// default (the appliance passes boot.dhcp_lease_time for both); the
	// preferred lifetime is half of it, T1 a quarter and T2 two fifths
	// (RFC 8415 21.4's 0.5 and 0.8 of the preferred lifetime).
	DefaultDHCPv6LeaseTime = time.Hour
	// dhcpv6DeclineHold is how long a DECLINEd address is kept out of the
	// pool.
	dhcpv6DeclineHold = 10 * time.Minute
	// maxIAs is how many IA_NA options of one message are served (a client
	// has one per interface); further ones are ignored, so one packet costs
	// a bounded amount of work.
	maxIAs = 8
	// maxDUID is RFC 8415 11.1's limit: 130 octets with the type code.
	maxDUID = 130
)

// DHCPv6Options configures the DHCPv6 server. Zero fields take the
// defaults noted.
type DHCPv6Options struct {
	// Stack and NIC are the gVisor stack and the guest-facing NIC (in
	// spoofing mode, so replies can come from RouterAddr).
	Stack *stack.Stack
	NIC   tcpip.NICID
	// Logger receives service logs; per-packet logs are at debug level.
	Logger *slog.Logger
	// RouterAddr is the link-local source of replies (default fe80::2).
	RouterAddr netip.Addr
	// DNS are the name servers returned (option 23; default [fd00::3]).
	DNS []netip.Addr
	// DomainSearch is returned in option 24 if non-empty.
	DomainSearch []string
	// RefreshTime is the information refresh time (option 32; default 1h).
	RefreshTime time.Duration

	// Stateful turns on address assignment (IA_NA). Without it only
	// INFORMATION-REQUEST is answered and addresses come from SLAAC.
	Stateful bool
	// Prefix is the guest prefix (default fd00::/64): the pool must lie in
	// it, and CONFIRM checks addresses against it.
	Prefix netip.Prefix
	// PoolStart is the first address leased (default Prefix + 0x100) and
	// PoolSize the number of addresses (default 256, at most 4096).
	PoolStart netip.Addr
	PoolSize  int
	// Reserved are addresses the pool must not contain besides DNS (the
	// appliance passes its gateway).
	Reserved []netip.Addr
	// LeaseTime is the valid lifetime of a lease (default 1h, 1m..8760h).
	LeaseTime time.Duration
}

// DHCPv6Stats are the DHCPv6 server's counters, declared for the metrics
// registry (internal/metrics).
type DHCPv6Stats struct {
	Received           atomic.Uint64 `metric:"dhcpv6_packets_total" help:"DHCPv6 packets received."`
	Malformed          atomic.Uint64 `metric:"dhcpv6_malformed_total" help:"Malformed DHCPv6 packets." hostile:"dhcpv6"`
	InformationRequest atomic.Uint64 `metric:"dhcpv6_messages_total{type=information_request}" help:"DHCPv6 messages by type, received and sent."`
	Solicit            atomic.Uint64 `metric:"dhcpv6_messages_total{type=solicit}"`
	Request            atomic.Uint64 `metric:"dhcpv6_messages_total{type=request}"`
	Renew              atomic.Uint64 `metric:"dhcpv6_messages_total{type=renew}"`
	Rebind             atomic.Uint64 `metric:"dhcpv6_messages_total{type=rebind}"`
	Release            atomic.Uint64 `metric:"dhcpv6_messages_total{type=release}"`
	Decline            atomic.Uint64 `metric:"dhcpv6_messages_total{type=decline}"`
	Confirm            atomic.Uint64 `metric:"dhcpv6_messages_total{type=confirm}"`
	Advertise          atomic.Uint64 `metric:"dhcpv6_messages_total{type=advertise}"`
	Replies            atomic.Uint64 `metric:"dhcpv6_messages_total{type=reply}"`
	// Unsupported counts stateful messages (SOLICIT, REQUEST...) received
	// in stateless mode: address assignment is then done by SLAAC, so they
	// are not answered.
	Unsupported atomic.Uint64 `metric:"dhcpv6_messages_total{type=unsupported}"`
	// Discarded counts messages RFC 8415 section 16 says to discard (no
	// client identifier, a server identifier where none may be or another
	// server's).
	Discarded     atomic.Uint64 `metric:"dhcpv6_discarded_total" help:"DHCPv6 messages discarded by RFC 8415's validity rules (client or server identifier missing, misplaced or not ours)." hostile:"dhcpv6"`
	PoolExhausted atomic.Uint64 `metric:"dhcpv6_pool_exhausted_total" help:"IA_NAs answered with NoAddrsAvail because the DHCPv6 pool was full."`
	SendErrors    atomic.Uint64 `metric:"dhcpv6_send_errors_total" help:"DHCPv6 replies that could not be sent."`
	// ActiveLeases and PoolSize are set by NewDHCPv6 (0 when stateless).
	ActiveLeases func() int64 `metric:"dhcpv6_leases" kind:"gauge" help:"Unexpired DHCPv6 leases (IA_NA bindings)."`
	PoolSize     func() int64 `metric:"dhcpv6_pool_size" kind:"gauge" help:"Addresses in the DHCPv6 pool (0 when stateless)."`
}

// DHCPv6 is vunet's DHCPv6 server (RFC 8415). Stateless (the default) it
// answers INFORMATION-REQUEST with DNS servers and the domain search list;
// stateful it also leases addresses (IA_NA) from a bounded pool.
type DHCPv6 struct {
	opts     DHCPv6Options
	log      *slog.Logger
	serverID dhcpv6.DUID
	conn     *gnet.UDP
	now      func() time.Time

	mu     sync.Mutex
	leases *leaseTable6 // nil when stateless

	stats DHCPv6Stats

	closeOnce sync.Once
	closed    chan struct{}
}

// NewDHCPv6 validates opts, applies defaults and binds [::]:547 on the NIC,
// joined to ff02::1:2.
func NewDHCPv6(opts DHCPv6Options) (*DHCPv6, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if !opts.RouterAddr.IsValid() {
		opts.RouterAddr = DefaultRouterAddr
	}
	if opts.DNS == nil {
		opts.DNS = []netip.Addr{DefaultDNS}
	}
	if opts.RefreshTime == 0 {
		opts.RefreshTime = time.Hour
	}
	if !opts.RouterAddr.Is6() || !opts.RouterAddr.IsLinkLocalUnicast() {
		return nil, fmt.Errorf("dhcpv6: router address %s: want an IPv6 link-local address", opts.RouterAddr)
	}
	for _, d := range opts.DNS {
		if !d.Is6() || d.Is4In6() {
			return nil, fmt.Errorf("dhcpv6: dns server %s: want an IPv6 address", d)
		}
	}
	for _, d := range opts.DomainSearch {
		if err := gnet.CheckDomain(d); err != nil {
			return nil, fmt.Errorf("dhcpv6: domain search: %w", err)
		}
	}
	if opts.RefreshTime < 10*time.Minute {
		// RFC 8415 21.23: IRT_MINIMUM is 600 seconds.
		return nil, fmt.Errorf("dhcpv6: refresh time %s: want at least 10m", opts.RefreshTime)
	}
	if err := opts.setPool(); err != nil {
		return nil, fmt.Errorf("dhcpv6: %w", err)
	}
	s := &DHCPv6{opts: opts, log: opts.Logger.With("service", "dhcpv6"), closed: make(chan struct{}), now: time.Now}
	if opts.Stateful {
		s.leases = newLeaseTable6(opts.PoolStart, opts.PoolSize)
	}
	s.stats.ActiveLeases = func() int64 {
		if s.leases == nil {
			return 0
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		return int64(s.leases.expire(s.now()))
	}
	s.stats.PoolSize = func() int64 {
		if s.leases == nil {
			return 0
		}
		return int64(opts.PoolSize)
	}
	mac := net.HardwareAddr{0x52, 0x55, 0x0a, 0x00, 0x02, 0x02}
	if opts.Stack != nil {
		if info, ok := opts.Stack.NICInfo()[opts.NIC]; ok && len(info.LinkAddress) == 6 {
			mac = net.HardwareAddr(info.LinkAddress)
		}
	}
	s.serverID = &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: mac}
	if opts.Stack == nil {
		return s, nil // for tests and fuzzing, which call handle directly
	}
	var err error
	s.conn, err = gnet.ListenUDP(opts.Stack, opts.NIC, ipv6.ProtocolNumber,
		netip.AddrPortFrom(netip.IPv6Unspecified(), DHCPv6ServerPort), gnet.UDPOptions{Groups: []netip.Addr{allDHCPServers}})
	if err != nil {
		return nil, fmt.Errorf("dhcpv6: %w", err)
	}
	return s, nil
}

// setPool applies the stateful defaults and checks the pool: inside
// Prefix, not crossing a 2^32 boundary (leaseTable6.inPool relies on
// that), clear of DNS, Reserved and SLAAC (EUI-64) addresses.
func (o *DHCPv6Options) setPool() error {
	if !o.Prefix.IsValid() {
		o.Prefix = DefaultPrefix
	}
	o.Prefix = o.Prefix.Masked()
	if !o.Prefix.Addr().Is6() || o.Prefix.Addr().Is4In6() || o.Prefix.Bits() > 120 {
		return fmt.Errorf("prefix %s: want an IPv6 prefix of at most /120", o.Prefix)
	}
	if !o.PoolStart.IsValid() {
		b := o.Prefix.Addr().As16()
		b[14], b[15] = DefaultDHCPv6PoolOffset>>8, DefaultDHCPv6PoolOffset&0xff
		o.PoolStart = netip.AddrFrom16(b)
	}
	if o.PoolSize == 0 {
		o.PoolSize = DefaultDHCPv6PoolSize
	}
	if o.LeaseTime == 0 {
		o.LeaseTime = DefaultDHCPv6LeaseTime
	}
	if o.LeaseTime < time.Minute || o.LeaseTime > 365*24*time.Hour {
		return fmt.Errorf("lease time %s: want 1m..8760h", o.LeaseTime)
	}
	if o.PoolSize < 1 || o.PoolSize > MaxDHCPv6PoolSize {
		return fmt.Errorf("pool size %d: want 1..%d", o.PoolSize, MaxDHCPv6PoolSize)
	}
	if !o.PoolStart.Is6() || o.PoolStart.Is4In6() || !o.Prefix.Contains(o.PoolStart) {
		return fmt.Errorf("pool start %s: want an address in %s", o.PoolStart, o.Prefix)
	}
	b := o.PoolStart.As16()
	low := uint64(b[12])<<24 | uint64(b[13])<<16 | uint64(b[14])<<8 | uint64(b[15])
	if low+uint64(o.PoolSize) > 1<<32 {
		return fmt.Errorf("pool %s+%d: crosses a /96 boundary", o.PoolStart, o.PoolSize)
	}
	t := newLeaseTable6(o.PoolStart, o.PoolSize)
	a := o.PoolStart
	for i := 0; i < o.PoolSize; i++ {
		if !o.Prefix.Contains(a) || a == o.Prefix.Addr() {
			return fmt.Errorf("pool %s+%d: %s is not a host address in %s", o.PoolStart, o.PoolSize, a, o.Prefix)
		}
		if x := a.As16(); x[11] == 0xff && x[12] == 0xfe {
			return fmt.Errorf("pool %s+%d: %s has the form of a SLAAC (EUI-64) address", o.PoolStart, o.PoolSize, a)
		}
		a = a.Next()
	}
	for _, r := range append(append([]netip.Addr{}, o.Reserved...), o.DNS...) {
		if t.inPool(r) {
			return fmt.Errorf("pool %s+%d contains service address %s", o.PoolStart, o.PoolSize, r)
		}
	}
	return nil
}

// Serve answers requests until ctx is done or Close is called; it returns
// nil on such a shutdown.
func (s *DHCPv6) Serve(ctx context.Context) error {
	if s.conn == nil {
		return errors.New("dhcpv6: server has no stack")
	}
	if s.leases != nil {
		s.log.Info("stateful dhcpv6 server listening", "nic", s.opts.NIC, "dns", s.opts.DNS,
			"pool", fmt.Sprintf("%s+%d", s.opts.PoolStart, s.opts.PoolSize), "lease_time", s.opts.LeaseTime)
	} else {
		s.log.Info("stateless dhcpv6 server listening", "nic", s.opts.NIC, "dns", s.opts.DNS)
	}
	go func() {
		select {
		case <-ctx.Done():
			s.Close()
		case <-s.closed:
		}
	}()
	err := s.conn.ReadLoop(1500, s.closed, func(b []byte, from *net.UDPAddr) {
		s.stats.Received.Add(1)
		if reply := s.handle(b); reply != nil {
			s.send(reply, from.AddrPort())
		}
	})
	if err != nil {
		return fmt.Errorf("dhcpv6: read: %w", err)
	}
	return nil
}

// handle returns the reply to one datagram, or nil. It recovers from panics
// in the third-party parser: guest input must not take the appliance down.
func (s *DHCPv6) handle(b []byte) (reply []byte) {
	defer func() {
		if r := recover(); r != nil {
			s.stats.Malformed.Add(1)
			s.log.Warn("dhcpv6: recovered from panic handling packet", "panic", fmt.Sprint(r))
			reply = nil
		}
	}()
	return s.reply(b)
}

// reply builds the reply to one datagram, or nil. It does not recover from
// panics (handle does), so the fuzz target calls it directly and sees them.
func (s *DHCPv6) reply(b []byte) []byte {
	d, err := dhcpv6.FromBytes(b)
	if err != nil {
		s.stats.Malformed.Add(1)
		s.log.Debug("dhcpv6: malformed packet", "err", err)
		return nil
	}
	msg, ok := d.(*dhcpv6.Message)
	if !ok {
		s.stats.Malformed.Add(1) // relay messages do not occur on a VM link
		return nil
	}
	if msg.MessageType == dhcpv6.MessageTypeInformationRequest {
		s.stats.InformationRequest.Add(1)
		return s.information(msg)
	}
	c := s.typeCounter(msg.MessageType)
	if c == nil {
		s.stats.Malformed.Add(1) // server-to-client or relay types
		return nil
	}
	if s.leases == nil {
		s.stats.Unsupported.Add(1)
		s.log.Debug("dhcpv6: ignoring stateful message (stateless mode: addresses come from SLAAC)", "type", msg.MessageType)
		return nil
	}
	c.Add(1)
	rep := s.stateful(msg)
	if rep == nil {
		return nil
	}
	return rep.ToBytes()
}

// typeCounter is the counter of a client message type handled by the
// stateful server, nil for other types.
func (s *DHCPv6) typeCounter(t dhcpv6.MessageType) *atomic.Uint64 {
	switch t {
	case dhcpv6.MessageTypeSolicit:
		return &s.stats.Solicit
	case dhcpv6.MessageTypeRequest:
		return &s.stats.Request
	case dhcpv6.MessageTypeRenew:
		return &s.stats.Renew
	case dhcpv6.MessageTypeRebind:
		return &s.stats.Rebind
	case dhcpv6.MessageTypeRelease:
		return &s.stats.Release
	case dhcpv6.MessageTypeDecline:
		return &s.stats.Decline
	case dhcpv6.MessageTypeConfirm:
		return &s.stats.Confirm
	}
	return nil
}

// information answers an INFORMATION-REQUEST.
func (s *DHCPv6) information(msg *dhcpv6.Message) []byte {
	// RFC 8415 16.12: discard an Information-request naming another server
	// or carrying an IA.
	if sid := msg.Options.ServerID(); sid != nil && !bytes.Equal(sid.ToBytes(), s.serverID.ToBytes()) {
		s.stats.Discarded.Add(1)
		return nil
	}
	if msg.Options.OneIANA() != nil || msg.Options.OneIATA() != nil || msg.Options.OneIAPD() != nil {
		s.stats.Discarded.Add(1)
		return nil
	}
	rep := s.newReply(msg, dhcpv6.MessageTypeReply)
	rep.AddOption(dhcpv6.OptInformationRefreshTime(s.opts.RefreshTime))
	return rep.ToBytes()
}

// newReply starts a reply of type t to msg: transaction ID, client and
// server identifiers, DNS servers and search list.
func (s *DHCPv6) newReply(msg *dhcpv6.Message, t dhcpv6.MessageType) *dhcpv6.Message {
	rep := &dhcpv6.Message{MessageType: t, TransactionID: msg.TransactionID}
	if cid := msg.GetOneOption(dhcpv6.OptionClientID); cid != nil {
		rep.AddOption(cid)
	}
	rep.AddOption(dhcpv6.OptServerID(s.serverID))
	if len(s.opts.DNS) > 0 {
		ips := make([]net.IP, len(s.opts.DNS))
		for i, d := range s.opts.DNS {
			ips[i] = d.AsSlice()
		}
		rep.AddOption(dhcpv6.OptDNS(ips...))
	}
	if len(s.opts.DomainSearch) > 0 {
		dhcpv6.WithDomainSearchList(s.opts.DomainSearch...)(rep)
	}
	return rep
}

// send unicasts a reply from RouterAddr to the client's (link-local)
// address. The source is chosen with IPV6_PKTINFO since the NIC need not have
// RouterAddr assigned (spoofing lets the stack send from it).
func (s *DHCPv6) send(reply []byte, to netip.AddrPort) {
	if s.conn == nil {
		return
	}
	dst := gnet.FullAddr(s.opts.NIC, to)
	wopts := tcpip.WriteOptions{
		To: &dst,
		ControlMessages: tcpip.SendableControlMessages{
			HasIPv6PacketInfo: true,
			IPv6PacketInfo:    tcpip.IPv6PacketInfo{NIC: s.opts.NIC, Addr: gnet.Addr(s.opts.RouterAddr)},
		},
	}
	if _, terr := s.conn.EP.Write(bytes.NewReader(reply), wopts); terr != nil {
		s.stats.SendErrors.Add(1)
		s.log.Warn("dhcpv6: send reply", "to", to, "err", terr)
		return
	}
	s.stats.Replies.Add(1)
	s.log.Debug("dhcpv6: sent reply", "to", to)
}

// Close stops the server; it is safe to call more than once.
func (s *DHCPv6) Close() {
	s.closeOnce.Do(func() {
		close(s.closed)
		if s.conn != nil {
			s.conn.Conn.Close()
		}
	})
}

// Stats returns the live counters.
func (s *DHCPv6) Stats() *DHCPv6Stats { return &s.stats }
