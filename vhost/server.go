// Package vhost is the device side of the vhost-user protocol: it accepts a
// frontend (QEMU, DPDK's virtio_user, ...) on a Unix socket, maps the guest
// memory it shares, negotiates features and manages the lifecycle of the
// virtqueues, which it hands to a Backend (the virtio-net endpoint).
//
// One frontend is served at a time. When it disconnects, every resource it
// gave us (memory mappings, eventfds) is released and the next one is
// served. Malformed requests are refused with a counted, rate-limited
// warning; they never bring the process down.
package vhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/vunet/vunet/internal/ratelimit"
	"github.com/vunet/vunet/vhost/internal/fdkind"
	"github.com/vunet/vunet/vhost/protocol"
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
}

// Server serves vhost-user frontends, one at a time.
type Server struct {
	opts    Options
	log     *slog.Logger
	limiter *ratelimit.Limiter
	// Stats counts control-plane events.
	Stats Stats
	// mu serialises sessions: the backend serves one frontend at a time.
	mu sync.Mutex
}

// NewServer validates opts and returns a server.
func NewServer(opts Options) (*Server, error) {
	if opts.Backend == nil {
		return nil, errors.New("vhost: Options.Backend is required")
	}
	if opts.Backend.NumQueues() < 1 || opts.Backend.NumQueues() > maxQueues {
		return nil, fmt.Errorf("vhost: backend has %d queues, want 1..%d", opts.Backend.NumQueues(), maxQueues)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{opts: opts, log: log, limiter: ratelimit.New(10, time.Second)}, nil
}

// Serve accepts frontends on l until ctx is done or l fails, serving them
// one after another. With once, it returns after the first frontend
// disconnects.
func (s *Server) Serve(ctx context.Context, l *net.UnixListener, once bool) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("vhost: accept: %w", err)
		}
		err = s.ServeConn(ctx, c)
		if err != nil {
			s.log.Warn("frontend session ended with an error", "err", err)
		}
		if once || ctx.Err() != nil {
			return err
		}
	}
}

// Connect is client mode: it dials a frontend listening at path (QEMU's
// `-chardev socket,server=on`), retrying until ctx is done, and serves it.
func (s *Server) Connect(ctx context.Context, path string, retry time.Duration) error {
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return s.ServeConn(ctx, c.(*net.UnixConn))
		}
		if retry <= 0 {
			return fmt.Errorf("vhost: connect %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(retry):
		}
	}
}

// ServeConn serves one frontend until it disconnects or ctx is done, then
// releases everything it set up.
func (s *Server) ServeConn(ctx context.Context, c *net.UnixConn) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	conn := protocol.NewConn(c)
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()

	s.Stats.Sessions.Add(1)
	onQueueErr := func(idx int, err error) {
		if s.opts.OnQueueError != nil {
			s.opts.OnQueueError(idx, err)
		}
		if s.limiter.Allow() {
			s.log.Warn("bad virtqueue input from guest", "queue", idx, "err", err)
		}
	}
	sess := newSession(s.log, s.opts.Backend, &s.Stats, onQueueErr)
	defer sess.close()
	s.log.Info("frontend connected")
	for {
		m, err := conn.Read()
		if err != nil {
			protocol.CloseFDs(m.FDs)
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
