package config

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// DefaultForwardHost returns the host address a forward listens on when the
// spec names none: loopback, not the wildcard, so that forwarding a guest
// port does not expose it to the network by accident.
func DefaultForwardHost() netip.Addr { return netip.AddrFrom4([4]byte{127, 0, 0, 1}) }

// Forward is one host→guest port forward: vunet listens on Host and relays
// each connection (or UDP flow) to GuestPort on the guest's address.
type Forward struct {
	Proto     string         // "tcp", "udp" or "unix"
	Host      netip.AddrPort // host address and port vunet listens on (tcp, udp)
	Path      string         // Unix socket vunet creates (unix)
	GuestPort uint16         // port on the guest
}

// String returns f in the spec form ParseForward accepts, with the host
// address always present: "tcp:127.0.0.1:8080:80", "udp:[::1]:53:53".
func (f Forward) String() string {
	if f.Proto == "unix" {
		return "unix:" + f.Path + ":" + strconv.Itoa(int(f.GuestPort))
	}
	return f.Proto + ":" + f.Host.String() + ":" + strconv.Itoa(int(f.GuestPort))
}

// forwardForm is the shape of a spec, used in every parse error so the user
// sees what was expected.
func forwardForm(proto string) string {
	if proto != "tcp" && proto != "udp" {
		proto = "tcp|udp"
	}
	return "expected " + proto + ":[HOSTADDR:]HOSTPORT:GUESTPORT"
}

// ParseForward parses a forward spec of the form
//
//	tcp:[HOSTADDR:]HOSTPORT:GUESTPORT
//	udp:[HOSTADDR:]HOSTPORT:GUESTPORT
//	unix:PATH:GUESTPORT
//
// A unix forward creates the Unix socket PATH (see ParseSocketPath) and
// relays its connections to the guest's TCP GUESTPORT (a single port).
// HOSTADDR is an IPv4 address or a bracketed IPv6 address ([::1]) and
// defaults to DefaultForwardHost(). HOSTPORT and GUESTPORT are ports 1..65535
// or equally long ranges (8000-8010:9000-9010), which expand to one Forward
// per port. The error describes the problem without repeating spec, so
// callers can prefix the flag or key it came from.
func ParseForward(spec string) ([]Forward, error) {
	proto, rest, _ := strings.Cut(spec, ":")
	if proto == "unix" {
		return parseUnixForward(rest)
	}
	form := forwardForm(proto)
	if proto != "tcp" && proto != "udp" {
		return nil, errors.New(form)
	}

	host := DefaultForwardHost()
	bracketed := strings.HasPrefix(rest, "[")
	if bracketed {
		end := strings.IndexByte(rest, ']')
		if end < 0 || !strings.HasPrefix(rest[end+1:], ":") {
			return nil, errors.New(form)
		}
		a, err := netip.ParseAddr(rest[1:end])
		if err != nil || !a.Is6() {
			return nil, fmt.Errorf("host address %q: %s with an IPv6 address in brackets", rest[1:end], form)
		}
		host, rest = a, rest[end+2:]
	}

	parts := strings.Split(rest, ":")
	switch {
	case len(parts) == 2:
	case len(parts) == 3 && !bracketed:
		a, err := netip.ParseAddr(parts[0])
		if err != nil || !a.Is4() {
			return nil, errors.New(form)
		}
		host, parts = a, parts[1:]
	default:
		// A bare IPv6 address is the likeliest cause of extra colons; say so.
		if n := len(parts); n > 3 && !bracketed {
			a, err := netip.ParseAddr(strings.Join(parts[:n-2], ":"))
			_, _, herr := parsePortRange(parts[n-2], "host", form)
			_, _, gerr := parsePortRange(parts[n-1], "guest", form)
			if err == nil && a.Is6() && herr == nil && gerr == nil {
				return nil, fmt.Errorf("IPv6 host address must be in brackets, as in %q", proto+":["+a.String()+"]:"+parts[n-2]+":"+parts[n-1])
			}
		}
		return nil, errors.New(form)
	}

	hlo, hhi, err := parsePortRange(parts[0], "host", form)
	if err != nil {
		return nil, err
	}
	glo, ghi, err := parsePortRange(parts[1], "guest", form)
	if err != nil {
		return nil, err
	}
	if hhi-hlo != ghi-glo {
		return nil, fmt.Errorf("host ports %s cover %d port(s) but guest ports %s cover %d; ranges must be the same length",
			parts[0], int(hhi-hlo)+1, parts[1], int(ghi-glo)+1)
	}
	out := make([]Forward, 0, int(hhi-hlo)+1)
	for i := 0; i <= int(hhi-hlo); i++ {
		out = append(out, Forward{
			Proto:     proto,
			Host:      netip.AddrPortFrom(host, hlo+uint16(i)),
			GuestPort: glo + uint16(i),
		})
	}
	return out, nil
}

