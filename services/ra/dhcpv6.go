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

// DHCPv6Options configures the stateless DHCPv6 server. Zero fields take the
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
}

// DHCPv6Stats are the DHCPv6 server's counters, declared for the metrics
// registry (internal/metrics).
type DHCPv6Stats struct {
	Received           atomic.Uint64 `metric:"dhcpv6_packets_total" help:"DHCPv6 packets received."`
	Malformed          atomic.Uint64 `metric:"dhcpv6_malformed_total" help:"Malformed DHCPv6 packets." hostile:"dhcpv6"`
	InformationRequest atomic.Uint64 `metric:"dhcpv6_messages_total{type=information_request}" help:"DHCPv6 messages by type, received and sent."`
	Replies            atomic.Uint64 `metric:"dhcpv6_messages_total{type=reply}"`
	// Unsupported counts stateful messages (SOLICIT, REQUEST...): address
	// assignment is done by SLAAC, so they are not answered.
	Unsupported atomic.Uint64 `metric:"dhcpv6_messages_total{type=unsupported}"`
	SendErrors  atomic.Uint64 `metric:"dhcpv6_send_errors_total" help:"DHCPv6 replies that could not be sent."`
}

// DHCPv6 is a stateless DHCPv6 server (RFC 8415 section 6.1): it answers
// INFORMATION-REQUEST with DNS servers and the domain search list.
type DHCPv6 struct {
	opts     DHCPv6Options
	log      *slog.Logger
	serverID dhcpv6.DUID
	conn     *gnet.UDP

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
	s := &DHCPv6{opts: opts, log: opts.Logger.With("service", "dhcpv6"), closed: make(chan struct{})}
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

// Serve answers requests until ctx is done or Close is called; it returns
// nil on such a shutdown.
func (s *DHCPv6) Serve(ctx context.Context) error {
	if s.conn == nil {
		return errors.New("dhcpv6: server has no stack")
	}
	s.log.Info("stateless dhcpv6 server listening", "nic", s.opts.NIC, "dns", s.opts.DNS)
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
	switch msg.MessageType {
	case dhcpv6.MessageTypeInformationRequest:
		s.stats.InformationRequest.Add(1)
	case dhcpv6.MessageTypeSolicit, dhcpv6.MessageTypeRequest, dhcpv6.MessageTypeRenew,
		dhcpv6.MessageTypeRebind, dhcpv6.MessageTypeConfirm, dhcpv6.MessageTypeRelease, dhcpv6.MessageTypeDecline:
		s.stats.Unsupported.Add(1)
		s.log.Debug("dhcpv6: ignoring stateful message (addresses come from SLAAC)", "type", msg.MessageType)
		return nil
	default:
		s.stats.Malformed.Add(1)
		return nil
	}
	// RFC 8415 16.12: discard an Information-request naming another server
	// or carrying an IA.
	if sid := msg.Options.ServerID(); sid != nil && !bytes.Equal(sid.ToBytes(), s.serverID.ToBytes()) {
		return nil
	}
	if msg.Options.OneIANA() != nil || msg.Options.OneIATA() != nil || msg.Options.OneIAPD() != nil {
		return nil
	}
	rep := &dhcpv6.Message{MessageType: dhcpv6.MessageTypeReply, TransactionID: msg.TransactionID}
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
	rep.AddOption(dhcpv6.OptInformationRefreshTime(s.opts.RefreshTime))
	return rep.ToBytes()
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
