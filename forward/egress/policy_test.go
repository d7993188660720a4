package egress

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

type addrSet map[netip.Addr]bool

func (s addrSet) Contains(a netip.Addr) bool { return s[a] }

func rules(t *testing.T, specs ...string) []Rule {
	t.Helper()
	var out []Rule
	for _, s := range specs {
		r, err := ParseRule(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func TestPolicyCheck(t *testing.T) {
	gw4, gw6 := netip.MustParseAddr("10.0.2.2"), netip.MustParseAddr("fd00::2")
	host := addrSet{netip.MustParseAddr("198.51.100.7"): true, netip.MustParseAddr("2001:db8::7"): true}
	type check struct {
		proto Proto
		dst   string
		allow bool
		rule  string
	}
	for _, tt := range []struct {
		name   string
		opts   Options
		checks []check
	}{
		{"defaults", Options{}, []check{
			{TCP, "169.254.169.254:80", false, "deny 169.254.0.0/16"},
			{UDP, "169.254.1.1:53", false, "deny 169.254.0.0/16"},
			{ICMP, "169.254.169.254:0", false, "deny 169.254.0.0/16"},
			{TCP, "[fd00:ec2::254]:80", false, "deny fd00:ec2::254/128"},
			{TCP, "[fe80::1]:80", false, "deny fe80::/10"},
			{TCP, "[::ffff:169.254.169.254]:80", false, "deny 169.254.0.0/16"},
			{TCP, "[fd00:ec2::253]:80", true, "allow any"},
			{TCP, "198.51.100.7:80", true, "allow any"},
			{TCP, "192.0.2.1:443", true, "allow any"},
		}},
		{"allow-metadata", Options{AllowMetadata: true}, []check{
			{TCP, "169.254.169.254:80", true, "allow any"},
			{TCP, "[fd00:ec2::254]:80", true, "allow any"},
		}},
		{"explicit allow of a metadata address", Options{Rules: rules(t, "allow tcp:169.254.169.254:80", "allow fd00:ec2::254", "allow any", "allow 0.0.0.0/0")}, []check{
			{TCP, "169.254.169.254:80", true, "allow tcp:169.254.169.254:80"},
			// broad allows do not open what the defaults protect
			{TCP, "169.254.169.254:81", false, "deny 169.254.0.0/16"},
			{UDP, "169.254.169.254:80", false, "deny 169.254.0.0/16"},
			{TCP, "169.254.1.1:80", false, "deny 169.254.0.0/16"},
			{UDP, "[fd00:ec2::254]:53", true, "allow fd00:ec2::254"},
			{TCP, "[fe80::1]:22", false, "deny fe80::/10"},
			{TCP, "192.0.2.1:443", true, "allow any"},
		}},
		{"first match", Options{Rules: rules(t, "deny tcp:192.0.2.0/24:22", "allow 192.0.2.7", "deny 192.0.2.0/24")}, []check{
			{TCP, "192.0.2.7:22", false, "deny tcp:192.0.2.0/24:22"},
			{TCP, "192.0.2.7:80", true, "allow 192.0.2.7"},
			{TCP, "192.0.2.8:80", false, "deny 192.0.2.0/24"},
			{ICMP, "192.0.2.8:0", false, "deny 192.0.2.0/24"},
			{UDP, "192.0.3.8:22", true, "allow any"},
		}},
		{"host addresses", Options{HostAddrs: host, Gateways: []netip.Addr{gw4, gw6}, Rules: rules(t, "allow 198.51.100.0/24", "allow tcp:[2001:db8::7]:8080")}, []check{
			{TCP, "198.51.100.7:80", false, "deny host-addresses"},
			{TCP, "198.51.100.8:80", true, "allow 198.51.100.0/24"},
			{TCP, "[2001:db8::7]:8080", true, "allow tcp:[2001:db8::7]:8080"},
			{TCP, "[2001:db8::7]:8081", false, "deny host-addresses"},
			{TCP, "10.0.2.2:80", true, "allow gateway"},
			{ICMP, "[fd00::2]:0", true, "allow gateway"},
		}},
		{"gateway owned by the host too", Options{HostAddrs: addrSet{gw4: true}, Gateways: []netip.Addr{gw4}}, []check{
			{TCP, "10.0.2.2:80", true, "allow gateway"},
		}},
		{"egress none", Options{Mode: AllowNone, Gateways: []netip.Addr{gw4, gw6}, Rules: rules(t, "deny tcp:10.0.2.2:22", "allow udp:192.0.2.53:53")}, []check{
			{TCP, "192.0.2.1:443", false, "deny any"},
			{ICMP, "[2001:db8::1]:0", false, "deny any"},
			{UDP, "8.8.8.8:53", false, "deny any"},
			{UDP, "192.0.2.53:53", true, "allow udp:192.0.2.53:53"},
			{TCP, "10.0.2.2:80", true, "allow gateway"},
			{TCP, "[fd00::2]:80", true, "allow gateway"},
			{TCP, "10.0.2.2:22", false, "deny tcp:10.0.2.2:22"},
			{TCP, "169.254.169.254:80", false, "deny 169.254.0.0/16"},
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := New(tt.opts)
			for _, c := range tt.checks {
				v := p.Check(Flow{Proto: c.proto, Dst: netip.MustParseAddrPort(c.dst)})
				if v.Allowed != c.allow || v.Rule != c.rule {
					t.Errorf("%s %s: allowed %v by %q, want %v by %q", c.proto, c.dst, v.Allowed, v.Rule, c.allow, c.rule)
				}
			}
		})
	}
}

func TestPolicyCountsAndFirstDenial(t *testing.T) {
	p := New(Options{Rules: rules(t, "deny tcp:192.0.2.0/24:22")})
	fl := Flow{Proto: TCP, Dst: netip.MustParseAddrPort("192.0.2.1:22")}
	if v := p.Check(fl); v.Allowed || !v.FirstDenial {
		t.Fatalf("first check %+v, want a first denial", v)
	}
	for range 4 {
		if v := p.Check(fl); v.FirstDenial {
			t.Fatalf("later check %+v reported as first", v)
		}
	}
	p.Check(Flow{Proto: TCP, Dst: netip.MustParseAddrPort("192.0.2.1:80")})
	if v := p.Check(Flow{Proto: TCP, Dst: netip.MustParseAddrPort("169.254.169.254:80")}); !v.FirstDenial {
		t.Fatalf("first metadata denial %+v not reported as first", v)
	}
	want := map[string]uint64{"deny tcp:192.0.2.0/24:22": 5, "allow any": 1, "deny 169.254.0.0/16": 1, "deny fe80::/10": 0}
	st := p.Stats()
	if st[0].Index != 1 || st[0].Action != "deny" || st[1].Index != 0 {
		t.Fatalf("stats order %+v", st)
	}
	for _, s := range st {
		if w, ok := want[s.Rule]; ok && s.Counters.Hits.Load() != w {
			t.Errorf("%s: %d hits, want %d", s.Rule, s.Counters.Hits.Load(), w)
		}
	}
}

func TestAddrDenied(t *testing.T) {
	gw := netip.MustParseAddr("10.0.2.2")
	for _, tt := range []struct {
		name string
		opts Options
		addr string
		want bool
	}{
		{"metadata", Options{}, "169.254.169.254", true},
		{"metadata allowed", Options{AllowMetadata: true}, "169.254.169.254", false},
		{"metadata allowed on one port", Options{Rules: rules(t, "allow tcp:169.254.169.254:80")}, "169.254.169.254", false},
		{"metadata broad allow", Options{Rules: rules(t, "allow any")}, "169.254.169.254", true},
		{"public", Options{}, "192.0.2.1", false},
		{"denied address", Options{Rules: rules(t, "deny 192.0.2.0/24")}, "192.0.2.1", true},
		{"denied port only", Options{Rules: rules(t, "deny tcp:192.0.2.0/24:22")}, "192.0.2.1", false},
		{"partial deny then full", Options{Rules: rules(t, "deny tcp:192.0.2.0/24:22", "deny 192.0.2.1")}, "192.0.2.1", true},
		{"allow before deny", Options{Rules: rules(t, "allow udp:192.0.2.1:53", "deny any")}, "192.0.2.1", false},
		{"none", Options{Mode: AllowNone, Gateways: []netip.Addr{gw}}, "192.0.2.1", true},
		{"none gateway", Options{Mode: AllowNone, Gateways: []netip.Addr{gw}}, "10.0.2.2", false},
		{"host address", Options{HostAddrs: addrSet{netip.MustParseAddr("192.0.2.1"): true}}, "192.0.2.1", true},
	} {
		if got := New(tt.opts).AddrDenied(netip.MustParseAddr(tt.addr)); got != tt.want {
			t.Errorf("%s: AddrDenied(%s) = %v, want %v", tt.name, tt.addr, got, tt.want)
		}
	}
}

func TestHostAddrSetFollowsChanges(t *testing.T) {
	cur := []net.Addr{&net.IPNet{IP: net.ParseIP("198.51.100.7"), Mask: net.CIDRMask(24, 32)}}
	reads := make(chan struct{}, 16)
	read := func() ([]net.Addr, error) {
		reads <- struct{}{}
		return cur, nil
	}
	changes := make(chan struct{})
	closed := false
	s, err := watchHostAddrs(nil, read, func() (<-chan struct{}, func() error, error) {
		return changes, func() error { closed = true; return nil }, nil
	}, PollInterval)
	if err != nil {
		t.Fatal(err)
	}
	<-reads
	if !s.Contains(netip.MustParseAddr("198.51.100.7")) || s.Contains(netip.MustParseAddr("198.51.100.8")) {
		t.Fatal("initial set wrong")
	}
	cur = []net.Addr{&net.IPNet{IP: net.ParseIP("2001:db8::8"), Mask: net.CIDRMask(64, 128)}}
	changes <- struct{}{}
	<-reads
	deadline := time.Now().Add(5 * time.Second)
	for s.Contains(netip.MustParseAddr("198.51.100.7")) || !s.Contains(netip.MustParseAddr("2001:db8::8")) {
		if time.Now().After(deadline) {
			t.Fatal("set not updated after a change notification")
		}
		time.Sleep(time.Millisecond)
	}
	s.Close()
	if !closed {
		t.Fatal("subscription not closed")
	}
}

func TestHostAddrSetKeepsOldSetOnError(t *testing.T) {
	fail := false
	s, err := watchHostAddrs(nil, func() ([]net.Addr, error) {
		if fail {
			return nil, errors.New("boom")
		}
		return []net.Addr{&net.IPAddr{IP: net.ParseIP("192.0.2.9")}}, nil
	}, func() (<-chan struct{}, func() error, error) { return nil, nil, errors.New("no netlink") }, PollInterval)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fail = true
	if s.Refresh() == nil || !s.Contains(netip.MustParseAddr("192.0.2.9")) || s.Stats().Failures.Load() != 1 {
		t.Fatal("a failed refresh lost the previous set")
	}
}

// TestWatchHostAddrsReal uses the host's netlink: loopback is always there.
func TestWatchHostAddrsReal(t *testing.T) {
	s, err := WatchHostAddrs(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.Contains(netip.MustParseAddr("127.0.0.1")) {
		t.Fatalf("127.0.0.1 not among the host's %d addresses", s.Len())
	}
}

// TestHostAddrSetPollsWhenNotificationsStop: a subscription that ends while
// the set is in use (the netlink socket failed) is replaced by polling.
func TestHostAddrSetPollsWhenNotificationsStop(t *testing.T) {
	var mu sync.Mutex
	cur, reads := "192.0.2.1", 0
	read := func() ([]net.Addr, error) {
		mu.Lock()
		defer mu.Unlock()
		reads++
		return []net.Addr{&net.IPAddr{IP: net.ParseIP(cur)}}, nil
	}
	readsNow := func() int { mu.Lock(); defer mu.Unlock(); return reads }
	changes := make(chan struct{})
	s, err := watchHostAddrs(nil, read, func() (<-chan struct{}, func() error, error) {
		return changes, func() error { return nil }, nil
	}, 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	close(changes)
	// The end of the subscription itself triggers one re-read; change the
	// set only after it, so only polling can find the change.
	for readsNow() < 2 {
		time.Sleep(time.Millisecond)
	}
	mu.Lock()
	cur = "192.0.2.2"
	mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for !s.Contains(netip.MustParseAddr("192.0.2.2")) {
		if time.Now().After(deadline) {
			t.Fatal("the set went stale after its notifications stopped")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
