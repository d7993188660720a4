package unixsock

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestModeWhateverTheUmask: with umask 000 the socket is still 0600 (or
// the mode asked for), with the group asked for.
func TestModeWhateverTheUmask(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	for _, tc := range []struct {
		mode os.FileMode
		gid  int
		want os.FileMode
	}{
		{0, -1, 0o600},
		{0o660, os.Getgid(), 0o660},
		{0o666, -1, 0o666},
	} {
		path := filepath.Join(t.TempDir(), "s")
		l, err := Listen(path, Options{Name: "test socket", Mode: tc.mode, GID: tc.gid})
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Lstat(path)
		l.Close()
		if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != tc.want {
			t.Errorf("mode %v: got %v, %v; want a %v socket", tc.mode, fi.Mode(), err, tc.want)
			continue
		}
		if tc.gid >= 0 && int(fi.Sys().(*syscall.Stat_t).Gid) != tc.gid {
			t.Errorf("group %d, want %d", fi.Sys().(*syscall.Stat_t).Gid, tc.gid)
		}
	}
	if _, err := Listen(filepath.Join(t.TempDir(), "s"), Options{Mode: os.ModeSetuid | 0o600}); err == nil {
		t.Error("setuid mode accepted")
	}
}

// TestOtherUsersSocket: a socket file of another user is never removed
// or taken over, even when dead.
func TestOtherUsersSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a socket owned by someone else")
	}
	path := filepath.Join(t.TempDir(), "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close() // dead: a stale socket, but not ours
	if err := os.Lchown(path, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path, Options{Name: "vhost-user socket", GID: -1}); err == nil || !strings.Contains(err.Error(), "belongs to uid 65534") {
		t.Fatalf("another user's socket: %v", err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Errorf("another user's socket removed: %v", err)
	}
}

// TestStaleAndLive: a dead socket of ours is replaced, a live one or a
// regular file refused.
func TestStaleAndLive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	l, err := Listen(path, Options{Name: "x", GID: -1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path, Options{Name: "x", GID: -1}); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Errorf("live socket: %v", err)
	}
	l.Close()
	l2, err := Listen(path, Options{Name: "x", GID: -1})
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l2.Close()
	file := filepath.Join(t.TempDir(), "f")
	os.WriteFile(file, nil, 0o600)
	if _, err := Listen(file, Options{Name: "x", GID: -1}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("regular file: %v", err)
	}
}
