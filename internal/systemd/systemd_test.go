package systemd

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestNotify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.sock")
	pc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	n, err := NewNotifier()
	if err != nil || n == nil {
		t.Fatalf("NewNotifier = %v, %v", n, err)
	}
	for _, state := range []string{Ready, "STATUS=serving\n" + Stopping} {
		if err := n.Notify(state); err != nil {
			t.Fatal(err)
		}
		pc.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 256)
		k, err := pc.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		if got := string(buf[:k]); got != state {
			t.Errorf("received %q, want %q", got, state)
		}
	}
}

func TestNotifyAbstract(t *testing.T) {
	name := "@vunet-test-" + strconv.Itoa(os.Getpid())
	pc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Skipf("abstract sockets unavailable: %v", err)
	}
	defer pc.Close()
	n, err := notifierFor(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Notify(Ready); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	k, err := pc.Read(buf)
	if err != nil || string(buf[:k]) != Ready {
		t.Errorf("received %q, %v", buf[:k], err)
	}
}

func TestNotifyUnset(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n, err := NewNotifier()
	if n != nil || err != nil {
		t.Fatalf("NewNotifier without NOTIFY_SOCKET = %v, %v; want nil, nil", n, err)
	}
	if err := n.Notify(Ready); err != nil {
		t.Errorf("nil Notifier: %v", err)
	}
	if _, err := notifierFor("vsock:2:9999"); err == nil {
		t.Error("vsock address accepted")
	}
	// A socket nobody listens on is an error to report, not a crash.
	n, _ = notifierFor(filepath.Join(t.TempDir(), "none"))
	if err := n.Notify(Ready); err == nil {
		t.Error("Notify to a missing socket succeeded")
	}
}

func TestActivatedFDs(t *testing.T) {
	const pid = 4242
	tests := []struct {
		pid, fds string
		want     int
		err      error // nil: success; ErrNotActivated; or errAny
	}{
		{"", "", 0, ErrNotActivated},
		{"4242", "", 0, ErrNotActivated},
		{"", "1", 0, ErrNotActivated},
		{"4243", "1", 0, ErrNotActivated}, // meant for another process
		{"4242", "0", 0, ErrNotActivated},
		{"4242", "1", 1, nil},
		{"4242", "3", 3, nil},
		{"x", "1", 0, errAny},
		{"4242", "-1", 0, errAny},
		{"4242", "two", 0, errAny},
	}
	for _, tt := range tests {
		env := map[string]string{"LISTEN_PID": tt.pid, "LISTEN_FDS": tt.fds}
		n, err := activatedFDs(func(k string) string { return env[k] }, pid)
		switch {
		case tt.err == nil && (err != nil || n != tt.want):
			t.Errorf("PID=%q FDS=%q: %d, %v; want %d", tt.pid, tt.fds, n, err, tt.want)
		case tt.err == ErrNotActivated && !errors.Is(err, ErrNotActivated):
			t.Errorf("PID=%q FDS=%q: %d, %v; want ErrNotActivated", tt.pid, tt.fds, n, err)
		case tt.err == errAny && (err == nil || errors.Is(err, ErrNotActivated)):
			t.Errorf("PID=%q FDS=%q: %d, %v; want a parse error", tt.pid, tt.fds, n, err)
		}
	}
}

var errAny = errors.New("any error")

// TestListenerFromFD wraps a real listening socket's descriptor.
func TestListenerFromFD(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.sock")
	orig, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	l, err := listenerFromFD(dupFD(t, orig))
	if err != nil {
		t.Fatal(err)
	}
	if got := l.Addr().String(); got != path {
		t.Errorf("Addr = %q, want %q", got, path)
	}
	accepted := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}
	l.Close()
	// The file stays for the service manager.
	if _, err := os.Lstat(path); err != nil {
		t.Errorf("socket file removed on Close: %v", err)
	}

	// A UDP socket is not what vunet can serve.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, err := listenerFromFD(dupFD(t, pc.(*net.UDPConn))); err == nil {
		t.Error("a UDP socket was accepted")
	}
}

// dupFD returns a new descriptor for c's socket, owned by the caller (an
// *os.File's would be closed again by its finalizer).
func dupFD(t *testing.T, c syscall.Conn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	rc.Control(func(s uintptr) { fd, err = syscall.Dup(int(s)) })
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

// TestActivationChild runs this test binary as a socket-activated child,
// the way systemd starts a service: the listening socket at fd 3 and
// LISTEN_FDS=1. LISTEN_PID cannot be known before the fork, so the child
// sets it to its own pid (systemd sets it in the child between fork and
// exec).
func TestActivationChild(t *testing.T) {
	if os.Getenv("VUNET_SYSTEMD_CHILD") == "1" {
		activationChild()
		return
	}
	path := filepath.Join(t.TempDir(), "v.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestActivationChild$", "-test.v")
	cmd.Env = append(os.Environ(), "VUNET_SYSTEMD_CHILD=1", "LISTEN_FDS=1")
	cmd.ExtraFiles = []*os.File{f} // becomes fd 3
	done := make(chan error, 1)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	// The child accepts one connection on the inherited socket and
	// writes its own view of the socket's path.
	var c net.Conn
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err = net.Dial("unix", path)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 512)
	k, _ := c.Read(buf)
	if err := <-done; err != nil {
		t.Fatalf("child: %v\n%s", err, out.String())
	}
	want := "ok " + path + " " + path
	if got := string(buf[:k]); got != want {
		t.Errorf("child said %q, want %q\n%s", got, want, out.String())
	}
}

// activationChild is the socket-activated side of TestActivationChild.
func activationChild() {
	os.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
	fail := func(err error) {
		os.Stderr.WriteString("child: " + err.Error() + "\n")
		os.Exit(3)
	}
	if !Activated() {
		fail(errors.New("not activated"))
	}
	peek := ActivatedPath()
	l, err := UnixListener()
	if err != nil {
		fail(err)
	}
	if os.Getenv("LISTEN_FDS") != "" || os.Getenv("LISTEN_PID") != "" {
		fail(errors.New("LISTEN_* left in the environment"))
	}
	if Activated() {
		fail(errors.New("still activated after taking the sockets"))
	}
	c, err := l.Accept()
	if err != nil {
		fail(err)
	}
	c.Write([]byte("ok " + peek + " " + l.Addr().String()))
	c.Close()
	l.Close()
}
