package forward

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/netstack"
)

// Per-direction gVisor buffer sizes of a splice. The gVisor send buffer
// (host → guest) holds what the guest has not acknowledged; the receive
// buffer (guest → host) what the host socket has not taken. Both start at
// MinTCPBuffer, which every connection takes from the budget as its
// minimum share, and grow (with Budget.Grow) only while data moves fast, so a stalled connection holds at most MinTCPBuffer per
// direction and everything else waits in the kernel's socket buffers.
const (
	// MinTCPBuffer is a connection's minimum share per direction, and the
	// size gVisor starts endpoints with (netstack's range default, which
	// also bounds the window in the SYN-ACK, before the splice has set its
	// sizes).
	MinTCPBuffer = netstack.InitialTCPBuffer
	// MaxTCPBuffer is the largest a direction grows to: netstack's range
	// maximum, from which gVisor derives the handshake's window scale.
	MaxTCPBuffer = netstack.DefaultTCPBuffer
	// floorTCPBuffer is gVisor's smallest buffer, used (unaccounted, part
	// of the fixed per-connection overhead) by a connection that got no
	// share at all: its windows are tiny until memory is released.
	floorTCPBuffer = 4 << 10
	// hostChunk bounds the bytes moved from the host socket per gVisor
	// write; gVisor splits them into 64 KiB views.
	hostChunk = 256 << 10
	// growWithin: a direction grows only if its peer consumed (send) or
	// sent (receive) half its buffer within this time. A slow or stalled
	// peer never grows.
	growWithin = 250 * time.Millisecond
	// shrinkAfter: a direction that moved nothing for this long goes
	// back to MinTCPBuffer and releases the rest.
	shrinkAfter = 2 * time.Second
	// roomPoll: how soon a direction parked for room in a full send
	// buffer looks for room itself (tcpSplice.roomTimer); below the host
	// kernel's smallest loss-probe timeout (2 ms plus twice the smoothed
	// RTT).
	roomPoll = time.Millisecond
	// rxShareNum/rxShareDen: the part of a guest link's receive capacity
	// (Options.GuestRXCapacity) its bulk senders share; the rest is left
	// for everything else queued toward the guest (ACKs of its uploads,
	// connections that have not grown, in-stack services).
	rxShareNum, rxShareDen = 7, 8
)

// Host → guest, what a connection may have queued toward the guest is
// bounded by the guest link, as Linux's TCP Small Queues bound a socket's
// bytes below it and passt reads from a socket only what fits in the
// guest's free buffers. gVisor's sender emits up to its congestion window
// whatever the guest's ring holds; the link backlogs the frames the ring
// has no buffers for, and drops beyond its backlog (endpoint:
// link_drops_total{reason="rx_backlog_full"}), every drop a retransmission.
// gVisor's send buffer holds the unacknowledged bytes and the unsent ones,
// so a send buffer no larger than the backlog's payload bytes keeps the
// connection's in-flight frames within the backlog: the frames the guest
// has taken or has buffers for only add room. The share is divided
// among the guest's bulk senders (sendLimit: connections that filled
// their send buffer and had half of it consumed within growWithin); one
// that finds its buffer full above a new, lower fair share gives the
// excess back (sendFull). The guest's sendBytes sums the send buffers of
// all its connections (the bytes each may have queued: a lowered buffer
// counts its old size until gVisor has room below the new one), and a
// buffer grows only into what that sum leaves of the share, so
// connections that start or join at once cannot overrun the backlog
// together while the others have not given back yet. On the testpmd bridge (no offloads,
// MTU 1500: 1024 frames of 1428 bytes, 1.25 MiB for one sender, 312 KiB
// each for four) this took the drops of a 5-s download from hundreds or
// thousands to 0 (docs/performance.md). With TSO, or a large MTU, a
// backlogged packet carries up to 64 KiB and the limit is far above
// MaxTCPBuffer: it vanishes.

// Keepalive settings for both halves of a splice: a guest or host peer that
// vanishes without FIN/RST is detected after about two minutes of silence.
const (
	keepIdle     = 60 * time.Second
	keepInterval = 15 * time.Second
	keepCount    = 4
)

func hostKeepAlive() net.KeepAliveConfig {
	return net.KeepAliveConfig{Enable: true, Idle: keepIdle, Interval: keepInterval, Count: keepCount}
}

// setGuestKeepalive enables TCP keepalive on a gVisor endpoint. Errors are
// ignored: keepalive is an optimisation for reaping dead peers, and gVisor
// TCP endpoints support all three options.
func setGuestKeepalive(ep tcpip.Endpoint) {
	ep.SocketOptions().SetKeepAlive(true)
	idle := tcpip.KeepaliveIdleOption(keepIdle)
	_ = ep.SetSockOpt(&idle)
	intvl := tcpip.KeepaliveIntervalOption(keepInterval)
	_ = ep.SetSockOpt(&intvl)
	_ = ep.SetSockOptInt(tcpip.KeepaliveCountOption, keepCount)
}

