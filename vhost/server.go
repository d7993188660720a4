// Package vhost is the device side of the vhost-user protocol: it accepts a
// frontend (QEMU, DPDK's virtio_user, ...) on a Unix socket, maps the guest
// memory it shares, negotiates features and manages the lifecycle of the
// virtqueues, which it hands to a Backend (the virtio-net endpoint).
//
// A bounded number of frontends is served at once (Options.MaxSessions,
// one by default: the endpoint is one device); a frontend beyond it is
// refused at once, not queued. When a frontend disconnects, every resource
// it gave us (memory mappings, eventfds) is released. Malformed requests
// are refused with a counted, rate-limited warning; they never bring the
// process down.
package vhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/internal/ratelimit"
	"github.com/vunet/vunet/vhost/internal/fdkind"
	"github.com/vunet/vunet/vhost/protocol"
)

// Accept errors are retried with a backoff doubling from acceptBackoffMin
// to acceptBackoffMax: out of descriptors (EMFILE/ENFILE) or memory, the
// next accept may work once something is released, and a daemon must not
// exit over it.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// Options configure a Server.
type Options struct {
	// Backend is the virtio device. Required.
	Backend Backend
	// Logger receives control-plane logs; nil discards them.
	Logger *slog.Logger
	// OnQueueError, if set, is told about malformed chains and broken
	// rings (in addition to the rate-limited log line).
	OnQueueError func(queue int, err error)
	// Backends, if set, gives each session its own device (see
	// BackendPool); Backend is then the template for queue count checks.
	Backends BackendPool
	// MaxSessions is how many frontends are served at once; 0 means 1. The
	// Backend (or Backends) must be able to serve that many (one endpoint
	// serves one; the pool of a switch serves one per port).
	MaxSessions int
	// SetupTimeout bounds the handshake: a frontend that has not sent
	// SET_OWNER within it is dropped, so that a client that connects and
	// says nothing cannot hold a session; 0 disables it (vunet's default,
	// 10 s, is config.Default's). The memory table and the rings are not
	// covered: QEMU sends them only when the guest's driver starts the
	// device, which may be minutes later (boot menus, firmware).
	SetupTimeout time.Duration
	// Peers says which local users may connect to a listening socket
	// (Serve); the zero value allows vunet's own user and root.
	Peers PeerPolicy
	// State, if set, is offered to frontends as PROTOCOL_F_DEVICE_STATE:
	// the back-end state a live migration moves.
	State DeviceState
	// StateTimeout bounds one device-state transfer; 0 means
	// DefaultStateTimeout.
	StateTimeout time.Duration
}

// PeerPolicy lists the users (by uid) and groups (by the gid SO_PEERCRED
// reports: the peer's effective group) allowed to connect. Root is always
// allowed: it can open guest memory anyway.
type PeerPolicy struct {
	UIDs []uint32
	GIDs []uint32
}

func (p PeerPolicy) allows(c *unix.Ucred) bool {
	if c.Uid == 0 {
		return true
	}
	for _, u := range p.UIDs {
		if c.Uid == u {
			return true
		}
	}
	for _, g := range p.GIDs {
		if c.Gid == g {
			return true
		}
	}
	return false
}

// Server serves vhost-user frontends.
type Server struct {
	opts    Options
	log     *slog.Logger
	limiter *ratelimit.Limiter
	// Stats counts control-plane events.
	Stats Stats
	// slots holds one token per session being served.
	slots chan struct{}
	// mu guards active, the connections of the sessions being served.
	mu     sync.Mutex
	active map[*net.UnixConn]struct{}
	// midRelease, if set, runs in release between freeing the slot and
	// forgetting the connection (tests: a frontend admitted there).
	midRelease func()
}

// NewServer validates opts and returns a server.
func NewServer(opts Options) (*Server, error) {
	if opts.Backend == nil {
		return nil, errors.New("vhost: Options.Backend is required")
	}
	if opts.Backend.NumQueues() < 1 || opts.Backend.NumQueues() > maxQueues {
		return nil, fmt.Errorf("vhost: backend has %d queues, want 1..%d", opts.Backend.NumQueues(), maxQueues)
	}
	if opts.MaxSessions < 0 {
		return nil, fmt.Errorf("vhost: MaxSessions %d is negative", opts.MaxSessions)
	}
	if opts.MaxSessions == 0 {
		opts.MaxSessions = 1
	}
	if len(opts.Peers.UIDs) == 0 && len(opts.Peers.GIDs) == 0 {
		opts.Peers.UIDs = []uint32{uint32(os.Getuid())}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{opts: opts, log: log, limiter: ratelimit.New(10, time.Second),
		slots: make(chan struct{}, opts.MaxSessions), active: map[*net.UnixConn]struct{}{}}, nil
}

// acceptor is what Serve needs of a listener (a fake in tests).
type acceptor interface {
	AcceptUnix() (*net.UnixConn, error)
	Close() error
}

// Serve accepts frontends on l until ctx is done or l is closed, serving
// up to Options.MaxSessions at once and refusing the rest. With once, it
// returns (with that session's error) after the first frontend
// disconnects. Accept errors are counted and retried with a backoff.
func (s *Server) Serve(ctx context.Context, l *net.UnixListener, once bool) error {
	return s.serve(ctx, l, once)
}

func (s *Server) serve(ctx context.Context, l acceptor, once bool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var (
		wg       sync.WaitGroup
		onceErr  error
		onceDone atomic.Bool
		backoff  time.Duration
	)
	defer wg.Wait()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				wg.Wait()
				return onceErr
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("vhost: accept: %w", err)
			}
			s.Stats.AcceptErrors.Add(1)
			backoff = min(max(2*backoff, acceptBackoffMin), acceptBackoffMax)
			if s.limiter.Allow() {
				s.log.Warn("accepting a frontend failed; retrying", "err", err, "retry_in", backoff)
			}
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		if !s.admit(c) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := s.serveConn(ctx, c)
			if err != nil {
				s.log.Warn("frontend session ended with an error", "err", err)
			}
			if once && !onceDone.Swap(true) {
				onceErr = err // read after wg.Wait
				cancel()
			}
		}()
	}
}

