package egress

import (
	"errors"
	"net/netip"
	"strings"
	"sync/atomic"
)

// Mode is the policy's last default: what happens to a flow no rule and no
// other default decided.
type Mode uint8

// The modes.
const (
	// AllowAll forwards everything not denied (the default).
	AllowAll Mode = iota
	// AllowNone forwards nothing but the gateway alias and what user rules
	// allow (--egress none). DNS through vunet's own resolver is not
	// egress: the resolver is vunet's, not the guest's, socket.
	AllowNone
)

func (m Mode) String() string {
	if m == AllowNone {
		return "none"
	}
	return "all"
}

// ParseMode parses "all" or "none".
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(s) {
	case "all":
		return AllowAll, nil
	case "none":
		return AllowNone, nil
	}
	return 0, errors.New("expected all or none")
}

// Metadata and link-local destinations, denied by default: link-local
// addresses are never meant to be reached through a NAT, and clouds serve
// instance credentials on them (169.254.169.254 on AWS, GCP, Azure and
// OpenStack; fd00:ec2::254 on AWS's IPv6 metadata endpoint).
var (
	LinkLocal4 = netip.MustParsePrefix("169.254.0.0/16")
	LinkLocal6 = netip.MustParsePrefix("fe80::/10")
	Metadata6  = netip.MustParsePrefix("fd00:ec2::254/128")
)

// HostAddrs is the set of the host's own addresses (see WatchHostAddrs).
type HostAddrs interface {
	Contains(netip.Addr) bool
}

// Options configures a Policy.
type Options struct {
	// Rules are the user's rules, matched first, in order.
	Rules []Rule
	// Mode is the last default (AllowAll or AllowNone).
	Mode Mode
	// AllowMetadata drops the link-local and metadata defaults.
	AllowMetadata bool
	// Gateways are the guest-side gateway addresses that vunet maps to the
	// host's loopback. They are allowed by default even with AllowNone and
	// HostAddrs (an explicit user rule still applies to them).
	Gateways []netip.Addr
	// HostAddrs, if set, denies the host's own addresses
	// (--no-host-addresses).
	HostAddrs HostAddrs
}

// entry is a rule's live state: its label and counters.
type entry struct {
	index  int // 1-based position among the user rules; 0 for defaults
	label  string
	action Action
	c      RuleCounters
	denied atomic.Bool // a denial has been reported (logged) once
}

type userRule struct {
	Rule
	e *entry
}

type protected struct {
	prefix netip.Prefix
	e      *entry
}

// Policy decides which guest flows may leave through the NAT. It is safe
// for concurrent use; its rules are fixed at New, the host address set may
// change underneath it.
type Policy struct {
	opts      Options
	user      []userRule
	protect   []protected // link-local and metadata defaults
	hostAddrs *entry      // nil without HostAddrs
	gateway   *entry
	none      *entry // nil in AllowAll mode
	allowAll  *entry // nil in AllowNone mode
	defaults  []*entry
}

// New builds a policy.
func New(opts Options) *Policy {
	p := &Policy{opts: opts}
	for i, r := range opts.Rules {
		p.user = append(p.user, userRule{r, &entry{index: i + 1, label: r.String(), action: r.Action}})
	}
	def := func(label string, a Action) *entry {
		e := &entry{label: label, action: a}
		p.defaults = append(p.defaults, e)
		return e
	}
	if !opts.AllowMetadata {
		for _, pr := range []netip.Prefix{LinkLocal4, LinkLocal6, Metadata6} {
			p.protect = append(p.protect, protected{pr, def("deny "+pr.String(), Deny)})
		}
	}
	if opts.HostAddrs != nil {
		p.hostAddrs = def("deny host-addresses", Deny)
	}
	p.gateway = def("allow gateway", Allow)
	if opts.Mode == AllowNone {
		p.none = def("deny any", Deny)
	} else {
		p.allowAll = def("allow any", Allow)
	}
	return p
}

// Verdict is the outcome of Check.
type Verdict struct {
	// Allowed says whether the flow may be forwarded.
	Allowed bool
	// Rule is the deciding rule, as in Stats.
	Rule string
	// FirstDenial is set on the first denial by this rule, which the caller
	// logs; later ones are only counted.
	FirstDenial bool
}

func (e *entry) verdict() Verdict {
	e.c.Hits.Add(1)
	v := Verdict{Allowed: e.action == Allow, Rule: e.label}
	if !v.Allowed && !e.denied.Load() {
		v.FirstDenial = e.denied.CompareAndSwap(false, true)
	}
	return v
}

