package netstack

import (
	"runtime"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// timerClock is gVisor's standard clock, except that its timers run their
// functions on a bounded set of goroutines instead of one goroutine each.
//
// gVisor's TCP arms a retransmission timer per connection whose segments
// wait for an acknowledgement, and calls it in a goroutine of its own when
// it fires (time.AfterFunc). When 10 000 connections closed at once, the
// guest's full RX queue dropped some 18 000 of their FINs and ACKs
// (rx_backlog_full), and the retransmission timers of thousands of them
// fired within the same few milliseconds: each goroutine went down
// gVisor's send path and waited for the link, about 2 000 at once with
// 32 MiB of stacks, which the Go heap then kept. The timer goroutine the
// runtime still starts per firing now only queues the function and ends;
// at most runners of them run at a time, in the order they fired. A
// function may run later than it would have (behind those queued before
// it), as if its goroutine had waited to be scheduled, which gVisor's
// timers already allow for (a fired timer's function checks whether it
// is still due).
type timerClock struct {
	tcpip.Clock // Now and NowMonotonic
	q           *funcQueue
}

func newTimerClock() *timerClock {
	return &timerClock{Clock: tcpip.NewStdClock(), q: newFuncQueue(max(16, 4*runtime.GOMAXPROCS(0)))}
}

// AfterFunc implements tcpip.Clock.
func (c *timerClock) AfterFunc(d time.Duration, f func()) tcpip.Timer {
	return c.Clock.AfterFunc(d, func() { c.q.push(f) })
}

// funcQueue runs functions in FIFO order on at most max goroutines, which
// exist only while it has work.
type funcQueue struct {
	max int

	mu      sync.Mutex
	fns     []func() // fns[head:] wait
	head    int
	runners int
}

func newFuncQueue(max int) *funcQueue { return &funcQueue{max: max} }

func (q *funcQueue) push(f func()) {
	q.mu.Lock()
	q.fns = append(q.fns, f)
	start := q.runners < q.max
	if start {
		q.runners++
	}
	q.mu.Unlock()
	if start {
		go q.run()
	}
}

func (q *funcQueue) run() {
	for {
		q.mu.Lock()
		if q.head == len(q.fns) {
			// Empty: give back a queue that a burst grew.
			if cap(q.fns) > 1024 {
				q.fns = nil
			} else {
				clear(q.fns)
				q.fns = q.fns[:0]
			}
			q.head = 0
			q.runners--
			q.mu.Unlock()
			return
		}
		f := q.fns[q.head]
		q.fns[q.head] = nil
		q.head++
		q.mu.Unlock()
		f()
	}
}
