// Package ratelimit bounds how often something happens per interval; it
// keeps hostile input from flooding the log.
package ratelimit

import (
	"sync"
	"time"
)

// Limiter allows a bounded number of events per interval. It is safe for
// concurrent use; the zero value allows nothing.
type Limiter struct {
	mu       sync.Mutex
	max      int
	interval time.Duration
	start    time.Time
	n        int
	dropped  uint64
}

// New allows max events per interval.
func New(max int, interval time.Duration) *Limiter {
	return &Limiter{max: max, interval: interval}
}

// Allow reports whether one more event may happen now.
func (r *Limiter) Allow() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if now.Sub(r.start) >= r.interval {
		r.start, r.n = now, 0
	}
	r.n++
	if r.n > r.max {
		r.dropped++
		return false
	}
	return true
}

// Dropped returns how many events were refused so far.
func (r *Limiter) Dropped() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.dropped
}
