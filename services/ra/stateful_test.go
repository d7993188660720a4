package ra

import (
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/iana"

	"github.com/vunet/vunet/services/internal/testnet"
)

// clock is a settable time source for lease expiry.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func statefulServer(t *testing.T, opts DHCPv6Options) (*DHCPv6, *clock) {
	t.Helper()
	opts.Stateful = true
	if opts.Logger == nil {
		opts.Logger = testnet.Logger(t)
	}
	s, err := NewDHCPv6(opts)
	if err != nil {
		t.Fatal(err)
	}
	c := &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	s.now = c.now
	return s, c
}

// client is a test DHCPv6 client with one DUID-LL.
type client struct {
	duid dhcpv6.DUID
	iaid [4]byte
}

func newClient(n int) client {
	return client{duid: &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: net.HardwareAddr{0x52, 0x54, 0, 0, byte(n >> 8), byte(n)}},
		iaid: [4]byte{0, 0, 0, 1}}
}

// msg builds a client message; addr, if valid, goes in the IA_NA; server
// adds our server identifier.
func (c client) msg(t testing.TB, typ dhcpv6.MessageType, s *DHCPv6, server bool, addr netip.Addr, mods ...dhcpv6.Modifier) []byte {
	t.Helper()
	m, err := dhcpv6.NewMessage(dhcpv6.WithClientID(c.duid))
	if err != nil {
		t.Fatal(err)
	}
	m.MessageType = typ
	ia := &dhcpv6.OptIANA{IaId: c.iaid}
	if addr.IsValid() {
		ia.Options.Add(&dhcpv6.OptIAAddress{IPv6Addr: addr.AsSlice(), PreferredLifetime: time.Hour, ValidLifetime: 2 * time.Hour})
	}
	m.AddOption(ia)
	if server {
		m.AddOption(dhcpv6.OptServerID(s.serverID))
	}
	for _, mod := range mods {
		mod(m)
	}
	return m.ToBytes()
}

func parseReply(t *testing.T, b []byte, want dhcpv6.MessageType) *dhcpv6.Message {
	t.Helper()
	if b == nil {
		t.Fatalf("no %s", want)
	}
	d, err := dhcpv6.FromBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	m := d.(*dhcpv6.Message)
	if m.MessageType != want {
		t.Fatalf("got %s, want %s", m.MessageType, want)
	}
	if m.Options.ServerID() == nil || m.Options.ClientID() == nil {
		t.Fatalf("%s without server or client id", want)
	}
	if dns := m.Options.DNS(); len(dns) != 1 || !dns[0].Equal(net.ParseIP("fd00::3")) {
		t.Errorf("%s DNS = %v", want, dns)
	}
	return m
}

// iaAddr returns the address and lifetimes of the reply's IA_NA, or its
// status code.
func iaAddr(t *testing.T, m *dhcpv6.Message) (netip.Addr, *dhcpv6.OptIAAddress, *dhcpv6.OptIANA) {
	t.Helper()
	ia := m.Options.OneIANA()
	if ia == nil {
		return netip.Addr{}, nil, nil
	}
	for _, a := range ia.Options.Addresses() {
		if a.ValidLifetime > 0 {
			x, _ := netip.AddrFromSlice(a.IPv6Addr)
			return x, a, ia
		}
	}
	return netip.Addr{}, nil, ia
}

func iaStatus(m *dhcpv6.Message) iana.StatusCode {
	ia := m.Options.OneIANA()
	if ia == nil || ia.Options.Status() == nil {
		return iana.StatusSuccess
	}
	return ia.Options.Status().StatusCode
}

var pool0 = netip.MustParseAddr("fd00::100")