// admit checks a new connection's peer and takes a session slot for it,
// or closes it: a refused frontend is told at once (its socket closes), is
// counted and logged (rate-limited), and never waits in a queue.
func (s *Server) admit(c *net.UnixConn) bool {
	cred, err := peerCred(c)
	if err != nil || !s.opts.Peers.allows(cred) {
		s.Stats.PeersRefused.Add(1)
		if s.limiter.Allow() {
			if err != nil {
				s.log.Warn("frontend refused: cannot read its credentials", "err", err)
			} else {
				s.log.Warn("frontend refused: user not allowed (see --socket-group)", "uid", cred.Uid, "gid", cred.Gid, "pid", cred.Pid)
			}
		}
		c.Close()
		return false
	}
	if !s.acquire(c) && !(s.hungUp() && s.acquireWithin(c, teardownWait)) {
		s.Stats.SessionsRefused.Add(1)
		if s.limiter.Allow() {
			s.log.Warn("frontend refused: already serving the maximum number of frontends",
				"max", s.opts.MaxSessions, "uid", cred.Uid, "pid", cred.Pid)
		}
		c.Close()
		return false
	}
	return true
}

// teardownWait bounds how long a new frontend waits for a session whose
// frontend has already hung up: releasing a session stops its queues,
// which takes well under a second. A frontend that reconnects at once
// (QEMU's reconnect, a restarted testpmd) is then served, not refused.
const teardownWait = 2 * time.Second

// acquire takes a session slot for c without waiting.
func (s *Server) acquire(c *net.UnixConn) bool {
	select {
	case s.slots <- struct{}{}:
		s.track(c)
		return true
	default:
		return false
	}
}

// acquireWithin takes a session slot for c, waiting up to d.
func (s *Server) acquireWithin(c *net.UnixConn, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case s.slots <- struct{}{}:
		s.track(c)
		return true
	case <-t.C:
		return false
	}
}

func (s *Server) track(c *net.UnixConn) {
	s.Stats.ActiveSessions.Add(1)
	s.mu.Lock()
	s.active[c] = struct{}{}
	s.mu.Unlock()
}

// release frees c's slot. It runs once the session is torn down and
// before its socket is closed, so a frontend that sees the close and
// reconnects finds the slot free. The slot is freed before c leaves
// active: in the other order a frontend admitted in between found neither
// a free slot nor a hung-up session to wait for, and was refused although
// a slot was being freed (TestTwoGuests' reconnect, once in ~1000 runs
// under -race).
func (s *Server) release(c *net.UnixConn) {
	<-s.slots
	if s.midRelease != nil {
		s.midRelease()
	}
	s.mu.Lock()
	delete(s.active, c)
	s.mu.Unlock()
	s.Stats.ActiveSessions.Add(-1)
}

// hungUp reports whether the frontend of a session being served has closed
// its end: that session is about to end.
func (s *Server) hungUp() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.active {
		rc, err := c.SyscallConn()
		if err != nil {
			continue
		}
		hup := false
		rc.Control(func(fd uintptr) { hup = peerClosed(int(fd)) })
		if hup {
			return true
		}
	}
	return false
}

// peerClosed reports whether the peer of socket fd has closed its end
// (EPOLLRDHUP), even with data still unread. It uses a throwaway epoll
// instance: the epoll calls are on the sandbox's allow-list, poll and
// ppoll are not.
func peerClosed(fd int) bool {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return false
	}
	defer unix.Close(ep)
	ev := unix.EpollEvent{Events: unix.EPOLLRDHUP, Fd: int32(fd)}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return false
	}
	var out [1]unix.EpollEvent
	n, err := unix.EpollWait(ep, out[:], 0)
	return err == nil && n == 1 && out[0].Events&(unix.EPOLLRDHUP|unix.EPOLLHUP) != 0
}

