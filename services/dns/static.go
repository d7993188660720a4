package dns

import (
	"fmt"
	"net/netip"
	"sync/atomic"

	mdns "github.com/miekg/dns"
)

// staticTable answers the configured static names authoritatively: the
// forwarder owns those names, so it must also get the negative answers right
// (NODATA for other types, NXDOMAIN below them) instead of leaking them to the
// upstream, which would answer NXDOMAIN for the name itself.
type staticTable struct {
	names map[string][]netip.Addr // canonical FQDN -> addresses
	ptr   map[string][]string     // reverse name -> canonical FQDNs
	deny  func(netip.Addr) bool   // addresses never answered; may be nil
}

func newStaticTable(m map[string][]netip.Addr, deny func(netip.Addr) bool) (*staticTable, error) {
	t := &staticTable{names: make(map[string][]netip.Addr), ptr: make(map[string][]string), deny: deny}
	for name, addrs := range m {
		if _, ok := mdns.IsDomainName(name); !ok || name == "" || name == "." {
			return nil, fmt.Errorf("static name %q is not a valid domain name", name)
		}
		fq := mdns.CanonicalName(name)
		for _, a := range addrs {
			if !a.IsValid() {
				return nil, fmt.Errorf("static name %q: invalid address", name)
			}
			a = a.Unmap()
			t.names[fq] = append(t.names[fq], a)
			rev, err := mdns.ReverseAddr(a.String())
			if err != nil {
				return nil, fmt.Errorf("static name %q: reverse of %s: %w", name, a, err)
			}
			t.ptr[rev] = append(t.ptr[rev], fq)
		}
		if _, ok := t.names[fq]; !ok {
			t.names[fq] = nil // a name with no address: NODATA for every type
		}
	}
	return t, nil
}

// answer returns the authoritative response for req if its name is static
// (or under a static name, or the reverse name of a static address), nil if
// the query should be forwarded.
// Addresses t.deny reports are left out and counted in denied.
func (t *staticTable) answer(req *mdns.Msg, ttl uint32, denied *atomic.Uint64) *mdns.Msg {
	q := req.Question[0]
	if q.Qclass != mdns.ClassINET && q.Qclass != mdns.ClassANY {
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
		return mdns.RR_Header{Name: q.Name, Rrtype: rrtype, Class: mdns.ClassINET, Ttl: ttl}
	}

	if names, ok := t.ptr[name]; ok {
		if q.Qtype == mdns.TypePTR || q.Qtype == mdns.TypeANY {
			for _, n := range names {
				resp.Answer = append(resp.Answer, &mdns.PTR{Hdr: hdr(mdns.TypePTR), Ptr: n})
			}
		}
		return resp
	}

	addrs, ok := t.names[name]
	if !ok {
		for parent := range t.names {
			if mdns.IsSubDomain(parent, name) {
				// Below a static name: it does not exist.
				resp.Rcode = mdns.RcodeNameError
				return resp
			}
		}
		return nil
	}
	for _, a := range addrs {
		want := a.Is4() && (q.Qtype == mdns.TypeA || q.Qtype == mdns.TypeANY) ||
			a.Is6() && (q.Qtype == mdns.TypeAAAA || q.Qtype == mdns.TypeANY)
		switch {
		case !want:
		case t.deny != nil && t.deny(a):
			denied.Add(1)
		case a.Is4():
			resp.Answer = append(resp.Answer, &mdns.A{Hdr: hdr(mdns.TypeA), A: a.AsSlice()})
		default:
			resp.Answer = append(resp.Answer, &mdns.AAAA{Hdr: hdr(mdns.TypeAAAA), AAAA: a.AsSlice()})
		}
	}
	// No matching records: NOERROR with an empty answer (NODATA).
	return resp
}
