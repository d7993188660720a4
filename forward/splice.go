package forward

import (
	"errors"
	"net"
	"os"
	"sync"
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
)

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
// Neither direction owns a copy buffer. Host → guest, the splice waits
// for the host socket to be readable and then lets gVisor read, straight
// from the socket into its send queue, at most the bytes the socket holds
// and the send buffer has room for; with no room it waits for gVisor's
// writable event and leaves the data in the kernel. Guest → host, it waits
// for the host socket to be writable and lets gVisor hand its queued
// segments straight to a non-blocking write(2), consuming only what the
// kernel took.
type tcpSplice struct {
	f     *Forwarder
	gep   tcpip.Endpoint
	wq    *waiter.Queue
	host  net.Conn
	rc    syscall.RawConn
	mem   *budget.Budget // the share this connection draws from
	desc  string         // for logs
	owner *portForward   // inbound forward it came through, or nil

	// Budget held by each direction; written by that direction's
	// goroutine, released by run after both have ended.
	snd, rcv window

	abortOnce sync.Once
	aborted   chan struct{}
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
	return &tcpSplice{f: f, gep: gep, wq: wq, host: host, rc: rc, mem: mem, desc: desc,
		aborted: make(chan struct{})}, nil
}

// run copies both directions until both have finished, then closes both
// sides. The caller's goroutine (already counted in f.wg) copies host to
// guest and one more goroutine copies guest to host: exactly two
// goroutines per connection, and both end when either side goes away or
// abort is called.
func (c *tcpSplice) run() {
	f := c.f
	defer c.releaseAll()
	if !f.addConn(c) {
		c.abort()
		c.closeBoth()
		return
	}
	defer f.removeConn(c)
	if !f.enter() {
		c.abort()
		c.closeBoth()
		return
	}
	so := c.gep.SocketOptions()
	c.setShare(&c.snd, so.SetSendBufferSize)
	c.setShare(&c.rcv, so.SetReceiveBufferSize)
	done := make(chan struct{})
	go func() {
		defer f.wg.Done()
		defer close(done)
		c.toHost()
	}()
	c.toGuest()
	<-done
	c.closeBoth()
	f.log.Debug("tcp connection closed", "conn", c.desc)
}

