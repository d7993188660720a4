package dhcp4

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
	"github.com/insomniacslk/dhcp/rfc1035label"
)

// Vendor classes (option 60) of network-boot firmware.
const (
	vendorHTTP = "HTTPClient"
)

// handlePacket parses and answers one datagram. Guest input must never panic
// the appliance: the parser is a third-party one, so a recover guards it as
// well as this package's own code.
func (s *Server) handlePacket(b []byte, from string) {
	s.stats.Received.Add(1)
	defer func() {
		if r := recover(); r != nil {
			s.stats.Malformed.Add(1)
			s.log.Warn("dhcp4: recovered from panic handling packet", "from", from, "panic", fmt.Sprint(r))
		}
	}()
	req, err := dhcpv4.FromBytes(b)
	if err != nil {
		s.stats.Malformed.Add(1)
		s.log.Debug("dhcp4: malformed packet", "from", from, "err", err)
		return
	}
	reply, dst := s.handle(req)
	if reply == nil {
		return
	}
	s.send(reply, dst)
}

func (s *Server) send(reply *dhcpv4.DHCPv4, dst netip.AddrPort) {
	if s.srvConn == nil {
		return
	}
	_, err := s.srvConn.Conn.WriteTo(reply.ToBytes(), net.UDPAddrFromAddrPort(dst))
	if err != nil {
		s.stats.SendErrors.Add(1)
		s.log.Warn("dhcp4: send reply", "to", dst, "type", reply.MessageType(), "err", err)
		return
	}
	s.log.Debug("dhcp4: sent", "to", dst, "type", reply.MessageType(), "yiaddr", reply.YourIPAddr, "xid", reply.TransactionID)
}

// handle computes the reply to req and where to send it; a nil reply means
// stay silent.
func (s *Server) handle(req *dhcpv4.DHCPv4) (*dhcpv4.DHCPv4, netip.AddrPort) {
	if req.OpCode != dhcpv4.OpcodeBootRequest || req.HWType != iana.HWTypeEthernet || len(req.ClientHWAddr) != 6 {
		s.stats.Malformed.Add(1)
		s.log.Debug("dhcp4: ignoring non-ethernet or non-request packet", "op", req.OpCode, "htype", req.HWType)
		return nil, netip.AddrPort{}
	}
	if !req.GatewayIPAddr.IsUnspecified() && req.GatewayIPAddr != nil {
		// There is no relay on a point-to-point VM link; a giaddr means the
		// packet is not for us.
		s.log.Debug("dhcp4: ignoring relayed packet", "giaddr", req.GatewayIPAddr)
		return nil, netip.AddrPort{}
	}
	var m mac
	copy(m[:], req.ClientHWAddr)
	now := s.now()
	mt := req.MessageType()
	s.log.Debug("dhcp4: received", "type", mt, "mac", m, "xid", req.TransactionID, "ciaddr", req.ClientIPAddr)

	s.mu.Lock()
	defer s.mu.Unlock()
	switch mt {
	case dhcpv4.MessageTypeDiscover:
		s.stats.Discover.Add(1)
		addr, ok := s.leases.pick(m, ip4(req.RequestedIPAddress()), now)
		if !ok {
			addr, ok = s.reclaimOffer(now)
		}
		if !ok {
			s.stats.PoolExhausted.Add(1)
			s.log.Warn("dhcp4: pool exhausted, no offer", "mac", m, "pool_size", s.opts.PoolSize)
			return nil, netip.AddrPort{}
		}
		// Keep a bound lease bound; otherwise just reserve the address.
		if l := s.leases.lookup(m, now); l != nil && l.bound && l.addr == addr {
			// Nothing to change: the client is rediscovering its lease.
		} else {
			s.leases.set(m, addr, now.Add(offerHold), false)
		}
		s.stats.Offer.Add(1)
		return s.reply(req, dhcpv4.MessageTypeOffer, addr), s.dest(req, false)

	case dhcpv4.MessageTypeRequest:
		s.stats.Request.Add(1)
		return s.handleRequest(req, m, now)

	case dhcpv4.MessageTypeDecline:
		s.stats.Decline.Add(1)
		if !s.forUs(req) {
			return nil, netip.AddrPort{}
		}
		a := ip4(req.RequestedIPAddress())
		if s.leases.release(m, a) {
			s.releaseName(m)
			s.leases.set(declined, a, now.Add(declineHold), false)
			s.log.Warn("dhcp4: client declined address (in use on the link?)", "mac", m, "addr", a)
		}
		return nil, netip.AddrPort{}

	case dhcpv4.MessageTypeRelease:
		s.stats.Release.Add(1)
		if !s.forUs(req) {
			return nil, netip.AddrPort{}
		}
		if a := ip4(req.ClientIPAddr); s.leases.release(m, a) {
			s.releaseName(m)
			s.log.Info("dhcp4: lease released", "mac", m, "addr", a)
		}
		return nil, netip.AddrPort{}

	case dhcpv4.MessageTypeInform:
		s.stats.Inform.Add(1)
		ci := ip4(req.ClientIPAddr)
		if !ci.IsValid() || ci.IsUnspecified() {
			return nil, netip.AddrPort{}
		}
		s.stats.Ack.Add(1)
		r := s.reply(req, dhcpv4.MessageTypeAck, netip.Addr{})
		// RFC 2131 4.3.5: no lease time in an ACK to INFORM.
		r.Options.Del(dhcpv4.OptionIPAddressLeaseTime)
		r.Options.Del(dhcpv4.OptionRenewTimeValue)
		r.Options.Del(dhcpv4.OptionRebindingTimeValue)
		return r, netip.AddrPortFrom(ci, ClientPort)
	default:
		s.stats.Malformed.Add(1)
		s.log.Debug("dhcp4: ignoring message", "type", mt, "mac", m)
		return nil, netip.AddrPort{}
	}
}

