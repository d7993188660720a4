package appliance

import (
	"log/slog"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/vhost/vhosttest"
)

// TestVHostSocketAccess: the vhost-user socket is 0600 whatever the umask,
// or the mode and group asked for, and the frontend of the socket's group
// (here our own) is served, while the set-up timeout drops a silent one.
func TestVHostSocketAccess(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	for _, tc := range []struct {
		name  string
		group string
		mode  os.FileMode
	}{
		{"default", "", 0o600},
		{"group", strconv.Itoa(os.Getgid()), 0o660},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, t.TempDir())
			cfg.API = ""
			cfg.SocketGroup, cfg.SocketMode = tc.group, tc.mode
			cfg.SetupTimeout = 300 * time.Millisecond
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			a, err := New(cfg, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			stop, _ := start(t, a)
			defer stop()
			fi, err := os.Lstat(cfg.Socket)
			if err != nil || fi.Mode().Perm() != tc.mode {
				t.Fatalf("socket %v, %v; want mode %v", fi, err, tc.mode)
			}
			if tc.group != "" && strconv.Itoa(int(fi.Sys().(*syscall.Stat_t).Gid)) != tc.group {
				t.Errorf("socket group %d, want %s", fi.Sys().(*syscall.Stat_t).Gid, tc.group)
			}
			f, err := vhosttest.Dial(cfg.Socket, vhosttest.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := f.Setup(^uint64(0)); err != nil {
				t.Fatal(err)
			}
			if st := &a.VHost.Stats; st.PeersRefused.Load() != 0 || st.ActiveSessions.Load() != 1 {
				t.Errorf("peers refused %d, active sessions %d", st.PeersRefused.Load(), st.ActiveSessions.Load())
			}
			f.Close()
			g, err := vhosttest.Dial(cfg.Socket, vhosttest.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			deadline := time.Now().Add(5 * time.Second)
			for a.VHost.Stats.SetupTimeouts.Load() == 0 {
				if time.Now().After(deadline) {
					t.Fatal("silent frontend not dropped")
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}
