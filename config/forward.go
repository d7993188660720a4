package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
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
	// Guest names the guest the forward reaches; the zero value means the
	// first guest (the configured guest address, 10.0.2.15), as before
	// vunet served several guests.
	Guest GuestSelector
}

// GuestSelector names one guest of the network in a forward: by DHCP host
// name, by MAC or by address. At most one field is set. It is resolved each
// time a connection or flow arrives, so it follows the guest across
// reconnects and renumbering.
type GuestSelector struct {
	// Name is the guest's DHCP host name (lower case; NAME.vunet.internal).
	Name string
	// MAC is the guest's MAC address in net.HardwareAddr's form
	// (52:54:00:12:34:56), so the selector stays comparable.
	MAC string
	// Addr is one of the guest's addresses (IPv4 or IPv6).
	Addr netip.Addr
}

// IsZero reports whether g names no guest (the first guest).
func (g GuestSelector) IsZero() bool { return g == GuestSelector{} }

// String is g in the form ParseGuestSelector accepts: the name, the MAC
// with dashes, the IPv4 address or the IPv6 address in brackets; "" for
// the zero selector.
func (g GuestSelector) String() string {
	switch {
	case g.Name != "":
		return g.Name
	case g.MAC != "":
		return strings.ReplaceAll(g.MAC, ":", "-")
	case g.Addr.Is6():
		return "[" + g.Addr.String() + "]"
	case g.Addr.IsValid():
		return g.Addr.String()
	}
	return ""
}

// guestSelectorForm is the shape of a selector, for errors.
const guestSelectorForm = "a guest is a DHCP host name (vm1), a MAC (52-54-00-12-34-56 or [52:54:00:12:34:56]), an IPv4 address or an IPv6 address in brackets"

// ParseGuestSelector parses the guest part of a forward spec: a DHCP host
// name (one RFC 1123 label with at least one letter, so it is never read as
// a port; matched case-insensitively), a MAC (dashes, or colons in
// brackets), an IPv4 address or a bracketed IPv6 address.
func ParseGuestSelector(s string) (GuestSelector, error) {
	if in, ok := strings.CutPrefix(s, "["); ok {
		in, ok = strings.CutSuffix(in, "]")
		if !ok {
			return GuestSelector{}, fmt.Errorf("guest %q: %s", s, guestSelectorForm)
		}
		if a, err := netip.ParseAddr(in); err == nil && a.Is6() && a.Zone() == "" {
			return GuestSelector{Addr: a}, nil
		}
		if m, err := net.ParseMAC(in); err == nil && len(m) == 6 && strings.Count(in, ":") == 5 {
			return GuestSelector{MAC: m.String()}, nil
		}
		return GuestSelector{}, fmt.Errorf("guest %q: %s", s, guestSelectorForm)
	}
	if a, err := netip.ParseAddr(s); err == nil && a.Is4() {
		return GuestSelector{Addr: a}, nil
	}
	if m, err := net.ParseMAC(s); err == nil && len(m) == 6 && strings.Count(s, "-") == 5 {
		return GuestSelector{MAC: m.String()}, nil
	}
	if validGuestName(s) {
		return GuestSelector{Name: strings.ToLower(s)}, nil
	}
	return GuestSelector{}, fmt.Errorf("guest %q: %s", s, guestSelectorForm)
}

// validGuestName: an RFC 1123 label (what services/names binds) with a
// letter in it.
func validGuestName(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	letter := false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
			letter = true
		case c >= '0' && c <= '9', c == '-':
		default:
			return false
		}
	}
	return letter
}

// String returns f in the spec form ParseForward accepts, with the host
// address always present: "tcp:127.0.0.1:8080:80", "udp:[::1]:53:53",
// "tcp:127.0.0.1:2222:vm1:22".
func (f Forward) String() string {
	guest := ""
	if !f.Guest.IsZero() {
		guest = f.Guest.String() + ":"
	}
	if f.Proto == "unix" {
		path := f.Path
		if guest == "" && unixGuestSuffix(path) {
			// The path's tail would read as a guest; "/." keeps it a path.
			path += "/."
		}
		return "unix:" + path + ":" + guest + strconv.Itoa(int(f.GuestPort))
	}
	return f.Proto + ":" + f.Host.String() + ":" + guest + strconv.Itoa(int(f.GuestPort))
}

// forwardForm is the shape of a spec, used in every parse error so the user
// sees what was expected.
func forwardForm(proto string) string {
	if proto != "tcp" && proto != "udp" {
		proto = "tcp|udp"
	}
	return "expected " + proto + ":[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT"
}

