package vhost

import (
	"log/slog"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/ratelimit"
)

// unixPair returns both ends of a connected Unix stream socket pair.
func unixPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

// TestAdmitDuringRelease: a frontend that connects while the previous
// one's session is being released is served, whatever instant of the
// release it hits. When release forgot the connection before freeing its
// slot, a frontend admitted in between found neither a free slot nor a
// hung-up session to wait for and was refused: TestTwoGuests' third
// frontend, about once in a thousand runs under -race.
func TestAdmitDuringRelease(t *testing.T) {
	s := &Server{opts: Options{MaxSessions: 1, Peers: PeerPolicy{UIDs: []uint32{uint32(os.Getuid())}}},
		log: slog.New(slog.DiscardHandler), limiter: ratelimit.New(10, time.Second),
		slots: make(chan struct{}, 1), active: map[*net.UnixConn]struct{}{}}
	old, oldPeer := unixPair(t)
	if !s.acquire(old) {
		t.Fatal("first session refused")
	}
	oldPeer.Close() // the frontend hung up; its session is torn down
	next, _ := unixPair(t)
	admitted := false
	s.midRelease = func() { admitted = s.admit(next) }
	s.release(old)
	if !admitted {
		t.Fatalf("a frontend connecting during the previous session's release was refused (%d refused)", s.Stats.SessionsRefused.Load())
	}
	if n := s.Stats.ActiveSessions.Load(); n != 1 {
		t.Errorf("active sessions %d, want 1 (the new one)", n)
	}
}
