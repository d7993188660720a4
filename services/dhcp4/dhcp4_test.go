package dhcp4

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/internal/ratelimit"
	"github.com/vunet/vunet/services/internal/gnet"
	"github.com/vunet/vunet/services/internal/testnet"
	"github.com/vunet/vunet/services/names"
)

// client is a DHCP client on the guest stack: the guest has no address, so
// like gVisor's former DHCP client it temporarily owns 0.0.0.0/0, which lets
// it send from 0.0.0.0 and makes 255.255.255.255 a local broadcast.
type client struct {
	t    *testing.T
	conn *gnet.UDP
	hw   net.HardwareAddr
}

func newClient(t *testing.T, p *testnet.Pair) *client {
	t.Helper()
	pa := tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: tcpip.AddressWithPrefix{
		Address: tcpip.AddrFrom4([4]byte{}), PrefixLen: 0}}
	if err := p.Guest.AddProtocolAddress(testnet.NIC, pa, stack.AddressProperties{}); err != nil {
		t.Fatalf("add 0.0.0.0: %v", err)
	}
	c, err := gnet.ListenUDP(p.Guest, testnet.NIC, ipv4.ProtocolNumber,
		netip.AddrPortFrom(netip.IPv4Unspecified(), ClientPort), gnet.UDPOptions{Broadcast: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Conn.Close() })
	return &client{t: t, conn: c, hw: net.HardwareAddr(testnet.GuestMAC)}
}

// exchange broadcasts req and returns the first reply with its xid.
func (c *client) exchange(req *dhcpv4.DHCPv4, to netip.Addr) *dhcpv4.DHCPv4 {
	c.t.Helper()
	if _, err := c.conn.Conn.WriteTo(req.ToBytes(), net.UDPAddrFromAddrPort(netip.AddrPortFrom(to, ServerPort))); err != nil {
		c.t.Fatalf("send %s: %v", req.MessageType(), err)
	}
	buf := make([]byte, 1500)
	deadline := time.Now().Add(5 * time.Second)
	for {
		c.conn.Conn.SetReadDeadline(deadline)
		n, from, err := c.conn.Conn.ReadFrom(buf)
		if err != nil {
			c.t.Fatalf("waiting for reply to %s: %v", req.MessageType(), err)
		}
		if from.String() != "10.0.2.2:67" {
			c.t.Errorf("reply from %s, want 10.0.2.2:67", from)
		}
		r, err := dhcpv4.FromBytes(buf[:n])
		if err != nil {
			c.t.Fatalf("parse reply: %v", err)
		}
		if r.TransactionID == req.TransactionID {
			return r
		}
	}
}

// expectSilence checks that req gets no reply.
func (c *client) expectSilence(req *dhcpv4.DHCPv4) {
	c.t.Helper()
	if _, err := c.conn.Conn.WriteTo(req.ToBytes(), net.UDPAddrFromAddrPort(netip.AddrPortFrom(bcast, ServerPort))); err != nil {
		c.t.Fatal(err)
	}
	buf := make([]byte, 1500)
	c.conn.Conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, _, err := c.conn.Conn.ReadFrom(buf); err == nil {
		r, _ := dhcpv4.FromBytes(buf[:n])
		c.t.Fatalf("unexpected reply to %s: %v", req.MessageType(), r)
	}
}

var bcast = netip.MustParseAddr("255.255.255.255")

