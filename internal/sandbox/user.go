package sandbox

import (
	"errors"
	"fmt"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	"kernel.org/pub/linux/libs/security/libcap/psx"
)

// cred is the user and group to switch to.
type cred struct {
	name     string // as given, for messages
	uid, gid int
}

// errNoRunAs: started as root without a user to switch to.
var errNoRunAs = errors.New("sandbox: started as root, but no user to switch to (--runas)")

// lookupRunAs resolves USER[:GROUP] (names or numbers). It runs before any
// confinement, while /etc/passwd and NSS are still reachable. Not started
// as root: nil, nothing to switch to.
func lookupRunAs(spec string) (*cred, error) {
	if syscall.Geteuid() != 0 {
		return nil, nil
	}
	if spec == "" {
		return nil, errNoRunAs
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	c := &cred{name: spec}
	if n, err := strconv.Atoi(userPart); err == nil {
		c.uid, c.gid = n, n
		if u, err := user.LookupId(userPart); err == nil {
			c.gid, _ = strconv.Atoi(u.Gid)
		}
	} else {
		u, err := user.Lookup(userPart)
		if err != nil {
			return nil, fmt.Errorf("--runas %s: %w", spec, err)
		}
		c.uid, _ = strconv.Atoi(u.Uid)
		c.gid, _ = strconv.Atoi(u.Gid)
	}
	if hasGroup {
		if n, err := strconv.Atoi(groupPart); err == nil {
			c.gid = n
		} else {
			g, err := user.LookupGroup(groupPart)
			if err != nil {
				return nil, fmt.Errorf("--runas %s: %w", spec, err)
			}
			c.gid, _ = strconv.Atoi(g.Gid)
		}
	}
	if c.uid < 0 || c.gid < 0 {
		return nil, fmt.Errorf("--runas %s: negative id", spec)
	}
	return c, nil
}

// RunAsUID returns the user id vunet will switch to (spec is --runas)
// when started as root, and -1 when it will stay the user it is.
func RunAsUID(spec string) (int, error) {
	c, err := lookupRunAs(spec)
	if err != nil || c == nil {
		return -1, err
	}
	return c.uid, nil
}

// dropTo switches every thread to c: no supplementary groups, then the
// group, then the user (Go applies these to all threads). From a non-zero
// uid the kernel clears every capability, unless keepNetAdmin: then
// CAP_NET_ADMIN alone survives (--migrate-tcp, for TCP repair mode).
func dropTo(c *cred, keepNetAdmin bool) error {
	if c.uid == 0 {
		// --runas root: stay root, deliberately (no capability is dropped).
		return nil
	}
	if keepNetAdmin {
		// Keep the permitted set across setuid; keepNetAdmin below then
		// narrows it to the one capability.
		if err := allThreadsPrctl(unix.PR_SET_KEEPCAPS, 1); err != nil {
			return fmt.Errorf("sandbox: prctl(PR_SET_KEEPCAPS): %w", err)
		}
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("sandbox: setgroups: %w", err)
	}
	if err := syscall.Setgid(c.gid); err != nil {
		return fmt.Errorf("sandbox: setgid %d: %w", c.gid, err)
	}
	if err := syscall.Setuid(c.uid); err != nil {
		return fmt.Errorf("sandbox: setuid %d: %w", c.uid, err)
	}
	if keepNetAdmin {
		if err := onlyNetAdmin(); err != nil {
			return err
		}
	}
	// The way back must be closed.
	if err := syscall.Setuid(0); err == nil {
		return fmt.Errorf("sandbox: setuid(0) still succeeds after dropping to %s", c.name)
	}
	return nil
}

// onlyNetAdmin sets every thread's capabilities to CAP_NET_ADMIN alone,
// effective and permitted, nothing inheritable, and clears keep-caps.
func onlyNetAdmin() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	data[0].Effective = 1 << unix.CAP_NET_ADMIN
	data[0].Permitted = 1 << unix.CAP_NET_ADMIN
	// capset acts on the calling thread: psx runs it on each.
	if _, _, e := psx.Syscall3(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0); e != 0 {
		return fmt.Errorf("sandbox: capset(CAP_NET_ADMIN): %w", e)
	}
	if err := allThreadsPrctl(unix.PR_SET_KEEPCAPS, 0); err != nil {
		return fmt.Errorf("sandbox: prctl(PR_SET_KEEPCAPS): %w", err)
	}
	return nil
}
