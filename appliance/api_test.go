package appliance

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/config"
)

// testConfig is the default configuration with sockets in dir and an
// explicit (unreachable) DNS upstream, so /etc/resolv.conf is not read.
func testConfig(t *testing.T, dir string) *config.Config {
	t.Helper()
	cfg := config.Default()
	cfg.Socket = filepath.Join(dir, "vhost.sock")
	cfg.API = filepath.Join(dir, "api.sock")
	cfg.DNSUpstream = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1")}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// notes records sd_notify states.
type notes struct {
	mu     sync.Mutex
	states []string
	ready  chan struct{}
}

func (n *notes) notify(s string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.states = append(n.states, s)
	if s == "READY=1" {
		close(n.ready)
	}
}

func (n *notes) get() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.states...)
}

// start runs a until the test ends and waits for readiness.
func start(t *testing.T, a *Appliance) (stop func() error, n *notes) {
	t.Helper()
	n = &notes{ready: make(chan struct{})}
	a.Notify = n.notify
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	select {
	case <-n.ready:
	case err := <-done:
		cancel()
		t.Fatalf("Run returned before ready: %v", err)
	case <-time.After(10 * time.Second):
		cancel()
		t.Fatal("not ready after 10s")
	}
	stopped := false
	stop = func() error {
		if stopped {
			return nil
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("Run did not return 10s after cancel")
			return nil
		}
	}
	t.Cleanup(func() { stop() })
	return stop, n
}

func TestApplianceAPI(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	cfg.Forwards = []config.Forward{{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), GuestPort: 22}}
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	stop, n := start(t, a)

	fi, err := os.Lstat(cfg.API)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("API socket: %v, %v; want mode 0600", fi, err)
	}

	ctx := context.Background()
	c := api.NewClient(cfg.API)
	defer c.Close()

	h, err := c.Health(ctx)
	if err != nil || h.Status != "ok" {
		t.Fatalf("Health = %+v, %v", h, err)
	}

	// The forward from the configuration is listed.
	fs, err := c.Forwards(ctx)
	if err != nil || len(fs) != 1 || fs[0].GuestPort != 22 || fs[0].Host.Port() == 0 {
		t.Fatalf("Forwards = %+v, %v; want the configured one", fs, err)
	}
	configured := fs[0]

	// Add: IPv4 TCP, IPv6 UDP (when the host has ::1), kernel-chosen ports.
	added, err := c.AddForward(ctx, api.Forward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), GuestPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	if added.Host.Port() == 0 || added.Guest != netip.MustParseAddrPort("10.0.2.15:8080") {
		t.Errorf("added = %+v", added)
	}
	// The host socket is really listening.
	conn, err := net.Dial("tcp", added.Host.String())
	if err != nil {
		t.Errorf("dial the new forward: %v", err)
	} else {
		conn.Close()
	}
	var added6 *api.Forward
	if l, err := net.ListenPacket("udp", "[::1]:0"); err == nil {
		l.Close()
		f, err := c.AddForward(ctx, api.Forward{Proto: "udp", Host: netip.MustParseAddrPort("[::1]:0"), GuestPort: 53})
		if err != nil {
			t.Fatalf("IPv6 UDP forward: %v", err)
		}
		added6 = &f
	}

	// Conflicts and bad requests carry their kind.
	if _, err := c.AddForward(ctx, api.Forward{Proto: "tcp", Host: added.Host, GuestPort: 9}); !errors.Is(err, api.ErrConflict) {
		t.Errorf("duplicate add: %v, want ErrConflict", err)
	}
	if _, err := c.AddForward(ctx, api.Forward{Proto: "tcp", Host: netip.MustParseAddrPort("192.0.2.1:8080"), GuestPort: 9}); !errors.Is(err, api.ErrInvalid) {
		t.Errorf("non-local host address: %v, want ErrInvalid", err)
	}

	fs, _ = c.Forwards(ctx)
	want := 2
	if added6 != nil {
		want = 3
	}
	if len(fs) != want {
		t.Errorf("Forwards = %+v, want %d", fs, want)
	}

	// Remove: a wrong guest port is refused, the right one works.
	if err := c.RemoveForward(ctx, api.Forward{Proto: "tcp", Host: added.Host, GuestPort: 8081}); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("remove with the wrong guest port: %v", err)
	}
	if err := c.RemoveForward(ctx, added); err != nil {
		t.Errorf("remove: %v", err)
	}
	if err := c.RemoveForward(ctx, added); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("second remove: %v", err)
	}
	if added6 != nil {
		if err := c.RemoveForward(ctx, api.Forward{Proto: "udp", Host: added6.Host}); err != nil {
			t.Errorf("remove IPv6: %v", err)
		}
	}
	if fs, _ := c.Forwards(ctx); len(fs) != 1 || fs[0] != configured {
		t.Errorf("after removals Forwards = %+v, want just %+v", fs, configured)
	}

	st, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pf, ok1 := st.Find("vunet_port_forwards")
	pool, ok2 := st.Find("vunet_dhcp_pool_size")
	_, ok3 := st.Find("vunet_ra_sent_total")
	_, ok4 := st.Find("vunet_dhcpv6_packets_total")
	_, tftp := st.Find("vunet_tftp_requests_total")
	if pf != 1 || !ok1 || pool == 0 || !ok2 || !ok3 || !ok4 || tftp {
		t.Errorf("Stats = %+v", st)
	}
	for _, want := range [][]string{
		{"vunet_link_drops_total", "guest", "0", "reason", "tx_bad_header"},
		{"vunet_virtqueue_popped_total", "direction", "from_guest", "guest", "0", "queue", "1"},
	} {
		if _, ok := st.Find(want[0], want[1:]...); !ok {
			t.Errorf("stats lack %v", want)
		}
	}

	m, err := c.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"# TYPE vunet_link_frames_total counter\n",
		`vunet_link_frames_total{direction="from_guest",guest="0",queue="1"} 0` + "\n",
		"vunet_port_forwards 1\n",
		"# TYPE vunet_ra_sent_total counter\n",
		`vunet_hostile_input_total{source="vhost"} 0` + "\n",
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	// Shutdown: clean, both sockets removed, systemd told.
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, p := range []string{cfg.API, cfg.Socket} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", p, err)
		}
	}
	if got := n.get(); len(got) != 2 || got[0] != "READY=1" || got[1] != "STOPPING=1" {
		t.Errorf("notifications %q, want READY=1 then STOPPING=1", got)
	}
	var ue *api.UnreachableError
	if _, err := c.Health(ctx); !errors.As(err, &ue) {
		t.Errorf("Health after stop: %v, want UnreachableError", err)
	}
}