func startServer(t *testing.T, p *testnet.Pair, mod func(*Options)) *Server {
	t.Helper()
	opts := Options{Stack: p.Server, NIC: testnet.NIC, Logger: testnet.Logger(t)}
	if mod != nil {
		mod(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	testnet.Serve(t, s)
	return s
}

func TestDORA(t *testing.T) {
	p := testnet.New(t, testnet.GuestOptions{})
	s := startServer(t, p, func(o *Options) {
		o.MTU = 1400
		o.DomainName = "vunet.internal"
		o.DomainSearch = []string{"vunet.internal", "example.com"}
		o.Hostname = "guest"
		o.LeaseTime = time.Hour
	})
	c := newClient(t, p)

	disc, err := dhcpv4.NewDiscovery(c.hw, dhcpv4.WithRequestedOptions(
		dhcpv4.OptionInterfaceMTU, dhcpv4.OptionDNSDomainSearchList, dhcpv4.OptionHostName))
	if err != nil {
		t.Fatal(err)
	}
	offer := c.exchange(disc, bcast)
	if offer.MessageType() != dhcpv4.MessageTypeOffer {
		t.Fatalf("got %s, want OFFER", offer.MessageType())
	}
	checkOptions(t, offer, "10.0.2.15")
	if offer.BootFileName != "" || offer.Options.Has(dhcpv4.OptionBootfileName) {
		t.Errorf("boot file offered without boot configuration: %q", offer.BootFileName)
	}

	req, err := dhcpv4.NewRequestFromOffer(offer)
	if err != nil {
		t.Fatal(err)
	}
	ack := c.exchange(req, bcast)
	if ack.MessageType() != dhcpv4.MessageTypeAck {
		t.Fatalf("got %s (%s), want ACK", ack.MessageType(), ack.Message())
	}
	checkOptions(t, ack, "10.0.2.15")

	st := s.Stats()
	if st.ActiveLeases() != 1 || st.Discover.Load() != 1 || st.Request.Load() != 1 || st.Offer.Load() != 1 || st.Ack.Load() != 1 {
		t.Errorf("stats after DORA = %+v", st)
	}
	if l := s.Leases(); len(l) != 1 || l[0].Addr.String() != "10.0.2.15" || l[0].MAC != c.hw.String() {
		t.Errorf("leases = %+v", l)
	}

	// A second client gets the next address.
	other := net.HardwareAddr{0x52, 0x54, 0, 0, 0, 0x99}
	disc2, _ := dhcpv4.NewDiscovery(other)
	if o2 := c.exchange(disc2, bcast); o2.YourIPAddr.String() != "10.0.2.16" {
		t.Errorf("second client offered %s, want 10.0.2.16", o2.YourIPAddr)
	}

	// Requesting someone else's address is NAKed.
	bad, _ := dhcpv4.New(dhcpv4.WithHwAddr(other), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 0, 2, 15))))
	if r := c.exchange(bad, bcast); r.MessageType() != dhcpv4.MessageTypeNak {
		t.Errorf("request for a taken address: got %s, want NAK", r.MessageType())
	}

	// Renewal is unicast from the bound address; the client now owns it.
	p.ConfigureGuest(t, netip.MustParsePrefix("10.0.2.15/24"))
	renew, err := dhcpv4.NewRenewFromAck(ack)
	if err != nil {
		t.Fatal(err)
	}
	if r := c.exchange(renew, netip.MustParseAddr("10.0.2.2")); r.MessageType() != dhcpv4.MessageTypeAck || r.YourIPAddr.String() != "10.0.2.15" {
		t.Errorf("renew: got %s yiaddr %s", r.MessageType(), r.YourIPAddr)
	}

	// INFORM gets options without a lease.
	inf, _ := dhcpv4.NewInform(c.hw, net.IPv4(10, 0, 2, 15))
	if r := c.exchange(inf, bcast); r.MessageType() != dhcpv4.MessageTypeAck || r.Options.Has(dhcpv4.OptionIPAddressLeaseTime) {
		t.Errorf("inform: got %s, lease time present=%v", r.MessageType(), r.Options.Has(dhcpv4.OptionIPAddressLeaseTime))
	}

	// RELEASE frees the lease.
	rel, _ := dhcpv4.NewReleaseFromACK(ack)
	c.expectSilence(rel)
	testnet.WaitFor(t, func() bool { return s.Stats().ActiveLeases() == 0 })
}

func checkOptions(t *testing.T, r *dhcpv4.DHCPv4, yiaddr string) {
	t.Helper()
	if got := r.YourIPAddr.String(); got != yiaddr {
		t.Errorf("yiaddr = %s, want %s", got, yiaddr)
	}
	if got := r.ServerIdentifier().String(); got != "10.0.2.2" {
		t.Errorf("server id = %s", got)
	}
	if got := net.IP(r.SubnetMask()).String(); got != "255.255.255.0" {
		t.Errorf("mask = %s", got)
	}
	if got := r.Router(); len(got) != 1 || got[0].String() != "10.0.2.2" {
		t.Errorf("router = %v", got)
	}
	if got := r.DNS(); len(got) != 1 || got[0].String() != "10.0.2.3" {
		t.Errorf("dns = %v", got)
	}
	if got := r.IPAddressLeaseTime(0); got != time.Hour {
		t.Errorf("lease time = %s", got)
	}
	if got := r.Options.Get(dhcpv4.OptionInterfaceMTU); len(got) != 2 || int(got[0])<<8|int(got[1]) != 1400 {
		t.Errorf("mtu option = %v", got)
	}
	if got := r.DomainName(); got != "vunet.internal" {
		t.Errorf("domain name = %q", got)
	}
	if got := r.DomainSearch(); got == nil || strings.Join(got.Labels, ",") != "vunet.internal,example.com" {
		t.Errorf("domain search = %v", got)
	}
	if got := r.HostName(); got != "guest" {
		t.Errorf("hostname = %q", got)
	}
}

