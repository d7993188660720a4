// Package budget accounts the bytes a guest can make vunet hold: TCP send
// and receive buffers inside gVisor, UDP flow buffers, frames waiting for
// guest RX buffers. One Budget is created by the appliance and handed down
// explicitly; every layer that holds guest-driven memory takes from it
// before holding and gives back when done.
//
// Two kinds of request exist. Take is for a flow's minimum share (the
// small amount every connection needs to move data at all) and succeeds
// while the total stays within the limit. Grow is for anything above a
// flow's minimum (larger windows for fast flows) and succeeds only while the
// total stays under the growth ceiling, three quarters of the limit: the
// last quarter is kept for minimum shares, so a guest that pins memory on
// many connections cannot starve a fresh one.
//
// A Budget may be split with Share: a share has its own limit but its bytes
// also count against the parent, so a share for inbound port forwards can
// be kept out of reach of outbound traffic. Shares nest: each guest's flows
// take from the guest's share of the outbound share, so one guest cannot
// hold the memory another needs.
//
// A nil *Budget is unlimited and keeps no counts, for callers (tests, tools)
// that do not care.
package budget

import (
	"sync"
	"sync/atomic"
)

// Budget is a byte budget. It is safe for concurrent use.
type Budget struct {
	parent  *Budget
	limit   int64
	ceiling int64 // growth ceiling: Grow keeps used at or below it

	c Counters

	waiting atomic.Bool // someone holds wake; the next release closes it
	mu      sync.Mutex
	wake    chan struct{} // closed by a release while waiting is set
}

// New returns a budget of limit bytes (at least 1).
func New(limit int64) *Budget {
	limit = max(limit, 1)
	return newBudget(nil, limit)
}

func newBudget(parent *Budget, limit int64) *Budget {
	b := &Budget{parent: parent, limit: limit, ceiling: limit - limit/4}
	b.c.Limit = func() int64 { return limit }
	return b
}

// Share returns a budget of at most limit bytes (clamped to b's limit)
// whose usage also counts against b. Nil b gives nil.
func (b *Budget) Share(limit int64) *Budget {
	if b == nil {
		return nil
	}
	return newBudget(b, min(max(limit, 1), b.limit))
}

// Limit returns the budget's limit in bytes (0 for nil: unlimited).
func (b *Budget) Limit() int64 {
	if b == nil {
		return 0
	}
	return b.limit
}

// Used returns the bytes currently accounted.
func (b *Budget) Used() int64 {
	if b == nil {
		return 0
	}
	return b.c.Used.Load()
}

// Tight reports whether b, or a budget b is a share of, has used more
// than half of its growth ceiling. Memory held on behalf of idle flows is
// then worth taking back even at a cost to them; below that it is left
// where it is, since giving it back can cost the flow more than it frees
// (see the forward package's receive buffers). Nil b is never tight.
func (b *Budget) Tight() bool {
	for x := b; x != nil; x = x.parent {
		if x.c.Used.Load() > x.ceiling/2 {
			return true
		}
	}
	return false
}

// Take accounts n bytes of a minimum share; it fails (and counts a denial)
// if b or any parent would exceed its limit.
func (b *Budget) Take(n int64) bool {
	if b == nil || n <= 0 {
		return true
	}
	if !b.add(n, false) {
		b.count(func(c *Counters) *atomic.Uint64 { return &c.Denied })
		return false
	}
	b.count(func(c *Counters) *atomic.Uint64 { return &c.Takes })
	return true
}

// Grow accounts n bytes above a minimum share; it fails (and counts a
// denial) if b or any parent would pass its growth ceiling.
func (b *Budget) Grow(n int64) bool {
	if b == nil || n <= 0 {
		return true
	}
	if !b.add(n, true) {
		b.count(func(c *Counters) *atomic.Uint64 { return &c.GrowDenied })
		return false
	}
	b.count(func(c *Counters) *atomic.Uint64 { return &c.Grows })
	return true
}

// count adds one to a request counter of b and of every budget b is a
// share of: a budget's counters include the requests made through its
// shares, so the outbound share still counts its flows' requests when
// they go through a guest's share of it.
func (b *Budget) count(field func(*Counters) *atomic.Uint64) {
	for x := b; x != nil; x = x.parent {
		field(&x.c).Add(1)
	}
}

// add reserves n in b and its parents, or in none of them.
func (b *Budget) add(n int64, growth bool) bool {
	bound := b.limit
	if growth {
		bound = b.ceiling
	}
	for {
		u := b.c.Used.Load()
		if u+n > bound {
			return false
		}
		if b.c.Used.CompareAndSwap(u, u+n) {
			if b.parent != nil && !b.parent.add(n, growth) {
				b.c.Used.Add(-n)
				b.wakeWaiters()
				return false
			}
			b.notePeak(u + n)
			return true
		}
	}
}

