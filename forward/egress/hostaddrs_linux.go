package egress

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// subscribeAddrChanges opens a NETLINK_ROUTE socket subscribed to the IPv4
// and IPv6 address groups. Every message on it (an address added, removed
// or changed) and every overflow (ENOBUFS: notifications were lost) is one
// signal on the channel; the receiver re-reads the whole list, so lost or
// coalesced notifications cannot leave the set stale. The socket is
// non-blocking and read through the Go netpoller, so closing it interrupts
// the reader, and the close function waits for it.
func subscribeAddrChanges() (<-chan struct{}, func() error, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, nil, fmt.Errorf("netlink socket: %w", err)
	}
	sa := &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: unix.RTMGRP_IPV4_IFADDR | unix.RTMGRP_IPV6_IFADDR}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("netlink bind: %w", err)
	}
	f := os.NewFile(uintptr(fd), "netlink-route")
	ch := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(ch)
		buf := make([]byte, 64<<10)
		for {
			_, err := f.Read(buf)
			if err != nil && !errors.Is(err, syscall.ENOBUFS) {
				return // closed, or the socket is unusable: stop signalling
			}
			select {
			case ch <- struct{}{}:
			default: // a re-read is already pending; it will see this change
			}
		}
	}()
	// Closing the file interrupts the reader; wait for it, so nothing is
	// left running after Close.
	stop := func() error {
		err := f.Close()
		<-done
		return err
	}
	return ch, stop, nil
}
