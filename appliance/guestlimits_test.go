package appliance

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// TestGuestLimits: with two guests, each has the connection limit and its
// own memory share for itself. Guest A opens connections until it is
// refused (RST), pinning more than the whole outbound memory on them;
// guest B still connects, gets its minimum shares (no direction at the
// floor window) and moves data, and A's refusals and denials are counted
// under A's `guest` label only.
func TestGuestLimits(t *testing.T) {
	// Each connection takes 16 KiB each way at once: 200 of them want
	// 6.25 MiB, more than the outbound share (6 MiB of the minimum 8 MiB
	// budget); each guest's equal share is 3 MiB.
	const maxConns = 200
	cfg := testConfig(t, t.TempDir())
	cfg.MaxGuests = 2
	cfg.MaxConnections = maxConns
	cfg.MaxMemory = 8 << 20
	const guestShare = (8<<20 - 2<<20) / 2
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	start(t, a)
	ga := connectGuest(t, cfg.Socket, "\x52\x54\x00\x00\x00\x01", netstacktest.Guest4)
	gb := connectGuest(t, cfg.Socket, "\x52\x54\x00\x00\x00\x02", netip.MustParseAddr("10.0.2.16"))

	// The host server holds every connection open and echoes.
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
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	dst := netip.AddrPortFrom(cfg.IPv4.Gateway, uint16(hl.Addr().(*net.TCPAddr).Port))
	dial := func(g *testGuest) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		return gonet.DialContextTCP(ctx, g.s, tcpip.FullAddress{NIC: netstacktest.GuestNIC,
			Addr: tcpip.AddrFrom4(dst.Addr().As4()), Port: dst.Port()}, ipv4.ProtocolNumber)
	}

	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := range maxConns {
		c, err := dial(ga)
		if err != nil {
			t.Fatalf("guest A's connection %d of its %d: %v", i+1, maxConns, err)
		}
		held = append(held, c)
	}
	stA, memA := a.Forward.GuestCounters(0)
	stB, memB := a.Forward.GuestCounters(1)
	eventuallyTrue(t, "guest A's connections open", func() bool { return stA.TCPConns.Load() == maxConns })
	if c, err := dial(ga); err == nil {
		c.Close()
		t.Fatalf("guest A's connection %d was accepted; its limit is %d", maxConns+1, maxConns)
	}
	if n := stA.RejectedConns.Load(); n != 1 {
		t.Errorf("guest A refused %d, want 1", n)
	}
	if memA.Used() > memA.Limit() || memA.Stats().Denied == 0 {
		t.Errorf("guest A's memory: used %d of %d, %d denials; want its share full and denials counted",
			memA.Used(), memA.Limit(), memA.Stats().Denied)
	}

	// A connection's directions take their shares when they first run,
	// which can trail the connection's count: wait until each of A's
	// 2 x maxConns directions has its share or its floor window, so that
	// the floor counter (the Forwarder's, not per guest) moves for B only.
	eventuallyTrue(t, "guest A's directions to have their shares", func() bool {
		return memA.Stats().Takes+a.Forward.Stats().TCPBudgetFloor.Load() >= 2*maxConns
	})

	// Guest B is served, with its own shares, while A holds everything.
	floor := a.Forward.Stats().TCPBudgetFloor.Load()
	c, err := dial(gb)
	if err != nil {
		t.Fatalf("guest B refused while guest A is at its limits: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := []byte("guest B still gets connections and memory")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != string(msg) {
		t.Fatalf("guest B's echo: %q, %v", buf, err)
	}
	if st := memB.Stats(); st.Denied != 0 || st.Takes < 2 || stB.TCPConns.Load() != 1 || stB.RejectedConns.Load() != 0 {
		t.Errorf("guest B: memory %+v, %d connections, %d refused; want its minimum shares granted", st, stB.TCPConns.Load(), stB.RejectedConns.Load())
	}
	if n := a.Forward.Stats().TCPBudgetFloor.Load() - floor; n != 0 {
		t.Errorf("guest B's connection ran %d directions at the floor window: guest A took its memory", n)
	}

	// The same numbers in Stats (GET /v1/stats, /metrics, vunet stats),
	// each under its guest's label, and in the guest list.
	st := a.Stats()
	for _, want := range []struct {
		name   string
		value  int64
		labels []string
	}{
		{"vunet_forward_guest_refused_total", 1, []string{"guest", "0", "limit", "max_connections"}},
		{"vunet_forward_guest_refused_total", 0, []string{"guest", "1", "limit", "max_connections"}},
		{"vunet_forward_guest_flows", maxConns, []string{"guest", "0", "proto", "tcp"}},
		{"vunet_forward_guest_flows", 1, []string{"guest", "1", "proto", "tcp"}},
		{"vunet_memory_denials_total", 0, []string{"share", "guest", "guest", "1", "kind", "minimum"}},
		{"vunet_memory_budget_bytes", guestShare, []string{"share", "guest", "guest", "0"}},
	} {
		if v, ok := st.Find(want.name, want.labels...); !ok || v != want.value {
			t.Errorf("%s%v = %d (found %v), want %d", want.name, want.labels, v, ok, want.value)
		}
	}
	if v, _ := st.Find("vunet_memory_denials_total", "share", "guest", "guest", "0", "kind", "minimum"); v == 0 {
		t.Error("guest A's memory denials are not in Stats")
	}
	for _, g := range a.GuestList() {
		found := false
		for _, m := range g.Metrics {
			if m.Name == "vunet_forward_guest_flows" && m.Labels["proto"] == "tcp" {
				found = true
				if want := map[int]int64{0: maxConns, 1: 1}[g.Port]; m.Value != want {
					t.Errorf("guest %d lists %d TCP flows, want %d", g.Port, m.Value, want)
				}
			}
		}
		if !found {
			t.Errorf("guest %d's list entry has no vunet_forward_guest_flows", g.Port)
		}
	}
}
