package config

import (
	"errors"
	"fmt"
	"net/netip"
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
	Proto     string         // "tcp" or "udp"
	Host      netip.AddrPort // host address and port vunet listens on
	GuestPort uint16         // port on the guest
}

// String returns f in the spec form ParseForward accepts, with the host
// address always present: "tcp:127.0.0.1:8080:80", "udp:[::1]:53:53".
func (f Forward) String() string {
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
//
// HOSTADDR is an IPv4 address or a bracketed IPv6 address ([::1]) and
// defaults to DefaultForwardHost(). HOSTPORT and GUESTPORT are ports 1..65535
// or equally long ranges (8000-8010:9000-9010), which expand to one Forward
// per port. The error describes the problem without repeating spec, so
// callers can prefix the flag or key it came from.
func ParseForward(spec string) ([]Forward, error) {
	proto, rest, _ := strings.Cut(spec, ":")
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