// setShare gives a direction its minimum share, or the unaccounted floor
// when the budget has none left (the connection then crawls until its
// direction finds memory again, see retryShare).
func (c *tcpSplice) setShare(w *window, set func(int64, bool)) {
	if c.mem.Take(MinTCPBuffer) {
		w.size, w.charged = MinTCPBuffer, MinTCPBuffer
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
func (c *tcpSplice) grow(w *window, set func(int64, bool)) {
	if w.charged == 0 || w.size >= MaxTCPBuffer {
		return
	}
	n := min(w.size*4, MaxTCPBuffer)
	if !c.mem.Grow(n - w.size) {
		return
	}
	w.charged += n - w.size
	w.size = n
	set(n, true)
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

// toGuest moves host data into the guest endpoint's send queue.
func (c *tcpSplice) toGuest() {
	so := c.gep.SocketOptions()
	entry, ch := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	c.wq.EventRegister(&entry)
	defer c.wq.EventUnregister(&entry)
	var (
		r        hostReader
		res      pushResult
		fullAt   time.Time // when the send buffer was last found full
		deadline bool      // a read deadline (for shrinking) is set
	)
	push := func(fd uintptr) bool {
		res = r.push(int(fd), c.gep)
		return res != pushWait
	}
	for {
		// A grown buffer shrinks when the host has been quiet.
		if grown := c.snd.size > MinTCPBuffer; grown || deadline {
			var d time.Time
			if grown {
				d = time.Now().Add(shrinkAfter)
			}
			_ = c.host.SetReadDeadline(d)
			deadline = grown
		}
		err := c.rc.Read(push)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				c.shrinkSend()
				continue
			}
			c.abort() // closed under us (abort) or failed
			return
		}
		switch res {
		case pushMoved:
			continue
		case pushNoRoom:
			fullAt = time.Now()
			select {
			case <-ch:
			case <-c.aborted:
				return
			}
			c.settleSend()
			if c.snd.charged == 0 {
				c.retryShare(&c.snd, so.SetSendBufferSize)
			} else if time.Since(fullAt) < growWithin {
				c.grow(&c.snd, so.SetSendBufferSize)
			}
		case pushEOF:
			if c.gep.Shutdown(tcpip.ShutdownWrite) != nil {
				c.abort()
			}
			return
		default:
			if r.lost {
				c.f.c.TCPLostReads.Add(1)
			}
			c.abort()
			return
		}
	}
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
	fd   int
	n    int
	lost bool    // read(2) returned less than SIOCINQ promised
	peek [1]byte // for telling EOF from "nothing yet"
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
	_, terr := ep.Write(r, tcpip.WriteOptions{})
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
// socket.
func (c *tcpSplice) toHost() {
	so := c.gep.SocketOptions()
	entry, ch := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	c.wq.EventRegister(&entry)
	defer c.wq.EventUnregister(&entry)
	var (
		w      hostWriter
		res    tcpip.ReadResult
		terr   tcpip.Error
		idle   *time.Timer
		waitCh <-chan struct{} // budget release, while floored
		since  time.Time       // start of the current growth interval
		moved  int64           // bytes moved since then
	)
	defer func() {
		if idle != nil {
			idle.Stop()
		}
	}()
	calls := 0
	pull := func(fd uintptr) bool {
		calls++
		w.fd, w.again, w.err = int(fd), false, nil
		res, terr = c.gep.Read(&w, tcpip.ReadOptions{})
		// The kernel took part (or none) of it: wait for room, then hand
		// over the rest.
		return !w.again || w.err != nil
	}
	for {
		calls = 0
		err := c.rc.Write(pull)
		switch {
		case err != nil || w.err != nil:
			c.abort()
			return
		case terr == nil:
			// Like Linux's receive autotuning: a guest that sent a whole
			// window's worth within growWithin, to a host that kept up
			// (no wait for room), is limited by the window.
			now := time.Now()
			if now.Sub(since) > growWithin || calls > 1 {
				since, moved = now, 0
			}
			if moved += int64(res.Count); moved >= c.rcv.size/2 {
				c.grow(&c.rcv, so.SetReceiveBufferSize)
				since, moved = now, 0
			}
			continue
		}
		switch terr.(type) {
		case *tcpip.ErrWouldBlock:
		case *tcpip.ErrClosedForReceive:
			// The guest half-closed: pass it on, keep the other way open.
			// TCP and Unix stream sockets (a unix forward or an exposed
			// socket) both half-close.
			if hc, ok := c.host.(interface{ CloseWrite() error }); !ok || hc.CloseWrite() != nil {
				c.abort()
			}
			return
		default:
			c.abort()
			return
		}
		// Nothing queued. A grown buffer shrinks after a quiet spell; a
		// floored one retries its share when memory is released.
		var idleC <-chan time.Time
		if c.rcv.size > MinTCPBuffer {
			if idle == nil {
				idle = time.NewTimer(shrinkAfter)
			} else {
				idle.Reset(shrinkAfter)
			}
			idleC = idle.C
		}
		if c.rcv.charged == 0 && waitCh == nil {
			waitCh = c.mem.Wait()
			c.retryShare(&c.rcv, so.SetReceiveBufferSize)
		}
		select {
		case <-ch:
		case <-idleC:
			c.shrinkRecv()
		case <-waitCh:
			waitCh = nil
			c.retryShare(&c.rcv, so.SetReceiveBufferSize)
		case <-c.aborted:
			return
		}
		if idle != nil && !idle.Stop() {
			select {
			case <-idle.C:
			default:
			}
		}
	}
}

// shrinkRecv returns an idle receive buffer to the minimum share. It runs
// only with nothing queued, so the released bytes are really free.
func (c *tcpSplice) shrinkRecv() {
	w := &c.rcv
	if w.charged == 0 || w.size <= MinTCPBuffer {
		return
	}
	c.gep.SocketOptions().SetReceiveBufferSize(MinTCPBuffer, true)
	c.mem.Release(w.charged - MinTCPBuffer)
	w.size, w.charged = MinTCPBuffer, MinTCPBuffer
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
// visible. It unblocks both copy goroutines.
func (c *tcpSplice) abort() {
	c.abortOnce.Do(func() {
		close(c.aborted)
		c.gep.Abort()
		if tc, ok := c.host.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = c.host.Close()
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
