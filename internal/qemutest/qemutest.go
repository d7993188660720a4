//go:build linux

// Package qemutest boots a tiny Linux guest under QEMU so tests can exercise
// vunet against a real virtio-net driver over vhost-user.
//
// The guest (kernel + busybox initramfs) is built by scripts/build-guest.sh
// into build/guest; EnsureGuest runs it on demand. A test supplies a shell
// script, which is added to the initramfs as /test/run.sh; the guest's /init
// runs it and reports its exit status on the serial console, then powers off:
//
//	res, err := (&qemutest.Guest{Socket: sock, Script: "udhcpc -i eth0 -n -q && ping -c1 10.0.2.2"}).Run(ctx, t)
//	if err != nil || res.ExitCode != 0 {
//		t.Fatalf("guest: %v, exit %d\n%s", err, res.ExitCode, res.Tail(40))
//	}
//
// QEMU always runs with TCG (nested KVM hangs on the machines this runs on),
// so a boot to userspace takes a few seconds; timeouts are generous.
//
// When QEMU or the guest is unavailable, tests are skipped with a loud message,
// unless the CI environment variable is true, in which case they fail.
package qemutest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Console markers printed by the guest's /init (testdata/guest/init).
const (
	// ReadyMarker is printed just before /test/run.sh starts.
	ReadyMarker = "VUNET-GUEST-READY"
	// ExitMarker is printed, followed by a space and the script's exit
	// status, after /test/run.sh exits.
	ExitMarker = "VUNET-TEST-EXIT"
)

// Defaults for the zero values of Guest fields.
const (
	// DefaultTimeout bounds a whole guest run. TCG on a loaded two-core
	// machine under -race can be many times slower than the ~3 s boot
	// measured idle, so it is deliberately large.
	DefaultTimeout = 5 * time.Minute
	// DefaultMemMB is the guest RAM size in MiB.
	DefaultMemMB = 256
)

// QEMUBinary is the emulator the guests run under.
const QEMUBinary = "qemu-system-x86_64"

// buildTimeout bounds scripts/build-guest.sh, which may download a kernel.
const buildTimeout = 10 * time.Minute

// RepoRoot returns the directory holding go.mod, searching upwards from the
// working directory (go test runs tests in their package's directory).
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("qemutest: no go.mod found above the working directory")
		}
		dir = parent
	}
}

// EnsureGuest returns the paths of the guest kernel and base initramfs,
// building them first if needed (scripts/build-guest.sh is cached, so this is
// cheap after the first call). Concurrent callers, including other test
// binaries that go test runs in parallel, are serialised with a file lock.
//
// If QEMU is not installed or the guest cannot be built, EnsureGuest skips
// the test, or fails it when the CI environment variable is true. Like
// t.Skip, it must be called from the goroutine running the test.
func EnsureGuest(t testing.TB) (kernel, initrd string) {
	t.Helper()
	if _, err := exec.LookPath(QEMUBinary); err != nil {
		unavailable(t, "qemutest: %s not found in PATH (apt-get install qemu-system-x86, or run scripts/install-deps.sh)", QEMUBinary)
	}
	kernel, initrd, log, err := buildGuest()
	if err != nil {
		unavailable(t, "qemutest: cannot build the test guest: %v\n%s", err, strings.TrimSpace(log))
	}
	if log != "" && !strings.Contains(log, "up to date") {
		t.Logf("qemutest: %s", strings.TrimSpace(log))
	}
	return kernel, initrd
}

func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	Unavailable(t, "REAL-QEMU TEST", format, args...)
}

// Unavailable skips the test loudly, or fails it under CI where a missing
// dependency means a broken CI image rather than a developer machine
// without it. kind names the test family in the skip banner.
func Unavailable(t testing.TB, kind, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if CIEnabled() {
		t.Fatalf("%s\n(CI is set, so a missing dependency is a failure, not a skip)", msg)
	}
	bar := strings.Repeat("!", 72)
	t.Skipf("\n%s\n!!! SKIPPING %s: %s\n!!! Run scripts/install-deps.sh as root to enable it (with CI=true this is a failure).\n%s", bar, kind, msg, bar)
}

