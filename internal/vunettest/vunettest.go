// Package vunettest runs the real vunet binary for end-to-end tests: it
// builds bin/vunet once per test binary, starts it on a fresh socket, waits
// until it serves, and stops it (printing its log if the test failed).
//
// Tests that boot guests run inside a private network namespace (see
// IsolateNetwork), so that whatever a guest does, nothing leaves the test's
// own loopback.
package vunettest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/testutil"
)

// isolatedEnv marks a test binary re-executed inside its own namespace.
const isolatedEnv = "VUNET_TEST_NETNS"

// IsolateNetwork is called from TestMain. On first entry it re-executes the
// test binary inside a new network namespace (`unshare --net`, loopback up)
// and exits with its status; inside, it returns and the tests run. Guests
// then reach only the servers the tests start on this namespace's
// loopback. When namespaces are unavailable (not root), it returns false
// and the caller should skip guest tests.
func IsolateNetwork() bool {
	if os.Getenv(isolatedEnv) == "1" {
		// Inside: bring loopback up (a new namespace starts with it down).
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "vunettest: ip link set lo up: %v: %s\n", err, out)
			os.Exit(1)
		}
		return true
	}
	if os.Geteuid() != 0 {
		return false
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		return false
	}
	self, err := os.Executable()
	if err != nil {
		return false
	}
	// The guest is built from Debian packages fetched with apt, which
	// cannot work inside the empty namespace: build (or find cached) now.
	if root, err := qemutest.RepoRoot(); err == nil {
		b := exec.Command(filepath.Join(root, "scripts", "build-guest.sh"))
		b.Dir = root
		if out, err := b.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "vunettest: building the test guest before entering the namespace: %v\n%s", err, out)
		}
	}
	cmd := exec.Command(unshare, append([]string{"--net", "--", self}, os.Args[1:]...)...)
	cmd.Env = append(os.Environ(), isolatedEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			os.Exit(ee.ExitCode())
		}
		fmt.Fprintf(os.Stderr, "vunettest: re-exec in a network namespace: %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
	return false
}

// Isolated reports whether this process runs in the namespace made by
// IsolateNetwork.
func Isolated() bool { return os.Getenv(isolatedEnv) == "1" }

var buildOnce struct {
	sync.Once
	path string
	err  error
}

// Binary builds bin/vunet (once per test binary) and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := qemutest.RepoRoot()
		if err != nil {
			buildOnce.err = err
			return
		}
		out := filepath.Join(root, "build", "test-bin", "vunet")
		cmd := exec.Command("go", "build", "-o", out, "./cmd/vunet")
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			buildOnce.err = fmt.Errorf("go build: %v: %s", err, b)
			return
		}
		buildOnce.path = out
	})
	if buildOnce.err != nil {
		t.Fatalf("vunettest: %v", buildOnce.err)
	}
	return buildOnce.path
}

// Instance is a running vunet.
type Instance struct {
	Socket string
	cmd    *exec.Cmd
	log    *testutil.Buffer
	done   chan struct{}
	err    error
}

// Start runs vunet with --socket in a temporary directory plus args, and
// returns once the socket accepts connections.
func Start(t testing.TB, args ...string) *Instance {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "vunet.sock")
	return StartAt(t, sock, args...)
}

// StartAt is Start with a chosen socket path (reconnect tests restart
// vunet on the same path).
func StartAt(t testing.TB, sock string, args ...string) *Instance {
	t.Helper()
	return start(t, sock, true, append([]string{"--socket", sock}, args...))
}

// StartConnect runs vunet --connect sock plus args (the frontend listens
// on sock) and returns once vunet says it is ready; it may still be
// dialling.
func StartConnect(t testing.TB, sock string, args ...string) *Instance {
	t.Helper()
	return start(t, sock, false, append([]string{"--connect", sock}, args...))
}