func TestNetboot(t *testing.T) {
	p := testnet.New(t, testnet.GuestOptions{})
	startServer(t, p, func(o *Options) {
		o.Boot = Boot{TFTPFile: "pxelinux.0", TFTPFileEFI: "bootx64.efi", HTTPURL: "http://10.0.2.2/boot.efi", IPXEURL: "http://10.0.2.2:8000/boot.ipxe"}
	})
	c := newClient(t, p)

	// PXE clients must not get "PXEClient" echoed in option 60: without
	// option 43 that makes OVMF query port 4011 and give up (see addBoot).
	cases := []struct {
		name       string
		mods       []dhcpv4.Modifier
		file       string
		vendor     string
		nextServer string
	}{
		{"plain", nil, "pxelinux.0", "", "10.0.2.2"},
		{"pxe-bios", []dhcpv4.Modifier{dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00000:UNDI:002001")),
			dhcpv4.WithOption(dhcpv4.OptClientArch(iana.INTEL_X86PC))}, "pxelinux.0", "", "10.0.2.2"},
		{"pxe-efi", []dhcpv4.Modifier{dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00007:UNDI:003016")),
			dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_BC))}, "bootx64.efi", "", "10.0.2.2"},
		{"pxe-efi-x86-64", []dhcpv4.Modifier{dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00009:UNDI:003016")),
			dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_X86_64))}, "bootx64.efi", "", "10.0.2.2"},
		// iPXE (here ipxe.efi, chainloaded by the PXE above) sends a raw
		// user class "iPXE" and gets the script URL instead of itself.
		{"ipxe-efi", []dhcpv4.Modifier{dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00007:UNDI:003010")),
			dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_BC)),
			dhcpv4.WithOption(dhcpv4.OptGeneric(dhcpv4.OptionUserClassInformation, []byte("iPXE")))}, "http://10.0.2.2:8000/boot.ipxe", "", "0.0.0.0"},
		{"ipxe-bios", []dhcpv4.Modifier{dhcpv4.WithOption(dhcpv4.OptClientArch(iana.INTEL_X86PC)),
			dhcpv4.WithOption(dhcpv4.OptGeneric(dhcpv4.OptionUserClassInformation, []byte("iPXE")))}, "http://10.0.2.2:8000/boot.ipxe", "", "0.0.0.0"},
		{"http", []dhcpv4.Modifier{dhcpv4.WithOption(dhcpv4.OptClassIdentifier("HTTPClient:Arch:00016:UNDI:003001")),
			dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_X86_64_HTTP))}, "http://10.0.2.2/boot.efi", "HTTPClient", "0.0.0.0"},
	}
	for i, tc := range cases {
		hw := net.HardwareAddr{0x52, 0x54, 0, 0, 1, byte(i)}
		disc, err := dhcpv4.NewDiscovery(hw, tc.mods...)
		if err != nil {
			t.Fatal(err)
		}
		offer := c.exchange(disc, bcast)
		if offer.BootFileName != tc.file || offer.BootFileNameOption() != tc.file {
			t.Errorf("%s: file field %q, option 67 %q, want %q", tc.name, offer.BootFileName, offer.BootFileNameOption(), tc.file)
		}
		if got := offer.ClassIdentifier(); got != tc.vendor {
			t.Errorf("%s: vendor class %q, want %q", tc.name, got, tc.vendor)
		}
		if got := offer.ServerIPAddr.String(); got != tc.nextServer {
			t.Errorf("%s: siaddr %s, want %s", tc.name, got, tc.nextServer)
		}
		if tc.nextServer != "0.0.0.0" && offer.TFTPServerName() != tc.nextServer {
			t.Errorf("%s: option 66 %q", tc.name, offer.TFTPServerName())
		}
	}
}

