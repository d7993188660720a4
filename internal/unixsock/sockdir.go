package unixsock

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
)

// SocketDir is a directory in which sockets are created while vunet is
// confined (--unix-forward-dir: unix forwards and exposes added at run
// time). The sandbox allows bind, connect and unlink there, but none of
// the mkdir, rename, chmod and chown that Listen uses to create a socket
// with exact permissions. So a socket's mode comes from the umask at
// bind(2) (held for the bind alone; nothing else creates files while vunet
// runs), and its group from the directory's setgid bit, which
// PrepareSocketDir sets before confinement; both are checked after the
// bind.
type SocketDir struct {
	path string
	mode os.FileMode
	gid  int
	// mu serialises binds: the umask is the process's.
	mu sync.Mutex
}

// SocketDirOptions say how PrepareSocketDir sets the directory up.
type SocketDirOptions struct {
	// Mode is each socket's permission bits; 0 means DefaultMode.
	Mode os.FileMode
	// GID, if not negative, is each socket's group: the directory gets
	// that group and the setgid bit (and the group may enter it).
	GID int
	// UID, if not negative, is the user the directory is given to: the
	// one vunet switches to after start-up (--runas), which must create
	// the sockets. Only root may pass it.
	UID int
}

// PrepareSocketDir makes sure dir can hold vunet's runtime sockets and
// returns it. It runs before confinement: it creates dir (0700) if it does
// not exist, gives it to o.UID and o.GID and sets the setgid bit for o.GID.
// An existing dir must be a directory (not a symbolic link) that belongs to
// vunet's user or to o.UID and that nobody else may write to: another user
// who could would replace vunet's sockets.
func PrepareSocketDir(dir string, o SocketDirOptions) (*SocketDir, error) {
	if o.Mode == 0 {
		o.Mode = DefaultMode
	}
	if o.Mode&^os.ModePerm != 0 {
		return nil, fmt.Errorf("socket directory %s: socket mode %v is not permission bits", dir, o.Mode)
	}
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("socket directory %s: not absolute", dir)
	}
	dir = filepath.Clean(dir)
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("socket directory %s: %w", dir, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return nil, fmt.Errorf("socket directory %s: %w", dir, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir():
		return nil, fmt.Errorf("socket directory %s: exists and is not a directory (%v)", dir, fi.Mode().Type())
	case !ok:
		return nil, fmt.Errorf("socket directory %s: cannot read its owner", dir)
	case int(st.Uid) != os.Geteuid() && (o.UID < 0 || int(st.Uid) != o.UID):
		return nil, fmt.Errorf("socket directory %s: belongs to uid %d, not to vunet's user (uid %d); remove it or choose another directory", dir, st.Uid, os.Geteuid())
	case fi.Mode().Perm()&0o022 != 0:
		return nil, fmt.Errorf("socket directory %s: mode %04o lets other users create and replace files in it; want no group or other write (chmod go-w %s)", dir, fi.Mode().Perm(), dir)
	}
	if o.UID >= 0 || o.GID >= 0 {
		if err := os.Lchown(dir, o.UID, o.GID); err != nil {
			return nil, fmt.Errorf("socket directory %s: %w", dir, err)
		}
	}
	perm := fi.Mode().Perm() | 0o700
	if o.GID >= 0 {
		// New files take the directory's group; the group may enter to
		// reach the sockets (their own mode says who may connect).
		perm |= os.ModeSetgid | 0o010
	}
	if err := os.Chmod(dir, perm); err != nil {
		return nil, fmt.Errorf("socket directory %s: %w", dir, err)
	}
	return &SocketDir{path: dir, mode: o.Mode, gid: o.GID}, nil
}

// Path returns the directory.
func (d *SocketDir) Path() string { return d.path }

// Holds reports whether path names a file directly in the directory (no
// subdirectory: none can be made while confined).
func (d *SocketDir) Holds(path string) bool {
	if !filepath.IsAbs(path) {
		return false
	}
	path = filepath.Clean(path)
	name := filepath.Base(path)
	return filepath.Dir(path) == d.path && name != "." && name != ".." && name != "/"
}

// Listen creates a listening socket at path, which must be in the
// directory, with the directory's socket mode and group; a stale socket
// of vunet's user is replaced and anything else refused, as by Listen.
// Closing the listener does not unlink the file.
func (d *SocketDir) Listen(path, name string) (*net.UnixListener, error) {
	if !d.Holds(path) {
		return nil, fmt.Errorf("%s %s: not a file directly in %s", name, path, d.path)
	}
	path = filepath.Clean(path)
	if len(path) >= MaxPath {
		return nil, fmt.Errorf("%s %s: %d bytes; a Unix socket path must be shorter than %d", name, path, len(path), MaxPath)
	}
	if err := checkStale(path, name); err != nil {
		return nil, err
	}
	d.mu.Lock()
	old := syscall.Umask(int(0o777 &^ d.mode))
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	d.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", name, path, err)
	}
	l.SetUnlinkOnClose(false)
	if err := d.check(path); err != nil {
		l.Close()
		os.Remove(path)
		return nil, fmt.Errorf("%s %s: %w", name, path, err)
	}
	return l, nil
}

// check makes sure the socket got the mode and group it should have: a
// file system that ignores the setgid bit, or a directory whose group was
// changed since start-up, must not leave it reachable by other users.
func (d *SocketDir) check(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if fi.Mode().Perm() != d.mode {
		return fmt.Errorf("created with mode %04o, not %04o", fi.Mode().Perm(), d.mode)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && d.gid >= 0 && int(st.Gid) != d.gid {
		return fmt.Errorf("created with group %d, not %d (has the directory lost its setgid bit or group?)", st.Gid, d.gid)
	}
	return nil
}
