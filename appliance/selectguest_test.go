package appliance

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/devstate"
	"github.com/vunet/vunet/netstack/netstacktest"
)

// TestForwardToNamedGuest runs two guests and forwards that name theirs
// (by DHCP host name, by MAC, by address): each connection reaches the
// guest it names, resolved at connection time; once the named guest has
// gone, its forward's connections are refused and counted. GuestList
// (GET /v1/guests) shows the names and only each guest's own series.
func TestForwardToNamedGuest(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	cfg.MaxGuests = 2
	byName, byMAC, byAddr := freePort(t), freePort(t), freePort(t)
	for _, spec := range []string{
		"tcp:" + byName + ":vm2:8080",
		"tcp:" + byMAC + ":52-54-00-00-00-01:8080",
		"tcp:" + byAddr + ":10.0.2.16:8080",
	} {
		fs, err := config.ParseForward(spec)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Forwards = append(cfg.Forwards, fs...)
	}
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	start(t, a)
	a1, a2 := netstacktest.Guest4, netip.MustParseAddr("10.0.2.16")
	g1 := connectGuest(t, cfg.Socket, "\x52\x54\x00\x00\x00\x01", a1)
	g2 := connectGuest(t, cfg.Socket, "\x52\x54\x00\x00\x00\x02", a2)
	for _, g := range []struct {
		tg   *testGuest
		name string
	}{{g1, "guest1"}, {g2, "guest2"}} {
		ln, err := gonet.ListenTCP(g.tg.s, tcpip.FullAddress{NIC: netstacktest.GuestNIC, Port: 8080}, ipv4.ProtocolNumber)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				io.WriteString(c, g.name)
				c.Close()
			}
		}()
	}
	// The switch learns each guest's MAC and address from its traffic; a
	// name comes from DHCP (bound here directly).
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	go func() {
		for {
			c, err := hl.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	for _, g := range []*testGuest{g1, g2} {
		g.dial(t, netip.AddrPortFrom(cfg.IPv4.Gateway, uint16(hl.Addr().(*net.TCPAddr).Port))).Close()
	}
	eventuallyTrue(t, "both guests learned", func() bool {
		gs := a.Guests()
		return len(gs) == 2 && len(gs[0].IPv4) > 0 && len(gs[1].IPv4) > 0
	})
	hw2, _ := net.ParseMAC("52:54:00:00:00:02")
	a.Names.Bind(hw2, "vm2", a2, time.Now().Add(time.Hour))

	// Guest 2's IPv6 address reaches its name (AAAA) from what the switch
	// saw it send, though it talks IPv6 only to guest 1, never to the
	// stack (whose neighbour table would not know it).
	v6 := netip.MustParseAddr("fd00::16")
	if err := g2.s.RemoveAddress(netstacktest.GuestNIC, tcpip.AddrFrom16(netstacktest.Guest6.As16())); err != nil {
		t.Fatal(err)
	}
	if err := g2.s.AddProtocolAddress(netstacktest.GuestNIC, tcpip.ProtocolAddress{Protocol: ipv6.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom16(v6.As16()), PrefixLen: 64}}, stack.AddressProperties{}); err != nil {
		t.Fatal(err)
	}
	uc, err := gonet.DialUDP(g2.s, nil, &tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: tcpip.AddrFrom16(netstacktest.Guest6.As16()), Port: 9}, ipv6.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	eventuallyTrue(t, "vm2's AAAA from the switch", func() bool {
		uc.Write([]byte("hello")) // neighbour solicitation first, from fd00::16
		g, ok := a.Names.Lookup("vm2")
		return ok && slices.Contains(g.Addrs6, v6)
	})

	who := func(port string) (string, error) {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 10*time.Second)
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		return string(b), err
	}
	for port, want := range map[string]string{byName: "guest2", byMAC: "guest1", byAddr: "guest2"} {
		if got, err := who(port); got != want {
			t.Errorf("forward on %s reached %q (%v), want %s", port, got, err, want)
		}
	}

	// The same at run time, over the API (vunet forward add
	// tcp:PORT:vm2:8080): listed with its guest, reaching guest 2, saved
	// in the device state with its selector; a malformed one is refused.
	rtPort, _ := strconv.Atoi(freePort(t))
	host := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(rtPort))
	got, err := a.AddForward(api.Forward{Proto: "tcp", Host: host, GuestPort: 8080, GuestSelector: "VM2"})
	if err != nil || got.GuestSelector != "vm2" || got.Guest.IsValid() {
		t.Fatalf("AddForward to vm2: %+v, %v", got, err)
	}
	if who, err := who(strconv.Itoa(rtPort)); who != "guest2" {
		t.Errorf("runtime forward to vm2 reached %q (%v)", who, err)
	}
	listed := false
	for _, f := range a.Forwards() {
		listed = listed || f.Host == host && f.GuestSelector == "vm2" && f.String() == "tcp:"+host.String()+":vm2:8080"
	}
	if !listed {
		t.Errorf("Forwards() = %+v: no runtime forward to vm2", a.Forwards())
	}
	if _, err := a.AddForward(api.Forward{Proto: "tcp", Host: netip.AddrPortFrom(host.Addr(), 0), GuestPort: 8080, GuestSelector: "-bad-"}); !errors.Is(err, api.ErrInvalid) {
		t.Errorf("AddForward with selector -bad-: %v, want ErrInvalid", err)
	}
	blob, err := a.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	ds, err := devstate.Decode(blob)
	if err != nil || len(ds.Forwards) != 1 || ds.Forwards[0].Guest != "vm2" || ds.Forwards[0].Host != host {
		t.Fatalf("device state forwards %+v, %v; want the runtime forward with guest vm2", ds.Forwards, err)
	}
	if err := a.RemoveForward(api.Forward{Proto: "tcp", Host: host}); err != nil {
		t.Fatal(err)
	}
	// Loaded by a vunet (this one, the forward gone): it comes back
	// aimed at vm2.
	if sum, err := a.LoadState(blob); err != nil || sum.Forwards != 1 {
		t.Fatalf("LoadState: %+v, %v", sum, err)
	}
	if who, err := who(strconv.Itoa(rtPort)); who != "guest2" {
		t.Errorf("restored forward to vm2 reached %q (%v)", who, err)
	}

	gl := a.GuestList()
	if len(gl) != 2 || gl[1].Name != "vm2" || gl[0].Name != "" || len(gl[0].Metrics) == 0 {
		t.Fatalf("GuestList = %+v", gl)
	}
	for _, g := range gl {
		for _, m := range g.Metrics {
			if m.Labels["guest"] != strconv.Itoa(g.Port) {
				t.Errorf("guest %d lists series %s %v", g.Port, m.Name, m.Labels)
			}
		}
	}

	// Guest 2 goes away: its forwards refuse, guest 1's still works.
	g2.f.Close()
	eventuallyTrue(t, "guest 2 gone", func() bool { return len(a.Guests()) == 1 })
	for _, port := range []string{byName, byAddr} {
		if got, err := who(port); got != "" {
			t.Errorf("forward on %s to a departed guest reached %q (%v)", port, got, err)
		}
	}
	eventuallyTrue(t, "refusals counted", func() bool { return a.Forward.Stats().InboundNoGuestTCP.Load() == 2 })
	if got, err := who(byMAC); got != "guest1" {
		t.Errorf("forward to guest 1 after guest 2 left: %q, %v", got, err)
	}
}

// freePort is a free TCP port on 127.0.0.1, as a string.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}
