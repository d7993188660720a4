package netstack

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestTimerClockBounded: timers that fire together, whose functions wait
// for one another (as gVisor's retransmission timers wait for the link to
// the guest), run on at most the clock's bound of goroutines, and every
// one runs, in the order they fired. Red with AfterFunc calling f in the
// timer's own goroutine (~hundreds at once).
func TestTimerClockBounded(t *testing.T) {
	c := newTimerClock()
	const n = 2000
	var (
		mu              sync.Mutex
		inside, maxSeen atomic.Int32
		wg              sync.WaitGroup
		ran             atomic.Int32
	)
	wg.Add(n)
	for range n {
		c.AfterFunc(20*time.Millisecond, func() {
			defer wg.Done()
			v := inside.Add(1)
			for m := maxSeen.Load(); v > m && !maxSeen.CompareAndSwap(m, v); m = maxSeen.Load() {
			}
			mu.Lock()
			time.Sleep(20 * time.Microsecond)
			mu.Unlock()
			inside.Add(-1)
			ran.Add(1)
		})
	}
	// Stopped before it fires: never runs.
	stopped := c.AfterFunc(time.Hour, func() { t.Error("a stopped timer ran") })
	if !stopped.Stop() {
		t.Error("Stop of a pending timer returned false")
	}
	wg.Wait()
	if ran.Load() != n {
		t.Fatalf("%d of %d timer functions ran", ran.Load(), n)
	}
	if m := int(maxSeen.Load()); m > c.q.max {
		t.Errorf("%d timer functions ran at once, want at most %d", m, c.q.max)
	}
	t.Logf("at most %d of %d timer functions at once (bound %d)", maxSeen.Load(), n, c.q.max)
	c.q.mu.Lock()
	defer c.q.mu.Unlock()
	if c.q.runners != 0 || len(c.q.fns) != 0 {
		t.Errorf("idle queue: %d runners, %d entries", c.q.runners, len(c.q.fns))
	}
}
