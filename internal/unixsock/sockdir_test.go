package unixsock

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestSocketDir: PrepareSocketDir creates the directory private to
// vunet's user (setgid and the group's with a GID); Listen creates a
// socket with exactly the mode asked for whatever the umask, in the
// directory only, replaces a stale socket, and refuses a live one with
// EADDRINUSE (what a carried-over forward waits on).
func TestSocketDir(t *testing.T) {
	base := t.TempDir()
	old := syscall.Umask(0o002) // a lax umask must not widen anything
	defer syscall.Umask(old)
	gid := -1
	if os.Geteuid() == 0 {
		gid = 65534
	}
	dir := filepath.Join(base, "fwd")
	d, err := PrepareSocketDir(dir, SocketDirOptions{Mode: 0o660, GID: gid, UID: -1})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(dir)
	if err != nil || !fi.IsDir() || fi.Mode().Perm()&0o027 != 0 || fi.Mode().Perm()&0o700 != 0o700 {
		t.Fatalf("directory: %v, %v", fi, err)
	}
	if gid >= 0 && (fi.Mode()&os.ModeSetgid == 0 || fi.Sys().(*syscall.Stat_t).Gid != uint32(gid)) {
		t.Errorf("directory with --socket-group: mode %v gid %d; want setgid, group %d", fi.Mode(), fi.Sys().(*syscall.Stat_t).Gid, gid)
	}
	for _, p := range []string{filepath.Join(base, "x.sock"), filepath.Join(dir, "sub", "x.sock"), dir, "x.sock"} {
		if d.Holds(p) {
			t.Errorf("Holds(%q) = true", p)
		}
		if _, err := d.Listen(p, "test socket"); err == nil {
			t.Errorf("Listen(%q) outside the directory succeeded", p)
		}
	}
	path := filepath.Join(dir, "a.sock")
	l, err := d.Listen(path, "test socket")
	if err != nil {
		t.Fatal(err)
	}
	fi, err = os.Lstat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket: %v, %v; want a 0660 socket", fi, err)
	}
	if gid >= 0 && fi.Sys().(*syscall.Stat_t).Gid != uint32(gid) {
		t.Errorf("socket group %d, want %d (from the setgid directory)", fi.Sys().(*syscall.Stat_t).Gid, gid)
	}
	if _, err := d.Listen(path, "test socket"); !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("Listen on a live socket: %v, want EADDRINUSE", err)
	}
	l.Close() // the file stays: stale
	l2, err := d.Listen(path, "test socket")
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer l2.Close()
	if c, err := net.Dial("unix", path); err != nil {
		t.Errorf("dial the new socket: %v", err)
	} else {
		c.Close()
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Listen(filepath.Join(dir, "file"), "test socket"); err == nil {
		t.Error("Listen replaced a regular file")
	}
}

// TestPrepareSocketDirRefuses: a directory others may write to, or a
// symbolic link in its place, is refused.
func TestPrepareSocketDirRefuses(t *testing.T) {
	base := t.TempDir()
	open := filepath.Join(base, "open")
	if err := os.Mkdir(open, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := PrepareSocketDir(open, SocketDirOptions{GID: -1, UID: -1}); err == nil {
		t.Error("a world-writable directory was accepted")
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(t.TempDir(), link); err != nil {
		t.Fatal(err)
	}
	if _, err := PrepareSocketDir(link, SocketDirOptions{GID: -1, UID: -1}); err == nil {
		t.Error("a symbolic link was accepted")
	}
	if _, err := PrepareSocketDir("rel", SocketDirOptions{GID: -1, UID: -1}); err == nil {
		t.Error("a relative directory was accepted")
	}
}
