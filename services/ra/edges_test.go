package ra

// Tests on the advertiser's encoding and limits that `make mutate` found
// unchecked; the mutant each kills is named next to it, and each was run
// once against that mutant by hand.

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/services/internal/testnet"
)

// raOptions splits an RA body built by buildRA into its raw options by
// type (RFC 4861 4.6: type, length in units of 8 bytes, body).
func raOptions(t *testing.T, p *raParams) map[byte][][]byte {
	t.Helper()
	b := buildRA(p)[16:]
	out := map[byte][][]byte{}
	for len(b) > 0 {
		if len(b) < 2 || b[1] == 0 || int(b[1])*8 > len(b) {
			t.Fatalf("bad option framing at %x", b)
		}
		n := int(b[1]) * 8
		out[b[0]] = append(out[b[0]], b[:n])
		b = b[n:]
	}
	return out
}

func be32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }

// TestBuildRAOptionalOptions: MTU, RDNSS and DNSSL appear only when there
// is something to say (mutants: == 0 for != 0, >= 0 for > 0), and RDNSS's
// length counts 2 units per server (mutant of 1+2*len).
func TestBuildRAOptionalOptions(t *testing.T) {
	base := raParams{src: DefaultRouterAddr, srcMAC: testnet.ServerMAC, prefix: DefaultPrefix,
		routerLifetime: time.Hour, validLifetime: time.Hour, prefLifetime: time.Minute, dnsLifetime: time.Minute}
	opts := raOptions(t, &base)
	for _, id := range []byte{optMTU, optRDNSS, optDNSSL} {
		if len(opts[id]) != 0 {
			t.Errorf("option %d sent with nothing to say", id)
		}
	}
	full := base
	full.mtu = 1400
	full.dns = []netip.Addr{netip.MustParseAddr("fd00::3"), netip.MustParseAddr("fd00::4")}
	full.search = []string{"a.example"}
	opts = raOptions(t, &full)
	if m := opts[optMTU]; len(m) != 1 || be32(m[0][4:]) != 1400 {
		t.Errorf("MTU option %x, want 1400", m)
	}
	r := opts[optRDNSS]
	if len(r) != 1 || len(r[0]) != 8+2*16 {
		t.Fatalf("RDNSS options %x, want one of 40 bytes", r)
	}
	if a := netip.AddrFrom16([16]byte(r[0][24:40])); a.String() != "fd00::4" {
		t.Errorf("second RDNSS server %s, want fd00::4", a)
	}
	if len(opts[optDNSSL]) != 1 {
		t.Errorf("DNSSL missing")
	}
}

// TestServerLifetimes: the preferred lifetime is 4 h and the DNS options
// live 3 intervals (RFC 8106 5.1) (mutants: / for *).
func TestServerLifetimes(t *testing.T) {
	p := testnet.New(t, testnet.GuestOptions{})
	s, err := New(Options{Stack: p.Server, NIC: testnet.NIC, Logger: testnet.Logger(t), Interval: 10 * time.Minute,
		DomainSearch: []string{"a.example"}})
	if err != nil {
		t.Fatal(err)
	}
	opts := raOptions(t, &s.params)
	if pi := opts[optPrefixInfo]; len(pi) != 1 || be32(pi[0][8:]) != 4*3600 {
		t.Errorf("prefix option %x, want a preferred lifetime of 4h", pi)
	}
	for _, id := range []byte{optRDNSS, optDNSSL} {
		if o := opts[id]; len(o) != 1 || be32(o[0][4:]) != 30*60 {
			t.Errorf("option %d: %x, want a lifetime of 3 intervals (30m)", id, o)
		}
	}
}

// nameOfLen is a valid domain name of exactly n bytes (labels of at most 63).
func nameOfLen(n int) string {
	var labels []string
	for n > 0 {
		l := min(n, 63)
		if n-l == 1 { // a trailing "." plus nothing would leave an empty label
			l--
		}
		labels = append(labels, strings.Repeat("a", l))
		n -= l + 1 // the dot before the next label
	}
	return strings.Join(labels, ".")
}

// TestDNSSLSizeEdge: a search list that fills one DNSSL option exactly
// (255 units of 8 bytes) is accepted and one byte more is refused (mutants:
// >= for >, len-2 for len+2).
func TestDNSSLSizeEdge(t *testing.T) {
	// 8 option header bytes + 7 names of 253 (255 encoded) + one of 245
	// (247 encoded) = 2040 = 255*8.
	fill := func(last int) []string {
		l := []string{}
		for range 7 {
			l = append(l, nameOfLen(253))
		}
		return append(l, nameOfLen(last))
	}
	for _, n := range []int{253, 245} {
		if got := len(nameOfLen(n)); got != n {
			t.Fatalf("nameOfLen(%d) has %d bytes", n, got)
		}
	}
	p := testnet.New(t, testnet.GuestOptions{})
	for last, ok := range map[int]bool{245: true, 246: false} {
		_, err := New(Options{Stack: p.Server, NIC: testnet.NIC, Logger: testnet.Logger(t), DomainSearch: fill(last)})
		if (err == nil) != ok {
			t.Errorf("search list of %d bytes: err %v, want ok=%v", 8+7*255+last+2, err, ok)
		}
	}
}

// TestLeaseTable6PoolEdges: the first and last pool addresses are in, their
// neighbours out (mutants: > for >=, <= for <).
func TestLeaseTable6PoolEdges(t *testing.T) {
	tab := newLeaseTable6(netip.MustParseAddr("fd00::100"), 0x100)
	for a, want := range map[string]bool{"fd00::ff": false, "fd00::100": true, "fd00::1ff": true, "fd00::200": false} {
		if got := tab.inPool(netip.MustParseAddr(a)); got != want {
			t.Errorf("inPool(%s) = %v, want %v", a, got, want)
		}
	}
}
