package ratelimit

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func newTestHandler(burst int, every time.Duration) (*Handler, *bytes.Buffer, *time.Time) {
	var buf bytes.Buffer
	h := NewHandler(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}), burst, every)
	now := time.Unix(1e9, 0)
	h.st.now = func() time.Time { return now }
	return h, &buf, &now
}

func lines(b *bytes.Buffer) []string {
	s := strings.TrimSpace(b.String())
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

func TestHandlerBoundsAFlood(t *testing.T) {
	h, buf, now := newTestHandler(5, time.Second)
	log := slog.New(h).With("service", "dhcp4")
	for i := range 1000 {
		log.Warn("dhcp4: pool exhausted, no offer", "mac", i)
	}
	got := lines(buf)
	// 5 records, then one line announcing the suppression.
	if len(got) != 6 || !strings.Contains(got[5], "log rate limit reached") || !strings.Contains(got[5], "pool exhausted") {
		t.Fatalf("%d lines:\n%s", len(got), strings.Join(got, "\n"))
	}
	if h.Suppressed() != 995 {
		t.Fatalf("Suppressed = %d, want 995", h.Suppressed())
	}
	// Another message is not held back by the flood.
	log.Info("dhcp4: lease bound")
	if l := lines(buf); len(l) != 7 || !strings.Contains(l[6], "lease bound") {
		t.Fatalf("other message held back: %q", l[len(l)-1])
	}
	// One second later one more record passes, carrying the count.
	*now = now.Add(time.Second)
	log.Warn("dhcp4: pool exhausted, no offer", "mac", "last")
	l := lines(buf)
	if len(l) != 8 || !strings.Contains(l[7], "suppressed=995") || !strings.Contains(l[7], "service=dhcp4") {
		t.Fatalf("after a second: %q", l[len(l)-1])
	}
	// The budget refills to the burst, not beyond.
	*now = now.Add(time.Hour)
	buf.Reset()
	for range 100 {
		log.Warn("dhcp4: pool exhausted, no offer")
	}
	if n := len(lines(buf)); n != 6 {
		t.Fatalf("after an hour of quiet: %d lines, want 5 + the announcement", n)
	}
}

func TestHandlerKeyBound(t *testing.T) {
	h, buf, _ := newTestHandler(1, time.Second)
	log := slog.New(h)
	for i := range maxLogKeys + 100 {
		log.Info(fmt.Sprintf("message %d", i))
	}
	if len(h.st.buckets) > maxLogKeys+1 {
		t.Fatalf("%d buckets, want at most %d", len(h.st.buckets), maxLogKeys+1)
	}
	if n := len(lines(buf)); n > maxLogKeys+2 {
		t.Fatalf("%d lines", n)
	}
}

func TestHandlerLevelsAndGroups(t *testing.T) {
	var buf bytes.Buffer
	h := NewHandler(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}), 2, time.Hour)
	log := slog.New(h)
	for range 10 {
		log.Debug("noise") // disabled: never reaches the limiter
	}
	if h.Suppressed() != 0 || buf.Len() != 0 {
		t.Fatalf("disabled level counted: %d %q", h.Suppressed(), buf.String())
	}
	g := log.WithGroup("g")
	for range 3 {
		g.Info("m")
		log.Info("m") // same message, same budget, whatever the group
	}
	if n := len(lines(&buf)); n != 3 || h.Suppressed() != 4 {
		t.Fatalf("%d lines, %d suppressed:\n%s", n, h.Suppressed(), buf.String())
	}
}