// forUs reports whether a message naming a server identifier names this one.
func (s *Server) forUs(req *dhcpv4.DHCPv4) bool {
	id := ip4(req.ServerIdentifier())
	return !id.IsValid() || id == s.opts.ServerAddr
}

func (s *Server) handleRequest(req *dhcpv4.DHCPv4, m mac, now time.Time) (*dhcpv4.DHCPv4, netip.AddrPort) {
	serverID := ip4(req.ServerIdentifier())
	requested := ip4(req.RequestedIPAddress())
	ci := ip4(req.ClientIPAddr)
	if serverID.IsValid() && serverID != s.opts.ServerAddr {
		// SELECTING another server's offer: forget ours (RFC 2131 4.3.2).
		if l := s.leases.lookup(m, now); l != nil && !l.bound {
			s.leases.remove(l)
		}
		return nil, netip.AddrPort{}
	}
	// SELECTING and INIT-REBOOT name the address in option 50; RENEWING and
	// REBINDING put it in ciaddr.
	want := requested
	if !want.IsValid() {
		want = ci
	}
	if !want.IsValid() || want.IsUnspecified() {
		s.stats.Nak.Add(1)
		return s.nak(req, "no address requested"), s.dest(req, true)
	}
	l := s.leases.lookup(m, now)
	switch {
	case l != nil && l.addr == want:
		// The client's offer or lease: fine.
	case serverID.IsValid():
		// SELECTING our offer but asking for something else (or the offer
		// expired and the address went to someone else).
		if !s.leases.free(want, m, now) {
			s.stats.Nak.Add(1)
			return s.nak(req, "address not offered to you"), s.dest(req, true)
		}
	default:
		// INIT-REBOOT/RENEW with no record, e.g. after the appliance
		// restarted: keep the guest's address when it is free in our pool
		// rather than forcing it to renumber.
		if !s.leases.free(want, m, now) {
			s.stats.Nak.Add(1)
			return s.nak(req, "address not available"), s.dest(req, true)
		}
	}
	isNew := l == nil || !l.bound || l.addr != want
	expiry := now.Add(s.opts.LeaseTime)
	s.leases.set(m, want, expiry, true)
	name := clientName(req)
	if isNew {
		s.log.Info("dhcp4: lease bound", "mac", m, "addr", want, "hostname", fmt.Sprintf("%.80q", name))
	}
	if s.opts.Names != nil {
		s.opts.Names.Bind(net.HardwareAddr(m[:]), name, want, expiry)
	}
	s.stats.Ack.Add(1)
	return s.reply(req, dhcpv4.MessageTypeAck, want), s.dest(req, false)
}

func (s *Server) releaseName(m mac) {
	if s.opts.Names != nil {
		s.opts.Names.Release(net.HardwareAddr(m[:]))
	}
}