func TestPoolExhaustionAndExpiry(t *testing.T) {
	s, err := New(Options{PoolSize: 2, Logger: testnet.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1e9, 0)
	s.now = func() time.Time { return now }
	dora := func(i byte) *dhcpv4.DHCPv4 {
		hw := net.HardwareAddr{2, 0, 0, 0, 0, i}
		d, _ := dhcpv4.NewDiscovery(hw)
		o, _ := s.handle(d)
		if o == nil {
			return nil
		}
		r, _ := dhcpv4.NewRequestFromOffer(o)
		a, _ := s.handle(r)
		return a
	}
	if a := dora(1); a == nil || a.YourIPAddr.String() != "10.0.2.15" {
		t.Fatalf("first lease: %v", a)
	}
	if a := dora(2); a == nil || a.YourIPAddr.String() != "10.0.2.16" {
		t.Fatalf("second lease: %v", a)
	}
	if a := dora(3); a != nil {
		t.Fatalf("third client got %s from a pool of 2", a.YourIPAddr)
	}
	if st := s.Stats(); st.PoolExhausted.Load() != 1 || st.ActiveLeases() != 2 {
		t.Errorf("stats = %+v", st)
	}
	now = now.Add(DefaultLeaseTime + time.Second)
	if a := dora(3); a == nil || a.YourIPAddr.String() != "10.0.2.15" {
		t.Fatalf("after expiry: %v", a)
	}
	if st := s.Stats(); st.ActiveLeases() != 1 {
		t.Errorf("active leases after expiry = %d", st.ActiveLeases())
	}
}

func TestOptionsValidation(t *testing.T) {
	bad := []Options{
		{Prefix: netip.MustParsePrefix("fd00::/64")},
		{ServerAddr: netip.MustParseAddr("192.168.1.1")},
		{PoolStart: netip.MustParseAddr("10.0.2.255")},
		{PoolStart: netip.MustParseAddr("10.0.2.1")}, // pool covers 10.0.2.2
		{PoolSize: 1000},
		{MTU: 10},
		{LeaseTime: time.Second},
		{DomainSearch: []string{strings.Repeat("a", 64) + ".com"}},
		{DNS: []netip.Addr{netip.MustParseAddr("fd00::3")}},
		{Boot: Boot{HTTPURL: "tftp://x/y"}},
	}
	for i, o := range bad {
		if _, err := New(o); err == nil {
			t.Errorf("case %d: New(%+v) succeeded", i, o)
		} else {
			t.Logf("case %d: %v", i, err)
		}
	}
	s, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s.opts.PoolSize != 240 {
		t.Errorf("default pool size = %d, want 240", s.opts.PoolSize)
	}
	if err := s.Serve(context.Background()); err == nil {
		t.Error("Serve without a stack succeeded")
	}
}

func TestServeStopsOnClose(t *testing.T) {
	p := testnet.New(t, testnet.GuestOptions{})
	s, err := New(Options{Stack: p.Server, NIC: testnet.NIC, Logger: testnet.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background()) }()
	time.Sleep(50 * time.Millisecond)
	s.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after Close")
	}
	// The port is free again.
	s2, err := New(Options{Stack: p.Server, NIC: testnet.NIC})
	if err != nil {
		t.Fatal(err)
	}
	s2.Close()
}

// TestPoolExhaustedLogIsBounded floods the server with DISCOVERs from new
// MACs once its pool is full: each would log a warning, and the appliance's
// log limiter must keep the lines bounded while counting what it held back.
func TestPoolExhaustedLogIsBounded(t *testing.T) {
	var buf bytes.Buffer
	lim := ratelimit.NewHandler(slog.NewTextHandler(&buf, nil), ratelimit.LogBurst, time.Hour)
	s, err := New(Options{PoolSize: 1, Logger: slog.New(lim)})
	if err != nil {
		t.Fatal(err)
	}
	// Bind the one address, then flood.
	d, _ := dhcpv4.NewDiscovery(net.HardwareAddr{2, 0, 0, 0, 0xff, 0xff})
	o, _ := s.handle(d)
	r, _ := dhcpv4.NewRequestFromOffer(o)
	if a, _ := s.handle(r); a == nil {
		t.Fatal("no lease for the first client")
	}
	const flood = 2000
	for i := range flood {
		d, _ := dhcpv4.NewDiscovery(net.HardwareAddr{2, 0, 0, 0, byte(i >> 8), byte(i)})
		s.handle(d)
	}
	exhausted := strings.Count(buf.String(), "pool exhausted")
	if st := s.Stats(); st.PoolExhausted.Load() != flood {
		t.Fatalf("PoolExhausted = %d, want %d", st.PoolExhausted.Load(), flood)
	}
	// LogBurst warnings, plus the line announcing the suppression (which
	// names the message).
	if exhausted != ratelimit.LogBurst+1 || lim.Suppressed() != flood-ratelimit.LogBurst {
		t.Fatalf("%d pool-exhausted lines, %d suppressed; want %d and %d\n%s", exhausted, lim.Suppressed(),
			ratelimit.LogBurst+1, flood-ratelimit.LogBurst, buf.String())
	}
}

