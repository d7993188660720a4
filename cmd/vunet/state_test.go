package main

import (
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/appliance"
	"github.com/vunet/vunet/config"
)

// TestStateCommands moves a source appliance's lease and runtime forward
// with `vunet state save` and `vunet state load` over real API sockets.
func TestStateCommands(t *testing.T) {
	newApp := func() (*appliance.Appliance, string) {
		cfg := config.Default()
		cfg.Socket = filepath.Join(t.TempDir(), "vhost.sock")
		cfg.DNSUpstream = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1")}
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		a, err := appliance.New(cfg, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Close)
		return a, fakeServer(t, a)
	}
	src, srcAPI := newApp()
	dst, dstAPI := newApp()
	if err := src.DHCP.RestoreLease(net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}, netip.MustParseAddr("10.0.2.15"), time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := src.AddForward(api.Forward{Proto: "udp", Host: netip.MustParseAddrPort("127.0.0.1:0"), GuestPort: 53}); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "state")
	if r := runVunet(t, nil, "state", "save", "--api", srcAPI, "--output", file); r.err != nil || r.stdout != "" {
		t.Fatalf("state save: %v %q", r.err, r.stdout)
	}
	if fi, err := os.Stat(file); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file: %v %v", fi, err)
	}
	r := runVunet(t, nil, "state", "load", "--api", dstAPI, "--input", file)
	// The source still holds the forward's port: it waits for it.
	if r.err != nil || !strings.Contains(r.stdout, "restored 1 leases, 0 port forwards") || !strings.Contains(r.stdout, "1 port forwards wait") {
		t.Fatalf("state load: %v\n%s", r.err, r.stdout)
	}
	if ls := dst.DHCP.Leases(); len(ls) != 1 {
		t.Errorf("destination leases %+v", ls)
	}

	garbage := writeFile(t, "garbage", "not a state")
	if r := runVunet(t, nil, "state", "load", "--api", dstAPI, "--input", garbage); r.err == nil || !strings.Contains(r.err.Error(), "not a vunet device state") {
		t.Errorf("garbage: %v", r.err)
	}
	if r := runVunet(t, nil, "state", "save"); r.err == nil || !strings.Contains(r.err.Error(), "--api PATH is required") {
		t.Errorf("no --api: %v", r.err)
	}
	if r := runVunet(t, nil, "state", "frobnicate"); r.err == nil || !strings.Contains(r.err.Error(), "save or load") {
		t.Errorf("unknown command: %v", r.err)
	}
}