// tcpSplice joins a guest TCP endpoint (inside gVisor) to a host socket.
//
// Neither direction owns a copy buffer. Host → guest, the splice lets
// gVisor read, straight from the host socket into its send queue, at most
// the bytes the socket holds and the send buffer has room for; guest →
// host, it lets gVisor hand its queued segments straight to a
// non-blocking write(2), consuming only what the kernel took.
//
// Nor does an idle connection hold a goroutine. Each direction runs only
// while it has work; when it would wait (nothing to read, or no room to
// write) it parks: it records what it waits for and returns. Guest-side
// events (gVisor's waiter queue, one callback entry per connection) and
// host-side events (the Forwarder's hostPoller) queue a parked direction
// in the Forwarder's run queue, whose bounded set of goroutines runs it
// (runqueue.go), so many connections getting work at once (closing
// together, say) do not start a goroutine each. A direction is in
// exactly one state at a time (running, parked on the guest, parked on
// the host, done), changed only by compare-and-swap, so it never runs
// twice at once and a wakeup that races with parking is never lost: the
// parking goroutine checks readiness again after publishing its state.
type tcpSplice struct {
	f     *Forwarder
	gep   tcpip.Endpoint
	wq    *waiter.Queue
	host  net.Conn
	rc    syscall.RawConn
	mem   *budget.Budget // the share this connection draws from
	desc  string         // for logs
	owner *portForward   // inbound forward it came through, or nil
	// restoredRcv: the receive buffer netstack.RestoreTCP gave a moved
	// connection's endpoint, room for the window the guest holds; the
	// receive direction starts with it (budget permitting) instead of
	// MinTCPBuffer, which would drop most of the guest's first flight.
	restoredRcv int64
	// g is the guest an outbound connection belongs to (its send buffer
	// is bounded by the guest's link, sendLimit), or nil.
	g *guestLimits
	// sender: counted in g.senders (a bulk sender, see sendLimit);
	// counted: this connection's part of g.sendBytes. Owned by tg, and by
	// finish once tg is done.
	sender  bool
	counted int64
	// onEnd runs once when the splice has ended (the caller's slot
	// accounting).
	onEnd func()

	// Budget held by each direction; written by that direction's
	// goroutine, released when both have ended.
	snd, rcv window

	tg, th direction // host → guest, guest → host
	live   atomic.Int32
	entry  waiter.Entry // guest events; the splice is its listener

	// host → guest state, owned by whoever runs tg.
	r       hostReader
	res     pushResult
	pushFn  func(uintptr) bool
	fullAt  time.Time // start of the send buffer's growth interval (see sendFull)
	noRoom  bool      // tg parked for room in the send buffer
	lastSnd time.Time // data last moved host → guest
	// sinceFull: bytes moved since fullAt. The send buffer grows when
	// the guest consumed half of it within growWithin of it filling up.
	sinceFull int64
	// progress: this run of tg moved data (so it polls for room when it
	// parks, see roomTimer); a run that yielded to the run queue
	// (tgYielded) goes on with it.
	progress  bool
	tgYielded bool
	byPoll    bool // this run of tg was started by roomTimer
	// roomTimer wakes tg, parked for room in a full send buffer, before
	// gVisor would: gVisor reports room only once half the buffer is
	// free (2 MiB of a grown one: several milliseconds of a TCG guest's
	// ACKs), and while the host socket is not read the kernel holds back
	// its ACKs to the host's sender (its receive window is shrinking),
	// whose tail loss probe (2·SRTT + 2 ms) fires first: a spurious
	// retransmission on the loopback per stall. Looking every roomPoll
	// reads the socket in smaller, more frequent pieces. A run that
	// finds no room does not poll again (a stalled guest costs no
	// wakeups); gVisor's event takes over.
	roomTimer *time.Timer

	// guest → host state, owned by whoever runs th.
	w       hostWriter
	rcount  int // bytes the last gVisor read moved
	rterr   tcpip.Error
	pullFn  func(uintptr) bool
	since   time.Time // start of the current growth interval
	moved   int64     // bytes moved since then
	waited  bool      // th parked for room in the host socket
	lastRcv time.Time // data last moved guest → host
	// budgetWait: the splice is in the Forwarder's starved set, waiting
	// for the budget to release memory for its floored receive direction.
	budgetWait atomic.Bool

	// Host socket registration in the poller, under pmu.
	pmu      sync.Mutex
	pid      int32  // id in the poller's events
	interest uint32 // EPOLLIN (tg parked) | EPOLLOUT (th parked)
	polled   bool   // the socket is in the epoll set
	unpolled bool   // removed for good (abort, end): never park on the host again
	ctlOp    int    // for ctlFn
	ctlErr   error
	ctlFn    func(uintptr)

	abortOnce sync.Once
	stopOnce  sync.Once
	stop      chan struct{} // closed by abort (and at the end)

	// A migration takes the connection over (detach, tcpmove.go): both
	// directions stop, and the end leaves both sides open for the taker.
	detaching atomic.Bool
	aborted   atomic.Bool
	detached  chan struct{} // closed when a detaching splice has ended
}

