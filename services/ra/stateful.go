package ra

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/iana"
)

// stateful answers the address-assignment messages of RFC 8415 section 18.3,
// or returns nil for a message to discard.
func (s *DHCPv6) stateful(msg *dhcpv6.Message) *dhcpv6.Message {
	cid := msg.GetOneOption(dhcpv6.OptionClientID)
	if cid == nil {
		s.stats.Discarded.Add(1) // RFC 8415 16: every client message has one
		return nil
	}
	duid := cid.ToBytes()
	if len(duid) == 0 || len(duid) > maxDUID {
		s.stats.Discarded.Add(1)
		return nil
	}
	sid := msg.Options.ServerID()
	ours := sid != nil && bytes.Equal(sid.ToBytes(), s.serverID.ToBytes())
	switch msg.MessageType {
	case dhcpv6.MessageTypeSolicit, dhcpv6.MessageTypeRebind, dhcpv6.MessageTypeConfirm:
		// Sent to all servers: one naming a server is invalid (16.2, 16.5,
		// 16.8).
		if sid != nil {
			s.stats.Discarded.Add(1)
			return nil
		}
	default:
		// REQUEST, RENEW, RELEASE, DECLINE are for the server the client
		// chose; another server's are not ours to answer (16.4, 16.6, ...).
		if !ours {
			s.stats.Discarded.Add(1)
			return nil
		}
	}

	ias := msg.Options.IANA()
	if len(ias) > maxIAs {
		ias = ias[:maxIAs]
	}
	c := &call{s: s, msg: msg, duid: string(duid), now: s.now()}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch msg.MessageType {
	case dhcpv6.MessageTypeSolicit:
		if msg.GetOneOption(dhcpv6.OptionRapidCommit) != nil {
			// RFC 8415 18.3.1: with Rapid Commit the server commits at
			// once and answers with a REPLY carrying Rapid Commit.
			rep := c.assign(ias, true)
			dhcpv6.WithRapidCommit(rep)
			return rep
		}
		return c.assign(ias, false)
	case dhcpv6.MessageTypeRequest:
		return c.assign(ias, true)
	case dhcpv6.MessageTypeRenew, dhcpv6.MessageTypeRebind:
		return c.extend(ias)
	case dhcpv6.MessageTypeRelease:
		return c.release(ias)
	case dhcpv6.MessageTypeDecline:
		return c.decline(ias)
	case dhcpv6.MessageTypeConfirm:
		return c.confirm(ias)
	}
	return nil
}

// call is one message being answered, under s.mu.
type call struct {
	s    *DHCPv6
	msg  *dhcpv6.Message
	duid string
	now  time.Time
}

func (c *call) key(ia *dhcpv6.OptIANA) iaKey { return iaKey{duid: c.duid, iaid: ia.IaId} }

// lifetimes of a lease granted now.
func (c *call) lifetimes() (pref, valid, t1, t2 time.Duration) {
	valid = c.s.opts.LeaseTime
	pref = valid / 2
	return pref, valid, pref / 2, pref * 4 / 5
}

// addrIA is an IA_NA holding addr with the current lifetimes, plus the
// addresses in stale listed with zero lifetimes (RFC 8415 18.3.4: addresses
// the client must stop using).
func (c *call) addrIA(ia *dhcpv6.OptIANA, addr netip.Addr, stale []netip.Addr) *dhcpv6.OptIANA {
	pref, valid, t1, t2 := c.lifetimes()
	out := &dhcpv6.OptIANA{IaId: ia.IaId, T1: t1, T2: t2}
	out.Options.Add(&dhcpv6.OptIAAddress{IPv6Addr: addr.AsSlice(), PreferredLifetime: pref, ValidLifetime: valid})
	for _, a := range stale {
		if a != addr {
			out.Options.Add(&dhcpv6.OptIAAddress{IPv6Addr: a.AsSlice()})
		}
	}
	return out
}

// statusIA is an IA_NA without addresses and with a status code, plus the
// addresses in stale with zero lifetimes.
func statusIA(ia *dhcpv6.OptIANA, code iana.StatusCode, text string, stale []netip.Addr) *dhcpv6.OptIANA {
	out := &dhcpv6.OptIANA{IaId: ia.IaId}
	for _, a := range stale {
		out.Options.Add(&dhcpv6.OptIAAddress{IPv6Addr: a.AsSlice()})
	}
	out.Options.Add(&dhcpv6.OptStatusCode{StatusCode: code, StatusMessage: text})
	return out
}

// addrs returns the valid IPv6 addresses of an IA (at most maxIAs of them).
func addrs(ia *dhcpv6.OptIANA) []netip.Addr {
	var out []netip.Addr
	for _, o := range ia.Options.Addresses() {
		if a, ok := netip.AddrFromSlice(o.IPv6Addr); ok && a.Is6() && !a.Is4In6() {
			out = append(out, a)
			if len(out) == maxIAs {
				break
			}
		}
	}
	return out
}