// CIEnabled reports whether the CI environment variable asks for strictness:
// any non-empty value except one that parses as false ("false", "0").
func CIEnabled() bool {
	v := os.Getenv("CI")
	if v == "" {
		return false
	}
	b, err := strconv.ParseBool(v)
	return err != nil || b
}

// buildGuest runs scripts/build-guest.sh under build/guest.lock and returns
// the outputs and the script's output.
func buildGuest() (kernel, initrd, log string, err error) {
	root, err := RepoRoot()
	if err != nil {
		return "", "", "", err
	}
	buildDir := filepath.Join(root, "build")
	if err := os.MkdirAll(buildDir, 0o755); err != nil {
		return "", "", "", err
	}
	unlock, err := lockFile(filepath.Join(buildDir, "guest.lock"), buildTimeout)
	if err != nil {
		return "", "", "", err
	}
	defer unlock()

	out := filepath.Join(buildDir, "guest")
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(root, "scripts", "build-guest.sh"), out)
	cmd.Dir = root
	b, err := cmd.CombinedOutput()
	if err != nil {
		return "", "", string(b), fmt.Errorf("scripts/build-guest.sh: %w", err)
	}
	kernel = filepath.Join(out, "vmlinuz")
	initrd = filepath.Join(out, "initrd.gz")
	for _, p := range []string{kernel, initrd} {
		if _, err := os.Stat(p); err != nil {
			return "", "", string(b), fmt.Errorf("scripts/build-guest.sh succeeded but %w", err)
		}
	}
	return kernel, initrd, string(b), nil
}

// lockFile takes an exclusive flock on path, polling so that a wedged holder
// produces an error after timeout instead of hanging the test binary.
func lockFile(path string, timeout time.Duration) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing releases the lock
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("timed out after %v waiting for %s (another guest build stuck?)", timeout, path)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Guest describes one QEMU run of the test guest. The zero value of every
// field except Socket (required unless NoNet) and Script is usable.
type Guest struct {
	// Socket is the vhost-user unix socket QEMU connects to (the backend
	// must already be listening unless ChardevOpts says otherwise).
	Socket string
	// ChardevOpts is appended to the socket -chardev options, e.g.
	// "reconnect=1" (a leading comma is optional).
	ChardevOpts string
	// DeviceOpts is appended to the virtio-net-pci -device options, e.g.
	// "mrg_rxbuf=off" or "mac=52:54:00:00:00:01,host_mtu=9000" (a leading
	// comma is optional).
	DeviceOpts string
	// NetdevOpts is appended to the vhost-user -netdev options, e.g.
	// "queues=2" (a leading comma is optional).
	NetdevOpts string
	// NoNet boots without any network device (-nic none).
	NoNet bool

	// Script is the shell script run as /test/run.sh. Its exit status is
	// reported as Result.ExitCode. If empty, the guest drops to a shell on
	// the console and runs until killed or timed out.
	Script string
	// Files are extra files added to the initramfs, keyed by absolute guest
	// path, all with mode 0755 (so helper binaries can be run directly).
	// Dynamically linked binaries need their libraries too; static Go
	// binaries (CGO_ENABLED=0) just work. Script, if set, replaces any
	// /test/run.sh given here.
	Files map[string][]byte

	// MemMB is the guest RAM in MiB (default DefaultMemMB).
	MemMB int
	// MemOpts is appended to -m, e.g. "slots=2,maxmem=1G" for memory
	// hotplug (a leading comma is optional).
	MemOpts string
	// Timeout bounds the run from QEMU start to exit (default
	// DefaultTimeout); QEMU is killed when it expires.
	Timeout time.Duration
	// KernelArgs is appended to the kernel command line.
	KernelArgs string
	// ExtraArgs are appended to the QEMU command line.
	ExtraArgs []string
	// Kernel and Initrd override the guest built by EnsureGuest. Initrd is
	// the base archive; the test's files are appended to a copy of it.
	Kernel, Initrd string
}