func TestStatefulSolicitRequest(t *testing.T) {
	s, _ := statefulServer(t, DHCPv6Options{})
	c := newClient(1)
	adv := parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeSolicit, s, false, netip.Addr{})), dhcpv6.MessageTypeAdvertise)
	a, ia, o := iaAddr(t, adv)
	if a != pool0 {
		t.Fatalf("advertised %v, want %s", a, pool0)
	}
	if ia.PreferredLifetime != 30*time.Minute || ia.ValidLifetime != time.Hour || o.T1 != 15*time.Minute || o.T2 != 24*time.Minute {
		t.Errorf("lifetimes pref %s valid %s T1 %s T2 %s", ia.PreferredLifetime, ia.ValidLifetime, o.T1, o.T2)
	}
	if p := adv.GetOneOption(dhcpv6.OptionPreference); p == nil {
		t.Error("ADVERTISE without preference")
	}
	if len(s.Leases()) != 0 {
		t.Errorf("ADVERTISE reserved a lease: %v", s.Leases())
	}
	// Another client's REQUEST may take the advertised address: ADVERTISE
	// reserves nothing, and the first client then gets the next one.
	other := newClient(2)
	rep := parseReply(t, s.reply(other.msg(t, dhcpv6.MessageTypeRequest, s, true, pool0)), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0 {
		t.Fatalf("other client got %v", a)
	}
	rep = parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRequest, s, true, pool0)), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0.Next() {
		t.Fatalf("REQUEST for a taken address got %v, want %s", a, pool0.Next())
	}
	if rep.GetOneOption(dhcpv6.OptionRapidCommit) != nil {
		t.Error("REPLY to REQUEST carries Rapid Commit")
	}
	ls := s.Leases()
	if len(ls) != 2 {
		t.Fatalf("leases = %+v", ls)
	}
	for _, l := range ls {
		if l.IAID != 1 || l.MAC == "" || !strings.HasPrefix(l.DUID, "0003") {
			t.Errorf("lease %+v", l)
		}
	}
	if st := s.Stats(); st.Solicit.Load() != 1 || st.Request.Load() != 2 || st.ActiveLeases() != 2 || st.PoolSize() != 256 {
		t.Errorf("stats solicit %d request %d leases %d pool %d", st.Solicit.Load(), st.Request.Load(), st.ActiveLeases(), st.PoolSize())
	}
	// The same client asking again keeps its address (one lease per DUID+IAID).
	rep = parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{})), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0.Next() || len(s.Leases()) != 2 {
		t.Errorf("repeat REQUEST got %v, %d leases", a, len(s.Leases()))
	}
	// A second IAID of the same DUID is a second lease.
	c2 := c
	c2.iaid = [4]byte{0, 0, 0, 2}
	rep = parseReply(t, s.reply(c2.msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{})), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0.Next().Next() {
		t.Errorf("second IAID got %v", a)
	}
}

func TestStatefulRapidCommit(t *testing.T) {
	s, _ := statefulServer(t, DHCPv6Options{})
	c := newClient(1)
	rep := parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeSolicit, s, false, netip.Addr{}, dhcpv6.WithRapidCommit)), dhcpv6.MessageTypeReply)
	if rep.GetOneOption(dhcpv6.OptionRapidCommit) == nil {
		t.Error("Rapid Commit REPLY without the option")
	}
	if a, _, _ := iaAddr(t, rep); a != pool0 {
		t.Errorf("got %v", a)
	}
	if ls := s.Leases(); len(ls) != 1 || ls[0].Addr != pool0 {
		t.Errorf("leases %+v", ls)
	}
}

func TestStatefulRenewRebind(t *testing.T) {
	s, clk := statefulServer(t, DHCPv6Options{LeaseTime: time.Hour})
	c := newClient(1)
	parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{})), dhcpv6.MessageTypeReply)
	clk.t = clk.t.Add(50 * time.Minute)
	rep := parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRenew, s, true, pool0)), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0 {
		t.Fatalf("RENEW got %v", a)
	}
	if ls := s.Leases(); len(ls) != 1 || !ls[0].Expiry.Equal(clk.t.Add(time.Hour)) {
		t.Fatalf("RENEW did not extend: %+v", ls)
	}
	// RENEW naming another server, REBIND naming any: discarded.
	if s.reply(c.msg(t, dhcpv6.MessageTypeRenew, s, false, pool0)) != nil {
		t.Error("RENEW without our server id answered")
	}
	if s.reply(c.msg(t, dhcpv6.MessageTypeRebind, s, true, pool0)) != nil {
		t.Error("REBIND with a server id answered")
	}
	if s.Stats().Discarded.Load() != 2 {
		t.Errorf("discarded = %d", s.Stats().Discarded.Load())
	}
	clk.t = clk.t.Add(50 * time.Minute)
	rep = parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRebind, s, false, pool0)), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0 {
		t.Fatalf("REBIND got %v", a)
	}
	if ls := s.Leases(); len(ls) != 1 || !ls[0].Expiry.Equal(clk.t.Add(time.Hour)) {
		t.Fatalf("REBIND did not extend: %+v", ls)
	}

	// After a vunet restart (a fresh server) RENEW of a free pool address
	// rebuilds the binding, so the guest keeps its address.
	s2, _ := statefulServer(t, DHCPv6Options{})
	s2.serverID = s.serverID
	rep = parseReply(t, s2.reply(c.msg(t, dhcpv6.MessageTypeRenew, s2, true, pool0.Next())), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0.Next() || len(s2.Leases()) != 1 {
		t.Fatalf("RENEW after restart got %v", a)
	}
	// An address another client holds, or one outside the pool, comes back
	// with zero lifetimes and NoBinding.
	other := newClient(2)
	for _, a := range []netip.Addr{pool0.Next(), netip.MustParseAddr("2001:db8::1")} {
		rep = parseReply(t, s2.reply(other.msg(t, dhcpv6.MessageTypeRenew, s2, true, a)), dhcpv6.MessageTypeReply)
		if got, _, ia := iaAddr(t, rep); got.IsValid() || iaStatus(rep) != iana.StatusNoBinding || len(ia.Options.Addresses()) != 1 {
			t.Errorf("RENEW of %s by another client: addr %v status %v", a, got, iaStatus(rep))
		}
	}
}

