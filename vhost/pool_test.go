package vhost_test

import (
	"context"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// pool hands out sink backends and records what it was given back.
type pool struct {
	mu       sync.Mutex
	given    []*sinkBackend
	released []vhost.Backend
	hangUps  []func()
}

func (p *pool) AcquireBackend(hangUp func()) (vhost.Backend, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b := newSink()
	p.given = append(p.given, b)
	p.hangUps = append(p.hangUps, hangUp)
	return b, nil
}

func (p *pool) ReleaseBackend(b vhost.Backend) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.released = append(p.released, b)
}

func (p *pool) counts() (given, released int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.given), len(p.released)
}

// TestBackendPool: with Options.Backends each frontend gets a device of
// its own (set up through it), released once its session ends, after its
// Reset; the device's hangUp ends its session and only its.
func TestBackendPool(t *testing.T) {
	p := &pool{}
	srv, err := vhost.NewServer(vhost.Options{Backend: newSink(), Backends: p, MaxSessions: 2})
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
	defer func() { cancel(); <-done }()

	var fs []*vhosttest.Frontend
	for range 2 {
		f, err := vhosttest.Dial(path, vhosttest.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Setup(allFeatures); err != nil {
			t.Fatal(err)
		}
		fs = append(fs, f)
	}
	if g, _ := p.counts(); g != 2 {
		t.Fatalf("%d backends acquired, want 2", g)
	}
	p.mu.Lock()
	given := append([]*sinkBackend(nil), p.given...)
	p.mu.Unlock()
	for i, b := range given {
		b.mu.Lock()
		n := len(b.workers)
		b.mu.Unlock()
		if n == 0 {
			t.Errorf("backend %d: no queue started on it", i)
		}
	}
	// The first device hangs up its frontend: the second is unaffected.
	p.mu.Lock()
	hangUp := p.hangUps[0]
	p.mu.Unlock()
	hangUp()
	waitClosed(t, fs[0], 5*time.Second)
	deadline := time.Now().Add(5 * time.Second)
	for _, r := p.counts(); r != 1; _, r = p.counts() {
		if time.Now().After(deadline) {
			t.Fatal("backend not released after its session ended")
		}
		time.Sleep(time.Millisecond)
	}
	p.mu.Lock()
	b0, r0 := p.given[0], p.released[0]
	p.mu.Unlock()
	b0.mu.Lock()
	resets := b0.resets
	b0.mu.Unlock()
	if r0 != vhost.Backend(b0) || resets == 0 {
		t.Fatalf("released %v (reset %d), want the first backend, reset", r0, resets)
	}
	if _, err := fs[1].U64(protocol.GetFeatures, 0, true); err != nil {
		t.Fatalf("second frontend disturbed: %v", err)
	}
}
