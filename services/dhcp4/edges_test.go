package dhcp4

// Tests that sit exactly on the server's limits and decisions. Each was
// written for a mutant of `make mutate` that no other test noticed (the
// mutant is named next to the check), and each was run once against that
// mutant by hand to see it fail.

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"

	"github.com/vunet/vunet/services/internal/testnet"
)

// TestOptionsEdges accepts every limit of Options exactly and refuses one
// step past it (mutants: < for <= and > for >= in New's checks, the +2 of
// the option-119 length sum).
func TestOptionsEdges(t *testing.T) {
	slash30 := func(o *Options) {
		o.Prefix = netip.MustParsePrefix("10.0.2.0/30")
		o.ServerAddr = netip.MustParseAddr("10.0.2.1")
		o.Router = o.ServerAddr
		o.DNS = []netip.Addr{o.ServerAddr}
		o.PoolStart = netip.MustParseAddr("10.0.2.2")
	}
	dnsList := func(n int) []netip.Addr {
		var l []netip.Addr
		for i := range n {
			l = append(l, netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}))
		}
		return l
	}
	// Five 49-byte names encode to exactly 5*(49+2) = 255 bytes.
	name49 := strings.Repeat("a", 45) + ".abc"
	search255 := []string{name49, name49, name49, name49, name49}
	cases := []struct {
		name string
		mod  func(*Options)
		ok   bool
	}{
		{"prefix /8", func(o *Options) { o.Prefix = netip.MustParsePrefix("10.0.0.0/8") }, true},
		{"prefix /7", func(o *Options) { o.Prefix = netip.MustParsePrefix("10.0.0.0/7") }, false},
		{"prefix /30", slash30, true},
		{"prefix /31", func(o *Options) {
			slash30(o)
			o.Prefix = netip.MustParsePrefix("10.0.2.0/31")
			o.ServerAddr, o.PoolStart = netip.MustParseAddr("10.0.2.0"), netip.MustParseAddr("10.0.2.1")
		}, false},
		{"server is the network address", func(o *Options) { o.ServerAddr = netip.MustParseAddr("10.0.2.0") }, false},
		{"server is the broadcast address", func(o *Options) { o.ServerAddr = netip.MustParseAddr("10.0.2.255") }, false},
		{"pool fills the prefix", func(o *Options) { o.PoolSize = 255 - 15 }, true},
		{"pool one past the prefix", func(o *Options) { o.PoolSize = 255 - 15 + 1 }, false},
		{"pool of one at the end", func(o *Options) { slash30(o); o.PoolSize = 1 }, true},
		{"pool of two in a /30", func(o *Options) { slash30(o); o.PoolSize = 2 }, false},
		{"lease time 1m", func(o *Options) { o.LeaseTime = time.Minute }, true},
		{"lease time just under 1m", func(o *Options) { o.LeaseTime = time.Minute - time.Second }, false},
		{"lease time one year", func(o *Options) { o.LeaseTime = 365 * 24 * time.Hour }, true},
		{"lease time past one year", func(o *Options) { o.LeaseTime = 365*24*time.Hour + time.Second }, false},
		{"mtu 68", func(o *Options) { o.MTU = 68 }, true},
		{"mtu 67", func(o *Options) { o.MTU = 67 }, false},
		{"mtu 65535", func(o *Options) { o.MTU = 65535 }, true},
		{"mtu 65536", func(o *Options) { o.MTU = 65536 }, false},
		{"63 dns servers", func(o *Options) { o.DNS = dnsList(63) }, true},
		{"64 dns servers", func(o *Options) { o.DNS = dnsList(64) }, false},
		{"255-byte boot file", func(o *Options) { o.Boot.TFTPFile = strings.Repeat("f", 255) }, true},
		{"256-byte boot file", func(o *Options) { o.Boot.TFTPFile = strings.Repeat("f", 256) }, false},
		{"search list of 255 bytes", func(o *Options) { o.DomainSearch = search255 }, true},
		{"search list of 256 bytes", func(o *Options) { o.DomainSearch = append(search255[:4:4], name49+"x") }, false},
		{"http boot url", func(o *Options) { o.Boot.HTTPURL = "http://10.0.2.2/boot.efi" }, true},
		{"https boot url", func(o *Options) { o.Boot.HTTPURL = "https://10.0.2.2/boot.efi" }, true},
	}
	for _, tc := range cases {
		o := Options{}
		tc.mod(&o)
		_, err := New(o)
		if (err == nil) != tc.ok {
			t.Errorf("%s: New: err = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

// newBare is a server without a stack, driven through handle.
func newBare(t *testing.T, mod func(*Options)) (*Server, *time.Time) {
	t.Helper()
	o := Options{LeaseTime: time.Hour}
	if mod != nil {
		mod(&o)
	}
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1e9, 0)
	s.now = func() time.Time { return now }
	return s, &now
}

func hwAddr(i byte) net.HardwareAddr { return net.HardwareAddr{2, 0, 0, 0, 0, i} }

func discover(t *testing.T, s *Server, hw net.HardwareAddr) *dhcpv4.DHCPv4 {
	t.Helper()
	d, err := dhcpv4.NewDiscovery(hw)
	if err != nil {
		t.Fatal(err)
	}
	o, _ := s.handle(d)
	return o
}

func bind(t *testing.T, s *Server, hw net.HardwareAddr) *dhcpv4.DHCPv4 {
	t.Helper()
	o := discover(t, s, hw)
	if o == nil {
		t.Fatalf("%s: no offer", hw)
	}
	r, err := dhcpv4.NewRequestFromOffer(o)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := s.handle(r)
	if a == nil || a.MessageType() != dhcpv4.MessageTypeAck {
		t.Fatalf("%s: no ACK: %v", hw, a)
	}
	return a
}

// TestReplyTimersAndOptionalOptions: T1 is half the lease and T2 seven
// eighths (mutants: / for * and the reverse); a server with no DNS servers
// or search list sends neither option (mutants: >= 0 for > 0).
func TestReplyTimersAndOptionalOptions(t *testing.T) {
	s, _ := newBare(t, func(o *Options) { o.DNS = []netip.Addr{} })
	a := bind(t, s, hwAddr(1))
	if got := a.IPAddressRenewalTime(0); got != 30*time.Minute {
		t.Errorf("T1 = %s, want 30m", got)
	}
	if got := a.IPAddressRebindingTime(0); got != 52*time.Minute+30*time.Second {
		t.Errorf("T2 = %s, want 52m30s", got)
	}
	if a.Options.Has(dhcpv4.OptionDomainNameServer) {
		t.Errorf("option 6 sent with no DNS servers: %v", a.Options.Get(dhcpv4.OptionDomainNameServer))
	}
	if a.Options.Has(dhcpv4.OptionDNSDomainSearchList) {
		t.Errorf("option 119 sent with no search list")
	}
}

// TestRelayedPacketIgnored: a request carrying a relay address (giaddr) is
// not for a point-to-point link's server (mutant: == nil for != nil).
func TestRelayedPacketIgnored(t *testing.T) {
	s, _ := newBare(t, nil)
	d, _ := dhcpv4.NewDiscovery(hwAddr(1))
	d.GatewayIPAddr = net.IPv4(192, 0, 2, 1)
	if r, _ := s.handle(d); r != nil {
		t.Fatalf("relayed DISCOVER answered: %v", r)
	}
}

// TestRediscoverKeepsBoundLease: a bound client that sends DISCOVER again
// (a reboot without INIT-REBOOT) is offered its address and keeps its lease
// bound; it must not be downgraded to a 60 s offer that then expires and
// hands the address to someone else (mutants of the l.bound / l.addr check).
func TestRediscoverKeepsBoundLease(t *testing.T) {
	s, now := newBare(t, nil)
	a := bind(t, s, hwAddr(1))
	o := discover(t, s, hwAddr(1))
	if o == nil || !o.YourIPAddr.Equal(a.YourIPAddr) {
		t.Fatalf("rediscover offered %v, want %s", o, a.YourIPAddr)
	}
	*now = now.Add(offerHold + time.Second)
	if n := s.Stats().ActiveLeases(); n != 1 {
		t.Fatalf("active leases after the offer hold = %d, want 1 (bound lease dropped)", n)
	}
	if o2 := discover(t, s, hwAddr(2)); o2 == nil || o2.YourIPAddr.Equal(a.YourIPAddr) {
		t.Fatalf("second client offered %v, the first client's bound address", o2)
	}
}

// TestReclaimTakesOnlyOffers: when the pool is full, a new client gets the
// address of the oldest mere offer, never a bound lease nor a declined
// address (mutants of reclaimOffer's !l.bound and l.mac != declined).
func TestReclaimTakesOnlyOffers(t *testing.T) {
	s, now := newBare(t, func(o *Options) { o.PoolSize = 3 })
	bound := bind(t, s, hwAddr(1)) // .15, bound
	// Client 2 binds .16 and declines it: .16 is held out of the pool.
	a2 := bind(t, s, hwAddr(2))
	dec, _ := dhcpv4.New(dhcpv4.WithHwAddr(hwAddr(2)), dhcpv4.WithMessageType(dhcpv4.MessageTypeDecline),
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(a2.YourIPAddr)),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.IPv4(10, 0, 2, 2))))
	s.handle(dec)
	*now = now.Add(time.Second)
	offered := discover(t, s, hwAddr(3)) // .17, only offered
	if offered == nil || offered.YourIPAddr.String() != "10.0.2.17" {
		t.Fatalf("third client offered %v, want 10.0.2.17", offered)
	}
	*now = now.Add(time.Second)
	o := discover(t, s, hwAddr(4))
	if o == nil || o.YourIPAddr.String() != "10.0.2.17" {
		t.Fatalf("fourth client offered %v, want the reclaimed offer 10.0.2.17 (bound %s, declined %s)",
			o, bound.YourIPAddr, a2.YourIPAddr)
	}
	if st := s.Stats(); st.PoolExhausted.Load() != 0 {
		t.Errorf("pool exhausted counted %d times, want 0 (an offer was reclaimable)", st.PoolExhausted.Load())
	}
}

