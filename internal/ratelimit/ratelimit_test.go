package ratelimit

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	l := New(3, time.Hour)
	n := 0
	for i := 0; i < 10; i++ {
		if l.Allow() {
			n++
		}
	}
	if n != 3 || l.Dropped() != 7 {
		t.Fatalf("allowed %d dropped %d", n, l.Dropped())
	}
	l = New(1, time.Millisecond)
	l.Allow()
	time.Sleep(2 * time.Millisecond)
	if !l.Allow() {
		t.Fatal("new interval did not allow")
	}
}
