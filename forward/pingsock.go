package forward

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// openPingSocket opens an unprivileged ICMP echo ("ping") socket: a
// SOCK_DGRAM socket of protocol IPPROTO_ICMP(V6). The kernel owns the echo
// identifier (it rewrites it to the socket's "port") and the checksum, and
// only delivers echo replies that match the socket, so no privileges are
// needed. Whether it is permitted is decided by the sysctl
// net.ipv4.ping_group_range (which covers IPv6 too).
//
// The socket is wrapped with net.FilePacketConn so it gets the runtime
// poller, deadlines and a Close that unblocks readers.
func openPingSocket(v6 bool) (net.PacketConn, error) {
	family, proto, name := unix.AF_INET, unix.IPPROTO_ICMP, "ping4"
	if v6 {
		family, proto, name = unix.AF_INET6, unix.IPPROTO_ICMPV6, "ping6"
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, fmt.Errorf("%s socket: %w", name, err)
	}
	// Queue the ICMP errors about our requests (unreachable, time
	// exceeded) so they can be passed on to the guest.
	if v6 {
		err = unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_RECVERR, 1)
	} else {
		err = unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_RECVERR, 1)
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s socket: recverr: %w", name, err)
	}
	file := os.NewFile(uintptr(fd), name)
	defer file.Close() // FilePacketConn dups the descriptor
	pc, err := net.FilePacketConn(file)
	if err != nil {
		return nil, fmt.Errorf("%s socket: %w", name, err)
	}
	return pc, nil
}

// pingGroupRange returns the contents of the sysctl that governs ping
// sockets, for the log message explaining why they are unavailable.
func pingGroupRange() string {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
	if err != nil {
		return "unreadable"
	}
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return string(b)
}