// Result is the outcome of a guest run.
type Result struct {
	// Console is everything QEMU wrote to stdout and stderr: the guest's
	// serial console plus QEMU's own diagnostics, with "\r" removed.
	Console string
	// ExitCode is the exit status of /test/run.sh from the ExitMarker line,
	// or -1 if the guest never printed one.
	ExitCode int
	// Duration is the wall time from QEMU start to exit.
	Duration time.Duration
}

// Tail returns the last n lines of the console output, for failure messages.
func (r *Result) Tail(n int) string {
	if r == nil {
		return ""
	}
	return tail(r.Console, n)
}

func tail(s string, n int) string {
	s = strings.TrimRight(s, "\n")
	if n <= 0 {
		return ""
	}
	i := len(s)
	for ; n > 0; n-- {
		j := strings.LastIndexByte(s[:i], '\n')
		if j < 0 {
			return s
		}
		i = j
	}
	return s[i+1:]
}

// Run boots the guest, waits for it to power off and returns the result.
// The Result is never nil, so its console is available even with an error.
// Run returns an error if QEMU fails, times out, ctx ends, or the guest exits
// without reporting the script's status; a non-zero status alone is not an
// error (check Result.ExitCode).
func (g *Guest) Run(ctx context.Context, t testing.TB) (*Result, error) {
	t.Helper()
	inst, err := g.Start(ctx, t)
	if err != nil {
		return &Result{ExitCode: -1}, err
	}
	return inst.Wait()
}

// Instance is a running guest, returned by Guest.Start.
type Instance struct {
	cmd     *exec.Cmd
	console *consoleBuffer
	start   time.Time
	kill    context.CancelCauseFunc // stops QEMU with a cause

	// Set before done is closed; read only after.
	done      chan struct{}
	waitErr   error     // from exec.Cmd.Wait
	stopCause error     // why QEMU was stopped early (ctx, timeout, Kill), or nil
	end       time.Time // when QEMU exited
}

// Start boots the guest and returns once QEMU is running. QEMU is killed
// when ctx ends, when the timeout expires, and at the latest when the test
// finishes (t.Cleanup), so no process outlives the test. If the test failed,
// the cleanup also logs the tail of the console.
//
// Start may call EnsureGuest, so it must be called from the test goroutine.
func (g *Guest) Start(ctx context.Context, t testing.TB) (*Instance, error) {
	t.Helper()
	if !g.NoNet && g.Socket == "" {
		return nil, errors.New("qemutest: Guest.Socket is required unless NoNet is set")
	}
	kernel, initrd := g.Kernel, g.Initrd
	if kernel == "" || initrd == "" {
		k, i := EnsureGuest(t)
		if kernel == "" {
			kernel = k
		}
		if initrd == "" {
			initrd = i
		}
	}
	if g.Script != "" || len(g.Files) > 0 {
		combined := filepath.Join(t.TempDir(), "initrd.gz")
		if err := writeTestInitrd(combined, initrd, g.Script, g.Files); err != nil {
			return nil, fmt.Errorf("qemutest: building the test initrd: %w", err)
		}
		initrd = combined
	}

	timeout := g.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	// Two layers so the cause says which of Kill, the timeout or the
	// caller's ctx stopped QEMU.
	killCtx, kill := context.WithCancelCause(ctx)
	runCtx, cancelTimeout := context.WithTimeoutCause(killCtx, timeout,
		fmt.Errorf("guest timed out after %v and was killed (Guest.Timeout)", timeout))
	cmd := exec.CommandContext(runCtx, QEMUBinary, g.args(kernel, initrd)...)
	console := newConsoleBuffer()
	// The same writer for both makes exec use a single pipe, so QEMU's own
	// messages stay in order with the guest console (e.g. a vhost-user
	// disconnect shows up exactly where the guest noticed it).
	cmd.Stdout = console
	cmd.Stderr = console
	// Stdin stays nil (/dev/null): QEMU makes its stdio non-blocking, which
	// would leak into the test binary's own stdin if it were shared.
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// If the test binary dies (e.g. go test -timeout panics), the
		// kernel kills QEMU instead of leaving it running.
		Pdeathsig: syscall.SIGKILL,
	}
	// Bounds how long Wait waits for the output pipe after QEMU exits.
	cmd.WaitDelay = 10 * time.Second

	inst := &Instance{
		cmd:     cmd,
		console: console,
		kill:    kill,
		done:    make(chan struct{}),
	}
	inst.start = time.Now()
	if err := cmd.Start(); err != nil {
		cancelTimeout()
		kill(nil)
		return nil, fmt.Errorf("qemutest: starting %s: %w", QEMUBinary, err)
	}
	go func() {
		err := cmd.Wait()
		inst.end = time.Now()
		inst.waitErr = err
		// nil unless runCtx ended, i.e. QEMU was killed rather than exited.
		inst.stopCause = context.Cause(runCtx)
		cancelTimeout()
		kill(nil)
		close(inst.done)
	}()
	t.Cleanup(func() {
		inst.Kill()
		if t.Failed() {
			t.Logf("qemutest: guest console (last 60 lines):\n%s", tail(inst.Console(), 60))
		}
	})
	return inst, nil
}

