package dns

import (
	"net/netip"
	"strconv"
	"strings"

	mdns "github.com/miekg/dns"

	"github.com/vunet/vunet/services/names"
)

// zoneAnswer answers names in the server's own zone (after the static table
// had its turn) and the reverse names of guest addresses; nil means forward
// the query.
func (s *Server) zoneAnswer(req *mdns.Msg) *mdns.Msg {
	zone := s.opts.Zone
	q := req.Question[0]
	if zone == "" || q.Qclass != mdns.ClassINET && q.Qclass != mdns.ClassANY {
		return nil
	}
	name := mdns.CanonicalName(q.Name)
	resp := new(mdns.Msg)
	resp.SetReply(req)
	resp.Authoritative = true
	resp.RecursionAvailable = true
	if o := req.IsEdns0(); o != nil {
		resp.SetEdns0(4096, o.Do())
	}
	hdr := func(rrtype uint16) mdns.RR_Header {
		return mdns.RR_Header{Name: q.Name, Rrtype: rrtype, Class: mdns.ClassINET, Ttl: guestTTL}
	}

	if !mdns.IsSubDomain(zone, name) {
		// A reverse name of a guest's address: its name. Any other reverse
		// name is the upstream's.
		a, ok := reverseAddr(name)
		if !ok || s.opts.Guests == nil {
			return nil
		}
		g, ok := s.opts.Guests.LookupAddr(a)
		if !ok {
			return nil
		}
		if q.Qtype == mdns.TypePTR || q.Qtype == mdns.TypeANY {
			resp.Answer = append(resp.Answer, &mdns.PTR{Hdr: hdr(mdns.TypePTR), Ptr: g.Name + "." + zone})
		}
		return resp
	}
	if name == zone {
		return resp // the apex exists but has no records vunet serves: NODATA
	}
	label := strings.TrimSuffix(name, "."+zone)
	var g names.Guest
	var ok bool
	if s.opts.Guests != nil && !strings.Contains(label, ".") {
		g, ok = s.opts.Guests.Lookup(label)
	}
	if !ok {
		resp.Rcode = mdns.RcodeNameError
		return resp
	}
	if g.Addr4.IsValid() && (q.Qtype == mdns.TypeA || q.Qtype == mdns.TypeANY) {
		resp.Answer = append(resp.Answer, &mdns.A{Hdr: hdr(mdns.TypeA), A: g.Addr4.AsSlice()})
	}
	if q.Qtype == mdns.TypeAAAA || q.Qtype == mdns.TypeANY {
		for _, a := range g.Addrs6 {
			resp.Answer = append(resp.Answer, &mdns.AAAA{Hdr: hdr(mdns.TypeAAAA), AAAA: a.AsSlice()})
		}
	}
	return resp // no matching records: NODATA
}

// reverseAddr parses a canonical in-addr.arpa. or ip6.arpa. name of a whole
// address.
func reverseAddr(name string) (netip.Addr, bool) {
	if rest, ok := strings.CutSuffix(name, ".in-addr.arpa."); ok {
		parts := strings.Split(rest, ".")
		if len(parts) != 4 {
			return netip.Addr{}, false
		}
		var b [4]byte
		for i, p := range parts {
			n, err := strconv.ParseUint(p, 10, 8)
			if err != nil || len(p) > 1 && p[0] == '0' {
				return netip.Addr{}, false
			}
			b[3-i] = byte(n)
		}
		return netip.AddrFrom4(b), true
	}
	if rest, ok := strings.CutSuffix(name, ".ip6.arpa."); ok {
		parts := strings.Split(rest, ".")
		if len(parts) != 32 {
			return netip.Addr{}, false
		}
		var b [16]byte
		for i, p := range parts {
			n, err := strconv.ParseUint(p, 16, 8)
			if err != nil || len(p) != 1 {
				return netip.Addr{}, false
			}
			nib := 31 - i // parts[0] is the last nibble
			if nib%2 == 0 {
				b[nib/2] |= byte(n) << 4
			} else {
				b[nib/2] |= byte(n)
			}
		}
		return netip.AddrFrom16(b), true
	}
	return netip.Addr{}, false
}
