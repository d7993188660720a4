// Package sandbox confines a running vunet after it has opened everything it
// needs (sockets, the pcap file, the TFTP root): no_new_privs, a switch from
// root to an unprivileged user, new IPC and UTS namespaces (as root),
// Landlock (no filesystem access beyond the TFTP root and what the capture
// and --connect need) and a seccomp allow-list on every thread.
//
// Every step is irreversible for the process, so the package has no tests
// that run in the test binary's own process: they re-execute it (see
// sandbox_test.go).
package sandbox

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
	"kernel.org/pub/linux/libs/security/libcap/psx"
)

// Mode says how much of the sandbox is applied.
type Mode int

const (
	// On applies everything and denies system calls outside the allow-list
	// with EPERM (and the kernel logs each denial).
	On Mode = iota
	// Log applies everything, but system calls outside the allow-list are
	// allowed and logged by the kernel: the mode for finding what a new
	// code path needs.
	Log
	// Off applies nothing: the escape hatch.
	Off
)

// String returns the mode's name as the --sandbox flag spells it.
func (m Mode) String() string {
	switch m {
	case On:
		return "on"
	case Log:
		return "log"
	case Off:
		return "off"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Options says what the confined process may still reach.
type Options struct {
	Mode Mode
	// RunAs is the user (name or uid, optionally ":group" or ":gid") to
	// switch to when started as root (required then); not used otherwise.
	RunAs string
	// ReadDirs are directory trees that stay readable (the TFTP root).
	ReadDirs []string
	// ConnectSockets are Unix socket paths the process dials after
	// confinement (--connect). Landlock ABI 9 restricts connecting to
	// pathname sockets; on older kernels they need no rule.
	ConnectSockets []string
	// SocketDirs are directories in which the process creates, removes
	// and connects to Unix sockets after confinement (--unix-forward-dir:
	// forwards and exposes added at run time). Landlock allows exactly
	// that there (no other kind of file, no subdirectory), and the
	// seccomp filter then also allows unlinkat and umask (see
	// socketDirRules).
	SocketDirs []string
	// KeepNetAdmin keeps CAP_NET_ADMIN (and no other capability) across
	// the switch to RunAs, for TCP repair mode (--migrate-tcp).
	KeepNetAdmin bool
}

// Status reports what Apply enforced, for the log and the stats.
type Status struct {
	Mode Mode
	// NoNewPrivs is set on every thread.
	NoNewPrivs bool
	// LandlockABI is the kernel's Landlock ABI version, 0 without Landlock.
	LandlockABI int
	// Landlock is true when a Landlock domain restricts the filesystem.
	Landlock bool
	// Seccomp is true when the filter is loaded on every thread.
	Seccomp bool
	// Syscalls is the number of system calls the filter allows.
	Syscalls int
	// DroppedTo is the user switched to ("" when not started as root).
	DroppedTo string
	// NetAdmin: CAP_NET_ADMIN was kept across the switch (KeepNetAdmin).
	NetAdmin bool
	UID, GID int
	// Namespaces lists the namespaces detached into ("ipc", "uts").
	Namespaces []string
}

// Apply confines the calling process. It must be called once, after every
// file and socket the process needs has been opened, and before untrusted
// input is served. A returned error leaves the process partly confined; the
// caller must exit.
func Apply(opts Options) (Status, error) {
	st := Status{Mode: opts.Mode, UID: os.Getuid(), GID: os.Getgid()}
	if opts.Mode == Off {
		return st, nil
	}
	if !archSupported {
		return st, fmt.Errorf("sandbox: no seccomp policy for this architecture; use --sandbox=off")
	}
	cred, err := lookupRunAs(opts.RunAs)
	if err != nil {
		return st, err
	}

	// no_new_privs first, on every thread: nothing from here on can gain
	// privileges through exec, and Landlock and seccomp require it.
	if err := allThreadsPrctl(unix.PR_SET_NO_NEW_PRIVS, 1); err != nil {
		return st, fmt.Errorf("sandbox: prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	st.NoNewPrivs = true

	if os.Geteuid() == 0 {
		if st.Namespaces, err = detachNamespaces(); err != nil {
			return st, err
		}
	}
	// Landlock while still root: its rules open the allowed paths, which
	// the user switched to may not be able to walk to (the TFTP root's
	// parents). What is then reachable through them is checked by the
	// caller, with the new credentials.
	if st.LandlockABI, st.Landlock, err = restrictFS(opts); err != nil {
		return st, err
	}
	if cred != nil {
		if err := dropTo(cred, opts.KeepNetAdmin); err != nil {
			return st, err
		}
		st.DroppedTo = cred.name
		st.NetAdmin = opts.KeepNetAdmin && cred.uid != 0
	}
	st.UID, st.GID = os.Getuid(), os.Getgid()

	deny := retErrno(syscall.EPERM)
	if opts.Mode == Log {
		deny = retLog
	}
	rules := allowList(os.Getpid())
	if len(opts.SocketDirs) > 0 {
		rules = append(rules, socketDirRules()...)
	}
	prog, err := filterProgram(rules, auditArch, deny)
	if err != nil {
		return st, fmt.Errorf("sandbox: %w", err)
	}
	if err := installFilters(quietProgram(rules, auditArch), prog); err != nil {
		return st, fmt.Errorf("sandbox: %w", err)
	}
	st.Seccomp = true
	st.Syscalls = countAllowed(rules)
	return st, nil
}

// Confined reports whether a seccomp filter confines the calling thread,
// that is whether Apply ran (with the filter, every thread has it). Files
// outside the sandbox, such as sockets and the pid file, are then left in
// place at exit rather than triggering denials.
func Confined() bool {
	mode, err := unix.PrctlRetInt(unix.PR_GET_SECCOMP, 0, 0, 0, 0)
	// The filter allows PR_GET_SECCOMP; an EPERM still means a filter.
	return mode == 2 || errors.Is(err, unix.EPERM)
}

// allThreadsPrctl runs prctl(option, arg) on every thread of the process
// (psx: the Go runtime's AllThreadsSyscall without cgo, libpsx with it).
func allThreadsPrctl(option, arg uintptr) error {
	// prctl checks that unused arguments are zero: all six are passed.
	if _, _, e := psx.Syscall6(unix.SYS_PRCTL, option, arg, 0, 0, 0, 0); e != 0 {
		return e
	}
	return nil
}

// Gauges show what Apply enforced, as metrics (internal/metrics tags), so
// `vunet stats` and /metrics say whether and how vunet is confined. Denied
// system calls cannot be counted from inside the process (see
// docs/security.md); the kernel logs each one.
type Gauges struct {
	NoNewPrivs atomic.Int64 `metric:"sandbox_no_new_privs" kind:"gauge" help:"1 when no_new_privs is set on every thread."`
	Syscalls   atomic.Int64 `metric:"sandbox_seccomp_syscalls" kind:"gauge" help:"System calls the seccomp filter allows; 0 without a filter (--sandbox=off)."`
	Enforcing  atomic.Int64 `metric:"sandbox_seccomp_enforcing" kind:"gauge" help:"1 when calls outside the allow-list fail with EPERM (--sandbox=on), 0 when they are only logged (log) or there is no filter."`
	Landlock   atomic.Int64 `metric:"sandbox_landlock_abi" kind:"gauge" help:"Landlock ABI of the domain that restricts the filesystem; 0 when the filesystem is not restricted."`
	UID        atomic.Int64 `metric:"sandbox_uid" kind:"gauge" help:"The user id vunet runs as once started."`
	NetAdmin   atomic.Int64 `metric:"sandbox_net_admin" kind:"gauge" help:"1 when CAP_NET_ADMIN was kept across --runas for TCP repair mode (--migrate-tcp)."`
}

// Set records st.
func (g *Gauges) Set(st Status) {
	b := func(v bool) int64 {
		if v {
			return 1
		}
		return 0
	}
	g.NoNewPrivs.Store(b(st.NoNewPrivs))
	g.Syscalls.Store(int64(st.Syscalls))
	g.Enforcing.Store(b(st.Seccomp && st.Mode == On))
	landlockABI := 0
	if st.Landlock {
		landlockABI = st.LandlockABI
	}
	g.Landlock.Store(int64(landlockABI))
	g.UID.Store(int64(st.UID))
	g.NetAdmin.Store(b(st.NetAdmin))
}

// AllowedSyscalls is the size of the allow-list on this architecture (the
// calls the filter lets through; clone3's ENOSYS is not counted).
func AllowedSyscalls() int { return countAllowed(allowList(0)) }

// countAllowed counts the rules that allow their call.
func countAllowed(rules []rule) int {
	n := 0
	for _, r := range rules {
		if r.errno == 0 {
			n++
		}
	}
	return n
}
