// Package names is the table of guest host names: a guest that sends a host
// name in DHCP (option 12, or the client FQDN option 81) becomes
// NAME.vunet.internal for the other guests and the built-in DNS, for as long
// as its lease lasts.
//
// The DHCPv4 server writes the table (Bind on every ACK, Release on RELEASE
// and DECLINE); the DNS server reads it. Names come from the guest and are
// hostile: each is checked (one RFC 1123 label, lower-cased), a bad one is
// refused and counted, and the first guest holding a name keeps it.
package names

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Domain is the zone vunet answers for itself: the gateway's alias
// (host.Domain) and the guests' names (NAME.Domain). It is the one source of
// truth for the name; nothing under it is forwarded upstream.
const Domain = "vunet.internal"

// MaxLabel is the longest name accepted (RFC 1035 2.3.4: 63 octets a label).
const MaxLabel = 63

// MaxNames bounds the table. Each name needs a bound DHCP lease, so the
// DHCP pool (at most 4096 addresses) bounds it already; this is the
// registry's own guard.
const MaxNames = 4096

// Stats are the registry's counters, declared for the metrics registry
// (internal/metrics).
type Stats struct {
	Bound   atomic.Uint64 `metric:"guest_names_bound_total" help:"Guest host names bound from DHCP (a guest taking a name or changing it)."`
	Invalid atomic.Uint64 `metric:"guest_names_refused_total{reason=invalid}" help:"Guest host names refused, by reason: not one RFC 1123 label (invalid), held by another guest or reserved (taken), table full (full)." hostile:"names"`
	Taken   atomic.Uint64 `metric:"guest_names_refused_total{reason=taken}"`
	Full    atomic.Uint64 `metric:"guest_names_refused_total{reason=full}"`
	// Active is set by New.
	Active func() int64 `metric:"guest_names" kind:"gauge" help:"Guest host names currently resolvable."`
}

// Options configures a Registry.
type Options struct {
	// Reserved are labels no guest may take (host, and the first label of
	// static names under Domain): they are answered by the static table.
	Reserved []string
	// Addrs6, if set, returns the IPv6 addresses of the guest with the given
	// MAC (its SLAAC address seen in neighbour discovery, its DHCPv6 lease).
	// It is asked at lookup time, without the registry's lock held.
	Addrs6 func(mac net.HardwareAddr) []netip.Addr
	// Logger receives refusals (warn) and bindings (info). Defaults to
	// slog.Default().
	Logger *slog.Logger
	// Now is the clock (default time.Now); tests set it.
	Now func() time.Time
}

// Guest is one name in the table.
type Guest struct {
	Name  string // the label, lower case; the FQDN is Name + "." + Domain
	MAC   net.HardwareAddr
	Addr4 netip.Addr
	// Addrs6 are the guest's IPv6 addresses at lookup time.
	Addrs6 []netip.Addr
	Expiry time.Time
}

// FQDN is the guest's fully qualified name, without the trailing dot.
func (g Guest) FQDN() string { return g.Name + "." + Domain }

type macKey [6]byte

type entry struct {
	name   string
	mac    macKey
	addr4  netip.Addr
	expiry time.Time
}

// Registry is the name table; safe for concurrent use.
type Registry struct {
	opts     Options
	log      *slog.Logger
	reserved map[string]bool
	stats    Stats

	mu     sync.Mutex
	byName map[string]*entry
	byMAC  map[macKey]*entry
}

// New returns an empty registry.
func New(opts Options) *Registry {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	r := &Registry{opts: opts, log: opts.Logger.With("service", "names"),
		reserved: make(map[string]bool), byName: make(map[string]*entry), byMAC: make(map[macKey]*entry)}
	for _, l := range opts.Reserved {
		r.reserved[strings.ToLower(l)] = true
	}
	r.stats.Active = func() int64 {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.expireLocked(r.opts.Now())
		return int64(len(r.byName))
	}
	return r
}

// Stats returns the live counters.
func (r *Registry) Stats() *Stats { return &r.stats }

// Canonical checks a host name a guest sent and returns the label it is
// known by: the part before the first dot (a client may send its FQDN; the
// domain is vunet's, not the guest's), lower-cased. The label must be an RFC
// 1123 host name label: 1 to 63 letters, digits and hyphens, not starting or
// ending with a hyphen. All-digit labels are allowed (RFC 1123 2.1) but a
// name that is all digits and dots is refused: it reads as an address.
func Canonical(raw string) (string, error) {
	if raw == "" {
		return "", fmt.Errorf("empty name")
	}
	if len(raw) > 255 {
		return "", fmt.Errorf("name of %d bytes", len(raw))
	}
	label, rest, _ := strings.Cut(raw, ".")
	if len(label) == 0 || len(label) > MaxLabel {
		return "", fmt.Errorf("label of %d bytes: want 1..%d", len(label), MaxLabel)
	}
	digits := true
	for i := 0; i < len(label); i++ {
		c := label[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
			digits = false
		case c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(label)-1:
			digits = false
		default:
			return "", fmt.Errorf("byte %#02x at %d: want letters, digits and inner hyphens", c, i)
		}
	}
	if digits && rest != "" && strings.Trim(rest, "0123456789.") == "" {
		return "", fmt.Errorf("name looks like an IPv4 address")
	}
	return strings.ToLower(label), nil
}

