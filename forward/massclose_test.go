package forward

import (
	"net"
	"net/netip"
	"os"
	"runtime/metrics"
	"strconv"
	"sync"
	"testing"
	"time"
)

// closePeak samples the process's goroutines and goroutine stack memory
// every 100 µs until stop is closed, and returns the peaks.
func closePeak(stop <-chan struct{}) (goroutines, stacks uint64) {
	s := []metrics.Sample{{Name: "/sched/goroutines:goroutines"}, {Name: "/memory/classes/heap/stacks:bytes"}}
	for {
		metrics.Read(s)
		goroutines = max(goroutines, s[0].Value.Uint64())
		stacks = max(stacks, s[1].Value.Uint64())
		select {
		case <-stop:
			return
		case <-time.After(100 * time.Microsecond):
		}
	}
}

// TestMassCloseBounded closes both ends of many idle spliced connections at
// once (the guest's and the host's, as when a client pool and its server
// go away together) and checks that the Forwarder's work on the close is
// bounded: every closing direction used to start a goroutine of its own,
// and each of them descended into gVisor's send path (a FIN or ACK per
// connection) and queued behind the link, so 10 000 closes held ~10 000
// goroutines with ~14 KiB of stack each (148 MiB at the peak, measured in
// vunet) that the Go heap kept as free memory afterwards. Woken
// directions now wait in the Forwarder's run queue for one of a bounded
// set of goroutines. VUNET_CLOSE_CONNS=N closes N.
func TestMassCloseBounded(t *testing.T) {
	n := 1000
	if s := os.Getenv("VUNET_CLOSE_CONNS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n <= 0 {
			t.Fatalf("VUNET_CLOSE_CONNS=%q", s)
		}
	}
	e := benchEnv(t)
	l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		hosts []net.Conn
		wg    sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			hosts = append(hosts, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() { _ = l.Close(); wg.Wait() })
	accepted := func() int { mu.Lock(); defer mu.Unlock(); return len(hosts) }
	dst := netip.AddrPortFrom(gw4, l.Addr().(*net.TCPAddr).AddrPort().Port())
	conns := openIdle(t, e, dst, n, accepted)
	eventually(t, "every direction parked", func() bool { return parked(e.f) == 2*n })
	_ = l.Close()
	wg.Wait()

	before := measureMem()
	stop := make(chan struct{})
	peak := make(chan [2]uint64, 1)
	go func() { g, s := closePeak(stop); peak <- [2]uint64{g, s} }()
	start := time.Now()
	var cwg sync.WaitGroup
	cwg.Add(2)
	go func() {
		defer cwg.Done()
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	go func() {
		defer cwg.Done()
		for _, c := range hosts {
			_ = c.Close()
		}
	}()
	cwg.Wait()
	eventually(t, "every splice ended", func() bool { return e.f.Stats().TCPConns.Load() == 0 })
	took := time.Since(start)
	close(stop)
	p := <-peak
	goroutines := int(p[0]) - before.goroutines
	stacks := int64(p[1]) - int64(before.stack)
	t.Logf("closed %d connections in %v: peak %d goroutines above the %d before, peak goroutine stacks %.1f MiB above %.1f MiB",
		n, took.Round(time.Millisecond), goroutines, before.goroutines, float64(stacks)/(1<<20), float64(before.stack)/(1<<20))
	// The closing goroutines (2 here) and gVisor's own (the simulated
	// guest's and vunet's timers, which fire in goroutines of their own:
	// ~250 of 1000 under the race detector, where the close is slow
	// enough for retransmission timers to fire) come on top of the
	// Forwarder's bounded runners; a goroutine per closing direction made
	// 1.5–1.8 per connection.
	if limit := e.f.run.max + 2 + n/2; goroutines > limit {
		t.Errorf("%d goroutines at the peak of closing %d connections (before: %d), want at most %d", goroutines, n, before.goroutines, limit)
	}
}