// start runs vunet with args; with listens, it waits for the socket file
// too.
func start(t testing.TB, sock string, listens bool, args []string) *Instance {
	t.Helper()
	bin := Binary(t)
	in := &Instance{Socket: sock, log: &testutil.Buffer{}, done: make(chan struct{})}
	in.cmd = exec.Command(bin, append([]string{"--log-level", "debug"}, args...)...)
	in.cmd.Stdout, in.cmd.Stderr = in.log, in.log
	in.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := in.cmd.Start(); err != nil {
		t.Fatalf("vunettest: start vunet: %v", err)
	}
	go func() {
		in.err = in.cmd.Wait()
		close(in.done)
	}()
	t.Cleanup(func() {
		in.Stop()
		if t.Failed() {
			t.Logf("vunet log:\n%s", in.Log())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		// A probe connection would become a frontend session; waiting for
		// the socket file and the ready line avoids that.
		if _, err := os.Stat(sock); (err == nil || !listens) && strings.Contains(in.Log(), "vunet ready") {
			if err := checkSandbox(in.cmd.Process.Pid, args); err != nil {
				t.Fatalf("vunettest: %v\n%s", err, in.Log())
			}
			return in
		}
		select {
		case <-in.done:
			t.Fatalf("vunettest: vunet exited early (%v):\n%s", in.err, in.Log())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("vunettest: vunet not ready after 30s:\n%s", in.Log())
		}
	}
}

// checkSandbox makes sure the vunet under test is confined the way it is by
// default, so that every real-client test exercises the sandbox: its
// /proc/PID/status must show no_new_privs and a seccomp filter, and, started
// as root, the switch to nobody. vunet applies the sandbox before it says
// "vunet ready". Tests that turn the sandbox off say so in args.
func checkSandbox(pid int, args []string) error {
	mode := os.Getenv("VUNET_SANDBOX")
	runas := "nobody"
	for i, a := range args {
		next := func() string {
			if i+1 < len(args) {
				return args[i+1]
			}
			return ""
		}
		switch {
		case a == "--sandbox":
			mode = next()
		case strings.HasPrefix(a, "--sandbox="):
			mode = strings.TrimPrefix(a, "--sandbox=")
		case a == "--runas":
			runas = next()
		case strings.HasPrefix(a, "--runas="):
			runas = strings.TrimPrefix(a, "--runas=")
		}
	}
	if mode == "off" {
		return nil
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return fmt.Errorf("sandbox check: %v", err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	if fields["NoNewPrivs"] != "1" || fields["Seccomp"] != "2" {
		return fmt.Errorf("vunet is not sandboxed: NoNewPrivs %q, Seccomp %q (want 1 and 2)", fields["NoNewPrivs"], fields["Seccomp"])
	}
	if os.Geteuid() == 0 && runas == "nobody" && !strings.HasPrefix(fields["Uid"], "65534 65534 65534 65534") {
		return fmt.Errorf("vunet started as root did not switch to nobody: Uid %q", fields["Uid"])
	}
	return nil
}

// Pid is vunet's process id.
func (in *Instance) Pid() int { return in.cmd.Process.Pid }

// Log returns everything vunet printed so far.
func (in *Instance) Log() string { return in.log.String() }

// Stop sends SIGTERM and waits (SIGKILL after 10 s). It returns the exit
// error, if any.
func (in *Instance) Stop() error {
	select {
	case <-in.done:
		return in.err
	default:
	}
	in.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-in.done:
	case <-time.After(10 * time.Second):
		in.cmd.Process.Kill()
		<-in.done
	}
	return in.err
}

// Signal sends sig to vunet.
func (in *Instance) Signal(sig os.Signal) error { return in.cmd.Process.Signal(sig) }

// ExitErr is vunet's exit error (nil for status 0); valid once Done is
// closed.
func (in *Instance) ExitErr() error {
	<-in.done
	return in.err
}

// Done is closed when vunet exits.
func (in *Instance) Done() <-chan struct{} { return in.done }

// WaitLog polls the log until it contains s.
func (in *Instance) WaitLog(ctx context.Context, s string) error {
	for !strings.Contains(in.Log(), s) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("vunet log never said %q", s)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// FreePort returns a TCP port free on 127.0.0.1 right now.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
