package ratelimit

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Log rate limits, per distinct message: LogBurst records at once, then one
// every LogEvery. A message a guest can trigger once per packet (a DHCP
// DISCOVER with the pool exhausted, a TFTP request, a denied flow) then
// costs at most LogBurst lines plus one a second, however fast it comes;
// rare messages are never held back.
const (
	LogBurst = 20
	LogEvery = time.Second
)

// maxLogKeys bounds the per-message state. Messages are normally constants
// in the code, so the bound is never reached; beyond it, all further
// messages of a level share one budget rather than grow the map.
const maxLogKeys = 4096

// SuppressedKey is the attribute that tells how many records of the same
// message were held back since the last one logged.
const SuppressedKey = "suppressed"

// Handler is a slog.Handler that rate-limits records per message (level and
// text; attributes are not part of the key, so one message about many
// peers shares one budget). It is the one mechanism that bounds every log
// line a guest or a remote peer can trigger: the appliance wraps its root
// logger with it, so every layer is covered without a limiter of its own.
//
// When a message first runs out of budget, one line says so; further
// records are counted (Suppressed) and dropped, and the next record of that
// message that is logged carries SuppressedKey with the count.
type Handler struct {
	next slog.Handler
	st   *logState
}

type logKey struct {
	level slog.Level
	msg   string
}

type bucket struct {
	tokens     float64
	last       time.Time
	suppressed uint64 // since the last record logged
	announced  bool   // the "suppressing" line was written for this run
}

type logState struct {
	burst float64
	every time.Duration
	now   func() time.Time
	stats Stats

	mu      sync.Mutex
	buckets map[logKey]*bucket
}

// NewHandler wraps next with a rate limit of burst records, then one every
// every, per message.
func NewHandler(next slog.Handler, burst int, every time.Duration) *Handler {
	return &Handler{next: next, st: &logState{
		burst: float64(max(burst, 1)), every: max(every, time.Nanosecond), now: time.Now,
		buckets: make(map[logKey]*bucket),
	}}
}

// Stats are the handler's counters, shared by every handler derived from it
// (WithAttrs, WithGroup), declared for the metrics registry
// (internal/metrics).
type Stats struct {
	Suppressed atomic.Uint64 `metric:"log_suppressed_total" help:"Log records held back by the per-message rate limit."`
}

// Stats returns the live counters.
func (h *Handler) Stats() *Stats { return &h.st.stats }

// Suppressed returns how many records were dropped so far.
func (h *Handler) Suppressed() uint64 { return h.st.stats.Suppressed.Load() }

// Enabled implements slog.Handler.
func (h *Handler) Enabled(ctx context.Context, l slog.Level) bool { return h.next.Enabled(ctx, l) }

// WithAttrs implements slog.Handler; the result shares the budgets.
func (h *Handler) WithAttrs(as []slog.Attr) slog.Handler {
	return &Handler{next: h.next.WithAttrs(as), st: h.st}
}

// WithGroup implements slog.Handler; the result shares the budgets.
func (h *Handler) WithGroup(name string) slog.Handler {
	return &Handler{next: h.next.WithGroup(name), st: h.st}
}

// Handle implements slog.Handler.
func (h *Handler) Handle(ctx context.Context, r slog.Record) error {
	allow, held, announce := h.st.take(logKey{r.Level, r.Message})
	if announce {
		n := slog.NewRecord(r.Time, r.Level, "log rate limit reached: further lines with this message are suppressed and counted", r.PC)
		n.AddAttrs(slog.String("message", r.Message), slog.Int("burst", int(h.st.burst)), slog.Duration("then_one_per", h.st.every))
		return h.next.Handle(ctx, n)
	}
	if !allow {
		return nil
	}
	if held > 0 {
		r = r.Clone()
		r.AddAttrs(slog.Uint64(SuppressedKey, held))
	}
	return h.next.Handle(ctx, r)
}

// take spends a token of k's budget. It returns whether the record may be
// logged and, if so, how many were held back before it; or that the record
// is the first one over budget, to be replaced by the announcement.
func (s *logState) take(k logKey) (allow bool, held uint64, announce bool) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.buckets[k]
	if b == nil {
		if len(s.buckets) >= maxLogKeys {
			k.msg = "" // the shared overflow budget of this level
			b = s.buckets[k]
		}
		if b == nil {
			b = &bucket{tokens: s.burst, last: now}
			s.buckets[k] = b
		}
	}
	if el := now.Sub(b.last); el > 0 {
		b.tokens = min(s.burst, b.tokens+float64(el)/float64(s.every))
	}
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		held, b.suppressed, b.announced = b.suppressed, 0, false
		return true, held, false
	}
	b.suppressed++
	s.stats.Suppressed.Add(1)
	if !b.announced {
		b.announced = true
		return false, 0, true
	}
	return false, 0, false
}
