package sandbox

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
	"kernel.org/pub/linux/libs/security/libcap/psx"
)

// detachNamespaces moves every thread into one new IPC and one new UTS
// namespace: System V IPC and POSIX message queues of the host, and its
// host name, are out of reach. (Mount, user and PID namespaces cannot be
// entered by a multi-threaded process, which a Go program always is, and
// the network namespace is the one vunet serves; see docs/security.md.)
//
// Namespaces are per thread: one locked thread unshares, and every thread
// then joins the new namespaces by setns (the calling one re-joins its own,
// a no-op), so that all threads, and the threads they start later, share
// them.
func detachNamespaces() ([]string, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWIPC | unix.CLONE_NEWUTS); err != nil {
		return nil, fmt.Errorf("sandbox: unshare(IPC, UTS): %w", err)
	}
	for _, ns := range []struct {
		name string
		flag uintptr
	}{{"ipc", unix.CLONE_NEWIPC}, {"uts", unix.CLONE_NEWUTS}} {
		fd, err := unix.Open("/proc/thread-self/ns/"+ns.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("sandbox: %s namespace: %w", ns.name, err)
		}
		_, _, e := psx.Syscall3(unix.SYS_SETNS, uintptr(fd), ns.flag, 0)
		unix.Close(fd)
		if e != 0 {
			return nil, fmt.Errorf("sandbox: setns(%s) on every thread: %w", ns.name, e)
		}
	}
	return []string{"ipc", "uts"}, nil
}
