package vhost_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// waitClosed reads c until the server closes it, failing after d.
func waitClosed(t *testing.T, f *vhosttest.Frontend, d time.Duration) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := f.Conn.Read()
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("server sent a message instead of closing")
		}
	case <-time.After(d):
		t.Fatalf("connection still open after %v", d)
	}
}

// TestSecondFrontendRefused: while one frontend is served, another is
// refused at once (closed, counted), not left waiting; the first one is
// unaffected, and once it hangs up the next one is served at once.
func TestSecondFrontendRefused(t *testing.T) {
	b := newSink()
	// A teardown that takes a while: a frontend reconnecting meanwhile
	// must wait for it, not be refused.
	b.stopDelay = 100 * time.Millisecond
	srv, path, _ := serve(t, b)
	f, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Setup(allFeatures); err != nil {
		t.Fatal(err)
	}
	g, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	g.Conn.Write(protocol.Header{Request: protocol.GetFeatures, Flags: protocol.FlagVersion}, nil, nil)
	waitClosed(t, g, time.Second)
	if got := srv.Stats.SessionsRefused.Load(); got != 1 {
		t.Errorf("sessions refused %d, want 1", got)
	}
	if _, err := f.U64(protocol.GetFeatures, 0, true); err != nil {
		t.Fatalf("first frontend disturbed: %v", err)
	}
	if got := srv.Stats.ActiveSessions.Load(); got != 1 {
		t.Errorf("active sessions %d, want 1", got)
	}
	// A frontend that reconnects right after hanging up is served.
	f.Close()
	h, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := h.Setup(allFeatures); err != nil {
		t.Fatalf("reconnect after hang-up: %v", err)
	}
	if got := srv.Stats.SessionsRefused.Load(); got != 1 {
		t.Errorf("sessions refused %d after a reconnect, want 1", got)
	}
}

// serveWith serves a sink backend with opts on a fresh socket in a
// directory anyone may enter, and stops it at cleanup.
func serveWith(t *testing.T, opts vhost.Options) (*vhost.Server, string) {
	t.Helper()
	opts.Backend = newSink()
	srv, err := vhost.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	// t.TempDir's parent is private; peers connecting as other users
	// must reach the socket.
	dir, err := os.MkdirTemp("", "vhost-peers-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	path := filepath.Join(dir, "vhost.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(path, 0o777)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l, false) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return srv, path
}

// TestSetupTimeout: a frontend that connects and says nothing is dropped
// after the set-up timeout and counted; one that sent SET_OWNER may then
// wait for its guest as long as it likes.
func TestSetupTimeout(t *testing.T) {
	const timeout = 200 * time.Millisecond
	srv, path := serveWith(t, vhost.Options{SetupTimeout: timeout})
	f, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	waitClosed(t, f, 5*time.Second)
	if took := time.Since(start); took < timeout/2 {
		t.Errorf("dropped after %v, before the %v timeout", took, timeout)
	}
	if got := srv.Stats.SetupTimeouts.Load(); got != 1 {
		t.Errorf("setup timeouts %d, want 1", got)
	}

	g, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if _, err := g.Request(protocol.SetOwner, 0, nil, nil, false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * timeout)
	if _, err := g.U64(protocol.GetFeatures, 0, true); err != nil {
		t.Fatalf("owner dropped: %v", err)
	}
	if got := srv.Stats.SetupTimeouts.Load(); got != 1 {
		t.Errorf("setup timeouts %d, want 1", got)
	}
}

// dialAs connects to path with effective uid and gid changed on this
// thread only (raw setresuid/setresgid: credentials are per thread in
// Linux, and SO_PEERCRED records the connecting thread's). Needs root.
func dialAs(t *testing.T, path string, uid, gid int) (*net.UnixConn, error) {
	t.Helper()
	type result struct {
		c   *net.UnixConn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread is never unlocked: it dies with the goroutine, and
		// its changed credentials with it.
		runtime.LockOSThread()
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESGID, ^uintptr(0), uintptr(gid), ^uintptr(0)); e != 0 {
			ch <- result{err: e}
			return
		}
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
			ch <- result{err: e}
			return
		}
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			ch <- result{err: err}
			return
		}
		if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
			unix.Close(fd)
			ch <- result{err: err}
			return
		}
		f := os.NewFile(uintptr(fd), "peer")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			ch <- result{err: err}
			return
		}
		ch <- result{c: c.(*net.UnixConn)}
	}()
	r := <-ch
	return r.c, r.err
}

// TestPeerCredentials: only vunet's own user, root and the socket group
// may connect; anyone else is closed at once and counted.
func TestPeerCredentials(t *testing.T) {
	if os.Geteuid() != 0 {
		// Without root we cannot connect as someone else: refuse
		// ourselves instead.
		srv, path := serveWith(t, vhost.Options{Peers: vhost.PeerPolicy{UIDs: []uint32{uint32(os.Getuid()) + 1}}})
		f, err := vhosttest.Dial(path, vhosttest.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		waitClosed(t, f, time.Second)
		if srv.Stats.PeersRefused.Load() != 1 {
			t.Fatalf("peers refused %d", srv.Stats.PeersRefused.Load())
		}
		return
	}
	const nobody, group = 65534, 4242
	srv, path := serveWith(t, vhost.Options{Peers: vhost.PeerPolicy{UIDs: []uint32{1234}, GIDs: []uint32{group}}})
	for _, tc := range []struct {
		name     string
		uid, gid int
		allowed  bool
	}{
		{"other user", nobody, nobody, false},
		{"socket group", nobody, group, true},
		{"listed user", 1234, nobody, true},
		{"root", 0, 0, true},
	} {
		before := srv.Stats.PeersRefused.Load()
		c, err := dialAs(t, path, tc.uid, tc.gid)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		f, err := vhosttest.New(c, vhosttest.Options{MemSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.U64(protocol.GetFeatures, 0, true)
		if tc.allowed && err != nil {
			t.Errorf("%s refused: %v", tc.name, err)
		}
		if !tc.allowed && (err == nil || srv.Stats.PeersRefused.Load() != before+1) {
			t.Errorf("%s served (err %v, refused %d)", tc.name, err, srv.Stats.PeersRefused.Load())
		}
		f.Close()
		if tc.allowed {
			// Let the session end before the next peer connects.
			for srv.Stats.ActiveSessions.Load() != 0 {
				time.Sleep(time.Millisecond)
			}
		}
	}
}
