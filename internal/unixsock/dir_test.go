package unixsock

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

func TestDefaultPath(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	if got := DefaultPath(); got != "/run/user/1000/vunet/vunet.sock" {
		t.Errorf("with XDG_RUNTIME_DIR: %s", got)
	}
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	want := filepath.Join(tmp, "vunet-"+strconv.Itoa(os.Geteuid()), "vunet.sock")
	for _, xdg := range []string{"", "relative/dir"} {
		t.Setenv("XDG_RUNTIME_DIR", xdg)
		if got := DefaultPath(); got != want {
			t.Errorf("XDG_RUNTIME_DIR=%q: %s, want %s", xdg, got, want)
		}
	}
}

// TestPrivateDir: a new directory is 0700 whatever the umask; an existing
// private one is accepted; a wider one, a symlink, a file and (as root)
// another user's directory are refused with a reason. (Mutation checked:
// dropping the permission check lets the 0755 case through.)
func TestPrivateDir(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	base := t.TempDir()
	dir := filepath.Join(base, "vunet-1")
	if err := PrivateDir(dir); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("created %v, %v; want 0700", fi.Mode(), err)
	}
	if err := PrivateDir(dir); err != nil {
		t.Errorf("existing private directory: %v", err)
	}

	wide := filepath.Join(base, "wide")
	os.Mkdir(wide, 0o755)
	link := filepath.Join(base, "link")
	os.Symlink(dir, link)
	file := filepath.Join(base, "file")
	os.WriteFile(file, nil, 0o600)
	cases := map[string]string{wide: "mode 0755 lets other users in", link: "not a directory", file: "not a directory"}
	if os.Geteuid() == 0 {
		other := filepath.Join(base, "other")
		os.Mkdir(other, 0o700)
		if err := os.Chown(other, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		cases[other] = "belongs to uid 65534"
	}
	for path, want := range cases {
		err := PrivateDir(path)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want an error saying %q", filepath.Base(path), err, want)
		}
	}
	if fi, _ := os.Stat(wide); fi.Mode().Perm() != 0o755 {
		t.Errorf("PrivateDir changed an existing directory's mode to %v", fi.Mode())
	}
}