// TestInPoolEdges: the first and last pool addresses are in, their
// neighbours out (mutants: > for >= and <= for <).
func TestInPoolEdges(t *testing.T) {
	tab := newLeaseTable(netip.MustParseAddr("10.0.2.15"), 10)
	for a, want := range map[string]bool{"10.0.2.14": false, "10.0.2.15": true, "10.0.2.24": true, "10.0.2.25": false} {
		if got := tab.inPool(netip.MustParseAddr(a)); got != want {
			t.Errorf("inPool(%s) = %v, want %v", a, got, want)
		}
	}
}

// TestCleanExchangeCountsNothingBad: a normal DORA over a real stack counts
// no malformed packet and no send error (mutants: r == nil in the recover,
// err == nil after the send).
func TestCleanExchangeCountsNothingBad(t *testing.T) {
	pair := testnet.New(t, testnet.GuestOptions{})
	s := startServer(t, pair, nil)
	c := newClient(t, pair)
	disc, _ := dhcpv4.NewDiscovery(c.hw)
	offer := c.exchange(disc, bcast)
	req, _ := dhcpv4.NewRequestFromOffer(offer)
	if ack := c.exchange(req, bcast); ack.MessageType() != dhcpv4.MessageTypeAck {
		t.Fatalf("got %s, want ACK", ack.MessageType())
	}
	st := s.Stats()
	if st.Malformed.Load() != 0 || st.SendErrors.Load() != 0 {
		t.Errorf("malformed %d, send errors %d after a clean exchange, want 0 and 0",
			st.Malformed.Load(), st.SendErrors.Load())
	}
}