// A lease restored after a migration is the client's: its DISCOVER is
// offered that address, another client is not, and what cannot be honoured
// is refused with a reason.
func TestRestoreLease(t *testing.T) {
	s, err := New(Options{PoolSize: 4, Logger: testnet.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1e9, 0)
	s.now = func() time.Time { return now }
	a, b := net.HardwareAddr{2, 0, 0, 0, 0, 1}, net.HardwareAddr{2, 0, 0, 0, 0, 2}
	addr := netip.MustParseAddr("10.0.2.17")
	if err := s.RestoreLease(a, addr, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if ls := s.Leases(); len(ls) != 1 || ls[0].Addr != addr || ls[0].MAC != a.String() {
		t.Fatalf("leases %+v", ls)
	}
	offer := func(hw net.HardwareAddr, req netip.Addr) netip.Addr {
		d, _ := dhcpv4.NewDiscovery(hw)
		if req.IsValid() {
			d.UpdateOption(dhcpv4.OptRequestedIPAddress(req.AsSlice()))
		}
		o, _ := s.handle(d)
		if o == nil {
			return netip.Addr{}
		}
		x, _ := netip.AddrFromSlice(o.YourIPAddr.To4())
		return x
	}
	if got := offer(a, netip.Addr{}); got != addr {
		t.Errorf("restored client offered %v, want %v", got, addr)
	}
	if got := offer(b, addr); got == addr || !got.IsValid() {
		t.Errorf("other client asking for the restored address offered %v", got)
	}
	for name, err := range map[string]error{
		"held":     s.RestoreLease(b, addr, now.Add(time.Hour)),
		"expired":  s.RestoreLease(b, netip.MustParseAddr("10.0.2.18"), now),
		"off pool": s.RestoreLease(b, netip.MustParseAddr("10.0.2.99"), now.Add(time.Hour)),
		"bad mac":  s.RestoreLease(net.HardwareAddr{1, 2}, netip.MustParseAddr("10.0.2.18"), now.Add(time.Hour)),
	} {
		if err == nil {
			t.Errorf("%s: restored", name)
		}
	}
}

// TestStaticLeases: a MAC with a static lease always gets its address,
// also outside the pool and when it asks for another; nobody else gets a
// statically reserved address, even one inside the pool.
func TestStaticLeases(t *testing.T) {
	inPool, outside := netip.MustParseAddr("10.0.2.15"), netip.MustParseAddr("10.0.2.5")
	s, err := New(Options{PoolSize: 3, Logger: testnet.Logger(t), Static: map[[6]byte]netip.Addr{
		{2, 0, 0, 0, 0, 1}: inPool, {2, 0, 0, 0, 0, 2}: outside,
	}})
	if err != nil {
		t.Fatal(err)
	}
	dora := func(i byte, want string) *dhcpv4.DHCPv4 {
		t.Helper()
		hw := net.HardwareAddr{2, 0, 0, 0, 0, i}
		mods := []dhcpv4.Modifier{}
		if want != "" {
			mods = append(mods, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP(want))))
		}
		d, _ := dhcpv4.NewDiscovery(hw, mods...)
		o, _ := s.handle(d)
		if o == nil {
			return nil
		}
		r, _ := dhcpv4.NewRequestFromOffer(o)
		a, _ := s.handle(r)
		return a
	}
	// A dynamic client first, asking for the reserved address: it gets
	// the next free pool address instead.
	if a := dora(9, "10.0.2.15"); a == nil || a.YourIPAddr.String() != "10.0.2.16" {
		t.Fatalf("dynamic client: %v", a)
	}
	if a := dora(1, "10.0.2.17"); a == nil || a.YourIPAddr.String() != inPool.String() {
		t.Fatalf("static client in the pool: %v", a)
	}
	if a := dora(2, ""); a == nil || a.YourIPAddr.String() != outside.String() {
		t.Fatalf("static client outside the pool: %v", a)
	}
	// The pool (15, 16, 17) has one address left for dynamic clients.
	if a := dora(10, ""); a == nil || a.YourIPAddr.String() != "10.0.2.17" {
		t.Fatalf("second dynamic client: %v", a)
	}
	if a := dora(11, ""); a != nil {
		t.Fatalf("third dynamic client got %s; the rest is reserved", a.YourIPAddr)
	}
	// A static client asking to keep another address (INIT-REBOOT) is
	// told no.
	hw := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	r, _ := dhcpv4.NewDiscovery(hw)
	r.UpdateOption(dhcpv4.OptMessageType(dhcpv4.MessageTypeRequest))
	r.UpdateOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.0.2.17")))
	if a, _ := s.handle(r); a == nil || a.MessageType() != dhcpv4.MessageTypeNak {
		t.Fatalf("static client's request for another address: %v", a)
	}
	for _, bad := range []map[[6]byte]netip.Addr{
		{{2, 0, 0, 0, 0, 1}: netip.MustParseAddr("10.0.2.2")},   // the server
		{{2, 0, 0, 0, 0, 1}: netip.MustParseAddr("10.0.3.9")},   // outside the subnet
		{{3, 0, 0, 0, 0, 1}: netip.MustParseAddr("10.0.2.9")},   // multicast MAC
		{{2, 0, 0, 0, 0, 1}: netip.MustParseAddr("10.0.2.255")}, // broadcast
		{{2, 0, 0, 0, 0, 1}: netip.MustParseAddr("10.0.2.9"), {2, 0, 0, 0, 0, 2}: netip.MustParseAddr("10.0.2.9")},
	} {
		if _, err := New(Options{Static: bad}); err == nil {
			t.Errorf("New with static leases %v succeeded", bad)
		}
	}
}

