package budget

import (
	"sync"
	"testing"
	"time"
)

func TestTakeGrowLimits(t *testing.T) {
	b := New(1000) // ceiling 750
	if !b.Grow(700) {
		t.Fatal("Grow(700) under the ceiling refused")
	}
	if b.Grow(100) {
		t.Fatal("Grow past the ceiling (800 > 750) granted")
	}
	if !b.Take(300) {
		t.Fatal("Take(300) within the limit refused: the last quarter is for minimum shares")
	}
	if b.Take(1) {
		t.Fatal("Take past the limit granted")
	}
	b.Release(500)
	if got := b.Used(); got != 500 {
		t.Fatalf("Used = %d, want 500", got)
	}
	st := b.Stats()
	if st.Limit != 1000 || st.Peak != 1000 || st.Takes != 1 || st.Grows != 1 || st.Denied != 1 || st.GrowDenied != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestShareCountsAgainstParent(t *testing.T) {
	root := New(1000)
	out := root.Share(800)
	in := root.Share(1000)
	if !out.Take(800) {
		t.Fatal("share refused its own limit")
	}
	if out.Take(1) {
		t.Fatal("share passed its limit")
	}
	// The inbound share still has the 200 the outbound one cannot take.
	if !in.Take(200) {
		t.Fatal("inbound share refused the reserve")
	}
	if in.Take(1) {
		t.Fatal("parent limit not enforced through a share")
	}
	if root.Used() != 1000 || out.Used() != 800 || in.Used() != 200 {
		t.Fatalf("used root %d out %d in %d", root.Used(), out.Used(), in.Used())
	}
	// A denial by the parent must not leave bytes in the share.
	in.Release(200)
	out.Release(700)
	if !in.Take(900) || in.Used() != 900 || root.Used() != 1000 {
		t.Fatalf("after release: in %d root %d", in.Used(), root.Used())
	}
	if out.Take(1) || out.Used() != 100 {
		t.Fatalf("share kept bytes of a parent denial: out %d", out.Used())
	}
}

func TestWaitWakesOnRelease(t *testing.T) {
	root := New(100)
	a, c := root.Share(100), root.Share(100)
	if !a.Take(100) {
		t.Fatal("take")
	}
	if c.Take(1) {
		t.Fatal("over limit granted")
	}
	ch := c.Wait()
	select {
	case <-ch:
		t.Fatal("woken before any release")
	default:
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); a.Release(50) }() // a sibling's release wakes c
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("waiter not woken by a sibling share's release")
	}
	wg.Wait()
	if !c.Take(50) {
		t.Fatal("retry after wake refused")
	}
	if st := c.Stats(); st.Waits != 1 {
		t.Fatalf("waits = %d", st.Waits)
	}
}

func TestNilIsUnlimited(t *testing.T) {
	var b *Budget
	if !b.Take(1<<40) || !b.Grow(1<<40) || b.Used() != 0 || b.Wait() != nil || b.Share(5) != nil {
		t.Fatal("nil budget is not unlimited")
	}
	b.Release(5)
}

func TestConcurrentNeverExceeds(t *testing.T) {
	b := New(1 << 20)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 10000; i++ {
				n := int64(1+i%7) << 10
				if b.Take(n) {
					if u := b.Used(); u > 1<<20 {
						t.Errorf("used %d over the limit", u)
					}
					b.Release(n)
				}
			}
		}()
	}
	wg.Wait()
	if b.Used() != 0 {
		t.Fatalf("used %d after all releases", b.Used())
	}
}

// TestNestedGuestShares: two guests' shares of one outbound share. A guest
// that fills its share is refused while the other still gets its own, and
// the outbound share's counters include both guests' requests.
func TestNestedGuestShares(t *testing.T) {
	root := New(1000)
	out := root.Share(800)
	a, b := out.Share(400), out.Share(400)
	for a.Take(100) {
	}
	if a.Used() != 400 || out.Used() != 400 {
		t.Fatalf("guest A took %d (outbound %d), want its 400", a.Used(), out.Used())
	}
	if !b.Take(400) {
		t.Fatal("guest B refused its share while A is full")
	}
	// Growth stops at each level's ceiling: B is at its limit already.
	if b.Grow(1) {
		t.Fatal("B grew past its share")
	}
	sa, sb, so := a.Stats(), b.Stats(), out.Stats()
	if sa.Takes != 4 || sa.Denied != 1 || sb.Takes != 1 || sb.GrowDenied != 1 {
		t.Fatalf("guest counters: A %+v B %+v", sa, sb)
	}
	if so.Takes != sa.Takes+sb.Takes || so.Denied != 1 || so.GrowDenied != 1 || root.Stats().Takes != so.Takes {
		t.Fatalf("outbound %+v, root %+v: want the guests' requests counted up the chain", so, root.Stats())
	}
	a.Release(400)
	b.Release(400)
	if root.Used() != 0 || out.Used() != 0 {
		t.Fatalf("released: root %d out %d", root.Used(), out.Used())
	}
}

func TestTight(t *testing.T) {
	b := New(800) // growth ceiling 600: tight above 300
	s := b.Share(400)
	if b.Tight() || s.Tight() {
		t.Fatal("an empty budget is tight")
	}
	if !b.Take(300) || b.Tight() {
		t.Fatalf("tight at 300 of 800 (ceiling 600)")
	}
	if !s.Take(1) || !b.Tight() || !s.Tight() {
		t.Fatalf("at 301 of 800: parent tight %v, share tight %v; want both (a share is tight when its parent is)", b.Tight(), s.Tight())
	}
	b.Release(300)
	if b.Tight() || s.Tight() {
		t.Fatal("still tight after the release")
	}
	if !s.Take(200) || !s.Tight() || b.Tight() {
		t.Fatalf("share at 201 of 400 (ceiling 300): share tight %v, parent tight %v; want true, false", s.Tight(), b.Tight())
	}
	var nilB *Budget
	if nilB.Tight() {
		t.Fatal("nil budget is tight")
	}
}
