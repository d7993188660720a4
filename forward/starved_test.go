package forward

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/netstack/netstacktest"
)

// TestStarvedConnectionsShareOneWaiter opens more idle connections than a
// small budget has minimum shares for. The floored ones wait for the
// budget in the Forwarder's starved set, not in a goroutine each (before,
// each held one: 10 000 idle connections kept ~3 900 goroutines), and when
// memory is released they are woken and take their shares.
func TestStarvedConnectionsShareOneWaiter(t *testing.T) {
	const conns, limit = 120, 1 << 20 // room for ~24 connections' 2 × 16 KiB
	mem := budget.New(limit)
	e := newEnv(t, func(o *Options) {
		o.Memory = mem
		o.OutboundMemory = limit - limit/4
		o.Logger = slog.New(slog.DiscardHandler)
		o.MaxConns = conns + 16
	})
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), echoHandler)
	dst := netip.AddrPortFrom(gw4, srv.Port())
	before := runtime.NumGoroutine()
	cs := make([]net.Conn, 0, conns)
	defer func() {
		for _, c := range cs {
			c.Close()
		}
	}()
	for i := 0; i < conns; i++ {
		c, err := netstacktest.DialTCP(ctxT(t, 20*time.Second), e.p.Guest, dst)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		cs = append(cs, c)
	}
	eventually(t, "all connections spliced", func() bool { return e.f.Stats().TCPConns.Load() == conns })
	starved := func() (int, bool) {
		e.f.starved.mu.Lock()
		defer e.f.starved.mu.Unlock()
		return len(e.f.starved.waiting), e.f.starved.running
	}
	eventually(t, "floored connections to wait for the budget", func() bool {
		n, _ := starved()
		return n >= conns/2
	})
	// One goroutine per connection is the echo server's handler; the
	// splices themselves are parked. A goroutine per starved connection
	// would add another conns/2 or more.
	if extra := runtime.NumGoroutine() - before - conns; extra > 16 {
		n, _ := starved()
		t.Errorf("%d goroutines beyond one per connection with %d connections waiting for the budget", extra, n)
	}

	// Release most of the memory: every waiting connection is woken and
	// takes its share; the waiter goroutine ends.
	// The last ones opened are the floored ones: keep those.
	keep := 10
	for _, c := range cs[:conns-keep] {
		c.Close()
	}
	cs = cs[conns-keep:]
	eventually(t, "connections to close", func() bool { return e.f.Stats().TCPConns.Load() == int64(keep) })
	eventually(t, "the starved set to empty", func() bool {
		n, running := starved()
		return n == 0 && !running
	})
	// The guest→host direction of every remaining connection holds its
	// share again (the other direction retries when host data moves).
	eventually(t, "the woken connections to take their shares", func() bool {
		return mem.Used() >= int64(keep)*MinTCPBuffer
	})
	msg := bytes.Repeat([]byte("starved"), 10000)
	for i, c := range cs {
		go func() { _, _ = c.Write(msg) }()
		got := make([]byte, len(msg))
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("connection %d after the release: %v", i, err)
		}
	}
}
