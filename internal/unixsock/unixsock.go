// Package unixsock creates vunet's listening Unix sockets (the vhost-user
// socket and the control API) with exactly the permissions asked for,
// whatever the umask, and refuses socket paths it must not take over.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
)

// MaxPath is the capacity of sockaddr_un.sun_path on Linux, including
// the terminating NUL.
const MaxPath = 108

// DefaultMode is a socket only its owner (and root) may connect to.
const DefaultMode os.FileMode = 0o600

// Options say how a socket is created.
type Options struct {
	// Name is used in errors ("vhost-user socket", "api socket").
	Name string
	// Mode is the socket file's permission bits; 0 means DefaultMode.
	Mode os.FileMode
	// GID, if not negative, becomes the socket file's group (the group
	// must be one vunet's user belongs to, or vunet must be root).
	GID int
}

// Listen creates a listening socket at path, replacing a stale socket file
// left by a crashed run of the same user, but never a live socket, another
// kind of file, or a socket that belongs to another user. Closing the
// listener does not unlink the file; the caller removes it when done.
//
// The socket is never reachable with wider permissions than asked for: it
// is bound inside a fresh 0700 directory, given its mode and group, then
// renamed into place. Only when that temporary path would be too long for
// a sockaddr_un is it bound in place and then chmodded, which leaves a
// window as wide as the umask allows (the vhost-user server checks every
// peer's credentials, so that window does not let anyone in).
func Listen(path string, o Options) (*net.UnixListener, error) {
	if o.Mode == 0 {
		o.Mode = DefaultMode
	}
	if o.Mode&^os.ModePerm != 0 {
		return nil, fmt.Errorf("%s %s: mode %v is not permission bits", o.Name, path, o.Mode)
	}
	if err := checkStale(path, o.Name); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".vunet-sock-")
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", o.Name, path, err)
	}
	defer os.Remove(dir)
	tmp := filepath.Join(dir, "s")
	if len(tmp) >= MaxPath {
		return listenSet(path, path, o)
	}
	l, err := listenSet(tmp, path, o)
	if err != nil {
		return nil, err
	}
	// rename(2) moves the bound inode; clients connecting to path reach
	// this listener.
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("%s %s: %w", o.Name, path, err)
	}
	return l, nil
}

// listenSet binds a socket at bind and gives it o's mode and group; errors
// name path.
func listenSet(bind, path string, o Options) (*net.UnixListener, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: bind, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", o.Name, path, err)
	}
	l.SetUnlinkOnClose(false)
	fail := func(err error) (*net.UnixListener, error) {
		l.Close()
		os.Remove(bind)
		return nil, fmt.Errorf("%s %s: %w", o.Name, path, err)
	}
	if o.GID >= 0 {
		if err := os.Lchown(bind, -1, o.GID); err != nil {
			return fail(fmt.Errorf("setting group %d: %w", o.GID, err))
		}
	}
	if err := os.Chmod(bind, o.Mode); err != nil {
		return fail(err)
	}
	return l, nil
}

// checkStale refuses a path that is a live socket, not a socket, or a
// socket of another user, and removes a dead socket file of ours.
func checkStale(path, name string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", name, path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s %s: exists and is not a socket", name, path)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s %s: belongs to uid %d, not to vunet's user (uid %d): remove it or choose another path", name, path, st.Uid, os.Geteuid())
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		// EADDRINUSE, as for a TCP port: a carried-over forward waits for
		// the source vunet on this host to let go of it.
		return fmt.Errorf("%s %s: another process is serving it (is vunet already running?): %w", name, path, syscall.EADDRINUSE)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s %s: removing stale socket: %w", name, path, err)
	}
	return nil
}
