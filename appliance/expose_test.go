package appliance

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/devstate"
	"github.com/vunet/vunet/netstack/netstacktest"
)

// hostEcho serves a unix socket at path: each line read is answered with
// prefix and the line.
func hostEcho(t *testing.T, path, prefix string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					fmt.Fprintf(c, "%s%s", prefix, line)
				}
			}()
		}
	}()
}

// guestConn is a guest's connection to the gateway with a line reader.
type guestConn struct {
	net.Conn
	r *bufio.Reader
}

// dialGateway connects guest g to the gateway on port; the error is the
// guest's connect's.
func dialGateway(t *testing.T, g *testGuest, port uint16) (*guestConn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := netstacktest.DialTCP(ctx, g.s, netip.AddrPortFrom(netip.MustParseAddr("10.0.2.2"), port))
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return &guestConn{Conn: c, r: bufio.NewReader(c)}, nil
}

func (c *guestConn) ask(t *testing.T, line string) string {
	t.Helper()
	fmt.Fprintf(c, "%s\n", line)
	got, err := c.r.ReadString('\n')
	if err != nil {
		t.Fatalf("after %q: %q, %v", line, got, err)
	}
	return got
}

// TestRuntimeExpose: a gateway port exposed over the API reaches the host
// socket from the guest, is listed with the start-up one, is the only
// one in the device state, and stops taking connections when removed
// while a connection made before goes on; bad requests get their own
// status and a message that says how to fix them. A destination vunet
// with the same --unix-forward-dir takes the expose from the device state
// and its guest reaches the socket; one without says why not.
func TestRuntimeExpose(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	cfg.MapHostLoopback = false // an unexposed gateway port refuses
	cfg.UnixForwardDir = filepath.Join(dir, "fwd")
	startup := filepath.Join(dir, "startup", "podman.sock")
	cfg.Expose = []config.Expose{{Port: 2376, Path: startup}}
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
	g := connectGuest(t, cfg.Socket, "\x52\x54\x00\x12\x34\x56", netstacktest.Guest4)
	sock := filepath.Join(cfg.UnixForwardDir, "svc.sock")
	hostEcho(t, sock, "host:")

	ctx := context.Background()
	c := api.NewClient(cfg.API)
	defer c.Close()
	if _, err := dialGateway(t, g, 2375); err == nil {
		t.Fatal("gateway port 2375 connected before it was exposed")
	}
	got, err := c.AddExpose(ctx, api.Expose{GatewayPort: 2375, Path: sock})
	want := api.Expose{Proto: "tcp", GatewayPort: 2375, Path: sock,
		Gateway: []netip.AddrPort{netip.MustParseAddrPort("10.0.2.2:2375"), netip.MustParseAddrPort("[fd00::2]:2375")}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("AddExpose = %+v, %v; want %+v", got, err, want)
	}
	held, err := dialGateway(t, g, 2375)
	if err != nil {
		t.Fatalf("guest connect to the exposed port: %v", err)
	}
	if ans := held.ask(t, "one"); ans != "host:one\n" {
		t.Fatalf("through the expose: %q", ans)
	}
	list, err := c.Exposes(ctx)
	if err != nil || len(list) != 2 || list[0].String() != "tcp:2375:unix:"+sock || list[1].String() != "tcp:2376:unix:"+startup {
		t.Fatalf("Exposes = %+v, %v; want the runtime and the start-up one", list, err)
	}
	b, err := a.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	st, err := devstate.Decode(b)
	if err != nil || !reflect.DeepEqual(st.Exposes, []devstate.Expose{{Port: 2375, Path: sock}}) {
		t.Fatalf("device state exposes %+v, %v; want the runtime one only", st, err)
	}

	// Refusals.
	regular := filepath.Join(cfg.UnixForwardDir, "file")
	if err := os.WriteFile(regular, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		e    api.Expose
		kind error
		msg  string
	}{
		{api.Expose{GatewayPort: 0, Path: sock}, api.ErrInvalid, "gateway_port 0: expected 1..65535"},
		{api.Expose{GatewayPort: 2375, Path: filepath.Join(cfg.UnixForwardDir, "other.sock")}, api.ErrConflict, "already exposed (to unix:" + sock + "); remove it first"},
		{api.Expose{GatewayPort: 2376, Path: sock}, api.ErrConflict, "already exposed"},
		{api.Expose{GatewayPort: 2377, Path: filepath.Join(dir, "elsewhere.sock")}, api.ErrInvalid,
			"is not directly in --unix-forward-dir " + cfg.UnixForwardDir + " or in the directory of an --expose socket given at start-up (" + filepath.Dir(startup) + ")"},
		{api.Expose{GatewayPort: 2377, Path: filepath.Join(cfg.UnixForwardDir, "sub", "x.sock")}, api.ErrInvalid, "is not directly in"},
		{api.Expose{GatewayPort: 2377, Path: regular}, api.ErrInvalid, "is a regular file, not a Unix socket"},
		{api.Expose{GatewayPort: 2377, Path: "relative.sock"}, api.ErrInvalid, "absolute socket path"},
	} {
		_, err := c.AddExpose(ctx, tt.e)
		if !errors.Is(err, tt.kind) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("AddExpose(%+v) = %v; want %v with %q", tt.e, err, tt.kind, tt.msg)
		}
	}
	// Next to the start-up expose's socket (not there yet) is allowed.
	if _, err := c.AddExpose(ctx, api.Expose{GatewayPort: 2378, Path: filepath.Join(filepath.Dir(startup), "docker.sock")}); err != nil {
		t.Errorf("AddExpose next to the start-up socket: %v", err)
	}
	if err := c.RemoveExpose(ctx, api.Expose{GatewayPort: 2378}); err != nil {
		t.Errorf("RemoveExpose(2378): %v", err)
	}

	if err := c.RemoveExpose(ctx, api.Expose{GatewayPort: 2375, Path: startup}); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("RemoveExpose with another path = %v, want ErrNotFound", err)
	}
	if err := c.RemoveExpose(ctx, api.Expose{GatewayPort: 2375, Path: sock}); err != nil {
		t.Fatalf("RemoveExpose: %v", err)
	}
	if _, err := dialGateway(t, g, 2375); err == nil {
		t.Error("gateway port 2375 connected after the expose was removed")
	}
	if ans := held.ask(t, "two"); ans != "host:two\n" {
		t.Errorf("the connection made before the removal: %q", ans)
	}
	if err := c.RemoveExpose(ctx, api.Expose{GatewayPort: 2375}); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("second RemoveExpose = %v, want ErrNotFound", err)
	}
	stats := a.Stats()
	if n, _ := stats.Find("vunet_forward_expose_total", "outcome", "connected"); n != 1 {
		t.Errorf("vunet_forward_expose_total{outcome=connected} = %d, want 1", n)
	}

	// The destination: the state saved above, loaded by a vunet with the
	// same directory (the socket is the host's, so both reach it).
	newDst := func(sub, sockDir string) (*Appliance, *config.Config) {
		d := filepath.Join(dir, sub)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		cfg := testConfig(t, d)
		cfg.UnixForwardDir = sockDir
		a, err := New(cfg, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.Close() })
		stop, _ := start(t, a)
		t.Cleanup(func() { _ = stop() })
		return a, cfg
	}
	bare, _ := newDst("bare", "")
	sum, err := bare.LoadState(b)
	if err != nil || sum.Exposes != 0 || len(sum.Problems) != 1 || !strings.Contains(sum.Problems[0], "--unix-forward-dir") {
		t.Errorf("destination without --unix-forward-dir: %+v, %v; want one problem naming the flag", sum, err)
	}
	dst, dcfg := newDst("dst", cfg.UnixForwardDir)
	sum, err = dst.LoadState(b)
	if err != nil || sum.Exposes != 1 || len(sum.Problems) != 0 {
		t.Fatalf("LoadState = %+v, %v; want the expose restored", sum, err)
	}
	if again, err := dst.LoadState(b); err != nil || again.Exposes != 1 || len(again.Problems) != 0 {
		t.Errorf("LoadState twice = %+v, %v; want the running expose taken as restored", again, err)
	}
	g2 := connectGuest(t, dcfg.Socket, "\x52\x54\x00\x12\x34\x56", netstacktest.Guest4)
	dc, err := dialGateway(t, g2, 2375)
	if err != nil {
		t.Fatalf("destination guest connect: %v", err)
	}
	if ans := dc.ask(t, "three"); ans != "host:three\n" {
		t.Errorf("through the restored expose: %q", ans)
	}
	// Moved again, it goes with the guest: the destination counts it as
	// its own runtime expose.
	b2, err := dst.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	if st, err := devstate.Decode(b2); err != nil || len(st.Exposes) != 1 {
		t.Errorf("destination's own device state: %+v, %v; want the expose", st, err)
	}
}