// args builds the QEMU command line.
func (g *Guest) args(kernel, initrd string) []string {
	mem := g.MemMB
	if mem <= 0 {
		mem = DefaultMemMB
	}
	appendLine := "console=ttyS0 panic=-1 quiet"
	if g.KernelArgs != "" {
		appendLine += " " + g.KernelArgs
	}
	args := MachineArgs(mem)
	if opts := strings.TrimPrefix(g.MemOpts, ","); opts != "" {
		for i := range args[:len(args)-1] {
			if args[i] == "-m" {
				args[i+1] += "," + opts
			}
		}
	}
	args = append(args, "-kernel", kernel, "-initrd", initrd, "-append", appendLine)
	if g.NoNet {
		args = append(args, "-nic", "none")
	} else {
		args = append(args, NetArgs(g.Socket, g.ChardevOpts, g.DeviceOpts)...)
		if opts := strings.TrimPrefix(g.NetdevOpts, ","); opts != "" {
			for i := range args[:len(args)-1] {
				if args[i] == "-netdev" {
					args[i+1] += "," + opts
				}
			}
		}
	}
	return append(args, g.ExtraArgs...)
}

// MachineArgs returns the QEMU arguments every test machine here shares:
// TCG, nothing but what is listed, the serial console on stdio, memMB of
// guest RAM in a shared memfd. machineOpts are added to -machine (a type
// such as "q35", "graphics=off").
func MachineArgs(memMB int, machineOpts ...string) []string {
	machine := append(slices.DeleteFunc(slices.Clone(machineOpts), func(s string) bool { return s == "" }), "memory-backend=mem0")
	return []string{
		// TCG always: nested KVM hangs, and TCG behaves the same everywhere.
		"-accel", "tcg",
		// -nodefaults: no default NIC, VGA, monitor or serial, so the
		// machine holds exactly what is listed here.
		"-nodefaults", "-no-user-config",
		"-display", "none",
		"-serial", "stdio",
		// Guest power-off and reboot (including panic=-1) end QEMU.
		"-no-reboot",
		"-m", strconv.Itoa(memMB),
		// vhost-user needs guest RAM in a shareable fd the backend maps.
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem0,share=on,size=%dM", memMB),
		"-machine", strings.Join(machine, ","),
	}
}

// NetArgs returns the arguments for a virtio-net-pci device on vunet's
// vhost-user socket, with extra chardev and device options.
func NetArgs(socket, chardevOpts, deviceOpts string) []string {
	// vectors=0 (no MSI-X) is required: QEMU 7.2 crashes with vhost-user
	// under TCG otherwise. romfile= skips the iPXE option ROM (firmware
	// tests bring their own driver).
	dev := "virtio-net-pci,netdev=n0,romfile=,vectors=0"
	if opts := strings.TrimPrefix(deviceOpts, ","); opts != "" {
		dev += "," + opts
	}
	chardev := "socket,id=chr0,path=" + socket
	if opts := strings.TrimPrefix(chardevOpts, ","); opts != "" {
		chardev += "," + opts
	}
	return []string{
		"-chardev", chardev,
		"-netdev", "vhost-user,id=n0,chardev=chr0",
		"-device", dev,
	}
}

