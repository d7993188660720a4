package forward

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// runQueue runs woken splice directions on a bounded set of goroutines.
//
// A parked direction that gets work (a guest or host event, a timer, an
// abort) used to start a goroutine of its own. That is one goroutine per
// busy direction, and when many connections get work at once it is one per
// connection: both ends of 10 000 idle connections closing together woke
// 20 000 directions within a few hundred milliseconds, each of which sent
// a FIN or an ACK down gVisor's send path and waited there for the link to
// the guest, so ~10 500 goroutines held ~14 KiB of stack each (148 MiB at
// the peak). The Go runtime keeps such memory as free heap (its heap goal
// was far above it), so vunet's RSS stayed at 235 MiB after the close, more
// than with every connection open (98 MiB).
//
// Now a woken direction is appended to this queue (a link in the
// direction itself: no allocation) and run by one of at most max
// runners, goroutines that exist only while the queue has work. A
// direction's work never blocks (it parks instead of waiting), so a
// bounded set keeps up; a direction that keeps finding work yields to the
// queue after runSlice when others wait, so a bulk transfer cannot hold a
// runner from the rest.
type runQueue struct {
	f   *Forwarder
	max int

	mu         sync.Mutex
	head, tail *direction
	runners    int
	// waiting counts queued directions, read without the lock by a
	// running direction deciding whether to yield.
	waiting atomic.Int32
}

// runSlice is how long a direction runs while others wait before it goes
// to the back of the queue.
const runSlice = 2 * time.Millisecond

// runnersFor is the runner bound: a few per processor, since a run also
// makes system calls (socket reads and writes, epoll_ctl) that may leave
// the processor to another runner, and never below 16, so that a few bulk
// transfers share the queue with other connections' short runs without
// waiting for a slice to end.
func runnersFor(procs int) int { return max(16, 4*procs) }

func newRunQueue(f *Forwarder) *runQueue {
	return &runQueue{f: f, max: runnersFor(runtime.GOMAXPROCS(0))}
}

// push queues d, which its caller has just moved to dirRunning (so d is
// queued at most once), and starts a runner if there are fewer than max.
// The caller's splice holds a count of the Forwarder's WaitGroup (d is
// not done), so a new runner may add its own.
func (q *runQueue) push(d *direction) {
	q.mu.Lock()
	d.next = nil
	if q.tail == nil {
		q.head = d
	} else {
		q.tail.next = d
	}
	q.tail = d
	q.waiting.Add(1)
	start := q.runners < q.max
	if start {
		q.runners++
	}
	q.mu.Unlock()
	if start {
		q.f.wg.Add(1)
		go q.run()
	}
}

// run takes directions off the queue until it is empty.
func (q *runQueue) run() {
	defer q.f.wg.Done()
	for {
		q.mu.Lock()
		d := q.head
		if d == nil {
			q.runners--
			q.mu.Unlock()
			return
		}
		q.head = d.next
		if q.head == nil {
			q.tail = nil
		}
		d.next = nil
		q.waiting.Add(-1)
		q.mu.Unlock()
		d.run()
	}
}

// yield reports whether a direction that started its run at start should
// give its runner to a queued one: it has run for runSlice and another
// waits. The caller then pushes itself and returns.
func (q *runQueue) yield(start time.Time) bool {
	return q.waiting.Load() > 0 && time.Since(start) >= runSlice
}