// TestApplianceInheritedListener: a socket passed in (systemd socket
// activation) is served and, belonging to the service manager, kept.
func TestApplianceInheritedListener(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	cfg.API = ""
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "inherited.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	a.VHostListener = l
	stop, _ := start(t, a)
	if _, err := os.Lstat(cfg.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("--socket %s created despite an inherited listener: %v", cfg.Socket, err)
	}
	// A frontend can connect to the inherited socket.
	c, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatalf("dial inherited socket: %v", err)
	}
	c.Close()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(l.Addr().String()); err != nil {
		t.Errorf("inherited socket file removed: %v", err)
	}
}

// TestApplianceAPISocketInUse: a live API socket stops the appliance
// before it serves anything.
func TestApplianceAPISocketInUse(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	other, err := api.Listen(cfg.API)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	err = a.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("Run with the API socket in use: %v", err)
	}
	if _, err := os.Lstat(cfg.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("vhost socket created: %v", err)
	}
	if _, err := os.Lstat(cfg.API); err != nil {
		t.Errorf("the other instance's API socket was removed: %v", err)
	}
}

// TestApplianceUnixForward: a configured unix forward's socket gets
// --socket-mode, the API lists it with its path, and refuses to add one at
// run time; an exposed socket is accepted by New.
func TestApplianceUnixForward(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	path := filepath.Join(dir, "app.sock")
	cfg.SocketMode = 0o660
	cfg.Forwards = []config.Forward{{Proto: "unix", Path: path, GuestPort: 22}}
	cfg.Expose = []config.Expose{{Port: 2375, Path: filepath.Join(dir, "podman.sock")}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	stop, _ := start(t, a)
	defer func() { _ = stop() }()
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("unix forward socket: %v, %v; want a 0660 socket", fi, err)
	}
	ctx := context.Background()
	c := api.NewClient(cfg.API)
	defer c.Close()
	fs, err := c.Forwards(ctx)
	if err != nil || len(fs) != 1 || fs[0].Path != path || fs[0].String() != "unix:"+path+":22" {
		t.Fatalf("Forwards = %+v, %v; want the unix forward", fs, err)
	}
	if _, err := c.AddForward(ctx, api.Forward{Proto: "unix", Path: path + "2", GuestPort: 22}); !errors.Is(err, api.ErrInvalid) {
		t.Errorf("AddForward(unix) = %v, want ErrInvalid", err)
	}
}
