package forward

import (
	"errors"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// hostPoller tells parked splice directions that their host socket is
// ready. It is one epoll instance per Forwarder, waited on through Go's
// own netpoller (an epoll fd is itself pollable), so an idle connection
// holds no goroutine on the host side: a direction that found its socket
// empty (or full) arms a one-shot interest here and returns, and the
// poller's single goroutine starts it again when the socket is ready.
//
// Interests are level-triggered and one-shot: arming while the socket is
// already ready reports it at once (no wakeup is lost between the failed
// read and the arm), and a registration reports nothing more until it is
// armed again (a busy connection that is not parked costs the poller
// nothing).
type hostPoller struct {
	file *os.File
	fd   int // the epoll fd; valid until close, which comes after every splice ended
	rc   syscall.RawConn
	done chan struct{}

	mu    sync.Mutex
	next  int32
	conns map[int32]*tcpSplice
}

func newHostPoller() (*hostPoller, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return nil, os.NewSyscallError("fcntl", err)
	}
	file := os.NewFile(uintptr(fd), "forward-epoll")
	rc, err := file.SyscallConn()
	if err != nil {
		_ = file.Close()
		return nil, err
	}
	p := &hostPoller{file: file, fd: fd, rc: rc, done: make(chan struct{}), conns: make(map[int32]*tcpSplice)}
	go p.run()
	return p, nil
}

// run dispatches readiness until the poller is closed.
func (p *hostPoller) run() {
	defer close(p.done)
	evs := make([]unix.EpollEvent, 128)
	var (
		n    int
		werr error
	)
	wait := func(fd uintptr) bool {
		n, werr = unix.EpollWait(int(fd), evs, 0)
		if werr == unix.EINTR {
			n, werr = 0, nil
			return true // try again at once
		}
		return n > 0 || werr != nil
	}
	for {
		if err := p.rc.Read(wait); err != nil {
			return // closed
		}
		if werr != nil {
			return // cannot happen with a valid epoll fd and buffer
		}
		for i := range evs[:n] {
			p.mu.Lock()
			c := p.conns[evs[i].Fd]
			p.mu.Unlock()
			if c != nil {
				c.hostReady(evs[i].Events)
			}
		}
	}
}

// add gives c an id for its epoll events (its socket is added when it
// first parks).
func (p *hostPoller) add(c *tcpSplice) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		p.next++
		if p.next <= 0 {
			p.next = 1
		}
		if p.conns[p.next] == nil {
			break
		}
	}
	c.pid = p.next
	p.conns[c.pid] = c
}

func (p *hostPoller) remove(c *tcpSplice) {
	p.mu.Lock()
	if p.conns[c.pid] == c {
		delete(p.conns, c.pid)
	}
	p.mu.Unlock()
}

// ctl changes the interest of host socket fd. The caller holds fd valid
// (inside RawConn.Control).
func (p *hostPoller) ctl(op, fd int, events uint32, id int32) error {
	ev := unix.EpollEvent{Events: events, Fd: id}
	if err := unix.EpollCtl(p.fd, op, fd, &ev); err != nil {
		return os.NewSyscallError("epoll_ctl", err)
	}
	return nil
}

// close stops the poller; every splice must have ended.
func (p *hostPoller) close() {
	_ = p.file.Close()
	<-p.done
}

var errNotPolled = errors.New("host socket no longer polled")
