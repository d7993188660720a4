package vhost

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"sync/atomic"
	"time"

	"github.com/vunet/vunet/internal/ratelimit"
)

// Re-dial back-off of DialLoop: the first retry comes after DialBackoffMin,
// each failed dial doubles the wait up to DialBackoffMax. A frontend that
// restarts (virsh destroy + start, a new QEMU on the same path) is found
// again within about DialBackoffMax of creating its socket, while a
// frontend that stays away costs one connect(2) every DialBackoffMax.
const (
	DialBackoffMin = 100 * time.Millisecond
	DialBackoffMax = 5 * time.Second
	// dialResetAfter: a session that lasted this long was a real one, and
	// the next re-dial starts again from DialBackoffMin. A frontend that
	// accepts and drops vunet at once keeps backing off instead of being
	// dialled ten times a second.
	dialResetAfter = 2 * time.Second
)

// DialStats counts the client side of the vhost-user connection
// (vunet --connect).
type DialStats struct {
	Dials        atomic.Uint64 `metric:"vhost_dials_total" help:"Connections made to the frontend's vhost-user socket (vunet --connect), the first one included."`
	DialFailures atomic.Uint64 `metric:"vhost_dial_failures_total" help:"Failed connects to the frontend's vhost-user socket (absent, refused, not permitted), each retried after a back-off."`
	Redials      atomic.Uint64 `metric:"vhost_redials_total" help:"Times the frontend went away and vunet --connect started dialling its socket again."`
}

// DialOptions configure DialLoop.
type DialOptions struct {
	// Once returns after the first session ends instead of re-dialling.
	Once bool
	// Stats, if set, receives the counters.
	Stats *DialStats
	// Dial connects to path; nil means a Unix stream connect. Tests
	// replace it.
	Dial func(ctx context.Context, path string) (*net.UnixConn, error)
	// BackoffMin and BackoffMax override DialBackoffMin and
	// DialBackoffMax (tests).
	BackoffMin, BackoffMax time.Duration
}

// DialLoop is the client mode: it connects to the frontend listening on
// path (QEMU's chardev server=on, libvirt's mode='server'), serves it, and
// when the frontend goes away dials the same path again, with a back-off,
// until ctx is done; with Once it returns after the first session instead.
// It returns nil when ctx ends. Until the first session, a permission
// error is returned at once (vunet may never reach that socket: a
// configuration error to report at start-up, not to retry forever); after
// a session every dial error is retried, since a restarting frontend may
// briefly leave a socket with other owners or none.
func (s *Server) DialLoop(ctx context.Context, path string, opts DialOptions) error {
	st := opts.Stats
	if st == nil {
		st = new(DialStats)
	}
	dial := opts.Dial
	if dial == nil {
		dial = dialUnix
	}
	lo, hi := opts.BackoffMin, opts.BackoffMax
	if lo <= 0 {
		lo = DialBackoffMin
	}
	if hi < lo {
		hi = max(lo, DialBackoffMax)
	}
	// One warning per 30 s while the frontend stays away; the attempts
	// in between are logged at debug level and counted.
	warn := ratelimit.New(1, 30*time.Second)
	backoff, served, attempts := lo, false, 0
	for {
		c, err := dial(ctx, path)
		if ctx.Err() != nil {
			if c != nil {
				c.Close()
			}
			return nil
		}
		if err != nil {
			st.DialFailures.Add(1)
			attempts++
			if !served && errors.Is(err, fs.ErrPermission) {
				return fmt.Errorf("vhost: connect %s: %w", path, err)
			}
			if warn.Allow() {
				s.log.Warn("waiting for the frontend's vhost-user socket", "path", path, "attempts", attempts, "retry_in", backoff, "err", err)
			} else {
				s.log.Debug("dial failed", "path", path, "attempts", attempts, "retry_in", backoff, "err", err)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, hi)
			continue
		}
		st.Dials.Add(1)
		if served {
			s.log.Info("reconnected to the frontend", "path", path, "attempts", attempts+1)
		}
		served, attempts = true, 0
		began := time.Now()
		err = s.ServeConn(ctx, c)
		if ctx.Err() != nil {
			return nil
		}
		if opts.Once {
			return err
		}
		if time.Since(began) >= dialResetAfter {
			backoff = lo
		}
		st.Redials.Add(1)
		s.log.Info("frontend went away; dialling its socket again", "path", path, "err", err, "retry_in", backoff)
		warn = ratelimit.New(1, 30*time.Second)
		warn.Allow() // the line above said it; the next warning comes in 30 s
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, hi)
	}
}

func dialUnix(ctx context.Context, path string) (*net.UnixConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	return c.(*net.UnixConn), nil
}
