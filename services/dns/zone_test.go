package dns

import (
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/vunet/vunet/services/internal/testnet"
	"github.com/vunet/vunet/services/names"
)

// TestGuestNames checks the vunet.internal zone: guest names from the name
// table (A, AAAA, PTR, NODATA), NXDOMAIN for every other name under the zone
// without asking the upstream (which would answer NXDOMAIN too, so the test
// checks the forwarded counter), static names still first, and a released
// name gone at once.
func TestGuestNames(t *testing.T) {
	up := upstream(t)
	reg := names.New(names.Options{Logger: testnet.Logger(t), Reserved: []string{"host"},
		Addrs6: func(mac net.HardwareAddr) []netip.Addr {
			if mac[5] == 1 {
				return []netip.Addr{netip.MustParseAddr("fd00::5054:ff:fe00:1")}
			}
			return nil
		}})
	vm1, vm2 := net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}, net.HardwareAddr{0x52, 0x54, 0, 0, 0, 2}
	reg.Bind(vm1, "vm1", netip.MustParseAddr("10.0.2.15"), time.Now().Add(time.Hour))
	reg.Bind(vm2, "vm2", netip.MustParseAddr("10.0.2.16"), time.Now().Add(time.Hour))
	rev6, _ := mdns.ReverseAddr("fd00::5054:ff:fe00:1")
	e := setup(t, Options{Upstreams: []netip.AddrPort{up}, Zone: names.Domain, Guests: reg})

	for _, c := range []struct {
		name  string
		qtype uint16
		rcode int
		want  []string
	}{
		{"vm1.vunet.internal.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.0.2.15"}},
		{"VM1.Vunet.Internal.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.0.2.15"}},
		{"vm1.vunet.internal.", mdns.TypeAAAA, mdns.RcodeSuccess, []string{"fd00::5054:ff:fe00:1"}},
		{"vm2.vunet.internal.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.0.2.16"}},
		{"vm2.vunet.internal.", mdns.TypeAAAA, mdns.RcodeSuccess, nil}, // NODATA: no IPv6 address
		{"vm1.vunet.internal.", mdns.TypeMX, mdns.RcodeSuccess, nil},
		{"nope.vunet.internal.", mdns.TypeA, mdns.RcodeNameError, nil},
		{"x.vm1.vunet.internal.", mdns.TypeA, mdns.RcodeNameError, nil},
		{"vunet.internal.", mdns.TypeA, mdns.RcodeSuccess, nil},
		{"host.vunet.internal.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.0.2.2"}}, // static first
		{"15.2.0.10.in-addr.arpa.", mdns.TypePTR, mdns.RcodeSuccess, []string{"vm1.vunet.internal."}},
		{rev6, mdns.TypePTR, mdns.RcodeSuccess, []string{"vm1.vunet.internal."}},
	} {
		for _, tcp := range []bool{false, true} {
			r := e.query(testnet.DNS4, tcp, c.name, c.qtype, false)
			if r.Rcode != c.rcode || !slices.Equal(answers(r), c.want) || !r.Authoritative {
				t.Errorf("%s %s (tcp=%v): rcode %s aa=%v answers %q; want %s %q", c.name, mdns.TypeToString[c.qtype], tcp,
					mdns.RcodeToString[r.Rcode], r.Authoritative, answers(r), mdns.RcodeToString[c.rcode], c.want)
			}
			if len(r.Answer) > 0 && r.Answer[0].Header().Ttl != guestTTL && c.name != "host.vunet.internal." {
				t.Errorf("%s: ttl %d, want %d", c.name, r.Answer[0].Header().Ttl, guestTTL)
			}
		}
	}
	if n := e.srv.Stats().Forwarded.Load(); n != 0 {
		t.Errorf("%d queries under the zone were forwarded upstream", n)
	}
	// Other names, and reverse names of non-guests, still go upstream.
	if r := e.query(testnet.DNS4, false, "example.test.", mdns.TypeA, false); !slices.Equal(answers(r), []string{"192.0.2.10"}) {
		t.Errorf("example.test: %q", answers(r))
	}
	if r := e.query(testnet.DNS4, false, "10.2.0.192.in-addr.arpa.", mdns.TypePTR, false); !slices.Equal(answers(r), []string{"example.test."}) {
		t.Errorf("upstream PTR: %q", answers(r))
	}
	if n := e.srv.Stats().Forwarded.Load(); n != 2 {
		t.Errorf("forwarded = %d, want 2", n)
	}
	reg.Release(vm1)
	if r := e.query(testnet.DNS4, false, "vm1.vunet.internal.", mdns.TypeA, false); r.Rcode != mdns.RcodeNameError {
		t.Errorf("released vm1: rcode %s answers %q, want NXDOMAIN", mdns.RcodeToString[r.Rcode], answers(r))
	}
}

func TestReverseAddr(t *testing.T) {
	for _, a := range []string{"10.0.2.15", "0.0.0.0", "255.255.255.255", "fd00::1", "2001:db8::5054:ff:fe12:3456"} {
		want := netip.MustParseAddr(a)
		rev, err := mdns.ReverseAddr(a)
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := reverseAddr(rev); !ok || got != want {
			t.Errorf("reverseAddr(%s) = %v, %v; want %s", rev, got, ok, want)
		}
	}
	for _, bad := range []string{"in-addr.arpa.", "1.2.3.in-addr.arpa.", "1.2.3.4.5.in-addr.arpa.", "256.0.0.10.in-addr.arpa.",
		"01.0.0.10.in-addr.arpa.", "a.0.0.10.in-addr.arpa.", "1.ip6.arpa.", "example.test."} {
		if got, ok := reverseAddr(bad); ok {
			t.Errorf("reverseAddr(%q) = %v, want not ok", bad, got)
		}
	}
}

func TestZoneValidation(t *testing.T) {
	if _, err := New(Options{Guests: names.New(names.Options{})}); err == nil {
		t.Error("guest names without a zone accepted")
	}
	if _, err := New(Options{Zone: "bad..zone"}); err == nil {
		t.Error("invalid zone accepted")
	}
}