// Bind records that the guest with mac, holding the DHCPv4 lease addr until
// expiry, asked for the host name raw. An empty raw drops the guest's name
// (the client stopped sending one). A bad name, a name another guest holds
// and a reserved name are refused, counted and logged; the guest keeps no
// name then (a name it held before is released, since it asked for
// another).
func (r *Registry) Bind(mac net.HardwareAddr, raw string, addr netip.Addr, expiry time.Time) {
	if len(mac) != 6 {
		return
	}
	k := macKey(mac)
	now := r.opts.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.expireLocked(now)
	old := r.byMAC[k]
	if raw == "" {
		if old != nil {
			r.removeLocked(old)
		}
		return
	}
	name, err := Canonical(raw)
	if err != nil {
		r.stats.Invalid.Add(1)
		r.log.Warn("guest host name refused", "mac", mac.String(), "name", fmt.Sprintf("%.80q", raw), "err", err)
		if old != nil {
			r.removeLocked(old)
		}
		return
	}
	if old != nil && old.name == name {
		old.addr4, old.expiry = addr, expiry
		return
	}
	holder := r.byName[name]
	switch {
	case r.reserved[name]:
		r.stats.Taken.Add(1)
		r.log.Warn("guest host name refused: reserved", "mac", mac.String(), "name", name)
	case holder != nil:
		r.stats.Taken.Add(1)
		r.log.Warn("guest host name refused: another guest holds it", "mac", mac.String(), "name", name,
			"holder", net.HardwareAddr(holder.mac[:]).String())
	case old == nil && len(r.byMAC) >= MaxNames:
		r.stats.Full.Add(1)
		r.log.Warn("guest host name refused: table full", "mac", mac.String(), "name", name, "max", MaxNames)
	default:
		if old != nil {
			r.removeLocked(old)
		}
		e := &entry{name: name, mac: k, addr4: addr, expiry: expiry}
		r.byName[name], r.byMAC[k] = e, e
		r.stats.Bound.Add(1)
		r.log.Info("guest host name bound", "mac", mac.String(), "name", name+"."+Domain, "addr", addr)
		return
	}
	if old != nil {
		r.removeLocked(old)
	}
}

// Release drops the name of the guest with mac (its lease was released or
// declined).
func (r *Registry) Release(mac net.HardwareAddr) {
	if len(mac) != 6 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.byMAC[macKey(mac)]; e != nil {
		r.log.Info("guest host name released", "mac", mac.String(), "name", e.name+"."+Domain)
		r.removeLocked(e)
	}
}

// Lookup returns the guest holding label (lower case, no dots).
func (r *Registry) Lookup(label string) (Guest, bool) {
	r.mu.Lock()
	e := r.byName[strings.ToLower(label)]
	if e != nil && !r.opts.Now().Before(e.expiry) {
		r.removeLocked(e)
		e = nil
	}
	var g Guest
	if e != nil {
		g = e.guest()
	}
	r.mu.Unlock()
	if e == nil {
		return Guest{}, false
	}
	r.fill6(&g)
	return g, true
}

// NameOf returns the name of the guest with mac, or "".
func (r *Registry) NameOf(mac net.HardwareAddr) string {
	if len(mac) != 6 {
		return ""
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.byMAC[macKey(mac)]
	if e == nil || !r.opts.Now().Before(e.expiry) {
		return ""
	}
	return e.name
}

// LookupAddr returns the guest whose DHCPv4 lease or IPv6 address is a
// (for reverse lookups).
func (r *Registry) LookupAddr(a netip.Addr) (Guest, bool) {
	a = a.Unmap()
	for _, g := range r.Guests() {
		if g.Addr4 == a || slices.Contains(g.Addrs6, a) {
			return g, true
		}
	}
	return Guest{}, false
}

// Guests returns every live name, sorted by name.
func (r *Registry) Guests() []Guest {
	r.mu.Lock()
	r.expireLocked(r.opts.Now())
	out := make([]Guest, 0, len(r.byName))
	for _, e := range r.byName {
		out = append(out, e.guest())
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b Guest) int { return strings.Compare(a.Name, b.Name) })
	for i := range out {
		r.fill6(&out[i])
	}
	return out
}

func (r *Registry) fill6(g *Guest) {
	if r.opts.Addrs6 != nil {
		g.Addrs6 = r.opts.Addrs6(g.MAC)
	}
}

func (e *entry) guest() Guest {
	return Guest{Name: e.name, MAC: net.HardwareAddr(slices.Clone(e.mac[:])), Addr4: e.addr4, Expiry: e.expiry}
}

func (r *Registry) removeLocked(e *entry) {
	if r.byName[e.name] == e {
		delete(r.byName, e.name)
	}
	if r.byMAC[e.mac] == e {
		delete(r.byMAC, e.mac)
	}
}

// expireLocked drops names whose lease expired.
func (r *Registry) expireLocked(now time.Time) {
	for _, e := range r.byName {
		if !now.Before(e.expiry) {
			r.removeLocked(e)
		}
	}
}
