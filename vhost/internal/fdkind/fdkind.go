// Package fdkind checks what a file descriptor passed by a vhost-user
// frontend really is, before vunet builds anything on it. A kick that is
// not an eventfd (a pipe, /dev/zero, a regular file) would make a queue
// worker spin or block where it cannot be interrupted; a memory region on
// a device file is not guest memory.
//
// The checks use fstat and readlink("/proc/self/fd/N") only: readlink is
// not a file open, so it keeps working under a Landlock sandbox, which
// would refuse opening /proc/self/fdinfo.
package fdkind

import (
	"errors"
	"fmt"
	"strconv"

	"golang.org/x/sys/unix"
)

// ErrWrongKind marks a descriptor of the wrong kind.
var ErrWrongKind = errors.New("wrong kind of file descriptor")

// eventFDLink is what /proc/self/fd/N links to for an eventfd.
const eventFDLink = "anon_inode:[eventfd]"

// EventFD checks that fd is an eventfd. Anonymous inodes (eventfd,
// timerfd, signalfd, epoll, ...) have no file type bits in st_mode; the
// /proc link names which one it is. Without /proc (a private mount
// namespace) the anonymous-inode check alone is made: every anonymous
// inode either polls or fails its reads, neither of which wedges a worker.
func EventFD(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%w: fd %d: fstat: %v", ErrWrongKind, fd, err)
	}
	if st.Mode&unix.S_IFMT != 0 {
		return fmt.Errorf("%w: fd %d is a %s, want an eventfd", ErrWrongKind, fd, typeName(st.Mode))
	}
	link, err := Link(fd)
	if err != nil {
		return nil
	}
	if link != eventFDLink {
		return fmt.Errorf("%w: fd %d is %q, want an eventfd", ErrWrongKind, fd, link)
	}
	return nil
}

// RegularFile checks that fd is a regular file (a memfd, a file on tmpfs
// or hugetlbfs: what guest memory is shared as) and returns its status.
func RegularFile(fd int) (unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return st, fmt.Errorf("%w: fd %d: fstat: %v", ErrWrongKind, fd, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return st, fmt.Errorf("%w: fd %d is a %s, want a regular file or memfd", ErrWrongKind, fd, typeName(st.Mode))
	}
	return st, nil
}

// Link returns the target of /proc/self/fd/fd ("anon_inode:[eventfd]",
// "pipe:[123]", a path, ...).
func Link(fd int) (string, error) {
	var buf [128]byte
	n, err := unix.Readlink("/proc/self/fd/"+strconv.Itoa(fd), buf[:])
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

func typeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case 0:
		return "anonymous inode"
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFBLK:
		return "block device"
	case unix.S_IFIFO:
		return "pipe"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFLNK:
		return "symlink"
	}
	return fmt.Sprintf("file of type %#o", mode&unix.S_IFMT)
}

// Stream checks that fd is a pipe or a socket: what a device-state
// transfer is read from or written to. Both poll, so a transfer can be
// bounded by a deadline; a regular file or a device could not be.
func Stream(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%w: fd %d: fstat: %v", ErrWrongKind, fd, err)
	}
	if t := st.Mode & unix.S_IFMT; t != unix.S_IFIFO && t != unix.S_IFSOCK {
		return fmt.Errorf("%w: fd %d is a %s, want a pipe or a socket", ErrWrongKind, fd, typeName(st.Mode))
	}
	return nil
}