// parsePortRange parses "PORT" or "LO-HI". which ("host"/"guest") and form
// only shape the error message.
func parsePortRange(s, which, form string) (lo, hi uint16, err error) {
	los, his, isRange := strings.Cut(s, "-")
	if lo, err = parsePort(los, which, form); err != nil {
		return 0, 0, err
	}
	if !isRange {
		return lo, lo, nil
	}
	if hi, err = parsePort(his, which, form); err != nil {
		return 0, 0, err
	}
	if hi < lo {
		return 0, 0, fmt.Errorf("%s port range %s is reversed; write %d-%d", which, s, hi, lo)
	}
	return lo, hi, nil
}

func parsePort(s, which, form string) (uint16, error) {
	// Check the syntax first so that "x" gets the form but "70000" gets a
	// precise range message; ParseUint reports both as errors.
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, errors.New(form)
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("%s port %s is out of range 1..65535", which, s)
	}
	return uint16(n), nil
}

const unixForwardForm = "expected unix:PATH:GUESTPORT"

func parseUnixForward(rest string) ([]Forward, error) {
	i := strings.LastIndexByte(rest, ':')
	if i < 0 {
		return nil, errors.New(unixForwardForm)
	}
	path, err := ParseSocketPath(rest[:i])
	if err != nil {
		return nil, err
	}
	port, err := parsePort(rest[i+1:], "guest", unixForwardForm)
	if err != nil {
		return nil, err
	}
	return []Forward{{Proto: "unix", Path: path, GuestPort: port}}, nil
}

// maxSocketPath is sockaddr_un's sun_path capacity on Linux, with its NUL.
const maxSocketPath = 108

// ParseSocketPath checks a Unix socket path of a unix forward or an
// exposed socket: $XDG_RUNTIME_DIR (or ${XDG_RUNTIME_DIR}) is replaced by
// the variable's value, and the result must be absolute and fit a
// sockaddr_un. It returns the cleaned path.
func ParseSocketPath(p string) (string, error) {
	for _, v := range []string{"${XDG_RUNTIME_DIR}", "$XDG_RUNTIME_DIR"} {
		if strings.Contains(p, v) {
			dir := os.Getenv("XDG_RUNTIME_DIR")
			if dir == "" {
				return "", fmt.Errorf("socket path %q uses $XDG_RUNTIME_DIR, which is not set", p)
			}
			p = strings.ReplaceAll(p, v, dir)
		}
	}
	switch {
	case p == "":
		return "", errors.New("socket path is empty")
	case !filepath.IsAbs(p):
		return "", fmt.Errorf("socket path %q is not absolute", p)
	case strings.ContainsRune(p, 0):
		return "", fmt.Errorf("socket path %q contains a NUL byte", p)
	}
	p = filepath.Clean(p)
	if len(p) >= maxSocketPath {
		return "", fmt.Errorf("socket path %q is %d bytes; a Unix socket path must be shorter than %d", p, len(p), maxSocketPath)
	}
	return p, nil
}

// Expose maps a gateway TCP port to a host Unix socket: a guest
// connection to the gateway address (IPv4 or IPv6) on Port is relayed to
// a connect on Path.
type Expose struct {
	Port uint16
	Path string
}

// String returns e in the spec form ParseExpose accepts.
func (e Expose) String() string {
	return "tcp:" + strconv.Itoa(int(e.Port)) + ":unix:" + e.Path
}

const exposeForm = "expected tcp:GATEWAYPORT:unix:PATH"

// ParseExpose parses an --expose spec, tcp:GATEWAYPORT:unix:PATH.
func ParseExpose(spec string) (Expose, error) {
	rest, ok := strings.CutPrefix(spec, "tcp:")
	if !ok {
		return Expose{}, errors.New(exposeForm)
	}
	ports, path, ok := strings.Cut(rest, ":unix:")
	if !ok {
		return Expose{}, errors.New(exposeForm)
	}
	port, err := parsePort(ports, "gateway", exposeForm)
	if err != nil {
		return Expose{}, err
	}
	if path, err = ParseSocketPath(path); err != nil {
		return Expose{}, err
	}
	return Expose{Port: port, Path: path}, nil
}