// noPrefixes answers each IA_PD: vunet delegates no prefixes.
func (c *call) noPrefixes(rep *dhcpv6.Message, code iana.StatusCode) {
	pds := c.msg.Options.IAPD()
	for i, pd := range pds {
		if i == maxIAs {
			break
		}
		out := &dhcpv6.OptIAPD{IaId: pd.IaId}
		out.Options.Add(&dhcpv6.OptStatusCode{StatusCode: code, StatusMessage: "no prefix delegation"})
		rep.AddOption(out)
	}
}

// assign answers SOLICIT (commit false: an ADVERTISE that reserves
// nothing, so a guest making up DUIDs cannot fill the pool with offers)
// and REQUEST or Rapid Commit SOLICIT (commit true: a REPLY with the
// bindings made). Each IA_NA gets its current lease, else the address it
// hints if free, else the lowest free one; with none left it gets
// NoAddrsAvail.
func (c *call) assign(ias []*dhcpv6.OptIANA, commit bool) *dhcpv6.Message {
	t := dhcpv6.MessageTypeAdvertise
	if commit {
		t = dhcpv6.MessageTypeReply
	}
	rep := c.s.newReply(c.msg, t)
	if !commit {
		// The highest preference: the client need not wait for other
		// servers' advertisements (RFC 8415 18.2.9); there are none.
		rep.AddOption(dhcpv6.OptPreference(255))
	}
	pref, valid, t1, t2 := c.lifetimes()
	taken := map[netip.Addr]bool{} // within this message, for ADVERTISE
	var out []*dhcpv6.OptIANA
	assigned := 0
	for _, ia := range ias {
		k := c.key(ia)
		var hint netip.Addr
		if as := addrs(ia); len(as) > 0 {
			hint = as[0]
		}
		a, ok := c.s.leases.pick(k, hint, c.now, taken)
		if !ok {
			c.s.stats.PoolExhausted.Add(1)
			c.s.log.Warn("dhcpv6: pool exhausted, answering NoAddrsAvail", "duid", duidString(k),
				"pool", c.s.opts.PoolSize)
			out = append(out, statusIA(ia, iana.StatusNoAddrsAvail, "address pool exhausted", nil))
			continue
		}
		taken[a] = true
		assigned++
		if commit {
			c.s.leases.set(k, a, c.now.Add(valid))
			c.s.log.Debug("dhcpv6: leased", "duid", duidString(k), "addr", a)
		}
		o := &dhcpv6.OptIANA{IaId: ia.IaId, T1: t1, T2: t2}
		o.Options.Add(&dhcpv6.OptIAAddress{IPv6Addr: a.AsSlice(), PreferredLifetime: pref, ValidLifetime: valid})
		out = append(out, o)
	}
	if !commit && assigned == 0 {
		// RFC 8415 18.3.1: an ADVERTISE that assigns nothing carries only a
		// top-level NoAddrsAvail.
		rep.AddOption(&dhcpv6.OptStatusCode{StatusCode: iana.StatusNoAddrsAvail, StatusMessage: "no addresses available"})
		c.noPrefixes(rep, iana.StatusNoPrefixAvail)
		return rep
	}
	for _, o := range out {
		rep.AddOption(o)
	}
	c.noPrefixes(rep, iana.StatusNoPrefixAvail)
	return rep
}

// extend answers RENEW and REBIND (RFC 8415 18.3.4, 18.3.5): a bound IA
// gets fresh lifetimes. An IA without a binding (vunet restarted, or the
// lease expired) gets the address it holds back if that address is in the
// pool and free, so a guest keeps its address across a vunet restart;
// otherwise its addresses are returned with zero lifetimes and NoBinding.
func (c *call) extend(ias []*dhcpv6.OptIANA) *dhcpv6.Message {
	rep := c.s.newReply(c.msg, dhcpv6.MessageTypeReply)
	_, valid, _, _ := c.lifetimes()
	for _, ia := range ias {
		k := c.key(ia)
		held := addrs(ia)
		if l := c.s.leases.lookup(k, c.now); l != nil {
			c.s.leases.set(k, l.addr, c.now.Add(valid))
			rep.AddOption(c.addrIA(ia, l.addr, held))
			continue
		}
		rebound := false
		for _, a := range held {
			if c.s.leases.free(a, k, c.now) {
				c.s.leases.set(k, a, c.now.Add(valid))
				rep.AddOption(c.addrIA(ia, a, held))
				rebound = true
				break
			}
		}
		if !rebound {
			rep.AddOption(statusIA(ia, iana.StatusNoBinding, "no binding for this IA", held))
		}
	}
	c.noPrefixes(rep, iana.StatusNoBinding)
	return rep
}

// release answers RELEASE (RFC 8415 18.3.7): bindings are dropped, IAs
// the server does not know get NoBinding, and the reply says Success.
func (c *call) release(ias []*dhcpv6.OptIANA) *dhcpv6.Message {
	rep := c.s.newReply(c.msg, dhcpv6.MessageTypeReply)
	for _, ia := range ias {
		k := c.key(ia)
		dropped := false
		for _, a := range addrs(ia) {
			if c.s.leases.drop(k, a, c.now) {
				dropped = true
				c.s.log.Debug("dhcpv6: released", "duid", duidString(k), "addr", a)
			}
		}
		if !dropped {
			rep.AddOption(statusIA(ia, iana.StatusNoBinding, "no binding for this IA", nil))
		}
	}
	rep.AddOption(&dhcpv6.OptStatusCode{StatusCode: iana.StatusSuccess, StatusMessage: "released"})
	return rep
}