// peerCred returns the credentials the kernel recorded for c's peer when
// it connected.
func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// Connect is client mode: it dials a frontend listening at path (QEMU's
// `-chardev socket,server=on`), retrying until ctx is done, and serves it.
// The peer is the one the user named, so its credentials are not checked.
func (s *Server) Connect(ctx context.Context, path string, retry time.Duration) error {
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return s.ServeConn(ctx, c.(*net.UnixConn))
		}
		// Waiting helps when the frontend has not created its socket
		// yet, not when vunet may not reach it.
		if retry <= 0 || errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("vhost: connect %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(retry):
		}
	}
}

// ErrBusy is returned by ServeConn when MaxSessions frontends are served.
var ErrBusy = errors.New("vhost: serving the maximum number of frontends")

// ServeConn serves one frontend until it disconnects or ctx is done, then
// releases everything it set up. It refuses (closing c) when the server
// already serves Options.MaxSessions frontends.
func (s *Server) ServeConn(ctx context.Context, c *net.UnixConn) error {
	if !s.acquire(c) && !(s.hungUp() && s.acquireWithin(c, teardownWait)) {
		s.Stats.SessionsRefused.Add(1)
		c.Close()
		return ErrBusy
	}
	return s.serveConn(ctx, c)
}

// serveConn serves c, which holds a session slot, and releases the slot.
func (s *Server) serveConn(ctx context.Context, c *net.UnixConn) error {
	conn := protocol.NewConn(c)
	defer conn.Close()
	defer s.release(c) // after the session's teardown, before the close
	stop := context.AfterFunc(ctx, func() { c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	// The set-up deadline interrupts the read the same way; timedOut tells
	// the two apart.
	var timedOut atomic.Bool
	var setup *time.Timer
	if s.opts.SetupTimeout > 0 {
		setup = time.AfterFunc(s.opts.SetupTimeout, func() {
			timedOut.Store(true)
			c.SetReadDeadline(time.Unix(1, 0))
		})
		defer setup.Stop()
	}

	s.Stats.Sessions.Add(1)
	onQueueErr := func(idx int, err error) {
		if s.opts.OnQueueError != nil {
			s.opts.OnQueueError(idx, err)
		}
		if s.limiter.Allow() {
			s.log.Warn("bad virtqueue input from guest", "queue", idx, "err", err)
		}
	}
	backend := s.opts.Backend
	if pool := s.opts.Backends; pool != nil {
		b, err := pool.AcquireBackend(func() { c.SetReadDeadline(time.Unix(1, 0)) })
		if err != nil {
			s.Stats.SessionsRefused.Add(1)
			s.log.Warn("frontend refused: no device for it", "err", err)
			return nil
		}
		// Deferred before the session's close, so it runs after it.
		defer pool.ReleaseBackend(b)
		backend = b
	}
	sess := newSession(s.log, backend, &s.Stats, onQueueErr)
	sess.state, sess.stateTimeout = s.opts.State, s.opts.StateTimeout
	if sess.stateTimeout <= 0 {
		sess.stateTimeout = DefaultStateTimeout
	}
	defer sess.close()
	s.log.Info("frontend connected")
	for {
		m, err := conn.Read()
		if err != nil {
			protocol.CloseFDs(m.FDs)
			if timedOut.Load() && ctx.Err() == nil {
				s.Stats.SetupTimeouts.Add(1)
				s.log.Warn("frontend dropped: no SET_OWNER within the set-up timeout", "timeout", s.opts.SetupTimeout)
				return nil
			}
			if errors.Is(err, io.EOF) || errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, net.ErrClosed) {
				s.log.Info("frontend disconnected")
				return nil
			}
			// The stream cannot be resynchronised after a bad header.
			s.Stats.BadMessages.Add(1)
			return fmt.Errorf("%w: %v", ErrProtocol, err)
		}
		s.Stats.Messages.Add(1)
		if err := s.dispatch(conn, sess, &m); err != nil {
			return err
		}
		if setup != nil && sess.owner {
			// Set-up is done once the frontend owns the session;
			// from here it may wait for its guest as long as it likes.
			setup.Stop()
			setup = nil
		}
	}
}

// dispatch validates and executes one message and sends its reply.
func (s *Server) dispatch(conn *protocol.Conn, sess *session, m *protocol.Message) error {
	defer protocol.CloseFDs(m.FDs) // whatever was not taken over
	var reply []byte
	err := m.Validate()
	if err == nil {
		reply, err = sess.handle(m)
	}
	if err != nil {
		s.Stats.BadMessages.Add(1)
		if errors.Is(err, fdkind.ErrWrongKind) {
			s.Stats.BadFDs.Add(1)
		}
		if s.limiter.Allow() {
			s.log.Warn("request refused", "request", m.Request.String(), "err", err)
		}
	} else {
		s.log.Debug("request", "request", m.Request.String(), "size", m.Size, "fds", len(m.FDs))
	}
	switch {
	case expectsReply(m.Request):
		if err != nil {
			// A request that must be answered cannot be answered: the
			// frontend would wait forever, so end the session instead.
			return fmt.Errorf("%w: %s: %v", ErrProtocol, m.Request, err)
		}
		return conn.Reply(m, reply)
	case m.NeedReply():
		var status uint64
		if err != nil {
			status = 1
		}
		return conn.Reply(m, u64(status))
	}
	return nil
}