func (b *Budget) notePeak(u int64) {
	for {
		p := b.c.Peak.Load()
		if u <= p || b.c.Peak.CompareAndSwap(p, u) {
			return
		}
	}
}

// Release gives back n bytes taken with Take or Grow and wakes anyone
// waiting for memory.
func (b *Budget) Release(n int64) {
	if b == nil || n <= 0 {
		return
	}
	for x := b; x != nil; x = x.parent {
		x.c.Used.Add(-n)
		x.wakeWaiters()
	}
}

// Wait returns a channel that is closed at the next Release in b (or a
// share of b). A caller denied memory calls Wait, retries its request once
// (a release may have come between the denial and Wait), and only then
// selects on the channel next to its other events. Releases cost an atomic
// load unless someone waits. Nil b returns nil (a channel that never fires:
// nothing is ever denied).
func (b *Budget) Wait() <-chan struct{} {
	if b == nil {
		return nil
	}
	b.count(func(c *Counters) *atomic.Uint64 { return &c.Waits })
	// Every release passes through the root, and a share may have been
	// denied by its parent: wait there.
	for b.parent != nil {
		b = b.parent
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.wake == nil {
		b.wake = make(chan struct{})
	}
	b.waiting.Store(true)
	return b.wake
}

func (b *Budget) wakeWaiters() {
	// The unlocked peek keeps Release cheap on the data path; a waiter
	// that registers after the peek retries its request before blocking
	// (see Wait), so no wakeup is lost.
	if !b.waiting.Load() {
		return
	}
	b.mu.Lock()
	if b.waiting.Load() {
		close(b.wake)
		b.wake = nil
		b.waiting.Store(false)
	}
	b.mu.Unlock()
}

// Counters are a budget's live counters, declared for the metrics registry
// (internal/metrics); the appliance registers each budget and share with a
// "share" label (and a guest's shares with "guest" too). The request
// counters (Takes ... Waits) of a budget include its shares' requests.
type Counters struct {
	// Limit is set by New and Share.
	Limit func() int64 `metric:"memory_budget_bytes" kind:"gauge" help:"The memory budget (--max-memory) and its shares, in bytes."`
	Used  atomic.Int64 `metric:"memory_used_bytes" kind:"gauge" help:"Bytes accounted in the memory budget now."`
	Peak  atomic.Int64 `metric:"memory_peak_bytes" kind:"gauge" help:"Most bytes ever accounted in the memory budget at once."`
	// Requests granted: minimum shares (Take) and growth (Grow).
	Takes atomic.Uint64 `metric:"memory_requests_total{kind=minimum}" help:"Memory requests granted by the budget, by kind (minimum share, growth)."`
	Grows atomic.Uint64 `metric:"memory_requests_total{kind=growth}"`
	// Requests refused: a TCP direction started at gVisor's smallest
	// window, a UDP flow or a queued frame was dropped (minimum); a flow
	// stayed at its size (growth).
	Denied     atomic.Uint64 `metric:"memory_denials_total{kind=minimum}" help:"Memory requests refused by the budget, by kind (minimum share, growth)."`
	GrowDenied atomic.Uint64 `metric:"memory_denials_total{kind=growth}"`
	// Waits counts pauses until memory was released.
	Waits atomic.Uint64 `metric:"memory_waits_total" help:"Pauses until memory in the budget was released."`
}

// Counters returns the live counters (nil for nil).
func (b *Budget) Counters() *Counters {
	if b == nil {
		return nil
	}
	return &b.c
}

// Stats is a snapshot of a budget's counters.
type Stats struct {
	// Limit is the budget in bytes (gauge).
	Limit int64
	// Used is the bytes accounted now (gauge).
	Used int64
	// Peak is the most bytes ever accounted at once (gauge).
	Peak int64
	// Takes and Grows count granted requests for minimum shares and for
	// growth.
	Takes, Grows uint64
	// Denied counts refused minimum shares: a flow had to wait (TCP: its
	// window closed, its reads paused) or was not created (UDP).
	Denied uint64
	// GrowDenied counts refused growth: a flow stayed at its current size.
	GrowDenied uint64
	// Waits counts the times a flow paused until memory was released.
	Waits uint64
}

// Stats returns a snapshot (zero for nil).
func (b *Budget) Stats() Stats {
	if b == nil {
		return Stats{}
	}
	return Stats{
		Limit: b.limit, Used: b.c.Used.Load(), Peak: b.c.Peak.Load(),
		Takes: b.c.Takes.Load(), Grows: b.c.Grows.Load(),
		Denied: b.c.Denied.Load(), GrowDenied: b.c.GrowDenied.Load(), Waits: b.c.Waits.Load(),
	}
}
