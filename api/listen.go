package api

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// maxUnixPath is the capacity of sockaddr_un.sun_path on Linux, including
// the terminating NUL.
const maxUnixPath = 108

// Listen creates the API socket at path with mode 0600, replacing a stale
// socket file left by a crashed run but never a live socket or another kind
// of file. Closing the listener does not unlink the file; the caller
// removes it when done.
//
// The socket is never reachable with wider permissions, whatever the
// umask: it is bound inside a fresh 0700 directory, chmodded, then renamed
// into place. Only when that temporary path would be too long for a
// sockaddr_un does Listen fall back to binding in place and chmodding,
// which leaves a window as wide as the umask allows.
func Listen(path string) (*net.UnixListener, error) {
	if err := checkStale(path); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".vunet-api-")
	if err != nil {
		return nil, fmt.Errorf("api socket %s: %w", path, err)
	}
	defer os.Remove(dir)
	tmp := filepath.Join(dir, "s")
	if len(tmp) >= maxUnixPath {
		return listenChmod(path, path)
	}
	l, err := listenChmod(tmp, path)
	if err != nil {
		return nil, err
	}
	// rename(2) moves the bound inode; clients connecting to path reach
	// this listener.
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("api socket %s: %w", path, err)
	}
	return l, nil
}

// listenChmod binds a socket at bind and makes it mode 0600; errors name the
// API socket path.
func listenChmod(bind, path string) (*net.UnixListener, error) {
	l, err := listenUnix(bind)
	if err != nil {
		return nil, fmt.Errorf("api socket %s: %w", path, err)
	}
	if err := os.Chmod(bind, 0o600); err != nil {
		l.Close()
		os.Remove(bind)
		return nil, fmt.Errorf("api socket %s: %w", path, err)
	}
	return l, nil
}

func listenUnix(path string) (*net.UnixListener, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	return l, nil
}

// checkStale refuses a path that is a live socket or not a socket, and
// removes a dead socket file.
func checkStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("api socket %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("api socket %s: exists and is not a socket", path)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("api socket %s: another process is serving it (is vunet already running?)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("api socket %s: removing stale socket: %w", path, err)
	}
	return nil
}
