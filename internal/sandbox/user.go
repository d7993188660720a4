package sandbox

import (
	"errors"
	"fmt"
	"os/user"
	"strconv"
	"strings"
	"syscall"
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
// uid the kernel clears every capability.
func dropTo(c *cred) error {
	if c.uid == 0 {
		// --runas root: stay root, deliberately (no capability is dropped).
		return nil
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
	// The way back must be closed.
	if err := syscall.Setuid(0); err == nil {
		return fmt.Errorf("sandbox: setuid(0) still succeeds after dropping to %s", c.name)
	}
	return nil
}
