package vhost_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// hostileFDs returns descriptors that are not eventfds, by name: each once
// made a queue worker spin (/dev/zero, a big regular file: reads that never
// block) or wedge (descriptors the netpoller cannot watch, so the worker
// could not be interrupted and the process ignored SIGTERM).
func hostileFDs(t *testing.T) map[string]int {
	t.Helper()
	fds := map[string]int{}
	open := func(name, path string) {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		fds[name] = int(f.Fd())
	}
	open("/dev/zero", "/dev/zero")
	reg := filepath.Join(t.TempDir(), "kick")
	if err := os.WriteFile(reg, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	open("regular file", reg)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	fds["pipe"] = p[0]
	tfd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(tfd) })
	fds["timerfd"] = tfd
	return fds
}

// TestKickNotEventFD is the regression test for a frontend whose kick is
// not an eventfd: it is refused (NACK with REPLY_ACK, silently without),
// counted, and no worker ever starts on it; the server stops at once.
func TestKickNotEventFD(t *testing.T) {
	for name, fd := range hostileFDs(t) {
		for _, legacy := range []bool{false, true} {
			t.Run(name+map[bool]string{false: "", true: " legacy"}[legacy], func(t *testing.T) {
				b := newSink()
				srv, path, stop := serve(t, b)
				f, err := vhosttest.Dial(path, vhosttest.Options{})
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				f.KickFDs[1] = fd
				features := allFeatures
				if legacy {
					features &^= 1 << 30 // no PROTOCOL_FEATURES: no REPLY_ACK
				}
				err = f.Setup(features)
				if !legacy && err == nil {
					t.Fatal("kick accepted")
				}
				if legacy {
					// Without REPLY_ACK the refusal is silent; a GET
					// round trip makes sure it was processed.
					if _, err := f.U64(protocol.GetStatus, 0, true); err != nil {
						t.Fatal(err)
					}
				}
				if got := srv.Stats.BadFDs.Load(); got != 1 {
					t.Errorf("bad fds %d, want 1", got)
				}
				b.mu.Lock()
				_, running := b.workers[1]
				b.mu.Unlock()
				if running {
					t.Error("a worker was started on the bad kick")
				}
				stop(t)
			})
		}
	}
}

// TestMemoryNotRegularFile: guest memory on a device or a pipe is refused
// and counted; the frontend may go on with a real memfd.
func TestMemoryNotRegularFile(t *testing.T) {
	b := newSink()
	srv, path, stop := serve(t, b)
	defer stop(t)
	f, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.U64(protocol.SetFeatures, 1<<30, false); err != nil {
		t.Fatal(err)
	}
	fds := hostileFDs(t)
	for _, name := range []string{"/dev/zero", "pipe", "timerfd"} {
		table := protocol.EncodeMemTable(nil, []protocol.MemRegion{{GuestAddr: 1 << 20, Size: 1 << 20, UserAddr: 1 << 40}})
		if err := f.Ack(protocol.SetMemTable, table, []int{fds[name]}); err == nil {
			t.Errorf("%s accepted as guest memory", name)
		}
	}
	if got := srv.Stats.BadFDs.Load(); got != 3 {
		t.Errorf("bad fds %d, want 3", got)
	}
}

// serve is StartServer with a stop function that fails the test unless
// the server returns within a second of being cancelled (a wedged worker
// made it hang for ever).
func serve(t *testing.T, b vhost.Backend) (*vhost.Server, string, func(*testing.T)) {
	srv, err := vhost.NewServer(vhost.Options{Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "vhost.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l, false) }()
	stopped := false
	stop := func(t *testing.T) {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve: %v", err)
			}
		case <-time.After(time.Second):
			t.Fatal("server did not stop within 1s")
		}
	}
	t.Cleanup(func() { stop(t) })
	return srv, path, stop
}