// TestRuntimeExposeWithoutDirectory: a sandboxed vunet started without
// --unix-forward-dir or --expose refuses runtime exposes with the flags
// that enable them; with --sandbox=off any path is allowed.
func TestRuntimeExposeWithoutDirectory(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	path := filepath.Join(dir, "svc.sock")
	if _, err := a.AddExpose(api.Expose{GatewayPort: 2375, Path: path}); !errors.Is(err, api.ErrInvalid) ||
		!strings.Contains(err.Error(), "restart it with --unix-forward-dir DIR") || !strings.Contains(err.Error(), "--expose tcp:2375:unix:"+path) {
		t.Errorf("AddExpose without --unix-forward-dir = %v", err)
	}

	cfg2 := testConfig(t, t.TempDir())
	cfg2.Sandbox = config.SandboxOff
	b, err := New(cfg2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := b.AddExpose(api.Expose{GatewayPort: 2375, Path: path}); err != nil {
		t.Errorf("AddExpose with --sandbox=off: %v", err)
	}
}

// TestRuntimeExposeSharedByGuests: with --max-guests 2, a gateway port
// exposed at run time is reached by both guests (it is the gateway's; an
// expose names no guest), and each guest's connection counts against its
// own flows.
func TestRuntimeExposeSharedByGuests(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	cfg.MaxGuests = 2
	cfg.UnixForwardDir = filepath.Join(dir, "fwd")
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	stop, _ := start(t, a)
	defer func() { _ = stop() }()
	g1 := connectGuest(t, cfg.Socket, "\x52\x54\x00\x00\x00\x01", netstacktest.Guest4)
	g2 := connectGuest(t, cfg.Socket, "\x52\x54\x00\x00\x00\x02", netip.MustParseAddr("10.0.2.16"))
	sock := filepath.Join(cfg.UnixForwardDir, "svc.sock")
	hostEcho(t, sock, "host:")
	if _, err := a.AddExpose(api.Expose{GatewayPort: 2375, Path: sock}); err != nil {
		t.Fatal(err)
	}
	for i, g := range []*testGuest{g1, g2} {
		c, err := dialGateway(t, g, 2375)
		if err != nil {
			t.Fatalf("guest %d: %v", i, err)
		}
		if ans := c.ask(t, fmt.Sprintf("from %d", i)); ans != fmt.Sprintf("host:from %d\n", i) {
			t.Errorf("guest %d through the expose: %q", i, ans)
		}
	}
	st := a.Stats()
	for i := range 2 {
		if n, ok := st.Find("vunet_forward_guest_flows", "guest", fmt.Sprint(i), "proto", "tcp"); !ok || n != 1 {
			t.Errorf("guest %d's tcp flows = %d (%v), want its own connection", i, n, ok)
		}
	}
}