func TestStatefulRelease(t *testing.T) {
	s, _ := statefulServer(t, DHCPv6Options{})
	c := newClient(1)
	parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{})), dhcpv6.MessageTypeReply)
	rep := parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRelease, s, true, pool0)), dhcpv6.MessageTypeReply)
	if st := rep.Options.Status(); st == nil || st.StatusCode != iana.StatusSuccess {
		t.Errorf("RELEASE status %v", st)
	}
	if len(s.Leases()) != 0 {
		t.Errorf("leases after RELEASE: %+v", s.Leases())
	}
	rep = parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRelease, s, true, pool0)), dhcpv6.MessageTypeReply)
	if iaStatus(rep) != iana.StatusNoBinding {
		t.Errorf("second RELEASE IA status %v", iaStatus(rep))
	}
}

func TestStatefulDecline(t *testing.T) {
	s, clk := statefulServer(t, DHCPv6Options{})
	c := newClient(1)
	parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{})), dhcpv6.MessageTypeReply)
	rep := parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeDecline, s, true, pool0)), dhcpv6.MessageTypeReply)
	if st := rep.Options.Status(); st == nil || st.StatusCode != iana.StatusSuccess {
		t.Errorf("DECLINE status %v", st)
	}
	rep = parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRequest, s, true, pool0)), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0.Next() {
		t.Errorf("after DECLINE got %v, want %s", a, pool0.Next())
	}
	if len(s.Leases()) != 1 || s.Stats().ActiveLeases() != 1 {
		t.Errorf("declined placeholder counted as a lease: %+v", s.Leases())
	}
	clk.t = clk.t.Add(dhcpv6DeclineHold)
	rep = parseReply(t, s.reply(newClient(2).msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{})), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0 {
		t.Errorf("declined address not back after the hold: got %v", a)
	}
	// Declining an address one does not hold changes nothing.
	rep = parseReply(t, s.reply(newClient(3).msg(t, dhcpv6.MessageTypeDecline, s, true, pool0)), dhcpv6.MessageTypeReply)
	if iaStatus(rep) != iana.StatusNoBinding || len(s.Leases()) != 2 {
		t.Errorf("foreign DECLINE: status %v leases %+v", iaStatus(rep), s.Leases())
	}
}

func TestStatefulConfirm(t *testing.T) {
	s, _ := statefulServer(t, DHCPv6Options{})
	c := newClient(1)
	for _, tc := range []struct {
		addr netip.Addr
		want iana.StatusCode
	}{{pool0, iana.StatusSuccess}, {netip.MustParseAddr("2001:db8::5"), iana.StatusNotOnLink}} {
		rep := parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeConfirm, s, false, tc.addr)), dhcpv6.MessageTypeReply)
		if st := rep.Options.Status(); st == nil || st.StatusCode != tc.want {
			t.Errorf("CONFIRM %s: status %v, want %v", tc.addr, st, tc.want)
		}
	}
	if s.reply(c.msg(t, dhcpv6.MessageTypeConfirm, s, false, netip.Addr{})) != nil {
		t.Error("CONFIRM without addresses answered")
	}
	if s.reply(c.msg(t, dhcpv6.MessageTypeConfirm, s, true, pool0)) != nil {
		t.Error("CONFIRM with a server id answered")
	}
	if s.Stats().Confirm.Load() != 4 {
		t.Errorf("confirm = %d", s.Stats().Confirm.Load())
	}
}

