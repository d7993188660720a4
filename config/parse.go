package config

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
)

// The parsers below are shared by the TOML file and the command line so both
// accept the same forms. Their errors say what was expected without repeating
// the input, so callers can prefix the key or flag and the value.

// ParseMAC parses a 48-bit MAC address such as 52:54:00:12:34:56.
func ParseMAC(s string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(s)
	if err != nil || len(mac) != 6 {
		// net.ParseMAC also accepts EUI-64 and InfiniBand forms, which a
		// virtio-net device cannot use.
		return nil, errors.New("expected a MAC address like 52:54:00:12:34:56")
	}
	return mac, nil
}

// ParseLogLevel parses debug, info, warn or error (any case).
func ParseLogLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, errors.New("expected debug, info, warn or error")
}

// levelName is the inverse of ParseLogLevel.
func levelName(l slog.Level) string {
	return strings.ToLower(l.String())
}

// ParseLogFormat parses text or json.
func ParseLogFormat(s string) (LogFormat, error) {
	switch f := LogFormat(strings.ToLower(s)); f {
	case LogText, LogJSON:
		return f, nil
	}
	return "", errors.New("expected text or json")
}

// ParseSandbox parses on, off or log.
func ParseSandbox(s string) (Sandbox, error) {
	switch m := Sandbox(strings.ToLower(s)); m {
	case SandboxOn, SandboxLog, SandboxOff:
		return m, nil
	}
	return "", errors.New("expected on, off or log")
}

// ParseDHCPv6Mode parses stateless or stateful.
func ParseDHCPv6Mode(s string) (DHCPv6Mode, error) {
	switch m := DHCPv6Mode(strings.ToLower(s)); m {
	case DHCPv6Stateless, DHCPv6Stateful:
		return m, nil
	}
	return "", errors.New("expected stateless or stateful")
}

// ParseRunAs checks the form USER[:GROUP] (names or numeric ids); the
// names are looked up when the sandbox switches to them.
func ParseRunAs(s string) (string, error) {
	user, group, hasGroup := strings.Cut(s, ":")
	if user == "" || (hasGroup && group == "") || strings.ContainsAny(s, " \t\n\x00") || strings.Count(s, ":") > 1 {
		return "", errors.New("expected USER[:GROUP], names or numeric ids")
	}
	return s, nil
}

// ParseDNSUpstream parses an upstream resolver: an IP address with an
// optional port (default 53); IPv6 with a port needs brackets.
func ParseDNSUpstream(s string) (netip.AddrPort, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.AddrPortFrom(a, 53), nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil || ap.Port() == 0 {
		return netip.AddrPort{}, errors.New("expected IP[:PORT] like 1.1.1.1, 1.1.1.1:53 or [2606:4700::1111]:53")
	}
	return ap, nil
}

// ParsePrefix parses a subnet in CIDR form, IPv4 or IPv6.
func ParsePrefix(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, errors.New("expected a subnet like 10.0.2.0/24 or fd00::/64")
	}
	return p, nil
}

// ParseAddr parses an IPv4 or IPv6 address.
func ParseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, errors.New("expected an IP address like 10.0.2.2 or fd00::2")
	}
	return a, nil
}

// ParseDuration parses a Go duration such as 30s, 5m or 1h30m.
func ParseDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, errors.New("expected a duration like 30s, 5m or 1h")
	}
	return d, nil
}

// formatDuration is time.Duration.String without the noise: "1h" rather than
// "1h0m0s", so that printed configurations read like hand-written ones.
func formatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// ParseSocketMode parses socket permission bits in octal, as chmod takes
// them ("0660", "660").
func ParseSocketMode(s string) (os.FileMode, error) {
	v, err := strconv.ParseUint(strings.TrimPrefix(s, "0o"), 8, 32)
	if err != nil || v > 0o777 {
		return 0, fmt.Errorf("expected octal permission bits 000..777, like 0660")
	}
	return os.FileMode(v), nil
}

// FormatSocketMode is the inverse of ParseSocketMode.
func FormatSocketMode(m os.FileMode) string { return fmt.Sprintf("%04o", uint32(m.Perm())) }

// sizeUnits are the suffixes ParseSize accepts, longest first; K, M and G
// are binary, like the kernel's and QEMU's sizes.
var sizeUnits = []struct {
	suffix string
	shift  uint
}{
	{"KiB", 10}, {"MiB", 20}, {"GiB", 30}, {"TiB", 40},
	{"KB", 10}, {"MB", 20}, {"GB", 30}, {"TB", 40},
	{"K", 10}, {"M", 20}, {"G", 30}, {"T", 40}, {"B", 0},
}

// ParseSize parses a byte count: a number with an optional unit, such as
// 268435456, 512KiB, 256MiB, 256M or 1G. Every unit is a power of 1024:
// KB and MB mean KiB and MiB, as they do in QEMU's and tcpdump's options.
func ParseSize(s string) (int64, error) {
	bad := errors.New("expected a size like 256MiB, 1GiB or a number of bytes")
	t := strings.TrimSpace(s)
	shift := uint(0)
	for _, u := range sizeUnits {
		if len(t) > len(u.suffix) && strings.EqualFold(t[len(t)-len(u.suffix):], u.suffix) {
			t, shift = strings.TrimSpace(t[:len(t)-len(u.suffix)]), u.shift
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > math.MaxInt64>>shift {
		return 0, bad
	}
	return n << shift, nil
}

// GuestMemoryAuto is max_guest_memory's default: an equal share.
const GuestMemoryAuto = "auto"

// ParseGuestMemory parses max_guest_memory: a size, or "auto" (0: the
// outbound share divided by max_guests).
func ParseGuestMemory(s string) (int64, error) {
	if strings.EqualFold(strings.TrimSpace(s), GuestMemoryAuto) {
		return 0, nil
	}
	n, err := ParseSize(s)
	if err != nil {
		return 0, errors.New("expected auto or a size like 64MiB")
	}
	return n, nil
}

// FormatGuestMemory is the inverse of ParseGuestMemory.
func FormatGuestMemory(n int64) string {
	if n == 0 {
		return GuestMemoryAuto
	}
	return FormatSize(n)
}

// FormatSize is the inverse of ParseSize, in the largest exact unit.
func FormatSize(n int64) string {
	for _, u := range []struct {
		suffix string
		shift  uint
	}{{"TiB", 40}, {"GiB", 30}, {"MiB", 20}, {"KiB", 10}} {
		if n != 0 && n%(1<<u.shift) == 0 {
			return strconv.FormatInt(n>>u.shift, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}
