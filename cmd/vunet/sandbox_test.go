package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/sandbox"
	"github.com/vunet/vunet/internal/testutil"
	"github.com/vunet/vunet/internal/vunettest"
)

// procStatus returns the fields of /proc/PID/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return fields
}

// TestSandboxBinary: the real binary, started with the defaults, is
// confined once it says "vunet ready" (vunettest.Start checks NoNewPrivs,
// Seccomp and the switch to nobody), has no capabilities left, and says
// what it applied; with --sandbox=off it is not confined.
func TestSandboxBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the vunet binary")
	}
	// systemd's notification socket in a directory only root may enter:
	// vunet connects to it before the sandbox, so STOPPING=1 still
	// arrives from the confined process.
	notify := filepath.Join(t.TempDir(), "notify")
	pc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	t.Setenv("NOTIFY_SOCKET", notify)
	recv := func() string {
		t.Helper()
		pc.SetReadDeadline(time.Now().Add(20 * time.Second))
		buf := make([]byte, 256)
		n, err := pc.Read(buf)
		if err != nil {
			t.Fatalf("waiting for sd_notify: %v", err)
		}
		return string(buf[:n])
	}

	apiSock := filepath.Join(t.TempDir(), "api.sock")
	in := vunettest.Start(t, "--api", apiSock)
	if got := recv(); got != "READY=1" {
		t.Errorf("first notification %q, want READY=1", got)
	}
	st := procStatus(t, in.Pid())
	if st["NoNewPrivs"] != "1" || st["Seccomp"] != "2" || st["Seccomp_filters"] != "2" {
		t.Errorf("status: NoNewPrivs %q Seccomp %q Seccomp_filters %q", st["NoNewPrivs"], st["Seccomp"], st["Seccomp_filters"])
	}
	if os.Geteuid() == 0 {
		if st["CapEff"] != "0000000000000000" || st["CapPrm"] != "0000000000000000" {
			t.Errorf("capabilities after switching from root: CapEff %s CapPrm %s", st["CapEff"], st["CapPrm"])
		}
		self, _ := os.Readlink("/proc/self/ns/ipc")
		theirs, _ := os.Readlink("/proc/" + strconv.Itoa(in.Pid()) + "/ns/ipc")
		if self == theirs {
			t.Errorf("vunet shares the IPC namespace %s", self)
		}
	}
	if log := in.Log(); !strings.Contains(log, `msg="sandbox applied" mode=on`) {
		t.Errorf("no sandbox line in the log:\n%s", log)
	}
	// What was enforced is in the metrics.
	metrics := httpGet(t, apiSock, "/metrics")
	wantUID := os.Getuid()
	if wantUID == 0 {
		wantUID = 65534
	}
	for _, want := range []string{"vunet_sandbox_no_new_privs 1\n", "vunet_sandbox_seccomp_enforcing 1\n",
		"vunet_sandbox_seccomp_syscalls " + strconv.Itoa(sandbox.AllowedSyscalls()) + "\n",
		"vunet_sandbox_uid " + strconv.Itoa(wantUID) + "\n"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if err := in.Stop(); err != nil {
		t.Errorf("vunet exit: %v\n%s", err, in.Log())
	}
	if got := recv(); got != "STOPPING=1" {
		t.Errorf("notification at exit %q, want STOPPING=1", got)
	}
	t.Setenv("NOTIFY_SOCKET", "")

	off := vunettest.Start(t, "--sandbox=off")
	if st := procStatus(t, off.Pid()); st["Seccomp"] != "0" {
		t.Errorf("--sandbox=off: Seccomp %q, want 0", st["Seccomp"])
	}
}

// httpGet fetches path from the API socket.
func httpGet(t *testing.T, sock, path string) string {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}, Timeout: 10 * time.Second}
	resp, err := c.Get("http://vunet" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestSandboxTFTPRootUnreadable: started as root with a TFTP root only
// root may read, vunet refuses to start and says why (instead of failing
// every transfer later).
func TestSandboxTFTPRootUnreadable(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the vunet binary")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: the TFTP root check matters after switching from root")
	}
	root := filepath.Join(t.TempDir(), "tftp")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "v.sock")
	cmd := exec.Command(vunettest.Binary(t), "--socket", sock, "--tftp-root", root)
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatal("vunet started with an unreadable TFTP root")
	}
	want := "vunet: tftp: root " + root + ": statat .: permission denied: vunet switched from root to nobody (uid 65534), which may not reach it"
	if err == nil || !strings.Contains(string(out), want) {
		t.Fatalf("exit %v, output:\n%s\nwant %q", err, out, want)
	}
}

