// Package egress is vunet's outbound policy: which destinations the guest's
// TCP connections, UDP datagrams and pings may reach through the NAT.
//
// A Policy is a first-match list of user rules followed by built-in
// defaults (link-local and cloud metadata addresses denied, optionally the
// host's own addresses, optionally everything). The forwarder asks it once
// per flow, when the flow would be created; see Policy.Check for the exact
// order of evaluation and docs/security.md for the user-facing description.
//
// The package depends only on the standard library (and, on Linux, on
// golang.org/x/sys/unix for the host address watcher), so the configuration
// layer can parse rules with it.
package egress

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Action is what a rule does with the flows it matches.
type Action uint8

// The actions.
const (
	Allow Action = iota + 1
	Deny
)

func (a Action) String() string {
	switch a {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	}
	return "invalid"
}

// ParseAction parses "allow" or "deny".
func ParseAction(s string) (Action, error) {
	switch strings.ToLower(s) {
	case "allow":
		return Allow, nil
	case "deny":
		return Deny, nil
	}
	return 0, errors.New("expected allow or deny")
}

// Proto is the transport a rule applies to.
type Proto uint8

// The protocols. ICMP means echo requests (ping) of either family: they are
// the only ICMP messages the NAT forwards.
const (
	AnyProto Proto = iota
	TCP
	UDP
	ICMP
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMP:
		return "icmp"
	}
	return "any"
}

// PortRange is an inclusive range of ports; the zero value means every port.
type PortRange struct{ Lo, Hi uint16 }

// All reports whether r is the zero value (every port).
func (r PortRange) All() bool { return r == PortRange{} }

func (r PortRange) contains(p uint16) bool { return r.All() || r.Lo <= p && p <= r.Hi }

func (r PortRange) String() string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return strconv.Itoa(int(r.Lo)) + "-" + strconv.Itoa(int(r.Hi))
}

// Rule is one user rule: an action for flows of a protocol to a prefix and
// port range.
type Rule struct {
	Action Action
	// Proto restricts the rule to one transport; AnyProto matches all.
	Proto Proto
	// Prefix is the destination network. The zero Prefix ("any") matches
	// every address of both families.
	Prefix netip.Prefix
	// Ports restricts the rule to TCP and UDP destination ports. A rule
	// with ports never matches ICMP.
	Ports PortRange
}

// String returns the rule in the form ParseRule accepts, e.g.
// "allow tcp:10.0.0.0/8:80-443" or "deny [fd00::/8]:53".
func (r Rule) String() string { return r.Action.String() + " " + r.Spec() }

// Spec returns the rule without its action, in the form ParseSpec accepts.
func (r Rule) Spec() string {
	var b strings.Builder
	if r.Proto != AnyProto {
		b.WriteString(r.Proto.String() + ":")
	}
	addr := "any"
	if r.Prefix.IsValid() {
		addr = r.Prefix.String()
		if r.Prefix.IsSingleIP() {
			addr = r.Prefix.Addr().String()
		}
	}
	if r.Prefix.Addr().Is6() && !r.Ports.All() {
		addr = "[" + addr + "]"
	}
	b.WriteString(addr)
	if !r.Ports.All() {
		b.WriteString(":" + r.Ports.String())
	}
	return b.String()
}

// specForm is the grammar, repeated in every parse error so the user sees
// what was expected.
const specForm = "expected [tcp:|udp:|icmp:]ADDR[/BITS][:PORT[-PORT]] (IPv6 with ports in brackets: [fd00::/8]:53; ADDR may be \"any\")"

// ParseRule parses "ACTION SPEC", the form of the config file's
// egress.rules entries: "allow tcp:10.0.0.0/8:80-443", "deny any".
func ParseRule(s string) (Rule, error) {
	act, spec, ok := strings.Cut(strings.TrimSpace(s), " ")
	if !ok {
		return Rule{}, errors.New("expected \"allow SPEC\" or \"deny SPEC\"; SPEC " + specForm[len("expected "):])
	}
	a, err := ParseAction(act)
	if err != nil {
		return Rule{}, err
	}
	return ParseSpec(a, strings.TrimSpace(spec))
}