// Direction states.
const (
	dirRunning     int32 = iota // a goroutine owns the direction
	dirParkedGuest              // waits for a gVisor event
	dirParkedHost               // waits for the host socket (hostPoller)
	dirDone
)

// direction is the scheduling state of one direction of a splice.
type direction struct {
	state atomic.Int32
	timer *time.Timer // wakes it to shrink a grown buffer; owned by the running goroutine
	c     *tcpSplice
	next  *direction // in the Forwarder's run queue, under its lock
}

// run runs the direction until it parks, ends or yields.
func (d *direction) run() {
	if d == &d.c.tg {
		d.c.toGuest()
	} else {
		d.c.toHost()
	}
}

// window is one direction's gVisor buffer: its size and the bytes of it
// accounted in the budget.
type window struct {
	size    int64
	charged int64
	// pending: the size was lowered while more than the new size was
	// queued; the excess stays charged until gVisor reports room.
	pending bool
}

func (f *Forwarder) newSplice(gep tcpip.Endpoint, wq *waiter.Queue, host net.Conn, mem *budget.Budget, desc string) (*tcpSplice, error) {
	sc, ok := host.(syscall.Conn)
	if !ok {
		return nil, errors.New("host connection has no file descriptor")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	c := &tcpSplice{f: f, gep: gep, wq: wq, host: host, rc: rc, mem: mem, desc: desc,
		stop: make(chan struct{}), detached: make(chan struct{})}
	c.pushFn, c.pullFn, c.ctlFn = c.pushFD, c.pullFD, c.ctlFD
	c.tg.c, c.th.c = c, c
	return c, nil
}

// run starts both directions and returns: host → guest first runs in the
// caller's goroutine until it parks, guest → host in the Forwarder's run
// queue. The splice holds one count of the Forwarder's WaitGroup until both
// directions have ended; then it closes both sides and calls onEnd.
func (c *tcpSplice) run() {
	f := c.f
	if !f.addConn(c) {
		c.abort()
		c.closeBoth()
		c.ended()
		return
	}
	if !f.enter() {
		c.abort()
		c.closeBoth()
		f.removeConn(c)
		c.ended()
		return
	}
	so := c.gep.SocketOptions()
	c.setShare(&c.snd, so.SetSendBufferSize, 0)
	c.recount(c.snd.size)
	c.setShare(&c.rcv, so.SetReceiveBufferSize, c.restoredRcv)
	if c.rcv.size > MinTCPBuffer {
		c.lastRcv = time.Now() // not shrunk before the guest had its turn
	}
	f.poll.add(c)
	c.entry.Init(c, waiter.ReadableEvents|waiter.WritableEvents|waiter.EventHUp|waiter.EventErr)
	c.wq.EventRegister(&c.entry)
	c.live.Store(2)
	f.run.push(&c.th) // th starts in dirRunning: the queue owns it
	c.toGuest()
}

// ended runs the caller's end-of-connection accounting once.
func (c *tcpSplice) ended() {
	if c.onEnd != nil {
		c.onEnd()
		c.onEnd = nil
	}
}

// finish runs when both directions are done.
func (c *tcpSplice) finish() {
	f := c.f
	for _, d := range []*direction{&c.tg, &c.th} {
		if d.timer != nil {
			d.timer.Stop()
		}
	}
	if c.roomTimer != nil {
		c.roomTimer.Stop()
	}
	c.stopOnce.Do(func() { close(c.stop) })
	c.wq.EventUnregister(&c.entry)
	c.unpoll()
	f.poll.remove(c)
	f.unstarve(c)
	c.setSender(false)
	c.recount(0)
	detached := c.detaching.Load()
	if !detached {
		c.closeBoth()
	}
	f.removeConn(c)
	c.releaseAll()
	c.ended()
	if detached {
		close(c.detached)
	} else {
		f.log.Debug("tcp connection closed", "conn", c.desc)
	}
	f.wg.Done()
}

// NotifyEvent implements waiter.EventListener for the guest endpoint. It
// runs inside gVisor with the waiter queue locked, so it only wakes.
func (c *tcpSplice) NotifyEvent(m waiter.EventMask) {
	if m&(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) != 0 {
		c.wake(&c.th, dirParkedGuest)
	}
	if m&(waiter.WritableEvents|waiter.EventHUp|waiter.EventErr) != 0 {
		c.wake(&c.tg, dirParkedGuest)
	}
}

// hostReady is called by the poller with the epoll events of the host
// socket. The registration is one-shot, so it is armed again for a
// direction that still waits.
func (c *tcpSplice) hostReady(ev uint32) {
	var in, out bool
	c.pmu.Lock()
	all := ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0
	if c.interest&unix.EPOLLIN != 0 && (all || ev&(unix.EPOLLIN|unix.EPOLLRDHUP) != 0) {
		in = true
		c.interest &^= unix.EPOLLIN
	}
	if c.interest&unix.EPOLLOUT != 0 && (all || ev&unix.EPOLLOUT != 0) {
		out = true
		c.interest &^= unix.EPOLLOUT
	}
	if c.interest != 0 && c.polled && !c.unpolled {
		c.armLocked()
	}
	c.pmu.Unlock()
	if in {
		c.wake(&c.tg, dirParkedHost)
	}
	if out {
		c.wake(&c.th, dirParkedHost)
	}
}

// wake queues direction d to run if it is parked in state from.
func (c *tcpSplice) wake(d *direction, from int32) { c.wakeBy(d, from, false) }

// wakeBy is wake; polled says roomTimer wakes tg, which the woken run
// learns from c.byPoll.
func (c *tcpSplice) wakeBy(d *direction, from int32, polled bool) {
	if !d.state.CompareAndSwap(from, dirRunning) {
		return
	}
	if polled {
		c.byPoll = true // tg is ours now; the run queue's lock publishes it
	}
	c.f.c.TCPWakeups.Add(1)
	c.f.run.push(d)
}

// done ends direction d; the last one to end finishes the splice.
func (c *tcpSplice) done(d *direction) {
	d.state.Store(dirDone)
	if c.live.Add(-1) == 0 {
		c.finish()
	}
}

func (c *tcpSplice) stopped() bool {
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

// parkGuest parks d until the guest endpoint reports one of mask. It
// returns true if the caller must return (d is parked, or another
// goroutine already runs it), false if it should go on at once.
func (c *tcpSplice) parkGuest(d *direction, mask waiter.EventMask) bool {
	d.state.Store(dirParkedGuest)
	// An event between the caller's last look and the Store found d
	// running and was dropped: look again.
	if c.gep.Readiness(mask|waiter.EventHUp|waiter.EventErr) == 0 && !c.stopped() {
		return true
	}
	return !d.state.CompareAndSwap(dirParkedGuest, dirRunning)
}

// parkHost parks d until the host socket reports want (EPOLLIN or
// EPOLLOUT), with the same result as parkGuest.
func (c *tcpSplice) parkHost(d *direction, want uint32) bool {
	d.state.Store(dirParkedHost)
	c.pmu.Lock()
	ok := !c.unpolled && !c.stopped()
	if ok {
		c.interest |= want
		ok = c.armLocked() == nil
	}
	c.pmu.Unlock()
	if ok {
		return true
	}
	// Aborted, or the socket cannot be polled: go on, and the next
	// socket operation reports why.
	return !d.state.CompareAndSwap(dirParkedHost, dirRunning)
}

// armLocked (re)arms the one-shot host interest. c.pmu is held.
func (c *tcpSplice) armLocked() error {
	c.ctlOp = unix.EPOLL_CTL_MOD
	if !c.polled {
		c.ctlOp = unix.EPOLL_CTL_ADD
	}
	c.ctlErr = errNotPolled
	if err := c.rc.Control(c.ctlFn); err != nil {
		return err
	}
	if c.ctlErr == nil {
		c.polled = true
	}
	return c.ctlErr
}

// ctlFD runs inside RawConn.Control, with c.pmu held.
func (c *tcpSplice) ctlFD(fd uintptr) {
	ev := c.interest | unix.EPOLLONESHOT
	if c.ctlOp == unix.EPOLL_CTL_DEL {
		ev = 0
	}
	c.ctlErr = c.f.poll.ctl(c.ctlOp, int(fd), ev, c.pid)
}

// unpoll takes the host socket out of the poller for good; it must run
// before the socket is closed (a closed fd number can be reused).
func (c *tcpSplice) unpoll() {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	if c.unpolled {
		return
	}
	c.unpolled = true
	if c.polled {
		c.ctlOp = unix.EPOLL_CTL_DEL
		_ = c.rc.Control(c.ctlFn)
		c.polled = false
	}
	c.interest = 0
}

// armTimer wakes d (parked in state from) after dur, to shrink a grown
// buffer. Only d's running goroutine calls it.
func (c *tcpSplice) armTimer(d *direction, dur time.Duration, from int32) {
	if d.timer == nil {
		d.timer = time.AfterFunc(dur, func() { c.wake(d, from) })
		return
	}
	d.timer.Reset(dur)
}

// setShare gives a direction its minimum share, or the unaccounted floor
// when the budget has none left (the connection then crawls until its
// direction finds memory again, see retryShare).
//
// A direction that starts larger (want: a restored connection's receive
// buffer, see restoredRcv) grows to want at once if the budget allows.
func (c *tcpSplice) setShare(w *window, set func(int64, bool), want int64) {
	if c.mem.Take(MinTCPBuffer) {
		w.size, w.charged = MinTCPBuffer, MinTCPBuffer
		if want = min(want, MaxTCPBuffer); want > MinTCPBuffer && c.mem.Grow(want-MinTCPBuffer) {
			w.size, w.charged = want, want
		}
	} else {
		c.f.c.TCPBudgetFloor.Add(1)
		w.size, w.charged = floorTCPBuffer, 0
	}
	set(w.size, true)
}

// retryShare tries again to give a floored direction its minimum share.
func (c *tcpSplice) retryShare(w *window, set func(int64, bool)) {
	if w.charged == 0 && c.mem.Take(MinTCPBuffer) {
		w.size, w.charged = MinTCPBuffer, MinTCPBuffer
		set(w.size, true)
	}
}

// grow quadruples a direction if the budget allows: from MinTCPBuffer to
// MaxTCPBuffer in four steps, so a bulk transfer of a few MiB is not spent
// ramping up.
// It stops at limit.
func (c *tcpSplice) grow(w *window, set func(int64, bool), limit int64) bool {
	if w.charged == 0 || w.size >= limit {
		return false
	}
	n := min(w.size*4, limit)
	if !c.mem.Grow(n - w.size) {
		return false
	}
	w.charged += n - w.size
	w.size = n
	set(n, true)
	return true
}

// setSender counts the splice in (or out of) its guest's bulk senders.
func (c *tcpSplice) setSender(on bool) {
	if c.g == nil || c.sender == on {
		return
	}
	c.sender = on
	if on {
		c.g.senders.Add(1)
	} else {
		c.g.senders.Add(-1)
	}
}

// recount makes n this connection's part of its guest's sendBytes.
func (c *tcpSplice) recount(n int64) {
	if c.g != nil && n != c.counted {
		c.g.sendBytes.Add(n - c.counted)
		c.counted = n
	}
}

// sendLimit returns the guest link's share (rxShare of
// Options.GuestRXCapacity), fair: the share divided among the guest's bulk
// senders, counting this one, between MinTCPBuffer and MaxTCPBuffer, and
// room: the largest this send buffer may grow to, fair or what the send
// buffers of the guest's other connections leave of the share if less.
// Without a capacity both are MaxTCPBuffer. See the comment above
// rxShareNum.
func (c *tcpSplice) sendLimit() (fair, room int64) {
	capf := c.f.opts.GuestRXCapacity
	if c.g == nil || capf == nil {
		return MaxTCPBuffer, MaxTCPBuffer
	}
	rx := capf(c.g.id)
	if rx <= 0 {
		return MaxTCPBuffer, MaxTCPBuffer
	}
	share := rx * rxShareNum / rxShareDen
	n := int64(c.g.senders.Load())
	if !c.sender {
		n++
	}
	fair = min(max(share/n, MinTCPBuffer), MaxTCPBuffer)
	others := c.g.sendBytes.Load() - c.counted
	return fair, min(fair, share-others)
}

func (c *tcpSplice) releaseAll() {
	c.mem.Release(c.snd.charged + c.rcv.charged)
	c.snd.charged, c.rcv.charged = 0, 0
}

// Outcomes of one attempt to move data host → guest.
type pushResult int

const (
	pushMoved  pushResult = iota // bytes went into the send queue
	pushWait                     // the host socket is empty: wait for it
	pushNoRoom                   // gVisor's send buffer is full
	pushEOF                      // the host peer half-closed
	pushFailed                   // a host or guest error: abort
)

// toGuest moves host data into the guest endpoint's send queue until
// it has to wait: for host data (parked on the host socket) or for room
// in the send queue (parked on the guest's writable event).
func (c *tcpSplice) toGuest() {
	d := &c.tg
	so := c.gep.SocketOptions()
	if c.noRoom {
		// Woken for room: by gVisor (half the buffer is free) or by
		// roomTimer (perhaps none is).
		c.noRoom = false
		c.settleSend()
		if c.snd.charged == 0 {
			c.retryShare(&c.snd, so.SetSendBufferSize)
			c.recount(c.snd.size)
		}
	}
	if !c.tgYielded {
		c.progress = false
	}
	c.tgYielded = false
	polled := c.byPoll
	c.byPoll = false
	start := time.Now()
	for {
		if c.stopped() {
			c.done(d)
			return
		}
		if err := c.rc.Read(c.pushFn); err != nil {
			c.abort() // closed under us (abort) or failed
			c.done(d)
			return
		}
		switch c.res {
		case pushMoved:
			if c.snd.size > MinTCPBuffer {
				c.lastSnd = time.Now()
			}
			c.sinceFull += int64(c.r.moved)
			if polled {
				c.f.c.TCPRoomPolls.Add(1)
				polled = false
			}
			c.progress = true
			if c.f.run.yield(start) {
				c.tgYielded = true
				c.f.run.push(d)
				return
			}
			continue
		case pushWait:
			// A grown buffer shrinks when the host has been quiet.
			if c.snd.size > MinTCPBuffer {
				if quiet := time.Since(c.lastSnd); quiet >= shrinkAfter {
					c.shrinkSend()
				} else {
					c.armTimer(d, shrinkAfter-quiet, dirParkedHost)
				}
			}
			if c.parkHost(d, unix.EPOLLIN) {
				return
			}
		case pushNoRoom:
			now := time.Now()
			c.lastSnd = now
			if c.sendFull(so, now) {
				continue // grown: there is room now
			}
			c.noRoom = true
			if c.progress {
				c.pollRoom()
			}
			c.progress = false
			if c.parkGuest(d, waiter.WritableEvents) {
				return
			}
			c.noRoom = false
			c.settleSend()
			if c.snd.charged == 0 {
				c.retryShare(&c.snd, so.SetSendBufferSize)
				c.recount(c.snd.size)
			}
		case pushEOF:
			if c.gep.Shutdown(tcpip.ShutdownWrite) != nil {
				c.abort()
			}
			c.done(d)
			return
		default:
			if c.r.lost {
				c.f.c.TCPLostReads.Add(1)
			}
			c.abort()
			c.done(d)
			return
		}
	}
}

// sendFull runs when tg finds the send buffer full. It grows the buffer
// (and reports so) if the guest consumed half of it within growWithin of
// it filling up: the rule gVisor's own writable event (at half the buffer
// free) used to decide alone, now that roomTimer also wakes tg. Otherwise
// a new interval starts when the last one has run out.
//
// A buffer above its limit (more bulk senders to the guest than when it
// grew) is lowered to it instead; as in shrinkSend, the excess stays
// charged until gVisor has room below the new size.
func (c *tcpSplice) sendFull(so *tcpip.SocketOptions, now time.Time) bool {
	if w := &c.snd; w.charged != 0 && w.size > MinTCPBuffer {
		if fair, _ := c.sendLimit(); w.size > fair {
			so.SetSendBufferSize(fair, true)
			w.size, w.pending = fair, true
			c.f.c.TCPSendLimited.Add(1)
			c.fullAt, c.sinceFull = now, 0
			return false
		}
	}
	if c.snd.charged != 0 && c.sinceFull >= c.snd.size/2 {
		grew := false
		if now.Sub(c.fullAt) < growWithin {
			// A bulk sender, whether or not it may grow now: the
			// others' fair share shrinks, and they give back.
			c.setSender(true)
			_, room := c.sendLimit()
			if grew = c.grow(&c.snd, so.SetSendBufferSize, room); grew {
				c.recount(c.snd.size)
			}
		}
		c.fullAt, c.sinceFull = now, 0
		return grew
	}
	if now.Sub(c.fullAt) >= growWithin {
		c.fullAt, c.sinceFull = now, 0
	}
	return false
}

// pollRoom arms roomTimer as tg parks for room. Only tg's running
// goroutine calls it; a timer that fires after tg left that state wakes
// nothing.
func (c *tcpSplice) pollRoom() {
	if c.roomTimer == nil {
		c.roomTimer = time.AfterFunc(roomPoll, func() { c.wakeBy(&c.tg, dirParkedGuest, true) })
		return
	}
	c.roomTimer.Reset(roomPoll)
}

// pushFD runs inside RawConn.Read: one attempt, never a wait in Go's
// netpoller (parking replaces that).
func (c *tcpSplice) pushFD(fd uintptr) bool {
	c.res = c.r.push(int(fd), c.gep)
	return true
}

// shrinkSend returns a quiet send buffer to the minimum share. Bytes the
// guest has not acknowledged stay charged until gVisor has room below the
// new size (settleSend).
func (c *tcpSplice) shrinkSend() {
	w := &c.snd
	if w.charged == 0 || w.size <= MinTCPBuffer {
		return
	}
	c.gep.SocketOptions().SetSendBufferSize(MinTCPBuffer, true)
	w.size = MinTCPBuffer
	w.pending = true
	c.setSender(false)
	c.settleSend()
}

// settleSend releases the excess of a shrunk send buffer once gVisor says
// the queue fits in the new size.
func (c *tcpSplice) settleSend() {
	w := &c.snd
	if !w.pending || c.gep.Readiness(waiter.WritableEvents) == 0 {
		return
	}
	w.pending = false
	c.recount(w.size)
	if w.charged > w.size {
		c.mem.Release(w.charged - w.size)
		w.charged = w.size
	}
}

// hostReader is the tcpip.Payloader through which gVisor reads host data
// straight into its send queue: Len is what the socket holds (SIOCINQ),
// so every byte gVisor asks for is there and read(2) never comes up
// short. One per direction, reused: no allocation per read.
type hostReader struct {
	fd    int
	n     int
	moved int     // bytes the last push moved
	lost  bool    // read(2) returned less than SIOCINQ promised
	peek  [1]byte // for telling EOF from "nothing yet"
}

// push runs inside RawConn.Read, i.e. while fd is valid.
func (r *hostReader) push(fd int, ep tcpip.Endpoint) pushResult {
	avail, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
	if err != nil {
		return pushFailed
	}
	if avail == 0 {
		n, _, err := unix.Recvfrom(fd, r.peek[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EAGAIN || err == unix.EINTR:
			return pushWait
		case err != nil:
			return pushFailed
		case n == 0:
			return pushEOF
		}
		avail = 1 // arrived since SIOCINQ
	}
	r.fd, r.n, r.lost = fd, min(avail, hostChunk), false
	n, terr := ep.Write(r, tcpip.WriteOptions{})
	r.moved = int(n)
	switch terr.(type) {
	case nil:
		if r.lost {
			return pushFailed
		}
		return pushMoved
	case *tcpip.ErrWouldBlock:
		return pushNoRoom
	}
	return pushFailed
}

// Len implements tcpip.Payloader.
func (r *hostReader) Len() int { return r.n }

// Read implements io.Reader for gVisor, which reads at most Len bytes.
func (r *hostReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		n, err := unix.Read(r.fd, p)
		if n > 0 {
			r.n -= n
			return n, nil
		}
		if err == unix.EINTR {
			continue
		}
		// SIOCINQ counted bytes that are not there: gVisor drops what it
		// read so far, so the stream has a hole and must be aborted.
		r.lost = true
		if err == nil {
			err = errLostRead
		}
		return 0, err
	}
}

var errLostRead = errors.New("host socket returned less than it announced")

// toHost moves guest data from the endpoint's receive queue to the host
// socket until it has to wait: for guest data (parked on the guest's
// readable event) or for room in the host socket (parked on the host).
func (c *tcpSplice) toHost() {
	d := &c.th
	so := c.gep.SocketOptions()
	start := time.Now()
	for {
		if c.stopped() {
			c.done(d)
			return
		}
		err := c.rc.Write(c.pullFn)
		switch {
		case err != nil || c.w.err != nil:
			c.abort()
			c.done(d)
			return
		case c.w.again:
			// The kernel took part (or none) of it: wait for room, then
			// hand over the rest.
			if c.rterr == nil {
				c.moved += int64(c.rcount)
			}
			c.waited = true
			if c.parkHost(d, unix.EPOLLOUT) {
				return
			}
			continue
		case c.rterr == nil:
			// Like Linux's receive autotuning: a guest that sent a whole
			// window's worth within growWithin, to a host that kept up
			// (no wait for room), is limited by the window.
			now := time.Now()
			c.lastRcv = now
			if now.Sub(c.since) > growWithin || c.waited {
				c.since, c.moved, c.waited = now, 0, false
			}
			if c.moved += int64(c.rcount); c.moved >= c.rcv.size/2 {
				c.grow(&c.rcv, so.SetReceiveBufferSize, MaxTCPBuffer)
				c.since, c.moved = now, 0
			}
			if c.f.run.yield(start) {
				c.f.run.push(d)
				return
			}
			continue
		}
		switch c.rterr.(type) {
		case *tcpip.ErrWouldBlock:
		case *tcpip.ErrClosedForReceive:
			// The guest half-closed: pass it on, keep the other way open.
			// TCP and Unix stream sockets (a unix forward or an exposed
			// socket) both half-close.
			if hc, ok := c.host.(interface{ CloseWrite() error }); !ok || hc.CloseWrite() != nil {
				c.abort()
			}
			c.done(d)
			return
		default:
			c.abort()
			c.done(d)
			return
		}
		// Nothing queued. A grown buffer shrinks after a quiet spell; a
		// floored one retries its share when memory is released.
		if c.rcv.size > MinTCPBuffer {
			if quiet := time.Since(c.lastRcv); quiet < shrinkAfter {
				c.armTimer(d, shrinkAfter-quiet, dirParkedGuest)
			} else if !c.shrinkRecv() {
				// Kept while memory is plentiful: look again
				// after another quiet spell.
				c.armTimer(d, shrinkAfter, dirParkedGuest)
			}
		}
		if c.rcv.charged == 0 {
			c.waitBudget()
		}
		if c.parkGuest(d, waiter.ReadableEvents) {
			return
		}
	}
}

// pullFD runs inside RawConn.Write: one attempt, never a wait in Go's
// netpoller.
func (c *tcpSplice) pullFD(fd uintptr) bool {
	c.w.fd, c.w.again, c.w.err = int(fd), false, nil
	res, terr := c.gep.Read(&c.w, tcpip.ReadOptions{})
	c.rcount, c.rterr = res.Count, terr
	return true
}

// waitBudget retries a floored receive direction's share and, if the
// budget still has none, registers the splice with the Forwarder's starved
// set, which wakes the direction at the next release.
func (c *tcpSplice) waitBudget() {
	so := c.gep.SocketOptions()
	if !c.budgetWait.CompareAndSwap(false, true) {
		return // registered already
	}
	ch := c.mem.Wait()
	c.retryShare(&c.rcv, so.SetReceiveBufferSize)
	if c.rcv.charged != 0 || ch == nil {
		c.budgetWait.Store(false)
		return
	}
	if !c.f.starve(c, ch) {
		c.budgetWait.Store(false)
	}
}

// shrinkRecv returns an idle receive buffer to the minimum share when the
// budget is tight, and says whether it did. It runs only with nothing
// queued, so the released bytes are really free.
//
// It does not while memory is plentiful: gVisor never takes back the
// window it offered the guest, but drops whatever the lowered buffer has
// no room for, so the guest's first flight after the quiet spell would be
// lost in part (40 of the segments of a 2 MiB upload,
// TestTCPBurstAfterIdleIsNotDropped) and come back by retransmission. An
// idle buffer holds no memory in gVisor, only its claim on the budget,
// which matters only once others need it. Under pressure the claim wins,
// as it does in a kernel pruning its socket queues.
func (c *tcpSplice) shrinkRecv() bool {
	w := &c.rcv
	if w.charged == 0 || w.size <= MinTCPBuffer {
		return true
	}
	if !c.mem.Tight() {
		return false
	}
	c.gep.SocketOptions().SetReceiveBufferSize(MinTCPBuffer, true)
	c.mem.Release(w.charged - MinTCPBuffer)
	w.size, w.charged = MinTCPBuffer, MinTCPBuffer
	c.f.c.TCPRecvShrinks.Add(1)
	return true
}

// hostWriter is the io.Writer gVisor reads its receive queue into: a
// non-blocking write(2) to the host socket. A short write reports an error,
// so gVisor consumes exactly the bytes the kernel took.
type hostWriter struct {
	fd    int
	again bool  // the socket buffer is full
	err   error // the socket failed
}

var errAgain = errors.New("host socket full")

// Write implements io.Writer.
func (w *hostWriter) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) {
		n, err := unix.Write(w.fd, p[done:])
		if n > 0 {
			done += n
		}
		switch err {
		case nil:
		case unix.EINTR:
		case unix.EAGAIN:
			w.again = true
			return done, errAgain
		default:
			w.err = err
			return done, err
		}
	}
	return done, nil
}

// abort resets both sides: the guest gets a RST from gVisor and the host
// peer gets one too (zero linger), mirroring what a real router would make
// visible. A parked direction is woken to see it and end.
func (c *tcpSplice) abort() {
	c.abortOnce.Do(func() {
		c.aborted.Store(true)
		c.stopOnce.Do(func() { close(c.stop) })
		c.gep.Abort()
		c.unpoll()
		if tc, ok := c.host.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = c.host.Close()
		for _, d := range []*direction{&c.tg, &c.th} {
			c.wake(d, dirParkedGuest)
			c.wake(d, dirParkedHost)
		}
	})
}

func (c *tcpSplice) closeBoth() {
	c.gep.Close()
	_ = c.host.Close()
}

// addConn records a live splice so Close can abort it. It returns false if
// the Forwarder is closing.
func (f *Forwarder) addConn(c *tcpSplice) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed || c.owner != nil && c.owner.isClosed() {
		return false
	}
	f.conns[c] = struct{}{}
	f.c.TCPConnsTotal.Add(1)
	return true
}

func (f *Forwarder) removeConn(c *tcpSplice) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
}
