package unixsock

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
)

// DefaultName is the file name of the default vhost-user socket.
const DefaultName = "vunet.sock"

// DefaultPath is the vhost-user socket vunet listens on when neither
// --socket nor --connect is given: $XDG_RUNTIME_DIR/vunet/vunet.sock (the
// per-user runtime directory a session manager creates, 0700 and cleaned at
// logout), else vunet-UID/vunet.sock in the system's temporary directory.
// An XDG_RUNTIME_DIR that is not absolute is ignored, as the XDG base
// directory specification asks.
func DefaultPath() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(d) {
		return filepath.Join(d, "vunet", DefaultName)
	}
	return filepath.Join(os.TempDir(), "vunet-"+strconv.Itoa(os.Geteuid()), DefaultName)
}

// PrivateDir makes sure dir is a directory only vunet's user may enter:
// it creates it with mode 0700 if it does not exist, and refuses one that
// is a symbolic link or another kind of file, belongs to another user, or
// lets anyone else in. In a shared directory such as /tmp another user may
// have created the name first, to read or replace vunet's socket.
func PrivateDir(dir string) error {
	err := os.Mkdir(dir, 0o700)
	created := err == nil
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("socket directory %s: %w", dir, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("socket directory %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("socket directory %s: exists and is not a directory (%v); remove it or choose --socket", dir, fi.Mode().Type())
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("socket directory %s: cannot read its owner", dir)
	}
	if int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("socket directory %s: belongs to uid %d, not to vunet's user (uid %d); remove it or choose --socket", dir, st.Uid, os.Geteuid())
	}
	if created && fi.Mode().Perm() != 0o700 {
		// The umask may have taken bits vunet needs; never adds any.
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("socket directory %s: %w", dir, err)
		}
		return nil
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("socket directory %s: mode %04o lets other users in; want 0700 (chmod 700 %s) or choose --socket", dir, perm, dir)
	}
	return nil
}
