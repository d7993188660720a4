package vhost_test

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// fakeFrontend is QEMU with chardev server=on: it listens, and serves one
// vhost-user handshake per accepted connection.
type fakeFrontend struct {
	l *net.UnixListener
}

func listenFrontend(t *testing.T, path string) *fakeFrontend {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return &fakeFrontend{l: l}
}

// session accepts vunet's connection, negotiates, and returns the frontend.
func (f *fakeFrontend) session(t *testing.T, within time.Duration) *vhosttest.Frontend {
	t.Helper()
	f.l.SetDeadline(time.Now().Add(within))
	c, err := f.l.AcceptUnix()
	if err != nil {
		t.Fatalf("no dial from vunet within %v: %v", within, err)
	}
	fe, err := vhosttest.New(c, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := fe.Setup(allFeatures); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	return fe
}

func dialLoop(t *testing.T, path string, opts vhost.DialOptions) (*vhost.Server, context.CancelFunc, <-chan error) {
	t.Helper()
	srv, err := vhost.NewServer(vhost.Options{Backend: newSink()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done, finished := make(chan error, 1), make(chan struct{})
	go func() {
		done <- srv.DialLoop(ctx, path, opts)
		close(finished)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(2 * time.Second):
			t.Error("DialLoop still running 2 s after cancel")
		}
	})
	return srv, cancel, done
}

// TestDialLoopRedials is a QEMU restart: the frontend's socket goes away
// with the session, vunet keeps dialling (failures counted), and a new
// frontend listening on the same path is served; the counters say so.
// (Mutation checked: returning after the session instead of re-dialling
// fails it.)
func TestDialLoopRedials(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qemu.sock")
	fe := listenFrontend(t, path)
	st := new(vhost.DialStats)
	_, cancel, done := dialLoop(t, path, vhost.DialOptions{Stats: st, BackoffMin: 5 * time.Millisecond, BackoffMax: 20 * time.Millisecond})
	s1 := fe.session(t, 2*time.Second)
	if _, err := s1.U64(protocol.GetFeatures, 0, true); err != nil {
		t.Fatal(err)
	}
	// The VM goes away: its connection and its socket file (a
	// UnixListener removes the file on Close).
	s1.Close()
	fe.l.Close()
	waitFor(t, func() bool { return st.DialFailures.Load() >= 3 }, "dial failures while the frontend is away")
	fe2 := listenFrontend(t, path)
	s2 := fe2.session(t, 2*time.Second)
	defer s2.Close()
	if got := st.Redials.Load(); got != 1 {
		t.Errorf("redials %d, want 1", got)
	}
	if got := st.Dials.Load(); got != 2 {
		t.Errorf("dials %d, want 2", got)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("DialLoop: %v after cancel, want nil", err)
		}
	case <-time.After(time.Second):
		t.Fatal("DialLoop did not stop within 1 s of cancel while serving")
	}
}

// TestDialLoopOnce: with Once the loop ends with the first session.
func TestDialLoopOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qemu.sock")
	fe := listenFrontend(t, path)
	st := new(vhost.DialStats)
	_, _, done := dialLoop(t, path, vhost.DialOptions{Once: true, Stats: st, BackoffMin: time.Millisecond})
	fe.session(t, 2*time.Second).Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("DialLoop --once: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("DialLoop with Once still running after the session ended")
	}
	if st.Redials.Load() != 0 {
		t.Errorf("redials %d with Once", st.Redials.Load())
	}
}

// TestDialLoopStopsDuringBackoff: a stop (SIGTERM cancels ctx) ends the
// loop at once while it waits between dials, even a long back-off.
func TestDialLoopStopsDuringBackoff(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent.sock")
	st := new(vhost.DialStats)
	_, cancel, done := dialLoop(t, path, vhost.DialOptions{Stats: st, BackoffMin: time.Minute, BackoffMax: time.Minute})
	waitFor(t, func() bool { return st.DialFailures.Load() == 1 }, "the first failed dial")
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("DialLoop: %v", err)
		}
	case <-time.After(time.Second):
		t.Fatal("DialLoop still waiting 1 s after cancel")
	}
	t.Logf("stopped %v after cancel", time.Since(start))
}

// recordingDial fails every dial with err and records when it was called.
type recordingDial struct {
	mu    sync.Mutex
	at    []time.Time
	errOf func(n int) error
}

func (r *recordingDial) dial(ctx context.Context, path string) (*net.UnixConn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.at = append(r.at, time.Now())
	return nil, r.errOf(len(r.at))
}

func (r *recordingDial) calls() []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]time.Time(nil), r.at...)
}

// TestDialLoopBackoff: the wait between failed dials doubles from the
// minimum and stops at the maximum. (Mutation checked: a constant wait
// fails it.)
func TestDialLoopBackoff(t *testing.T) {
	r := &recordingDial{errOf: func(int) error { return syscall.ECONNREFUSED }}
	lo, hi := 20*time.Millisecond, 80*time.Millisecond
	_, cancel, _ := dialLoop(t, "/nonexistent", vhost.DialOptions{Dial: r.dial, BackoffMin: lo, BackoffMax: hi})
	waitFor(t, func() bool { return len(r.calls()) >= 7 }, "7 dials")
	cancel()
	at := r.calls()
	want := []time.Duration{lo, 2 * lo, 4 * lo, hi, hi, hi}
	for i, w := range want {
		got := at[i+1].Sub(at[i])
		// Timers never fire early; a loaded machine makes them late.
		if got < w-time.Millisecond || got > w+200*time.Millisecond {
			t.Errorf("wait before dial %d: %v, want %v", i+2, got, w)
		}
	}
}

// TestDialLoopPermission: a socket vunet may not connect to is a start-up
// error; the same error after a session (a restarting frontend) is retried.
func TestDialLoopPermission(t *testing.T) {
	perm := &net.OpError{Op: "dial", Net: "unix", Err: &fs.PathError{Op: "connect", Path: "/x", Err: fs.ErrPermission}}
	r := &recordingDial{errOf: func(int) error { return perm }}
	_, _, done := dialLoop(t, "/x", vhost.DialOptions{Dial: r.dial, BackoffMin: time.Millisecond})
	select {
	case err := <-done:
		if !errors.Is(err, fs.ErrPermission) {
			t.Fatalf("DialLoop: %v, want a permission error", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a permission error before any session did not stop DialLoop")
	}

	// After a session: first dial succeeds (a real frontend), later ones
	// are refused for a while, then the socket is reachable again.
	path := filepath.Join(t.TempDir(), "qemu.sock")
	fe := listenFrontend(t, path)
	var mu sync.Mutex
	denied := 0
	dial := func(ctx context.Context, p string) (*net.UnixConn, error) {
		mu.Lock()
		defer mu.Unlock()
		if denied > 0 && denied < 4 {
			denied++
			return nil, perm
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", p)
		if err != nil {
			return nil, err
		}
		return c.(*net.UnixConn), nil
	}
	st := new(vhost.DialStats)
	dialLoop(t, path, vhost.DialOptions{Dial: dial, Stats: st, BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond})
	s1 := fe.session(t, 2*time.Second)
	mu.Lock()
	denied = 1
	mu.Unlock()
	s1.Close()
	s2 := fe.session(t, 2*time.Second)
	defer s2.Close()
	if got := st.DialFailures.Load(); got != 3 {
		t.Errorf("dial failures %d, want 3 (the refused re-dials)", got)
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
