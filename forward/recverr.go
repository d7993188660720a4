package forward

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// hostError is one ICMP error taken from a host socket's error queue.
type hostError struct {
	kind unreachKind
	// offender is the address that sent the ICMP error: the peer, or a
	// router on the path.
	offender netip.Addr
	// payload is the start of the datagram the error is about, as this
	// socket sent it (for ping sockets: the echo request).
	payload []byte
}

// enableRecvErr asks the kernel to queue every ICMP error for the socket
// (IP_RECVERR / IPV6_RECVERR) with its type, code and sender. Without it a
// socket learns only of "port unreachable", and not from whom.
func enableRecvErr(rc syscall.RawConn, v6 bool) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		if v6 {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_RECVERR, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_RECVERR, 1)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// maxErrQueue bounds how many errors one drain reads, so that a peer
// flooding ICMP cannot keep a relay goroutine in the loop.
const maxErrQueue = 64

// drainErrQueue reads, without blocking, the errors queued on the socket
// and calls fn for each ICMP error; it returns how many it read. It uses
// Control rather than Read so that it neither waits for nor is blocked by
// a concurrent blocking read of ordinary data.
func drainErrQueue(rc syscall.RawConn, fn func(hostError)) int {
	buf := make([]byte, 2048) // more than any quote the guest gets
	var oob [128]byte
	n := 0
	_ = rc.Control(func(fd uintptr) {
		for n < maxErrQueue {
			dn, oobn, _, _, err := unix.Recvmsg(int(fd), buf, oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			if err != nil {
				return // EAGAIN: the queue is empty
			}
			n++
			msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil {
				continue
			}
			for _, m := range msgs {
				if e, ok := parseExtendedErr(m.Header.Level, m.Header.Type, m.Data); ok {
					e.payload = buf[:dn]
					fn(e)
				}
			}
		}
	})
	return n
}

// parseExtendedErr decodes an IP_RECVERR / IPV6_RECVERR control message: a
// struct sock_extended_err (errno u32, origin, type, code, pad u8, info,
// data u32) followed by the offender's sockaddr. Errors that did not come
// from ICMP (local ones such as EMSGSIZE) are not for the guest.
func parseExtendedErr(level, typ int32, data []byte) (hostError, bool) {
	const eeSize = 16
	if len(data) < eeSize ||
		!(level == unix.SOL_IP && typ == unix.IP_RECVERR || level == unix.SOL_IPV6 && typ == unix.IPV6_RECVERR) {
		return hostError{}, false
	}
	var e hostError
	switch origin, t, c := data[4], data[5], data[6]; origin {
	case unix.SO_EE_ORIGIN_ICMP:
		e.kind = kindFromICMPv4(t, c)
	case unix.SO_EE_ORIGIN_ICMP6:
		e.kind = kindFromICMPv6(t, c)
	}
	if e.kind == kindNone {
		return hostError{}, false
	}
	sa := data[eeSize:]
	if len(sa) >= 2 {
		switch binary.NativeEndian.Uint16(sa) {
		case unix.AF_INET:
			if len(sa) >= 8 {
				e.offender = netip.AddrFrom4([4]byte(sa[4:8]))
			}
		case unix.AF_INET6:
			if len(sa) >= 24 {
				e.offender = netip.AddrFrom16([16]byte(sa[8:24])).Unmap()
			}
		}
	}
	return e, true
}

// icmpErrno reports whether err is how a socket reports a queued ICMP
// error: the errno the kernel maps ICMP errors to.
func icmpErrno(err error) bool {
	for _, e := range []syscall.Errno{syscall.ECONNREFUSED, syscall.EHOSTUNREACH, syscall.ENETUNREACH,
		syscall.EACCES, syscall.EPERM, syscall.EPROTO} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