// clientName is the host name the client sent: the client FQDN option 81
// (RFC 4702) if present, else the host name option 12. Neither is checked
// here (see Options.Names).
func clientName(req *dhcpv4.DHCPv4) string {
	if fq := req.Options.Get(dhcpv4.OptionFQDN); len(fq) > 3 {
		flags, name := fq[0], fq[3:]
		if flags&0x04 == 0 {
			// E clear: deprecated ASCII encoding, which busybox udhcpc -F
			// sends.
			return string(name)
		}
		// E set: canonical wire format, a sequence of length-prefixed
		// labels; only the first (the host name) is needed.
		if n := int(name[0]); n > 0 && n < len(name) {
			return string(name[1 : 1+n])
		}
		return ""
	}
	return req.HostName()
}

// reclaimOffer frees the oldest address that is only offered (not bound) so
// a flood of DISCOVERs with random MACs cannot lock real clients out of the
// pool for offerHold.
func (s *Server) reclaimOffer(now time.Time) (netip.Addr, bool) {
	var oldest *lease
	for _, l := range s.leases.byAddr {
		if !l.bound && l.mac != declined && (oldest == nil || l.expiry.Before(oldest.expiry)) {
			oldest = l
		}
	}
	if oldest == nil {
		return netip.Addr{}, false
	}
	s.leases.remove(oldest)
	return oldest.addr, true
}

// dest picks the reply destination (RFC 2131 4.1): a client that has an
// address (ciaddr) gets unicast; a client without one gets a broadcast,
// whatever its broadcast flag, since unicasting to yiaddr would require
// planting a neighbour entry in the appliance's stack. NAKs are always
// broadcast.
func (s *Server) dest(req *dhcpv4.DHCPv4, nak bool) netip.AddrPort {
	if ci := ip4(req.ClientIPAddr); !nak && ci.IsValid() && !ci.IsUnspecified() {
		return netip.AddrPortFrom(ci, ClientPort)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), ClientPort)
}

func (s *Server) nak(req *dhcpv4.DHCPv4, why string) *dhcpv4.DHCPv4 {
	s.log.Debug("dhcp4: nak", "mac", net.HardwareAddr(req.ClientHWAddr), "why", why)
	r, err := dhcpv4.NewReplyFromRequest(req,
		dhcpv4.WithMessageType(dhcpv4.MessageTypeNak),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(s.opts.ServerAddr.AsSlice())),
		dhcpv4.WithOption(dhcpv4.OptMessage(why)),
	)
	if err != nil {
		return nil
	}
	r.SetBroadcast()
	return r
}

// reply builds an OFFER or ACK carrying the configured options.
func (s *Server) reply(req *dhcpv4.DHCPv4, mt dhcpv4.MessageType, yiaddr netip.Addr) *dhcpv4.DHCPv4 {
	o := &s.opts
	mask := net.CIDRMask(o.Prefix.Bits(), 32)
	mods := []dhcpv4.Modifier{
		dhcpv4.WithMessageType(mt),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(o.ServerAddr.AsSlice())),
		dhcpv4.WithOption(dhcpv4.OptSubnetMask(mask)),
		dhcpv4.WithOption(dhcpv4.OptRouter(o.Router.AsSlice())),
		dhcpv4.WithOption(dhcpv4.OptBroadcastAddress(broadcastOf(o.Prefix).AsSlice())),
		dhcpv4.WithOption(dhcpv4.OptIPAddressLeaseTime(o.LeaseTime)),
		dhcpv4.WithOption(dhcpv4.OptRenewTimeValue(o.LeaseTime / 2)),
		dhcpv4.WithOption(dhcpv4.OptRebindingTimeValue(o.LeaseTime * 7 / 8)),
	}
	if yiaddr.IsValid() {
		mods = append(mods, dhcpv4.WithYourIP(yiaddr.AsSlice()))
	}
	if len(o.DNS) > 0 {
		ips := make([]net.IP, len(o.DNS))
		for i, d := range o.DNS {
			ips[i] = d.AsSlice()
		}
		mods = append(mods, dhcpv4.WithOption(dhcpv4.OptDNS(ips...)))
	}
	if o.MTU != 0 {
		mods = append(mods, dhcpv4.WithOption(dhcpv4.Option{Code: dhcpv4.OptionInterfaceMTU, Value: dhcpv4.Uint16(o.MTU)}))
	}
	if o.DomainName != "" {
		mods = append(mods, dhcpv4.WithOption(dhcpv4.OptDomainName(strings.TrimSuffix(o.DomainName, "."))))
	}
	if len(o.DomainSearch) > 0 {
		labels := make([]string, len(o.DomainSearch))
		for i, d := range o.DomainSearch {
			labels[i] = strings.TrimSuffix(d, ".")
		}
		mods = append(mods, dhcpv4.WithOption(dhcpv4.OptDomainSearch(&rfc1035label.Labels{Labels: labels})))
	}
	if o.Hostname != "" {
		mods = append(mods, dhcpv4.WithOption(dhcpv4.OptHostName(o.Hostname)))
	}
	r, err := dhcpv4.NewReplyFromRequest(req, mods...)
	if err != nil {
		// Only the random transaction id generation can fail in New, and
		// WithReply overwrites it; treat a failure as "stay silent".
		s.log.Warn("dhcp4: build reply", "err", err)
		return nil
	}
	// Keep the client's broadcast flag; we broadcast anyway (see dest).
	r.Flags = req.Flags
	s.addBoot(req, r)
	return r
}