// Check decides fl and counts the hit on the deciding rule. The order:
//
//  1. The user rules, first match wins. A matching deny denies. A matching
//     allow allows, except that for a protected destination (link-local,
//     metadata, and with HostAddrs the host's own addresses) it must be at
//     least as narrow as the protection: --allow 169.254.169.254 opens the
//     metadata address, --allow any or --allow 0.0.0.0/0 does not.
//  2. Protected destinations are denied.
//  3. The gateway alias is allowed.
//  4. In AllowNone mode everything else is denied, otherwise allowed.
//
// Addresses are compared unmapped: ::ffff:169.254.169.254 is 169.254.169.254,
// as it is to the host socket the NAT would use.
func (p *Policy) Check(fl Flow) Verdict {
	dst := fl.Dst.Addr().Unmap()
	fl.Dst = netip.AddrPortFrom(dst, fl.Dst.Port())
	prot, protOK := p.protection(dst)
	for _, u := range p.user {
		if !u.matches(fl) {
			continue
		}
		if u.Action == Allow && protOK && !within(u.Prefix, prot.prefix) {
			return prot.e.verdict()
		}
		return u.e.verdict()
	}
	return p.defaultVerdict(dst, prot, protOK).verdict()
}

func (p *Policy) defaultVerdict(dst netip.Addr, prot protected, protOK bool) *entry {
	switch {
	case protOK:
		return prot.e
	case p.isGateway(dst):
		return p.gateway
	case p.none != nil:
		return p.none
	}
	return p.allowAll
}

// AddrDenied reports whether every flow to a, whatever its protocol and
// port, would be denied. The DNS server uses it to never synthesise such an
// address. It counts nothing.
func (p *Policy) AddrDenied(a netip.Addr) bool {
	a = a.Unmap()
	prot, protOK := p.protection(a)
	for _, u := range p.user {
		if u.Prefix.IsValid() && !u.Prefix.Contains(a) {
			continue
		}
		if u.Action == Allow {
			if !protOK || within(u.Prefix, prot.prefix) {
				return false // some flows to a are allowed
			}
			continue // the protection denies what this rule would allow
		}
		if u.addrOnly() {
			return true // everything still undecided is denied
		}
		// A deny of some protocols or ports: the rest is still undecided.
	}
	return p.defaultVerdict(a, prot, protOK).action == Deny
}

// protection returns the default deny protecting dst, if any. The gateway
// alias is never protected: it is how the guest reaches the host on
// purpose.
func (p *Policy) protection(dst netip.Addr) (protected, bool) {
	if p.isGateway(dst) {
		return protected{}, false
	}
	for _, pr := range p.protect {
		if pr.prefix.Contains(dst) {
			return pr, true
		}
	}
	if p.hostAddrs != nil && p.opts.HostAddrs.Contains(dst) {
		return protected{netip.PrefixFrom(dst, dst.BitLen()), p.hostAddrs}, true
	}
	return protected{}, false
}

func (p *Policy) isGateway(a netip.Addr) bool {
	for _, g := range p.opts.Gateways {
		if g.Unmap() == a {
			return true
		}
	}
	return false
}

// within reports whether r lies inside p (the zero r, "any", never does).
func within(r, p netip.Prefix) bool {
	return r.IsValid() && r.Bits() >= p.Bits() && p.Contains(r.Addr())
}

// RuleCounters are one rule's counters, declared for the metrics registry
// (internal/metrics), which labels them with the rule (RuleStats).
type RuleCounters struct {
	// Hits counts the flows (TCP connection attempts, UDP datagrams that
	// would start a flow, echo requests that would start a flow) the rule
	// decided.
	Hits atomic.Uint64 `metric:"egress_rule_hits_total" help:"Guest flows decided by each egress rule (index is the position among the user rules, or default)."`
}

// RuleStats is one rule and its counters.
type RuleStats struct {
	// Index is the rule's 1-based position among the user rules, 0 for a
	// built-in default.
	Index int
	// Rule is the rule as ParseRule reads it ("allow tcp:10.0.0.0/8:80"),
	// or the default's name ("deny 169.254.0.0/16", "deny host-addresses",
	// "allow gateway", "deny any", "allow any").
	Rule string
	// Action is "allow" or "deny".
	Action   string
	Counters *RuleCounters
}

// Stats returns every rule's counters in evaluation order: user rules,
// then the active defaults.
func (p *Policy) Stats() []RuleStats {
	out := make([]RuleStats, 0, len(p.user)+len(p.defaults))
	add := func(e *entry) {
		out = append(out, RuleStats{Index: e.index, Rule: e.label, Action: e.action.String(), Counters: &e.c})
	}
	for _, u := range p.user {
		add(u.e)
	}
	for _, e := range p.defaults {
		add(e)
	}
	return out
}
