// Package systemd implements the two small systemd protocols vunet uses,
// without libsystemd: readiness notification (sd_notify: datagrams to
// $NOTIFY_SOCKET) and socket activation (sd_listen_fds: listening sockets
// inherited from fd 3 on, announced by $LISTEN_FDS and $LISTEN_PID).
package systemd

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
)

// Notification states understood by systemd (see sd_notify(3)).
const (
	Ready    = "READY=1"
	Stopping = "STOPPING=1"
)

// Notifier sends state notifications to the service manager.
type Notifier struct {
	addr *net.UnixAddr
	// conn is connected when the notifier is made, before vunet confines
	// itself: a sandboxed process may not be allowed to reach the socket
	// afterwards (Landlock scopes abstract sockets, and ABI 9 restricts
	// connecting to pathname sockets).
	mu   sync.Mutex
	conn *net.UnixConn
}

// NewNotifier returns a notifier for $NOTIFY_SOCKET, or nil when it is not
// set (not started by systemd, or no Type=notify): callers then simply skip
// notifying. A path starting with '@' names an abstract socket.
func NewNotifier() (*Notifier, error) {
	return notifierFor(os.Getenv("NOTIFY_SOCKET"))
}

func notifierFor(path string) (*Notifier, error) {
	switch {
	case path == "":
		return nil, nil
	case path[0] != '/' && path[0] != '@':
		// vsock: addresses (systemd in a VM) are not supported.
		return nil, fmt.Errorf("NOTIFY_SOCKET %q: only unix socket paths are supported", path)
	}
	n := &Notifier{addr: &net.UnixAddr{Name: path, Net: "unixgram"}}
	// A failed dial now is not fatal: Notify dials again.
	n.conn, _ = net.DialUnix("unixgram", nil, n.addr)
	return n, nil
}

// Notify sends state, one or more newline-separated VAR=value assignments
// such as Ready, Stopping or "STATUS=serving". A nil Notifier does nothing.
// It writes on the socket connected by NewNotifier and, if that fails (the
// service manager was restarted), dials once more.
func (n *Notifier) Notify(state string) error {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn != nil {
		if _, err := n.conn.Write([]byte(state)); err == nil {
			return nil
		}
		n.conn.Close()
		n.conn = nil
	}
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	n.conn = c
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}

// Close releases the notifier's socket.
func (n *Notifier) Close() error {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn == nil {
		return nil
	}
	err := n.conn.Close()
	n.conn = nil
	return err
}

// listenFDsStart is the first inherited descriptor (SD_LISTEN_FDS_START).
const listenFDsStart = 3

// ErrNotActivated means no sockets were passed to this process.
var ErrNotActivated = errors.New("not socket-activated")

// activatedFDs parses $LISTEN_PID and $LISTEN_FDS (read through getenv)
// for process pid and returns how many descriptors were passed; 0 with
// ErrNotActivated if none were passed to this process. A LISTEN_PID of
// another process means the variables were inherited from a parent, not
// meant for us.
func activatedFDs(getenv func(string) string, pid int) (int, error) {
	ps, ns := getenv("LISTEN_PID"), getenv("LISTEN_FDS")
	if ps == "" || ns == "" {
		return 0, ErrNotActivated
	}
	p, err := strconv.Atoi(ps)
	if err != nil {
		return 0, fmt.Errorf("LISTEN_PID %q: not a number", ps)
	}
	if p != pid {
		return 0, ErrNotActivated
	}
	n, err := strconv.Atoi(ns)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("LISTEN_FDS %q: not a count", ns)
	}
	if n == 0 {
		return 0, ErrNotActivated
	}
	return n, nil
}

// Activated reports whether socket activation passed descriptors to this
// process, without taking them.
func Activated() bool {
	n, err := activatedFDs(os.Getenv, os.Getpid())
	return err == nil && n > 0
}

// UnixListener takes the first socket passed by socket activation, which
// must be a listening Unix stream socket, and returns it as a listener.
// Further descriptors are closed (vunet listens on one socket). It unsets
// the LISTEN_* variables so they do not leak to child processes. It returns
// ErrNotActivated when nothing was passed.
func UnixListener() (*net.UnixListener, error) {
	n, err := activatedFDs(os.Getenv, os.Getpid())
	if err != nil {
		return nil, err
	}
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	for fd := listenFDsStart + 1; fd < listenFDsStart+n; fd++ {
		syscall.Close(fd)
	}
	return listenerFromFD(listenFDsStart)
}

// listenerFromFD wraps fd, which it takes ownership of, as a Unix stream
// listener.
func listenerFromFD(fd int) (*net.UnixListener, error) {
	// systemd passes the descriptors without close-on-exec.
	syscall.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), "LISTEN_FD_"+strconv.Itoa(fd))
	if f == nil {
		return nil, fmt.Errorf("socket activation: fd %d is not valid", fd)
	}
	defer f.Close() // FileListener dups it
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("socket activation: fd %d: %w", fd, err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("socket activation: fd %d is a %s socket, want a unix stream socket (ListenStream=/path)", fd, l.Addr().Network())
	}
	// The socket file belongs to the service manager, which may activate
	// us again: never unlink it.
	ul.SetUnlinkOnClose(false)
	return ul, nil
}

// ActivatedPath returns the filesystem path of the socket passed at fd 3,
// without taking it, so configuration can default --socket to it; "" when
// not activated or the socket has no path.
func ActivatedPath() string {
	if !Activated() {
		return ""
	}
	sa, err := syscall.Getsockname(listenFDsStart)
	if err != nil {
		return ""
	}
	if ua, ok := sa.(*syscall.SockaddrUnix); ok && len(ua.Name) > 0 && ua.Name[0] != '@' {
		return ua.Name
	}
	return ""
}
