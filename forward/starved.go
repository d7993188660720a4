package forward

import "sync"

// starvedSet holds the splices whose guest→host direction waits for the
// memory budget to release room for its receive buffer. One goroutine per
// Forwarder, running only while the set is not empty, waits on the budget
// for all of them, so a connection starved by a full budget costs a map
// entry instead of a goroutine of its own. (10 000 idle connections through
// the default budget floored about 3 900 of them, and each held a parked
// goroutine with its stack: ~30 MiB of vunet's ~104 MiB.)
//
// Every entry keeps the channel its splice got from budget.Wait before it
// retried its share: the root budget replaces its wake channel only after
// closing it, so the channels still open are all the current one, and one
// that closed since the splice registered is seen here; no release between
// a splice's retry and the goroutine's wait is lost.
type starvedSet struct {
	mu      sync.Mutex
	waiting map[*tcpSplice]<-chan struct{}
	running bool
}

// add registers c, whose share was refused after it took ch from
// budget.Wait, and starts the waiting goroutine if it is not running. It
// reports false when the Forwarder is closed (no goroutine may start then).
func (f *Forwarder) starve(c *tcpSplice, ch <-chan struct{}) bool {
	s := &f.starved
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.waiting == nil {
		s.waiting = make(map[*tcpSplice]<-chan struct{})
	}
	s.waiting[c] = ch
	if s.running {
		return true
	}
	if !f.enter() { // counts the goroutine in f.wg unless closed
		delete(s.waiting, c)
		return false
	}
	s.running = true
	go s.run(f)
	return true
}

// unstarve forgets c (its splice ended).
func (f *Forwarder) unstarve(c *tcpSplice) {
	s := &f.starved
	s.mu.Lock()
	delete(s.waiting, c)
	s.mu.Unlock()
}

func (s *starvedSet) run(f *Forwarder) {
	defer f.wg.Done()
	var woken []*tcpSplice
	for {
		var cur <-chan struct{}
		woken = woken[:0]
		s.mu.Lock()
		for c, ch := range s.waiting {
			select {
			case <-ch:
				woken = append(woken, c)
				delete(s.waiting, c)
			default:
				cur = ch
			}
		}
		if len(woken) == 0 && cur == nil {
			s.running = false
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
		// Outside the lock: wake queues the direction to run, and it
		// may register again at once.
		for _, c := range woken {
			c.budgetWait.Store(false)
			c.wake(&c.th, dirParkedGuest)
		}
		if cur == nil {
			continue
		}
		select {
		case <-cur:
		case <-f.ctx.Done():
			s.mu.Lock()
			for c := range s.waiting {
				c.budgetWait.Store(false)
				delete(s.waiting, c)
			}
			s.running = false
			s.mu.Unlock()
			return
		}
	}
}
