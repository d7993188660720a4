package sandbox

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// allowList is vunet's seccomp policy: every system call the running
// appliance makes after start-up, and nothing else. It was derived by
// tracing the real binary (strace -f) through the real-client suites and
// the sandbox tests, then checked by running those suites with
// --sandbox=log, under which the kernel logs every call outside this list
// (see docs/security.md, "Keeping the list right"). Calls only made while
// starting (execve, the dynamic loader's, rt_sigaction, setuid, landlock_*,
// seccomp itself) are not on it.
//
// pid is the process's own id, the only target signals may go to.
func allowList(pid int) []rule {
	self := &argCond{arg: 0, anyOf: []uint32{uint32(pid)}}
	rules := []rule{
		// The Go runtime on every thread: scheduling, memory, signals,
		// threads, timers, the netpoller.
		{name: "futex", nr: unix.SYS_FUTEX},
		{name: "nanosleep", nr: unix.SYS_NANOSLEEP},
		{name: "clock_nanosleep", nr: unix.SYS_CLOCK_NANOSLEEP},
		{name: "clock_gettime", nr: unix.SYS_CLOCK_GETTIME}, // vDSO fallback
		{name: "gettimeofday", nr: unix.SYS_GETTIMEOFDAY},   // vDSO fallback
		{name: "sched_yield", nr: unix.SYS_SCHED_YIELD},
		{name: "sched_getaffinity", nr: unix.SYS_SCHED_GETAFFINITY}, // GOMAXPROCS updates
		{name: "restart_syscall", nr: unix.SYS_RESTART_SYSCALL},
		// No executable mappings: nothing in vunet loads code after start.
		{name: "mmap", nr: unix.SYS_MMAP, cond: &argCond{arg: 2, clearAll: unix.PROT_EXEC}},
		{name: "mprotect", nr: unix.SYS_MPROTECT, cond: &argCond{arg: 2, clearAll: unix.PROT_EXEC}},
		{name: "munmap", nr: unix.SYS_MUNMAP},
		{name: "madvise", nr: unix.SYS_MADVISE},
		{name: "brk", nr: unix.SYS_BRK}, // the C allocator, in cgo builds
		{name: "rt_sigreturn", nr: unix.SYS_RT_SIGRETURN},
		{name: "rt_sigprocmask", nr: unix.SYS_RT_SIGPROCMASK},
		// os/signal changes handlers at run time (Notify, Stop, and the
		// reset after the first SIGTERM); the runtime aborts if it fails.
		{name: "rt_sigaction", nr: unix.SYS_RT_SIGACTION},
		{name: "sigaltstack", nr: unix.SYS_SIGALTSTACK},
		// Signals only to this process (preemption, raise on crash).
		{name: "tgkill", nr: unix.SYS_TGKILL, cond: self},
		{name: "kill", nr: unix.SYS_KILL, cond: self},
		{name: "getpid", nr: unix.SYS_GETPID},
		{name: "gettid", nr: unix.SYS_GETTID},
		// New threads only: a clone without CLONE_THREAD is a fork.
		{name: "clone", nr: unix.SYS_CLONE, cond: &argCond{arg: 0, setAll: unix.CLONE_THREAD}},
		// clone3 passes its flags in memory, which the filter cannot read:
		// ENOSYS makes glibc's pthread_create (cgo builds) use clone.
		{name: "clone3", nr: unix.SYS_CLONE3, errno: syscall.ENOSYS},
		{name: "exit", nr: unix.SYS_EXIT},
		{name: "exit_group", nr: unix.SYS_EXIT_GROUP},
		{name: "set_robust_list", nr: unix.SYS_SET_ROBUST_LIST}, // glibc thread start
		{name: "rseq", nr: unix.SYS_RSEQ},                       // glibc thread start
		{name: "getrandom", nr: unix.SYS_GETRANDOM},
		// PR_SET_VMA names the runtime's anonymous mappings; PR_SET_NAME
		// and PR_GET_NAME are thread names (glibc, the runtime); PR_GET_SECCOMP
		// is Confined.
		{name: "prctl", nr: unix.SYS_PRCTL, cond: &argCond{arg: 0, anyOf: []uint32{unix.PR_SET_VMA, unix.PR_SET_NAME, unix.PR_GET_NAME, unix.PR_GET_SECCOMP}}},
		{name: "epoll_create1", nr: unix.SYS_EPOLL_CREATE1},
		{name: "epoll_ctl", nr: unix.SYS_EPOLL_CTL},
		{name: "epoll_pwait", nr: unix.SYS_EPOLL_PWAIT},
		{name: "epoll_pwait2", nr: unix.SYS_EPOLL_PWAIT2},
		{name: "eventfd2", nr: unix.SYS_EVENTFD2},
		{name: "pipe2", nr: unix.SYS_PIPE2}, // netpoll wake-up, splice
		{name: "getuid", nr: unix.SYS_GETUID},
		{name: "geteuid", nr: unix.SYS_GETEUID},
		{name: "getgid", nr: unix.SYS_GETGID},
		{name: "getegid", nr: unix.SYS_GETEGID},

		// File descriptors: guest memory (mmap of the frontend's memfds),
		// kick/call eventfds, the pcap file, TFTP files through the
		// Landlock-confined root.
		{name: "read", nr: unix.SYS_READ},
		{name: "write", nr: unix.SYS_WRITE},
		{name: "readv", nr: unix.SYS_READV},
		{name: "writev", nr: unix.SYS_WRITEV},
		{name: "pread64", nr: unix.SYS_PREAD64},
		{name: "pwrite64", nr: unix.SYS_PWRITE64},
		{name: "close", nr: unix.SYS_CLOSE},
		{name: "fcntl", nr: unix.SYS_FCNTL},
		{name: "fstat", nr: unix.SYS_FSTAT},
		{name: "newfstatat", nr: unix.SYS_NEWFSTATAT},
		{name: "statx", nr: unix.SYS_STATX},
		// access(2): the start-up checks of what the switched-to user may
		// reach (--connect); like stat, it only reads metadata.
		{name: "faccessat", nr: unix.SYS_FACCESSAT},
		{name: "faccessat2", nr: unix.SYS_FACCESSAT2},
		{name: "lseek", nr: unix.SYS_LSEEK},
		{name: "openat", nr: unix.SYS_OPENAT}, // confined by Landlock
		{name: "getdents64", nr: unix.SYS_GETDENTS64},
		{name: "readlinkat", nr: unix.SYS_READLINKAT}, // fd kinds via /proc/self/fd
		{name: "fsync", nr: unix.SYS_FSYNC},
		{name: "fdatasync", nr: unix.SYS_FDATASYNC},
		// Nothing that creates, renames or removes files: a confined vunet
		// leaves its socket and pid files in place (see Confined).
		// A few harmless ioctls (socket queue sizes, isatty); notably not
		// TIOCSTI, which would type into a terminal.
		{name: "ioctl", nr: unix.SYS_IOCTL, cond: &argCond{arg: 1, anyOf: []uint32{
			unix.TIOCINQ, unix.TIOCOUTQ, unix.TCGETS}}},

		// Sockets: NAT to the host (TCP, UDP, ping), the vhost-user and API
		// sockets, netlink for the host's addresses. No packet sockets.
		{name: "socket", nr: unix.SYS_SOCKET, cond: &argCond{arg: 0, anyOf: []uint32{
			unix.AF_UNIX, unix.AF_INET, unix.AF_INET6, unix.AF_NETLINK}}},
		{name: "connect", nr: unix.SYS_CONNECT},
		{name: "bind", nr: unix.SYS_BIND},
		{name: "listen", nr: unix.SYS_LISTEN},
		{name: "accept4", nr: unix.SYS_ACCEPT4},
		{name: "shutdown", nr: unix.SYS_SHUTDOWN},
		{name: "getsockname", nr: unix.SYS_GETSOCKNAME},
		{name: "getpeername", nr: unix.SYS_GETPEERNAME},
		{name: "setsockopt", nr: unix.SYS_SETSOCKOPT},
		{name: "getsockopt", nr: unix.SYS_GETSOCKOPT},
		{name: "sendto", nr: unix.SYS_SENDTO},
		{name: "recvfrom", nr: unix.SYS_RECVFROM},
		{name: "sendmsg", nr: unix.SYS_SENDMSG},
		{name: "recvmsg", nr: unix.SYS_RECVMSG},
		{name: "sendmmsg", nr: unix.SYS_SENDMMSG},
		{name: "recvmmsg", nr: unix.SYS_RECVMMSG},
		{name: "splice", nr: unix.SYS_SPLICE},     // io.Copy between sockets
		{name: "sendfile", nr: unix.SYS_SENDFILE}, // io.Copy from a file
	}
	return append(rules, archRules()...)
}

// socketDirRules are added to the allow-list when the process keeps
// creating sockets after confinement (Options.SocketDirs). Creating one is
// bind(2), on the list already; what is added is removing it (a forward
// removed, a stale socket replaced) and the umask that gives a new socket
// its mode, since chmod and chown stay off the list. Landlock confines
// unlinkat to sockets in those directories; on a kernel without Landlock
// only file permissions do, which is why these are not on the list unless
// asked for.
func socketDirRules() []rule {
	return []rule{
		{name: "unlinkat", nr: unix.SYS_UNLINKAT},
		{name: "umask", nr: unix.SYS_UMASK},
	}
}