// decline answers DECLINE (RFC 8415 18.3.8): the client found its address
// in use on the link, so the address leaves the pool for a while.
func (c *call) decline(ias []*dhcpv6.OptIANA) *dhcpv6.Message {
	rep := c.s.newReply(c.msg, dhcpv6.MessageTypeReply)
	for _, ia := range ias {
		k := c.key(ia)
		l := c.s.leases.lookup(k, c.now)
		found := false
		for _, a := range addrs(ia) {
			if l != nil && l.addr == a {
				c.s.leases.remove(l)
				c.s.leases.set(declinedKey, a, c.now.Add(dhcpv6DeclineHold))
				c.s.log.Info("dhcpv6: address declined by the client, held out of the pool", "addr", a,
					"for", dhcpv6DeclineHold)
				found = true
				break
			}
		}
		if !found {
			rep.AddOption(statusIA(ia, iana.StatusNoBinding, "no binding for this IA", nil))
		}
	}
	rep.AddOption(&dhcpv6.OptStatusCode{StatusCode: iana.StatusSuccess, StatusMessage: "declined"})
	return rep
}

// confirm answers CONFIRM (RFC 8415 18.3.3): are the client's addresses
// still on this link? A CONFIRM without addresses gets no reply.
func (c *call) confirm(ias []*dhcpv6.OptIANA) *dhcpv6.Message {
	n := 0
	onLink := true
	for _, ia := range ias {
		for _, a := range addrs(ia) {
			n++
			if !c.s.opts.Prefix.Contains(a) {
				onLink = false
			}
		}
	}
	if n == 0 {
		return nil
	}
	rep := c.s.newReply(c.msg, dhcpv6.MessageTypeReply)
	if onLink {
		rep.AddOption(&dhcpv6.OptStatusCode{StatusCode: iana.StatusSuccess, StatusMessage: "on link"})
	} else {
		rep.AddOption(&dhcpv6.OptStatusCode{StatusCode: iana.StatusNotOnLink, StatusMessage: "not on this link"})
	}
	return rep
}

// Lease6 describes one DHCPv6 lease.
type Lease6 struct {
	// DUID is the client's DUID in hex; MAC is its link-layer address when
	// the DUID carries one (DUID-LL, DUID-LLT), else "".
	DUID   string
	MAC    string
	IAID   uint32
	Addr   netip.Addr
	Expiry time.Time
}

// Leases returns the unexpired leases (nil when stateless).
func (s *DHCPv6) Leases() []Lease6 {
	if s.leases == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.leases.expire(s.now())
	var out []Lease6
	for k, l := range s.leases.byKey {
		l6 := Lease6{DUID: duidString(k), Addr: l.addr, Expiry: l.expiry,
			IAID: uint32(k.iaid[0])<<24 | uint32(k.iaid[1])<<16 | uint32(k.iaid[2])<<8 | uint32(k.iaid[3])}
		if d, err := dhcpv6.DUIDFromBytes([]byte(k.duid)); err == nil {
			switch d := d.(type) {
			case *dhcpv6.DUIDLL:
				l6.MAC = macString(d.LinkLayerAddr)
			case *dhcpv6.DUIDLLT:
				l6.MAC = macString(d.LinkLayerAddr)
			}
		}
		out = append(out, l6)
	}
	return out
}

func macString(b net.HardwareAddr) string {
	if len(b) != 6 {
		return ""
	}
	return b.String()
}

// RestoreLease binds addr to the client's identity association (duid in
// wire form, iaid) until expiry: a lease the guest got from the vunet it
// was live-migrated from. The server must be stateful, the address in the
// pool and not held by another IA; the IA's lease here, if any, is
// replaced. The server DUID is derived from the gateway MAC, so with the
// same configuration the guest's RENEW names this server too.
func (s *DHCPv6) RestoreLease(duid []byte, iaid uint32, addr netip.Addr, expiry time.Time) error {
	if s.leases == nil {
		return fmt.Errorf("dhcpv6: restored lease %s: this server is stateless (--dhcpv6 stateful on both sides)", addr)
	}
	if len(duid) == 0 || len(duid) > maxDUID {
		return fmt.Errorf("dhcpv6: restored lease %s: DUID of %d bytes", addr, len(duid))
	}
	k := iaKey{duid: string(duid), iaid: [4]byte{byte(iaid >> 24), byte(iaid >> 16), byte(iaid >> 8), byte(iaid)}}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	switch {
	case !expiry.After(now):
		return fmt.Errorf("dhcpv6: restored lease %s: already expired", addr)
	case !s.leases.inPool(addr):
		return fmt.Errorf("dhcpv6: restored lease %s: not in the pool", addr)
	case !s.leases.free(addr, k, now):
		return fmt.Errorf("dhcpv6: restored lease %s: the address is held by another client", addr)
	}
	s.leases.set(k, addr, expiry)
	return nil
}
