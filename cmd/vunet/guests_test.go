package main

import (
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/appliance"
	"github.com/vunet/vunet/config"
)

func TestWriteGuests(t *testing.T) {
	now := time.Date(2026, 12, 1, 18, 0, 0, 0, time.Local)
	m := func(name, dir string, v int64, kv ...string) api.Metric {
		l := map[string]string{"guest": "1"}
		if dir != "" {
			l["direction"] = dir
		}
		for i := 0; i+1 < len(kv); i += 2 {
			l[kv[i]] = kv[i+1]
		}
		return api.Metric{Layer: "link", Name: name, Kind: "counter", Labels: l, Value: v}
	}
	gs := []api.Guest{{
		Port: 1, MAC: "52:54:00:00:00:02", Name: "vm2",
		IPv4:   []netip.Addr{netip.MustParseAddr("10.0.2.16")},
		IPv6:   []netip.Addr{netip.MustParseAddr("fd00::5054:ff:fe00:2")},
		Leases: []api.Lease{{MAC: "52:54:00:00:00:02", Addr: netip.MustParseAddr("10.0.2.16"), Expiry: now.Add(90 * time.Minute)}},
		Rings: []api.RingState{
			{Queue: 0, Direction: api.ToGuest, AvailIdx: 3, NextAvail: 65535}, // wrapped: 4 free
			{Queue: 1, Direction: api.FromGuest, AvailIdx: 12, NextAvail: 10},
		},
		Metrics: []api.Metric{
			m("vunet_link_frames_total", api.ToGuest, 5, "queue", "0"),
			m("vunet_link_frames_total", api.FromGuest, 7, "queue", "1"),
			m("vunet_link_bytes_total", api.ToGuest, 2048, "queue", "0"),
			m("vunet_link_bytes_total", api.FromGuest, 100, "queue", "1"),
			m("vunet_link_drops_total", "", 2, "reason", "tx_short"),
			m("vunet_link_drops_total", "", 1, "reason", "rx_backlog_full"),
			m("vunet_forward_guest_flows", "", 40, "proto", "tcp"),
			m("vunet_forward_guest_flows", "", 2, "proto", "udp"),
			m("vunet_forward_guest_refused_total", "", 1, "limit", "max_connections"),
			m("vunet_forward_guest_refused_total", "", 3, "limit", "udp_flows"),
		},
	}, {Port: 0}}
	var b strings.Builder
	if err := writeGuests(&b, gs, now); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"52:54:00:00:00:02", "vm2.vunet.internal", "10.0.2.16,fd00::5054:ff:fe00:2",
		"2026-12-01 19:30 (in 1h30m0s)", "5 / 2.0 KiB", "7 / 100 B", "  3  ", "2 rings, rx free 4, tx pending 2", "tcp 40, udp 2, icmp 0; refused 4"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	// A guest that has not sent a frame yet: dashes, no panic.
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 3 || !strings.HasPrefix(lines[2], "0 ") || !strings.Contains(lines[2], "-") {
		t.Errorf("second guest line: %q", lines)
	}
	b.Reset()
	if err := writeGuests(&b, nil, now); err != nil || b.String() != "no guests connected\n" {
		t.Errorf("no guests: %q, %v", b.String(), err)
	}
}

// TestGuestsCommand runs `vunet guests` against a real appliance with no
// guest connected: the table says so, --json is an empty list, and an
// argument is a usage error.
func TestGuestsCommand(t *testing.T) {
	dir := t.TempDir()
	cfg := config.Default()
	cfg.Socket = filepath.Join(dir, "vhost.sock")
	cfg.DNSUpstream = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1")}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a, err := appliance.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	sock := fakeServer(t, a)
	if r := runVunet(t, nil, "guests", "--api", sock); r.err != nil || r.stdout != "no guests connected\n" {
		t.Errorf("guests: %q, %v", r.stdout, r.err)
	}
	if r := runVunet(t, nil, "guests", "--api", sock, "--json"); r.err != nil || strings.Join(strings.Fields(r.stdout), "") != `{"guests":[]}` {
		t.Errorf("guests --json: %q, %v", r.stdout, r.err)
	}
	if r := runVunet(t, nil, "guests", "--api", sock, "extra"); r.err == nil || !strings.Contains(r.line(), `guests: unexpected argument "extra"`) {
		t.Errorf("guests extra: %q, %v", r.line(), r.err)
	}
}