// addBoot adds network-boot parameters for the firmware class in req.
func (s *Server) addBoot(req, r *dhcpv4.DHCPv4) {
	// Every case below checks its own field, so a server without boot
	// configuration adds nothing.
	b := &s.opts.Boot
	vendor := req.ClassIdentifier()
	isHTTP := strings.HasPrefix(vendor, vendorHTTP)
	var file string
	switch {
	case isIPXE(req) && b.IPXEURL != "":
		file = b.IPXEURL
	case isHTTP:
		if b.HTTPURL == "" {
			return
		}
		// UEFI HTTP boot only accepts offers that echo its vendor class and
		// carry the URL as the boot file.
		r.UpdateOption(dhcpv4.OptClassIdentifier(vendorHTTP))
		r.UpdateOption(dhcpv4.OptBootFileName(b.HTTPURL))
		r.BootFileName = b.HTTPURL
		return
	case isEFI(req) && b.TFTPFileEFI != "":
		file = b.TFTPFileEFI
	default:
		file = b.TFTPFile
	}
	if file == "" {
		return
	}
	// PXEClient is deliberately not echoed in option 60: to PXE firmware
	// an offer with option 60 "PXEClient" but no PXE vendor options (43) is
	// a "BINL" offer, after which the client asks the server again on UDP
	// port 4011 for the boot file. Nothing answers there, so OVMF failed
	// with "PXE-E16: No valid offer received" (e2e/boot TestOVMFPXE). A
	// plain offer with a boot file (option 67), as slirp sends, is accepted.
	if b.NextServer.IsValid() && !strings.Contains(file, "://") {
		r.ServerIPAddr = b.NextServer.AsSlice()
		r.UpdateOption(dhcpv4.OptTFTPServerName(b.NextServer.String()))
	}
	r.UpdateOption(dhcpv4.OptBootFileName(file))
	r.BootFileName = file
}

func isIPXE(req *dhcpv4.DHCPv4) bool {
	// iPXE sends user class "iPXE" (option 77), raw rather than RFC 3004
	// encoded, which the library's parser may not decode; look at the bytes.
	return bytes.Contains(req.Options.Get(dhcpv4.OptionUserClassInformation), []byte("iPXE"))
}

// isEFI reports whether the client architecture (option 93) is a UEFI one.
// The IANA "Processor Architecture Types" registry interleaves UEFI with
// BIOS, Open Firmware and U-Boot values, so this is a list, not a range.
func isEFI(req *dhcpv4.DHCPv4) bool {
	for _, a := range req.ClientArch() {
		switch uint16(a) {
		case 2, 6, 7, 8, 9, 10, 11, // EFI Itanium, IA32, BC, Xscale, x86-64, ARM32, ARM64
			15, 16, 17, 18, 19, // the same over HTTP
			25, 26, 27, 28, 29, 30, // RISC-V UEFI (and HTTP)
			33, 34, 35, 36, 37, 38, 39, 40: // MIPS, Sunway, LoongArch UEFI (and HTTP)
			return true
		}
	}
	return false
}

// ip4 converts a possibly nil net.IP from the parser to a netip.Addr; the
// result is invalid for nil or non-IPv4 input.
func ip4(ip net.IP) netip.Addr {
	if v4 := ip.To4(); v4 != nil {
		return netip.AddrFrom4([4]byte(v4))
	}
	return netip.Addr{}
}