// startConnect runs the real binary in --connect mode and returns its
// combined output once it has logged want or exited.
func startConnect(t *testing.T, sock, want string) (out string, exited bool) {
	t.Helper()
	var buf testutil.Buffer
	cmd := exec.Command(vunettest.Binary(t), "--connect", sock, "--log-level", "debug")
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		<-done
	}()
	deadline := time.After(20 * time.Second)
	for !strings.Contains(buf.String(), want) {
		select {
		case <-done:
			return buf.String(), true
		case <-deadline:
			t.Fatalf("vunet --connect never logged %q:\n%s", want, buf.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return buf.String(), false
}

// TestSandboxConnect: in --connect mode vunet dials QEMU's socket after
// the sandbox, so it must still be allowed to (Landlock restricts connect
// to pathname sockets from ABI 9 on; vunet's rule covers the socket's
// directory); and, started as root, a socket only root may reach is a
// start-up error naming the user, not a silent retry loop.
func TestSandboxConnect(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the vunet binary")
	}
	// A directory the switched-to user can walk to (t.TempDir's parent
	// is private to root).
	dir, err := os.MkdirTemp("", "vu-connect")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "qemu.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := os.Chmod(sock, 0o777); err != nil { // QEMU's socket, open to vunet's user
		t.Fatal(err)
	}
	accepted := make(chan struct{})
	go func() {
		if c, err := l.Accept(); err == nil {
			close(accepted)
			defer c.Close()
			io.Copy(io.Discard, c)
		}
	}()
	if out, exited := startConnect(t, sock, "frontend connected"); exited {
		t.Fatalf("vunet --connect exited:\n%s", out)
	}
	select {
	case <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("the listener never accepted vunet")
	}

	if os.Geteuid() != 0 {
		return
	}
	private := filepath.Join(t.TempDir(), "qemu.sock") // in a 0700 directory
	pl, err := net.Listen("unix", private)
	if err != nil {
		t.Fatal(err)
	}
	defer pl.Close()
	out, exited := startConnect(t, private, "frontend connected")
	want := "vunet: --connect " + private + ": search " + filepath.Dir(private) + ": permission denied: vunet switched from root to nobody"
	if !exited || !strings.Contains(out, want) {
		t.Fatalf("exited %v, output:\n%s\nwant %q", exited, out, want)
	}
}

// TestLogSandboxWithoutLandlock: on a kernel without Landlock the sandbox
// is best effort, and the log says what is missing.
func TestLogSandboxWithoutLandlock(t *testing.T) {
	var buf testutil.Buffer
	logSandbox(slog.New(slog.NewTextHandler(&buf, nil)), sandbox.Status{Mode: sandbox.On, NoNewPrivs: true, Seccomp: true, Syscalls: 80})
	if !strings.Contains(buf.String(), "Landlock is not available on this kernel: the filesystem is not restricted") {
		t.Errorf("log:\n%s", buf.String())
	}
	buf = testutil.Buffer{}
	logSandbox(slog.New(slog.NewTextHandler(&buf, nil)), sandbox.Status{Mode: sandbox.On, Landlock: true, LandlockABI: 7})
	if strings.Contains(buf.String(), "Landlock is not available") {
		t.Errorf("warning with Landlock in force:\n%s", buf.String())
	}
}