// Pid returns QEMU's process id.
func (i *Instance) Pid() int { return i.cmd.Process.Pid }

// Console returns the console output so far.
func (i *Instance) Console() string {
	s, _ := i.console.snapshot()
	return s
}

// Done is closed when QEMU has exited.
func (i *Instance) Done() <-chan struct{} { return i.done }

// WaitFor blocks until substr appears in the console output and returns nil.
// It returns an error if QEMU exits first (with the console tail), or if ctx
// or the run's own timeout ends.
func (i *Instance) WaitFor(ctx context.Context, substr string) error {
	from := 0
	for {
		s, changed := i.console.snapshot()
		if strings.Contains(s[from:], substr) {
			return nil
		}
		// Only rescan the new output, keeping an overlap for a substr
		// split across writes.
		from = max(0, len(s)-len(substr)+1)
		select {
		case <-changed:
		case <-i.done:
			// The output pipe is fully drained before done closes.
			if s := i.Console(); strings.Contains(s, substr) {
				return nil
			}
			return fmt.Errorf("qemutest: guest exited (%v) before printing %q; console tail:\n%s",
				i.exitDescription(), substr, tail(i.Console(), 30))
		case <-ctx.Done():
			return fmt.Errorf("qemutest: waiting for %q: %w; console tail:\n%s", substr, ctx.Err(), tail(i.Console(), 30))
		}
	}
}

// Wait waits for QEMU to exit and returns the result; see Guest.Run for the
// error semantics. The Result is never nil.
func (i *Instance) Wait() (*Result, error) {
	<-i.done
	console := i.Console()
	res := &Result{Console: console, ExitCode: parseExitCode(console), Duration: i.end.Sub(i.start)}

	switch {
	case i.stopCause != nil || i.waitErr != nil:
		return res, fmt.Errorf("qemutest: %s; console tail:\n%s", i.exitDescription(), res.Tail(30))
	case res.ExitCode < 0:
		return res, fmt.Errorf("qemutest: guest exited without a %q line (did /init or the kernel fail?); console tail:\n%s",
			ExitMarker, res.Tail(30))
	}
	return res, nil
}

// exitDescription explains why QEMU exited; call only after done is closed.
func (i *Instance) exitDescription() string {
	switch {
	case i.stopCause != nil:
		return fmt.Sprintf("guest stopped: %v", i.stopCause)
	case i.waitErr != nil:
		return fmt.Sprintf("%s failed: %v", QEMUBinary, i.waitErr)
	}
	return "QEMU exited"
}

// Kill stops QEMU (if still running) and waits for it to exit. It is safe to
// call more than once and concurrently with Wait.
func (i *Instance) Kill() {
	// A no-op if QEMU already exited: the goroutine cancelled the context.
	i.kill(errors.New("Instance.Kill called"))
	<-i.done
}

// parseExitCode returns the status on the last ExitMarker line, or -1.
func parseExitCode(console string) int {
	i := strings.LastIndex(console, ExitMarker+" ")
	if i < 0 {
		return -1
	}
	rest := console[i+len(ExitMarker)+1:]
	if j := strings.IndexByte(rest, '\n'); j >= 0 {
		rest = rest[:j]
	}
	code, err := strconv.Atoi(strings.TrimSpace(rest))
	if err != nil {
		return -1
	}
	return code
}

// consoleBuffer collects QEMU's output and lets readers wait for more.
type consoleBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

func newConsoleBuffer() *consoleBuffer {
	return &consoleBuffer{changed: make(chan struct{})}
}

// Write appends p without carriage returns (the serial console emits CRLF),
// so tests can match on "\n"-separated lines.
func (c *consoleBuffer) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for rest := p; len(rest) > 0; {
		j := bytes.IndexByte(rest, '\r')
		if j < 0 {
			c.buf.Write(rest)
			break
		}
		c.buf.Write(rest[:j])
		rest = rest[j+1:]
	}
	close(c.changed)
	c.changed = make(chan struct{})
	return len(p), nil
}

// snapshot returns the output so far and a channel closed on the next write.
func (c *consoleBuffer) snapshot() (string, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String(), c.changed
}