// Restored leases respect static leases: a client's static address is
// restored even outside the pool, another address for it is refused, and
// no other client gets a static lease's address (no panic: the reserved
// address has no lease entry).
func TestRestoreLeaseStatic(t *testing.T) {
	a, b := [6]byte{2, 0, 0, 0, 0, 1}, [6]byte{2, 0, 0, 0, 0, 2}
	out := netip.MustParseAddr("10.0.2.200") // outside the 4-address pool
	in := netip.MustParseAddr("10.0.2.16")
	s, err := New(Options{PoolSize: 4, Logger: testnet.Logger(t), Static: map[[6]byte]netip.Addr{a: out, b: in}})
	if err != nil {
		t.Fatal(err)
	}
	exp := time.Now().Add(time.Hour)
	if err := s.RestoreLease(net.HardwareAddr(a[:]), out, exp); err != nil {
		t.Errorf("static address outside the pool: %v", err)
	}
	if err := s.RestoreLease(net.HardwareAddr(a[:]), netip.MustParseAddr("10.0.2.15"), exp); err == nil || !strings.Contains(err.Error(), "static lease is 10.0.2.200") {
		t.Errorf("another address for a static client: %v", err)
	}
	other := net.HardwareAddr{2, 0, 0, 0, 0, 3}
	if err := s.RestoreLease(other, in, exp); err == nil || !strings.Contains(err.Error(), "another client's static lease") {
		t.Errorf("a static lease's address for another client: %v", err)
	}
}

// TestRenewWithoutRecord: a guest that arrives with its address already
// configured (live-migrated from another vunet, or vunet restarted) renews
// (RENEWING: ciaddr set, no server id) or reboots (INIT-REBOOT: option 50)
// against a server that has no lease for it. The server keeps the guest's
// address when it is free in the pool instead of renumbering it, and NAKs
// one another guest holds. Mutation checked: NAKing every request without
// a record (the default branch of handleRequest) fails it.
func TestRenewWithoutRecord(t *testing.T) {
	s, err := New(Options{PoolSize: 8, Logger: testnet.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.HardwareAddr{2, 0, 0, 0, 0, 1}, net.HardwareAddr{2, 0, 0, 0, 0, 2}
	renew, _ := dhcpv4.New(dhcpv4.WithHwAddr(a), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithClientIP(net.IPv4(10, 0, 2, 17)))
	if r, _ := s.handle(renew); r == nil || r.MessageType() != dhcpv4.MessageTypeAck || r.YourIPAddr.String() != "10.0.2.17" {
		t.Fatalf("RENEWING without a record: %v", r)
	}
	reboot, _ := dhcpv4.New(dhcpv4.WithHwAddr(b), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 0, 2, 18))))
	if r, _ := s.handle(reboot); r == nil || r.MessageType() != dhcpv4.MessageTypeAck || r.YourIPAddr.String() != "10.0.2.18" {
		t.Fatalf("INIT-REBOOT without a record: %v", r)
	}
	if ls := s.Leases(); len(ls) != 2 {
		t.Fatalf("leases %+v, want both bound", ls)
	}
	steal, _ := dhcpv4.New(dhcpv4.WithHwAddr(b), dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithClientIP(net.IPv4(10, 0, 2, 17)))
	if r, _ := s.handle(steal); r == nil || r.MessageType() != dhcpv4.MessageTypeNak {
		t.Fatalf("renewing another guest's address: %v, want NAK", r)
	}
}

