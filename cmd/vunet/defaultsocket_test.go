package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/testutil"
	"github.com/vunet/vunet/internal/vunettest"
)

// TestDefaultSocketConfig: without --socket or --connect the socket is
// $XDG_RUNTIME_DIR/vunet/vunet.sock, its directory is created 0700, and
// qemu-args names the same path; --print-config creates nothing.
func TestDefaultSocketConfig(t *testing.T) {
	xdg := t.TempDir()
	want := filepath.Join(xdg, "vunet", "vunet.sock")
	env := map[string]string{"XDG_RUNTIME_DIR": xdg}
	r := runVunet(t, env, "--print-config")
	if r.err != nil || !strings.Contains(r.stdout, want) {
		t.Fatalf("--print-config: %v\n%s", r.err, r.stdout)
	}
	if _, err := os.Stat(filepath.Dir(want)); !os.IsNotExist(err) {
		t.Errorf("--print-config created the socket directory (%v)", err)
	}
	r = runVunet(t, env)
	if r.err != nil || r.cfg.Socket != want || r.cfg.Connect != "" {
		t.Fatalf("no socket flag: err %v, socket %q, connect %q; want socket %s", r.err, r.cfg.Socket, r.cfg.Connect, want)
	}
	if fi, err := os.Stat(filepath.Dir(want)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("socket directory: %v %v, want 0700", fi.Mode(), err)
	}
	r = runVunet(t, env, "qemu-args", "--plain")
	if r.err != nil || !strings.Contains(r.stdout, "socket,id=vunet0,path="+want+"\n") {
		t.Errorf("qemu-args without --socket: %v\n%s", r.err, r.stdout)
	}
	// A directory other users may enter is refused, not used.
	os.Chmod(filepath.Dir(want), 0o755)
	if r = runVunet(t, env); r.err == nil || !strings.Contains(r.line(), "lets other users in") {
		t.Errorf("0755 socket directory: %v", r.err)
	}
}

// startDefault runs the real binary with no socket flag and returns it
// with its output.
func startDefault(t *testing.T, xdg string) (*exec.Cmd, *testutil.Buffer, chan error) {
	t.Helper()
	out := &testutil.Buffer{}
	cmd := exec.Command(vunettest.Binary(t))
	cmd.Env = append(os.Environ(), "XDG_RUNTIME_DIR="+xdg)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	return cmd, out, done
}

// TestDefaultSocketBinary runs the real vunet without a socket flag: it
// listens on the default socket (0600), prints the QEMU arguments for it;
// a second vunet refuses to take that live socket over; after the first
// stopped, a third replaces its stale socket file. (Mutation checked:
// without the live-socket check in unixsock the second one starts.)
func TestDefaultSocketBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the vunet binary")
	}
	xdg := t.TempDir()
	sock := filepath.Join(xdg, "vunet", "vunet.sock")
	first, out, done := startDefault(t, xdg)
	hint := "-chardev socket,id=vunet0,path=" + sock + " -netdev vhost-user"
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), hint) {
		if time.Now().After(deadline) {
			t.Fatalf("no QEMU arguments for %s printed:\n%s", sock, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("default socket: %v %v", fi, err)
	}

	second := exec.Command(vunettest.Binary(t))
	second.Env = append(os.Environ(), "XDG_RUNTIME_DIR="+xdg)
	var b bytes.Buffer
	second.Stdout, second.Stderr = &b, &b
	err := runWithin(second, 10*time.Second)
	if err == nil || !strings.Contains(b.String(), "another process is serving it") {
		t.Errorf("second vunet on the live default socket: %v\n%s", err, b.String())
	}

	first.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("first vunet did not stop")
	}
	_, out3, _ := startDefault(t, xdg)
	deadline = time.Now().Add(20 * time.Second)
	for !strings.Contains(out3.String(), hint) {
		if time.Now().After(deadline) {
			t.Fatalf("third vunet did not take over the stale socket:\n%s", out3.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runWithin runs cmd, killing it after d.
func runWithin(cmd *exec.Cmd, d time.Duration) error {
	if err := cmd.Start(); err != nil {
		return err
	}
	t := time.AfterFunc(d, func() { cmd.Process.Kill() })
	defer t.Stop()
	return cmd.Wait()
}