// TestSandboxUnixForwardDir: the confined binary adds and removes unix
// forwards at run time in --unix-forward-dir (bind, the umask for the
// mode, unlink: what the sandbox allows there and only there), with
// --socket-mode and, started as root, --socket-group and the switched-to
// user as owner; replaces a stale socket of its own there; refuses a path
// elsewhere with the directory's name; and removes the socket at exit.
// Runtime exposes: a path outside the directory is refused, and (as root)
// a socket the switched-to user may not write, checked after the switch.
func TestSandboxUnixForwardDir(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the vunet binary")
	}
	base, err := os.MkdirTemp("", "vu-fwddir")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil { // nobody must reach it
		t.Fatal(err)
	}
	dir := filepath.Join(base, "fwd")
	apiSock := filepath.Join(t.TempDir(), "api.sock")
	args := []string{"--api", apiSock, "--unix-forward-dir", dir, "--socket-mode", "0660"}
	root := os.Geteuid() == 0
	if root {
		args = append(args, "--socket-group", "65534")
	}
	in := vunettest.Start(t, args...)
	cli := func(args ...string) (string, error) {
		out, err := exec.Command(vunettest.Binary(t), args...).CombinedOutput()
		return string(out), err
	}
	path := filepath.Join(dir, "app.sock")
	if out, err := cli("forward", "add", "--api", apiSock, "unix:"+path+":8080"); err != nil || !strings.Contains(out, "added unix:"+path+":8080") {
		t.Fatalf("forward add: %v\n%s\n%s", err, out, in.Log())
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket %s: %v, %v; want a 0660 socket", path, fi, err)
	}
	if st := fi.Sys().(*syscall.Stat_t); root && (st.Uid != 65534 || st.Gid != 65534) {
		t.Errorf("socket owned by %d:%d, want 65534:65534 (--runas nobody, --socket-group 65534)", st.Uid, st.Gid)
	}
	if c, err := net.Dial("unix", path); err != nil {
		t.Errorf("dial %s: %v", path, err)
	} else {
		c.Close()
	}
	if out, err := cli("forward", "list", "--api", apiSock); err != nil || !strings.Contains(out, "unix:"+path+":8080") {
		t.Errorf("forward list: %v\n%s", err, out)
	}
	if out, err := cli("forward", "remove", "--api", apiSock, "unix:"+path+":8080"); err != nil {
		t.Fatalf("forward remove: %v\n%s", err, out)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("socket after forward remove: %v; want it removed", err)
	}

	// A stale socket of vunet's user in the directory is replaced.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if root {
		if err := os.Lchown(stale, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := cli("forward", "add", "--api", apiSock, "unix:"+stale+":22"); err != nil {
		t.Fatalf("forward add over a stale socket: %v\n%s", err, out)
	}

	outside := filepath.Join(base, "app.sock")
	out, err := cli("forward", "add", "--api", apiSock, "unix:"+outside+":8080")
	if err == nil || !strings.Contains(out, "is not in --unix-forward-dir "+dir) {
		t.Errorf("forward add outside the directory: %v\n%s", err, out)
	}

	// Runtime exposes, checked by the confined vunet: outside the
	// directory refused; in it, a socket its user may not write (as root:
	// root's 0600 socket, vunet running as nobody) refused, one it may
	// accepted.
	out, err = cli("expose", "add", "--api", apiSock, "tcp:2375:unix:"+outside)
	if err == nil || !strings.Contains(out, outside+" is not directly in --unix-forward-dir "+dir) {
		t.Errorf("expose add outside the directory: %v\n%s", err, out)
	}
	svc := filepath.Join(dir, "svc.sock")
	sl, err := net.Listen("unix", svc)
	if err != nil {
		t.Fatal(err)
	}
	defer sl.Close()
	if root {
		if err := os.Chmod(svc, 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := cli("expose", "add", "--api", apiSock, "tcp:2375:unix:"+svc)
		if err == nil || !strings.Contains(out, "vunet (uid 65534) may not connect to it") {
			t.Errorf("expose add of a socket nobody may not write: %v\n%s", err, out)
		}
		if err := os.Chmod(svc, 0o666); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := cli("expose", "add", "--api", apiSock, "tcp:2375:unix:"+svc); err != nil || !strings.Contains(out, "added tcp:2375:unix:"+svc) {
		t.Errorf("expose add in the directory: %v\n%s", err, out)
	}
	if err := in.Stop(); err != nil {
		t.Errorf("vunet exit: %v\n%s", err, in.Log())
	}
	if _, err := os.Lstat(stale); !os.IsNotExist(err) {
		t.Errorf("runtime forward socket after exit: %v; want it removed", err)
	}
}