func TestStatefulExhaustionAndExpiry(t *testing.T) {
	var logged atomic.Int64
	h := &msgCounter{Handler: testnet.Logger(t).Handler(), msg: "dhcpv6: pool exhausted, answering NoAddrsAvail", n: &logged}
	s, clk := statefulServer(t, DHCPv6Options{PoolSize: 2, LeaseTime: time.Hour, Logger: slog.New(h)})
	for i := 1; i <= 2; i++ {
		parseReply(t, s.reply(newClient(i).msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{})), dhcpv6.MessageTypeReply)
	}
	third := newClient(3)
	rep := parseReply(t, s.reply(third.msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{})), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a.IsValid() || iaStatus(rep) != iana.StatusNoAddrsAvail {
		t.Fatalf("REQUEST on a full pool: %v status %v", a, iaStatus(rep))
	}
	adv := parseReply(t, s.reply(third.msg(t, dhcpv6.MessageTypeSolicit, s, false, netip.Addr{})), dhcpv6.MessageTypeAdvertise)
	if st := adv.Options.Status(); st == nil || st.StatusCode != iana.StatusNoAddrsAvail || adv.Options.OneIANA() != nil {
		t.Fatalf("ADVERTISE on a full pool: status %v IA %v", st, adv.Options.OneIANA())
	}
	if n := s.Stats().PoolExhausted.Load(); n != 2 {
		t.Errorf("pool exhausted = %d", n)
	}
	if logged.Load() != 2 {
		t.Errorf("exhaustion logged %d times", logged.Load())
	}
	// A guest making up DUIDs cannot grow the table beyond the pool.
	for i := 0; i < 1000; i++ {
		s.reply(newClient(100+i).msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{}))
		s.reply(newClient(2000+i).msg(t, dhcpv6.MessageTypeSolicit, s, false, netip.Addr{}, dhcpv6.WithRapidCommit))
	}
	if n, m := len(s.leases.byKey), len(s.leases.byAddr); n > 2 || m > 2 {
		t.Errorf("lease table grew to %d/%d entries", n, m)
	}
	// Leases expire at the end of the valid lifetime; the address is then
	// leased to someone else.
	// (The REQUEST comes first: the gauge sweeps expired entries itself.)
	clk.t = clk.t.Add(time.Hour)
	rep = parseReply(t, s.reply(third.msg(t, dhcpv6.MessageTypeRequest, s, true, netip.Addr{})), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != pool0 {
		t.Errorf("after expiry got %v", a)
	}
	if n := s.Stats().ActiveLeases(); n != 1 {
		t.Errorf("%d leases after expiry and one REQUEST", n)
	}
}

func TestStatefulValidation(t *testing.T) {
	s, _ := statefulServer(t, DHCPv6Options{})
	// No client id: discarded.
	m, _ := dhcpv6.NewMessage()
	m.MessageType = dhcpv6.MessageTypeSolicit
	if s.reply(m.ToBytes()) != nil || s.Stats().Discarded.Load() != 1 {
		t.Error("SOLICIT without client id answered")
	}
	// A REQUEST for another server is not ours.
	c := newClient(1)
	b := c.msg(t, dhcpv6.MessageTypeRequest, s, false, netip.Addr{},
		dhcpv6.WithServerID(&dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: net.HardwareAddr{2, 0, 0, 0, 0, 9}}))
	if s.reply(b) != nil {
		t.Error("REQUEST for another server answered")
	}
	// IA_PD gets NoPrefixAvail.
	b = c.msg(t, dhcpv6.MessageTypeSolicit, s, false, netip.Addr{}, dhcpv6.WithIAPD([4]byte{0, 0, 0, 7}))
	adv := parseReply(t, s.reply(b), dhcpv6.MessageTypeAdvertise)
	if pd := adv.Options.OneIAPD(); pd == nil || pd.Options.Status() == nil || pd.Options.Status().StatusCode != iana.StatusNoPrefixAvail {
		t.Errorf("IA_PD answer %v", adv.Options.OneIAPD())
	}

	for _, tc := range []struct {
		opts DHCPv6Options
		err  string
	}{
		{DHCPv6Options{PoolStart: netip.MustParseAddr("fd00::1"), PoolSize: 4}, "service address fd00::3"},
		{DHCPv6Options{PoolStart: netip.MustParseAddr("fd00::1"), PoolSize: 2, Reserved: []netip.Addr{netip.MustParseAddr("fd00::2")}}, "service address fd00::2"},
		{DHCPv6Options{PoolStart: netip.MustParseAddr("fd00::5054:ff:fe12:3400")}, "SLAAC"},
		{DHCPv6Options{PoolStart: netip.MustParseAddr("fd01::100")}, "want an address in fd00::/64"},
		{DHCPv6Options{PoolSize: MaxDHCPv6PoolSize + 1}, "pool size"},
		{DHCPv6Options{PoolStart: netip.MustParseAddr("fd00::ffff:ff01")}, "boundary"},
		{DHCPv6Options{LeaseTime: time.Second}, "lease time"},
	} {
		tc.opts.Stateful = true
		tc.opts.Logger = testnet.Logger(t)
		if _, err := NewDHCPv6(tc.opts); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%+v: err %v, want %q", tc.opts, err, tc.err)
		}
	}
}