// splitSpec splits s at colons outside brackets, so [::1] and
// [52:54:00:12:34:56] stay one field. ok is false for unbalanced brackets
// or a bracketed field that is not a whole field.
func splitSpec(s string) (fields []string, ok bool) {
	start, depth := 0, 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '[':
			if depth > 0 || i != start {
				return nil, false
			}
			depth++
		case ']':
			if depth == 0 || i+1 < len(s) && s[i+1] != ':' {
				return nil, false
			}
			depth--
		case ':':
			if depth == 0 {
				fields = append(fields, s[start:i])
				start = i + 1
			}
		}
	}
	if depth != 0 {
		return nil, false
	}
	return append(fields, s[start:]), true
}

func isPortRange(s string) bool {
	_, _, err := parsePortRange(s, "", "")
	return err == nil
}

// ParseForward parses a forward spec of the form
//
//	tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT
//	udp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT
//	unix:PATH:[GUEST:]GUESTPORT
//
// A unix forward creates the Unix socket PATH (see ParseSocketPath) and
// relays its connections to the guest's TCP GUESTPORT (a single port).
// HOSTADDR is an IPv4 address or a bracketed IPv6 address ([::1]) and
// defaults to DefaultForwardHost(). HOSTPORT and GUESTPORT are ports 1..65535
// or equally long ranges (8000-8010:9000-9010), which expand to one Forward
// per port. GUEST (ParseGuestSelector) names the guest when vunet serves
// several; without it the forward reaches the first guest. A port is never
// a GUEST (names need a letter) and HOSTADDR is never a port, so the
// three-field forms are unambiguous. The error describes the problem
// without repeating spec, so callers can prefix the flag or key it came
// from.
func ParseForward(spec string) ([]Forward, error) {
	proto, rest, _ := strings.Cut(spec, ":")
	if proto == "unix" {
		return parseUnixForward(rest)
	}
	form := forwardForm(proto)
	if proto != "tcp" && proto != "udp" {
		return nil, errors.New(form)
	}

	parts, ok := splitSpec(rest)
	if !ok {
		return nil, errors.New(form)
	}
	host := DefaultForwardHost()
	hostAddr := func(s string) (bool, error) {
		if in, ok := strings.CutPrefix(s, "["); ok {
			a, err := netip.ParseAddr(strings.TrimSuffix(in, "]"))
			if err != nil || !a.Is6() {
				return false, fmt.Errorf("host address %q: %s with an IPv6 address in brackets", strings.TrimSuffix(in, "]"), form)
			}
			host = a
			return true, nil
		}
		a, err := netip.ParseAddr(s)
		if err != nil || !a.Is4() {
			return false, nil
		}
		host = a
		return true, nil
	}
	var guest GuestSelector
	var hp, gp string
	switch n := len(parts); {
	case n == 2:
		hp, gp = parts[0], parts[1]
	case n == 3 && !isPortRange(parts[0]):
		// HOSTADDR:HOSTPORT:GUESTPORT
		isAddr, err := hostAddr(parts[0])
		if err != nil {
			return nil, err
		}
		if !isAddr {
			return nil, errors.New(form)
		}
		hp, gp = parts[1], parts[2]
	case n == 3:
		// HOSTPORT:GUEST:GUESTPORT
		g, err := ParseGuestSelector(parts[1])
		if err != nil {
			if isPortRange(parts[1]) || parts[1] == "" {
				return nil, errors.New(form)
			}
			return nil, err
		}
		guest, hp, gp = g, parts[0], parts[2]
	case n == 4 && !strings.HasPrefix(rest, "[") || n == 4 && strings.HasPrefix(parts[0], "["):
		isAddr, err := hostAddr(parts[0])
		if err != nil {
			return nil, err
		}
		if !isAddr {
			return nil, errors.New(form)
		}
		g, err := ParseGuestSelector(parts[2])
		if err != nil {
			if isPortRange(parts[2]) || parts[2] == "" {
				return nil, errors.New(form)
			}
			return nil, err
		}
		guest, hp, gp = g, parts[1], parts[3]
	default:
		// A bare IPv6 address or MAC is the likeliest cause of extra colons;
		// say so.
		if n > 3 && !strings.Contains(rest, "[") {
			a, err := netip.ParseAddr(strings.Join(parts[:n-2], ":"))
			herr, gerr := isPortRange(parts[n-2]), isPortRange(parts[n-1])
			if err == nil && a.Is6() && herr && gerr {
				return nil, fmt.Errorf("IPv6 host address must be in brackets, as in %q", proto+":["+a.String()+"]:"+parts[n-2]+":"+parts[n-1])
			}
			if n >= 8 {
				if m, err := net.ParseMAC(strings.Join(parts[n-7:n-1], ":")); err == nil && len(m) == 6 && isPortRange(parts[n-1]) {
					return nil, fmt.Errorf("a guest MAC must be in brackets or written with dashes, as in %q",
						strings.Join(append(slices.Clone(parts[:n-7]), "["+m.String()+"]", parts[n-1]), ":"))
				}
			}
		}
		return nil, errors.New(form)
	}

	hlo, hhi, err := parsePortRange(hp, "host", form)
	if err != nil {
		return nil, err
	}
	glo, ghi, err := parsePortRange(gp, "guest", form)
	if err != nil {
		return nil, err
	}
	if hhi-hlo != ghi-glo {
		return nil, fmt.Errorf("host ports %s cover %d port(s) but guest ports %s cover %d; ranges must be the same length",
			hp, int(hhi-hlo)+1, gp, int(ghi-glo)+1)
	}
	out := make([]Forward, 0, int(hhi-hlo)+1)
	for i := 0; i <= int(hhi-hlo); i++ {
		out = append(out, Forward{
			Proto:     proto,
			Host:      netip.AddrPortFrom(host, hlo+uint16(i)),
			GuestPort: glo + uint16(i),
			Guest:     guest,
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

const unixForwardForm = "expected unix:PATH:[GUEST:]GUESTPORT"

// parseUnixForward parses PATH:[GUEST:]GUESTPORT. The path may itself
// contain colons, so the field before the port is a GUEST only when it
// parses as one and holds no slash; a path whose last component ends in
// ":vm1" is written with a trailing "/." (as String does).
func parseUnixForward(rest string) ([]Forward, error) {
	i := strings.LastIndexByte(rest, ':')
	if i < 0 {
		return nil, errors.New(unixForwardForm)
	}
	pathPart, portPart := rest[:i], rest[i+1:]
	var guest GuestSelector
	if j := unixGuestStart(pathPart); j >= 0 {
		if g, err := ParseGuestSelector(pathPart[j+1:]); err == nil {
			guest, pathPart = g, pathPart[:j]
		}
	}
	path, err := ParseSocketPath(pathPart)
	if err != nil {
		return nil, err
	}
	port, err := parsePort(portPart, "guest", unixForwardForm)
	if err != nil {
		return nil, err
	}
	return []Forward{{Proto: "unix", Path: path, GuestPort: port, Guest: guest}}, nil
}

// unixGuestStart is the index of the colon before a possible GUEST at the
// end of s (PATH:GUEST), or -1.
func unixGuestStart(s string) int {
	j := strings.LastIndexByte(s, ':')
	if strings.HasSuffix(s, "]") {
		j = strings.LastIndex(s, ":[")
	}
	if j < 0 || strings.Contains(s[j+1:], "/") {
		return -1
	}
	return j
}

// unixGuestSuffix reports whether the path p ends in ":GUEST".
func unixGuestSuffix(p string) bool {
	j := unixGuestStart(p)
	if j < 0 {
		return false
	}
	_, err := ParseGuestSelector(p[j+1:])
	return err == nil
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

// ParseSocketDir checks the directory of the sockets of runtime unix
// forwards (--unix-forward-dir): like ParseSocketPath, with room left in a
// sockaddr_un for a file name in it.
func ParseSocketDir(p string) (string, error) {
	d, err := ParseSocketPath(p)
	if err != nil {
		return "", fmt.Errorf("socket directory: %w", err)
	}
	if len(d)+2 >= maxSocketPath {
		return "", fmt.Errorf("socket directory %q is %d bytes: no room for a socket name in it (a Unix socket path must be shorter than %d)", d, len(d), maxSocketPath)
	}
	return d, nil
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

const exposeRefForm = "expected tcp:GATEWAYPORT or tcp:GATEWAYPORT:unix:PATH"

// ParseExposeRef parses the expose a removal names (vunet expose remove):
// an --expose spec, or tcp:GATEWAYPORT alone for whatever socket the
// port is exposed to (Path empty).
func ParseExposeRef(spec string) (Expose, error) {
	if strings.Contains(spec, ":unix:") {
		return ParseExpose(spec)
	}
	ports, ok := strings.CutPrefix(spec, "tcp:")
	if !ok {
		return Expose{}, errors.New(exposeRefForm)
	}
	port, err := parsePort(ports, "gateway", exposeRefForm)
	if err != nil {
		return Expose{}, err
	}
	return Expose{Port: port}, nil
}
