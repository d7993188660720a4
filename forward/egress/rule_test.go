package egress

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseSpec(t *testing.T) {
	p := netip.MustParsePrefix
	for _, tt := range []struct {
		in   string
		want Rule
		str  string // canonical Spec, if different from in
	}{
		{in: "10.0.0.0/8", want: Rule{Prefix: p("10.0.0.0/8")}},
		{in: "tcp:10.0.0.0/8:80-443", want: Rule{Proto: TCP, Prefix: p("10.0.0.0/8"), Ports: PortRange{80, 443}}},
		{in: "UDP:192.0.2.1:53", want: Rule{Proto: UDP, Prefix: p("192.0.2.1/32"), Ports: PortRange{53, 53}}, str: "udp:192.0.2.1:53"},
		{in: "192.0.2.1/32", want: Rule{Prefix: p("192.0.2.1/32")}, str: "192.0.2.1"},
		{in: "icmp:198.51.100.0/24", want: Rule{Proto: ICMP, Prefix: p("198.51.100.0/24")}},
		{in: "fd00::/8", want: Rule{Prefix: p("fd00::/8")}},
		{in: "fd00:ec2::254", want: Rule{Prefix: p("fd00:ec2::254/128")}},
		{in: "[fd00::/8]:53", want: Rule{Prefix: p("fd00::/8"), Ports: PortRange{53, 53}}},
		{in: "[fd00::/8]", want: Rule{Prefix: p("fd00::/8")}, str: "fd00::/8"},
		{in: "tcp:[::1]:1-65535", want: Rule{Proto: TCP, Prefix: p("::1/128"), Ports: PortRange{1, 65535}}},
		{in: "udp:[2001:db8::]:53", want: Rule{Proto: UDP, Prefix: p("2001:db8::/128"), Ports: PortRange{53, 53}}},
		{in: "any", want: Rule{}},
		{in: "tcp:any:25", want: Rule{Proto: TCP, Ports: PortRange{25, 25}}},
		{in: "icmp:any", want: Rule{Proto: ICMP}},
		{in: "0.0.0.0/0", want: Rule{Prefix: p("0.0.0.0/0")}},
		{in: "::/0", want: Rule{Prefix: p("::/0")}},
	} {
		got, err := ParseSpec(Deny, tt.in)
		tt.want.Action = Deny
		if err != nil || got != tt.want {
			t.Errorf("ParseSpec(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
			continue
		}
		str := tt.in
		if tt.str != "" {
			str = tt.str
		}
		if got.Spec() != str {
			t.Errorf("ParseSpec(%q).Spec() = %q, want %q", tt.in, got.Spec(), str)
		}
	}
}

func TestParseSpecErrors(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"", "empty address"},
		{"10.0.0.0/8:", "empty PORTS"},
		{"10.1.2.3/8", "did you mean 10.0.0.0/8"},
		{"10.0.0.0/33", "not a CIDR"},
		{"example.com", "not an IP address"},
		{"icmp:10.0.0.0/8:80", "no ports"},
		{"tcp:10.0.0.1:0", "not a port"},
		{"tcp:10.0.0.1:65536", "not a port"},
		{"tcp:10.0.0.1:443-80", "reversed"},
		{"tcp:10.0.0.1:80-", "not a port"},
		{"[fd00::/8", "missing ']'"},
		{"[fd00::/8]53", "expected :PORTS"},
		{"[fd00::/8]:", "expected :PORTS"},
		{"[10.0.0.1]:80", "brackets are for IPv6"},
		{"fe80::1%eth0", "zoned"},
		{"::ffff:169.254.169.254", "IPv4 form 169.254.169.254"},
		{"sctp:10.0.0.1", "not an IP address"},
		{"fd00::1:53:x", "not an IP address"},
	} {
		_, err := ParseSpec(Allow, tt.in)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseSpec(%q) error %v, want one containing %q", tt.in, err, tt.want)
		}
	}
}

func TestParseRule(t *testing.T) {
	r, err := ParseRule("  allow   tcp:10.0.0.0/8:80 ")
	if err != nil || r.String() != "allow tcp:10.0.0.0/8:80" {
		t.Fatalf("ParseRule = %v, %v", r, err)
	}
	for _, bad := range []string{"allow", "permit 10.0.0.0/8", "deny 10.0.0.0/8:x", ""} {
		if _, err := ParseRule(bad); err == nil {
			t.Errorf("ParseRule(%q) succeeded", bad)
		}
	}
}

func TestRuleMatches(t *testing.T) {
	fl := func(p Proto, s string) Flow { return Flow{Proto: p, Dst: netip.MustParseAddrPort(s)} }
	must := func(s string) Rule {
		r, err := ParseRule(s)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	for _, tt := range []struct {
		rule string
		flow Flow
		want bool
	}{
		{"deny 10.0.0.0/8", fl(TCP, "10.1.2.3:80"), true},
		{"deny 10.0.0.0/8", fl(ICMP, "10.1.2.3:0"), true},
		{"deny 10.0.0.0/8", fl(TCP, "11.1.2.3:80"), false},
		{"deny 10.0.0.0/8", fl(TCP, "[fd00::1]:80"), false},
		{"deny tcp:10.0.0.0/8:80-443", fl(TCP, "10.0.0.1:443"), true},
		{"deny tcp:10.0.0.0/8:80-443", fl(TCP, "10.0.0.1:444"), false},
		{"deny tcp:10.0.0.0/8:80-443", fl(UDP, "10.0.0.1:80"), false},
		{"deny 10.0.0.0/8:53", fl(UDP, "10.0.0.1:53"), true},
		{"deny 10.0.0.0/8:53", fl(TCP, "10.0.0.1:53"), true},
		{"deny 10.0.0.0/8:53", fl(ICMP, "10.0.0.1:0"), false},
		{"deny any", fl(UDP, "[2001:db8::1]:9"), true},
		{"deny any", fl(ICMP, "192.0.2.1:0"), true},
		{"deny icmp:any", fl(TCP, "192.0.2.1:1"), false},
		{"deny [fd00::/8]:53", fl(UDP, "[fd00::3]:53"), true},
		{"deny 0.0.0.0/0", fl(TCP, "[::1]:1"), false},
	} {
		if got := must(tt.rule).matches(tt.flow); got != tt.want {
			t.Errorf("%q matches %v = %v, want %v", tt.rule, tt.flow, got, tt.want)
		}
	}
}

// FuzzParseRule checks that the parser never panics and that every rule it
// accepts prints in a form that parses back to the same rule.
func FuzzParseRule(f *testing.F) {
	for _, s := range []string{"allow tcp:10.0.0.0/8:80-443", "deny [fd00::/8]:53", "deny any", "allow icmp:fe80::/10",
		"deny udp:[::1]:1-2", "allow 169.254.169.254", "deny fd00:ec2::254", "deny [", "allow :", "deny tcp::"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRule(s)
		if err != nil {
			return
		}
		back, err := ParseRule(r.String())
		if err != nil || back != r {
			t.Fatalf("%q parsed to %+v, printed %q, read back %+v, %v", s, r, r.String(), back, err)
		}
	})
}