// TestHostNames checks that the names clients send reach the name table with
// their leases: option 12, option 81 in both encodings (81 wins over 12),
// renewal, release, a refused duplicate and a refused bad name.
func TestHostNames(t *testing.T) {
	s, err := New(Options{Logger: testnet.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1e9, 0)
	s.now = func() time.Time { return now }
	reg := names.New(names.Options{Logger: testnet.Logger(t), Now: func() time.Time { return now }})
	s.opts.Names = reg
	dora := func(i byte, opts ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
		t.Helper()
		hw := net.HardwareAddr{2, 0, 0, 0, 0, i}
		d, _ := dhcpv4.NewDiscovery(hw, opts...)
		o, _ := s.handle(d)
		if o == nil {
			t.Fatalf("no offer for client %d", i)
		}
		r, _ := dhcpv4.NewRequestFromOffer(o, opts...)
		a, _ := s.handle(r)
		if a == nil || a.MessageType() != dhcpv4.MessageTypeAck {
			t.Fatalf("no ack for client %d: %v", i, a)
		}
		return a
	}
	fqdn := func(flags byte, name []byte) dhcpv4.Modifier {
		return dhcpv4.WithOption(dhcpv4.Option{Code: dhcpv4.OptionFQDN,
			Value: dhcpv4.OptionGeneric{Data: append([]byte{flags, 255, 255}, name...)}})
	}
	want := func(name, addr string) {
		t.Helper()
		g, ok := reg.Lookup(name)
		if addr == "" {
			if ok {
				t.Errorf("%s resolves to %s, want nothing", name, g.Addr4)
			}
			return
		}
		if !ok || g.Addr4.String() != addr {
			t.Errorf("%s = %v (%v), want %s", name, g.Addr4, ok, addr)
		}
	}

	a1 := dora(1, dhcpv4.WithOption(dhcpv4.OptHostName("VM1")))
	want("vm1", "10.0.2.15")
	// Option 81, ASCII (busybox udhcpc -F), wins over option 12.
	dora(2, fqdn(0x01, []byte("vm2.example.com")), dhcpv4.WithOption(dhcpv4.OptHostName("other")))
	want("vm2", "10.0.2.16")
	want("other", "")
	// Option 81, canonical wire format (E flag).
	dora(3, fqdn(0x05, []byte("\x03vm3\x07example\x03com\x00")))
	want("vm3", "10.0.2.17")
	// A duplicate: the first holder keeps the name.
	dora(4, dhcpv4.WithOption(dhcpv4.OptHostName("vm1")))
	want("vm1", "10.0.2.15")
	// A bad name is refused.
	dora(5, dhcpv4.WithOption(dhcpv4.OptHostName("bad_name;rm")))
	if st := reg.Stats(); st.Taken.Load() != 1 || st.Invalid.Load() != 1 || st.Bound.Load() != 3 {
		t.Errorf("taken %d invalid %d bound %d, want 1 1 3", st.Taken.Load(), st.Invalid.Load(), st.Bound.Load())
	}

	// RELEASE drops the name; the next claimant's renewal takes it.
	rel, _ := dhcpv4.NewReleaseFromACK(a1)
	s.handle(rel)
	want("vm1", "")
	dora(4, dhcpv4.WithOption(dhcpv4.OptHostName("vm1")))
	want("vm1", "10.0.2.18")

	// The name lasts as long as the lease.
	now = now.Add(DefaultLeaseTime)
	want("vm2", "")
}
