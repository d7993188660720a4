package vhost

import (
	"context"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// flakyListener fails its first accepts the way a process out of
// descriptors does, then accepts for real.
type flakyListener struct {
	*net.UnixListener
	errs []error
}

func (l *flakyListener) AcceptUnix() (*net.UnixConn, error) {
	if len(l.errs) > 0 {
		err := l.errs[0]
		l.errs = l.errs[1:]
		return nil, &net.OpError{Op: "accept", Net: "unix", Err: err}
	}
	return l.UnixListener.AcceptUnix()
}

// TestAcceptErrorsRetried: EMFILE/ENFILE/ENOMEM from accept are counted and
// retried after a backoff; they do not end Serve, and the frontend waiting
// in the backlog is then served.
func TestAcceptErrorsRetried(t *testing.T) {
	srv, err := NewServer(Options{Backend: &nopBackend{t: t, started: map[int]bool{}}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "s")
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l := &flakyListener{UnixListener: ul, errs: []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOMEM}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.serve(ctx, l, true) }()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.Stats.Sessions.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("frontend not served after accept errors (%d counted)", srv.Stats.AcceptErrors.Load())
		}
		time.Sleep(time.Millisecond)
	}
	c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		cancel()
		t.Fatal("serve did not return after the once session")
	}
	cancel()
	if got := srv.Stats.AcceptErrors.Load(); got != 3 {
		t.Errorf("accept errors %d, want 3", got)
	}
}
