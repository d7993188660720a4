package tapfront

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Offload flags of TUNSETOFFLOAD (linux/if_tun.h; not in x/sys/unix).
const (
	tunFCsum   = 0x01
	tunFTSO4   = 0x02
	tunFTSO6   = 0x04
	tunFTSOECN = 0x08
)

// OpenTap creates (or attaches to) the tap device name with
// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and a 12-byte vnet header, so that every
// read and write carries the same virtio-net header (with num_buffers) as
// the rings of a VERSION_1 device. Offloads stay off until the bridge has
// negotiated them (SetOffload). The file is non-blocking and watched by
// Go's poller.
func OpenTap(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("tapfront: open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tapfront: tap name %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tapfront: TUNSETIFF %s: %w", name, err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, HdrLen); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tapfront: TUNSETVNETHDRSZ %d: %w", HdrLen, err)
	}
	return os.NewFile(uintptr(fd), "tap:"+name), nil
}

// SetOffload tells the kernel which offloads the tap may hand us:
// partially checksummed frames (csum) and TSO frames for IPv4, IPv6 and
// with ECN. TSO requires csum.
func SetOffload(tap *os.File, csum, tso4, tso6, ecn bool) error {
	var flags int
	if csum {
		flags |= tunFCsum
		if tso4 {
			flags |= tunFTSO4
		}
		if tso6 {
			flags |= tunFTSO6
		}
		if (tso4 || tso6) && ecn {
			flags |= tunFTSOECN
		}
	}
	rc, err := tap.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) { ierr = unix.IoctlSetInt(int(fd), unix.TUNSETOFFLOAD, flags) }); err != nil {
		return err
	}
	if ierr != nil {
		return fmt.Errorf("tapfront: TUNSETOFFLOAD %#x: %w", flags, ierr)
	}
	return nil
}