// ParseSpec parses the destination part of a rule, the value of --allow and
// --deny:
//
//	[PROTO:]ADDR[:PORTS]
//
// PROTO is tcp, udp or icmp; without it the rule applies to all three (to
// TCP and UDP only if PORTS is given). ADDR is "any", an address or a CIDR
// prefix of either family; an IPv6 ADDR followed by PORTS must be in
// brackets ([fd00::/8]:53, [::1]:80), so every spec has one reading. PORTS is
// a port or an inclusive range 1..65535 (80, 8000-8100).
func ParseSpec(a Action, s string) (Rule, error) {
	if a != Allow && a != Deny {
		return Rule{}, errors.New("invalid action")
	}
	r := Rule{Action: a}
	// No address starts with a protocol name ("t", "u" and "i" are not hex
	// digits), so the prefix is unambiguous.
	for _, p := range []Proto{TCP, UDP, ICMP} {
		if rest, ok := cutPrefixFold(s, p.String()+":"); ok {
			r.Proto, s = p, rest
			break
		}
	}
	var addr, ports string
	switch {
	case strings.HasPrefix(s, "["):
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return Rule{}, errors.New("missing ']'; " + specForm)
		}
		addr, ports = s[1:end], s[end+1:]
		if ports != "" {
			var ok bool
			if ports, ok = strings.CutPrefix(ports, ":"); !ok || ports == "" {
				return Rule{}, errors.New("expected :PORTS after ']'; " + specForm)
			}
		}
		if !strings.Contains(addr, ":") {
			return Rule{}, errors.New("brackets are for IPv6 addresses; " + specForm)
		}
	case strings.Count(s, ":") >= 2:
		addr = s // a bare IPv6 address or prefix: no ports
	default:
		addr, ports, _ = strings.Cut(s, ":")
		if strings.Contains(s, ":") && ports == "" {
			return Rule{}, errors.New("empty PORTS; " + specForm)
		}
	}
	p, err := parsePrefix(addr)
	if err != nil {
		return Rule{}, err
	}
	r.Prefix = p
	if ports != "" {
		if r.Proto == ICMP {
			return Rule{}, errors.New("icmp rules take no ports")
		}
		if r.Ports, err = parsePorts(ports); err != nil {
			return Rule{}, err
		}
	}
	return r, nil
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return s, false
}

// parsePrefix parses "any", an address (a /32 or /128) or a masked prefix.
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.EqualFold(s, "any") {
		return netip.Prefix{}, nil
	}
	if s == "" {
		return netip.Prefix{}, errors.New("empty address; " + specForm)
	}
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR prefix; %s", s, specForm)
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an IP address; %s", s, specForm)
		}
		if a.Zone() != "" {
			return netip.Prefix{}, errors.New("zoned IPv6 addresses are not supported")
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	switch a := p.Addr(); {
	case a.Is4In6():
		return netip.Prefix{}, fmt.Errorf("write the IPv4 form %s instead of the IPv4-mapped IPv6 address", a.Unmap())
	case p.Masked() != p:
		return netip.Prefix{}, fmt.Errorf("%s has host bits set (did you mean %s?)", p, p.Masked())
	}
	return p, nil
}

func parsePorts(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(s, "-")
	l, err := parsePort(lo)
	if err != nil {
		return PortRange{}, err
	}
	h := l
	if isRange {
		if h, err = parsePort(hi); err != nil {
			return PortRange{}, err
		}
		if h < l {
			return PortRange{}, fmt.Errorf("port range %s is reversed", s)
		}
	}
	return PortRange{Lo: l, Hi: h}, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a port 1..65535", s)
	}
	return uint16(n), nil
}

// Flow is what a rule is matched against: the transport and the destination
// the guest used (port 0 for ICMP).
type Flow struct {
	Proto Proto
	Dst   netip.AddrPort
}

func (r Rule) matches(fl Flow) bool {
	if r.Proto != AnyProto && r.Proto != fl.Proto {
		return false
	}
	if !r.Ports.All() && (fl.Proto == ICMP || !r.Ports.contains(fl.Dst.Port())) {
		return false
	}
	return !r.Prefix.IsValid() || r.Prefix.Contains(fl.Dst.Addr())
}

// addrOnly reports whether the rule matches every flow to its addresses,
// whatever the protocol and port.
func (r Rule) addrOnly() bool { return r.Proto == AnyProto && r.Ports.All() }
