package appliance

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/devstate"
	"github.com/vunet/vunet/netstack/netstacktest"
)

// guestEcho serves port on the guest: each connection gets "guest:" and
// the line it sent.
func guestEcho(t *testing.T, g *testGuest, port uint16) {
	t.Helper()
	ln, err := gonet.ListenTCP(g.s, tcpip.FullAddress{NIC: netstacktest.GuestNIC, Port: port}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				fmt.Fprintf(c, "guest:%s", line)
			}()
		}
	}()
}

// askThrough sends a line through the unix socket path and returns the
// answer.
func askThrough(t *testing.T, path, line string) string {
	t.Helper()
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", path, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "%s\n", line)
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("through %s: %q, %v", path, got, err)
	}
	return got
}

// TestRuntimeUnixForward: with --unix-forward-dir, a unix forward added
// over the API creates its socket in that directory with --socket-mode,
// reaches the guest's TCP port, is listed and carried in the device
// state, and is removed with its socket; a path outside the directory,
// or any path without the flag, is refused with a message that says
// where it may go.
func TestRuntimeUnixForward(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(t, dir)
	cfg.SocketMode = 0o660
	cfg.UnixForwardDir = filepath.Join(dir, "fwd")
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	stop, _ := start(t, a)
	defer func() { _ = stop() }()
	if fi, err := os.Lstat(cfg.UnixForwardDir); err != nil || !fi.IsDir() || fi.Mode().Perm()&0o077 != 0 {
		t.Fatalf("--unix-forward-dir: %v, %v; want a directory only vunet's user may enter", fi, err)
	}
	g := connectGuest(t, cfg.Socket, "\x52\x54\x00\x12\x34\x56", netstacktest.Guest4)
	guestEcho(t, g, 8080)

	ctx := context.Background()
	c := api.NewClient(cfg.API)
	defer c.Close()
	outside := filepath.Join(dir, "app.sock")
	if _, err := c.AddForward(ctx, api.Forward{Proto: "unix", Path: outside, GuestPort: 8080}); !errors.Is(err, api.ErrInvalid) ||
		!strings.Contains(err.Error(), "not in --unix-forward-dir "+cfg.UnixForwardDir) {
		t.Errorf("AddForward outside the directory = %v; want ErrInvalid naming --unix-forward-dir", err)
	}
	if _, err := os.Lstat(outside); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a refused forward left %s: %v", outside, err)
	}
	path := filepath.Join(cfg.UnixForwardDir, "app.sock")
	got, err := c.AddForward(ctx, api.Forward{Proto: "unix", Path: path, GuestPort: 8080})
	if err != nil || got.String() != "unix:"+path+":8080" {
		t.Fatalf("AddForward = %+v, %v", got, err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("runtime unix forward socket: %v, %v; want a 0660 socket", fi, err)
	}
	if _, err := c.AddForward(ctx, api.Forward{Proto: "unix", Path: path, GuestPort: 22}); !errors.Is(err, api.ErrConflict) {
		t.Errorf("second AddForward on %s = %v, want ErrConflict", path, err)
	}
	if ans := askThrough(t, path, "hi"); ans != "guest:hi\n" {
		t.Errorf("through the runtime unix forward: %q", ans)
	}
	list, err := c.Forwards(ctx)
	if err != nil || len(list) != 1 || list[0].Path != path || list[0].GuestPort != 8080 {
		t.Fatalf("Forwards = %+v, %v", list, err)
	}
	b, err := a.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	st, err := devstate.Decode(b)
	if err != nil || len(st.Forwards) != 1 || st.Forwards[0] != (devstate.Forward{Proto: "unix", Path: path, GuestPort: 8080}) {
		t.Fatalf("device state forwards %+v, %v; want the unix forward", st, err)
	}
	if err := c.RemoveForward(ctx, api.Forward{Proto: "unix", Path: path}); err != nil {
		t.Fatalf("RemoveForward: %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket after RemoveForward: %v; want it removed", err)
	}
	if err := c.RemoveForward(ctx, api.Forward{Proto: "unix", Path: path}); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("second RemoveForward = %v, want ErrNotFound", err)
	}

	// Without the flag (and the sandbox on, the default), the refusal
	// names the flag that enables it.
	cfg2 := testConfig(t, t.TempDir())
	b2, err := New(cfg2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	if _, err := b2.AddForward(api.Forward{Proto: "unix", Path: path, GuestPort: 8080}); !errors.Is(err, api.ErrInvalid) ||
		!strings.Contains(err.Error(), "needs --unix-forward-dir") {
		t.Errorf("AddForward without --unix-forward-dir = %v", err)
	}
}

// TestUnixForwardCarriedOver: a runtime unix forward in the device state
// is re-created by a destination vunet on the same host with the same
// --unix-forward-dir, once the source lets go of the socket (it waits
// meanwhile, as for a TCP port); a destination without the directory
// says why it did not restore it.
func TestUnixForwardCarriedOver(t *testing.T) {
	dir := t.TempDir()
	fwdDir := filepath.Join(dir, "fwd")
	newApp := func(sub string, sockDir string) (*Appliance, func() error) {
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
		return a, stop
	}
	src, stopSrc := newApp("a", fwdDir)
	path := filepath.Join(fwdDir, "app.sock")
	if _, err := src.AddForward(api.Forward{Proto: "unix", Path: path, GuestPort: 8080}); err != nil {
		t.Fatal(err)
	}
	state, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}

	bare, _ := newApp("c", "")
	sum, err := bare.LoadState(state)
	if err != nil || sum.Forwards != 0 || len(sum.Problems) != 1 || !strings.Contains(sum.Problems[0], "--unix-forward-dir") {
		t.Errorf("destination without --unix-forward-dir: %+v, %v; want one problem naming the flag", sum, err)
	}

	dst, _ := newApp("b", fwdDir)
	sum, err = dst.LoadState(state)
	if err != nil || sum.Pending != 1 {
		t.Fatalf("LoadState while the source serves %s: %+v, %v; want it pending", path, sum, err)
	}
	if err := stopSrc(); err != nil {
		t.Fatal(err)
	}
	src.Close()
	eventuallyTrue(t, "the destination takes the socket", func() bool {
		for _, f := range dst.Forwards() {
			if f.Path == path {
				return true
			}
		}
		return false
	})
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("socket on the destination: %v, %v", fi, err)
	}
	if c, err := net.Dial("unix", path); err != nil {
		t.Errorf("dial the carried-over socket: %v", err)
	} else {
		c.Close()
	}
}