// TestStatelessIgnoresStateful: without Stateful every address message is
// counted as unsupported and not answered.
func TestStatelessIgnoresStateful(t *testing.T) {
	s, err := NewDHCPv6(DHCPv6Options{Logger: testnet.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(1)
	for i, typ := range []dhcpv6.MessageType{dhcpv6.MessageTypeSolicit, dhcpv6.MessageTypeRequest, dhcpv6.MessageTypeRenew,
		dhcpv6.MessageTypeRebind, dhcpv6.MessageTypeRelease, dhcpv6.MessageTypeDecline, dhcpv6.MessageTypeConfirm} {
		if r := s.reply(c.msg(t, typ, s, false, pool0)); r != nil {
			t.Errorf("%s answered", typ)
		}
		if n := s.Stats().Unsupported.Load(); n != uint64(i+1) {
			t.Errorf("unsupported = %d", n)
		}
	}
	if s.Leases() != nil || s.Stats().PoolSize() != 0 {
		t.Error("stateless server has a pool")
	}
}

// A lease restored after a migration is the client's: its RENEW keeps the
// address, another client's REQUEST for it gets another one, and what
// cannot be honoured is refused with a reason.
func TestStatefulRestoreLease(t *testing.T) {
	s, clk := statefulServer(t, DHCPv6Options{LeaseTime: time.Hour})
	c, other := newClient(1), newClient(2)
	addr := pool0.Next().Next() // not the one a new client would get first
	iaid := uint32(c.iaid[0])<<24 | uint32(c.iaid[1])<<16 | uint32(c.iaid[2])<<8 | uint32(c.iaid[3])
	if err := s.RestoreLease(c.duid.ToBytes(), iaid, addr, clk.t.Add(40*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if ls := s.Leases(); len(ls) != 1 || ls[0].Addr != addr || !ls[0].Expiry.Equal(clk.t.Add(40*time.Minute)) {
		t.Fatalf("leases %+v", ls)
	}
	rep := parseReply(t, s.reply(c.msg(t, dhcpv6.MessageTypeRenew, s, true, addr)), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a != addr || iaStatus(rep) != iana.StatusSuccess {
		t.Fatalf("RENEW of the restored lease got %v, status %v", a, iaStatus(rep))
	}
	rep = parseReply(t, s.reply(other.msg(t, dhcpv6.MessageTypeRequest, s, true, addr)), dhcpv6.MessageTypeReply)
	if a, _, _ := iaAddr(t, rep); a == addr || !a.IsValid() {
		t.Fatalf("another client's REQUEST for the restored address got %v", a)
	}
	for name, err := range map[string]error{
		"held":      s.RestoreLease(other.duid.ToBytes(), iaid, addr, clk.t.Add(time.Hour)),
		"expired":   s.RestoreLease(c.duid.ToBytes(), 7, pool0.Next().Next().Next(), clk.t),
		"off pool":  s.RestoreLease(c.duid.ToBytes(), 7, netip.MustParseAddr("fd00:1::1"), clk.t.Add(time.Hour)),
		"no duid":   s.RestoreLease(nil, 7, pool0.Next().Next().Next(), clk.t.Add(time.Hour)),
		"long duid": s.RestoreLease(make([]byte, maxDUID+1), 7, pool0.Next().Next().Next(), clk.t.Add(time.Hour)),
	} {
		if err == nil {
			t.Errorf("%s: restored", name)
		}
	}
	stateless, err := NewDHCPv6(DHCPv6Options{Logger: testnet.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := stateless.RestoreLease(c.duid.ToBytes(), iaid, addr, clk.t.Add(time.Hour)); err == nil || !strings.Contains(err.Error(), "stateless") {
		t.Errorf("stateless server: %v", err)
	}
}
