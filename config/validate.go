package config

import (
	"bytes"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// FieldError is one configuration problem, tied to the TOML key it concerns
// (for example "ipv4.gateway" or "forwards").
type FieldError struct {
	Key string
	Msg string
}

// Error returns "key: message".
func (e *FieldError) Error() string { return e.Key + ": " + e.Msg }

// Errors is a list of configuration problems. Validate and ApplyTOML return
// one so a user fixes everything in one go instead of one error per run.
type Errors []*FieldError

// Error returns the single problem, or a count followed by one indented
// problem per line.
func (es Errors) Error() string {
	if len(es) == 1 {
		return es[0].Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d problems:", len(es))
	for _, e := range es {
		b.WriteString("\n\t")
		b.WriteString(e.Error())
	}
	return b.String()
}

// Unwrap lets errors.As find an individual *FieldError.
func (es Errors) Unwrap() []error {
	out := make([]error, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

// add records a problem with key.
func (es *Errors) add(key, format string, args ...any) {
	*es = append(*es, &FieldError{Key: key, Msg: fmt.Sprintf(format, args...)})
}

// err returns es as an error, or a true nil when there are no problems (a
// nil Errors in an error interface would not compare equal to nil).
func (es Errors) err() error {
	if len(es) == 0 {
		return nil
	}
	return es
}

// maxUnixPath is the longest path a sockaddr_un holds on Linux: 108 bytes
// including the terminating NUL.
const maxUnixPath = 107

// Validate checks the whole configuration and reports every problem it finds
// as Errors, each naming its TOML key. It does not touch the file system:
// whether directories exist is checked when the appliance opens them.
func (c *Config) Validate() error {
	var es Errors
	c.validateEndpoints(&es)
	c.validateLogging(&es)
	if c.MTU < MinMTU || c.MTU > MaxMTU {
		es.add("mtu", "%d is out of range %d..%d", c.MTU, MinMTU, MaxMTU)
	}
	if c.Queues < 1 || c.Queues > MaxQueues {
		es.add("queues", "%d is out of range 1..%d", c.Queues, MaxQueues)
	}
	validateMAC(&es, "mac", c.MAC)
	validateMAC(&es, "gateway_mac", c.GatewayMAC)
	if len(c.MAC) == 6 && bytes.Equal(c.MAC, c.GatewayMAC) {
		es.add("gateway_mac", "%s is the same as mac", c.GatewayMAC)
	}
	c.validateIPv4(&es)
	c.validateIPv6(&es)
	c.validateForwards(&es)
	c.validateExpose(&es)
	c.validateDNS(&es)
	c.validateTimeouts(&es)
	if c.MaxConnections < 0 {
		es.add("max_connections", "%d is negative; use 0 for unlimited", c.MaxConnections)
	}
	if c.MaxInflightDials < 0 {
		es.add("max_inflight_dials", "%d is negative; use 0 for unlimited", c.MaxInflightDials)
	}
	if c.MaxInboundConnections < 0 {
		es.add("max_inbound_connections", "%d is negative; use 0 for unlimited", c.MaxInboundConnections)
	}
	if c.MaxUDPFlowsPerSource < 0 {
		es.add("max_udp_flows_per_source", "%d is negative; use 0 for unlimited", c.MaxUDPFlowsPerSource)
	}
	if c.MaxGuests < 1 || c.MaxGuests > MaxGuestsLimit {
		es.add("max_guests", "%d is out of range 1..%d", c.MaxGuests, MaxGuestsLimit)
	}
	if c.MigrateTCP && c.MaxGuests > 1 {
		// A device-state save hands over every connection of the network,
		// not only the migrating guest's.
		es.add("migrate_tcp", "needs max_guests 1 (a state save moves every TCP connection of the network)")
	}
	if c.MaxMemory < MinMaxMemory {
		es.add("max_memory", "%s is below the minimum %s", FormatSize(c.MaxMemory), FormatSize(MinMaxMemory))
	}
	switch {
	case c.MaxGuestMemory < 0:
		es.add("max_guest_memory", "%d is negative; use auto for an equal share", c.MaxGuestMemory)
	case c.MaxGuestMemory != 0 && c.MaxGuestMemory < MinMaxGuestMemory:
		es.add("max_guest_memory", "%s is below the minimum %s", FormatSize(c.MaxGuestMemory), FormatSize(MinMaxGuestMemory))
	case c.MaxGuestMemory > c.MaxMemory:
		es.add("max_guest_memory", "%s is above max_memory %s", FormatSize(c.MaxGuestMemory), FormatSize(c.MaxMemory))
	}
	c.validateBoot(&es)
	return es.err()
}

func (c *Config) validateEndpoints(es *Errors) {
	switch {
	case c.Socket == "" && c.Connect == "":
		es.add("socket", "one of socket or connect is required")
	case c.Socket != "" && c.Connect != "":
		es.add("connect", "socket and connect are mutually exclusive; set only one")
	}
	c.validateSocketAccess(es)
	// Unix socket paths have a hard length limit; other paths are only
	// checked for the NUL byte no system call accepts.
	type pathKey struct {
		key, path string
		unix      bool
	}
	paths := []pathKey{
		{"socket", c.Socket, true},
		{"connect", c.Connect, true},
		{"api", c.API, true},
		{"pid_file", c.PIDFile, false},
		{"pcap", c.PCAP, false},
	}
	seen := map[string]string{}
	for _, p := range paths {
		if p.path == "" {
			continue
		}
		if strings.IndexByte(p.path, 0) >= 0 {
			es.add(p.key, "path contains a NUL byte")
			continue
		}
		if p.unix && len(p.path) > maxUnixPath {
			es.add(p.key, "path is %d bytes; unix socket paths are limited to %d (use a shorter or relative path)", len(p.path), maxUnixPath)
		}
		clean := path.Clean(p.path)
		if other, dup := seen[clean]; dup {
			es.add(p.key, "%s is the same path as %s", p.path, other)
			continue
		}
		seen[clean] = p.key
	}
}

func (c *Config) validateLogging(es *Errors) {
	switch c.LogLevel {
	case slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError:
	default:
		es.add("log_level", "%s is not one of debug, info, warn or error", c.LogLevel)
	}
	if c.LogFormat != LogText && c.LogFormat != LogJSON {
		es.add("log_format", "%q is not one of text or json", c.LogFormat)
	}
	if _, err := ParseSandbox(string(c.Sandbox)); err != nil {
		es.add("sandbox", "%q: %v", c.Sandbox, err)
	}
	if _, err := ParseRunAs(c.RunAs); err != nil {
		es.add("runas", "%q: %v", c.RunAs, err)
	}
}

func validateMAC(es *Errors, key string, mac net.HardwareAddr) {
	switch {
	case len(mac) != 6:
		es.add(key, "%q is not a 48-bit MAC address", mac.String())
	case mac[0]&1 != 0:
		es.add(key, "%s is a multicast address; the first octet must be even", mac)
	case string(mac) == "\x00\x00\x00\x00\x00\x00":
		es.add(key, "%s is the all-zero address", mac)
	}
}

// validateSubnet checks the shared rules for both families and reports
// whether the subnet is usable for the address checks that follow.
func validateSubnet(es *Errors, key string, p netip.Prefix, is4 bool) bool {
	family := familyName(is4)
	switch {
	case !p.IsValid():
		es.add(key, "is required")
		return false
	case p.Addr().Is4() != is4 || p.Addr().Is4In6():
		es.add(key, "%s is not an %s subnet", p, family)
		return false
	case p.Masked() != p:
		es.add(key, "%s has host bits set; did you mean %s?", p, p.Masked())
		return false
	case p.Addr().IsLoopback() || p.Addr().IsMulticast() || p.Addr().IsUnspecified():
		es.add(key, "%s is a loopback, multicast or unspecified range", p)
		return false
	}
	return true
}

// validateMember checks an address of the subnet: same family, inside, not
// the network address (the IPv6 subnet-router anycast address) and, for
// IPv4, not the broadcast address.
func validateMember(es *Errors, key string, a netip.Addr, subnet netip.Prefix, subnetKey string) bool {
	switch {
	case !a.IsValid():
		es.add(key, "is required")
	case !subnet.Contains(a):
		es.add(key, "%s is not inside %s %s", a, subnetKey, subnet)
	case a == subnet.Addr():
		es.add(key, "%s is the network address of %s", a, subnet)
	case a.Is4() && a == lastAddr(subnet):
		es.add(key, "%s is the broadcast address of %s", a, subnet)
	default:
		return true
	}
	return false
}

// lastAddr returns the highest address of p (the IPv4 broadcast address).
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// validateDistinct reports later addresses equal to earlier ones. keys and
// addrs run in parallel; ok marks addresses that passed their own checks.
func validateDistinct(es *Errors, keys []string, addrs []netip.Addr, ok []bool) {
	for i := range addrs {
		for j := 0; j < i; j++ {
			if ok[i] && ok[j] && addrs[i] == addrs[j] {
				es.add(keys[i], "%s is the same as %s", addrs[i], keys[j])
				break
			}
		}
	}
}

func (c *Config) validateIPv4(es *Errors) {
	v := c.IPv4
	if !validateSubnet(es, "ipv4.subnet", v.Subnet, true) {
		return
	}
	// Network, broadcast, gateway, DNS and one guest need at least 5
	// addresses, so a /29 is the smallest workable subnet.
	if v.Subnet.Bits() > 29 {
		es.add("ipv4.subnet", "%s is too small; use /29 or larger", v.Subnet)
		return
	}
	keys := []string{"ipv4.gateway", "ipv4.dns", "ipv4.guest"}
	addrs := []netip.Addr{v.Gateway, v.DNS, v.Guest}
	ok := make([]bool, len(addrs))
	for i := range addrs {
		ok[i] = validateMember(es, keys[i], addrs[i], v.Subnet, "ipv4.subnet")
	}
	validateDistinct(es, keys, addrs, ok)
	macs := map[string]bool{}
	for _, l := range v.StaticLeases {
		key := "ipv4.static_leases." + l.MAC.String()
		switch {
		case len(l.MAC) != 6 || l.MAC[0]&1 != 0:
			es.add(key, "%s is not a unicast 48-bit MAC", l.MAC)
		case macs[l.MAC.String()]:
			es.add(key, "given twice")
		case !validateMember(es, key, l.Addr, v.Subnet, "ipv4.subnet"):
		case l.Addr == v.Gateway || l.Addr == v.DNS:
			es.add(key, "%s is the gateway or DNS address", l.Addr)
		default:
			for _, o := range v.StaticLeases {
				if o.Addr == l.Addr && o.MAC.String() != l.MAC.String() {
					es.add(key, "%s is also %s's static lease", l.Addr, o.MAC)
					break
				}
			}
		}
		macs[l.MAC.String()] = true
	}
}

func (c *Config) validateIPv6(es *Errors) {
	v := c.IPv6
	if !v.Enable {
		return // the addresses are unused, so wrong ones do no harm
	}
	if _, err := ParseDHCPv6Mode(string(v.DHCPv6)); err != nil {
		es.add("ipv6.dhcpv6", "%q: %v", v.DHCPv6, err)
	}
	if !validateSubnet(es, "ipv6.subnet", v.Subnet, false) {
		return
	}
	if v.Subnet.Bits() != 64 {
		// SLAAC builds addresses from 64-bit interface identifiers
		// (RFC 4862, RFC 4291); other lengths leave the guest without one.
		es.add("ipv6.subnet", "%s must be a /64 (SLAAC needs it)", v.Subnet)
		return
	}
	keys := []string{"ipv6.gateway", "ipv6.dns"}
	addrs := []netip.Addr{v.Gateway, v.DNS}
	ok := make([]bool, len(addrs))
	for i := range addrs {
		ok[i] = validateMember(es, keys[i], addrs[i], v.Subnet, "ipv6.subnet")
	}
	validateDistinct(es, keys, addrs, ok)
}

func (c *Config) validateForwards(es *Errors) {
	type bindKey struct {
		proto string
		host  netip.AddrPort
	}
	seen := map[bindKey]bool{}
	paths := map[string]bool{}
	for _, f := range c.Forwards {
		if f.Proto == "unix" {
			switch p, err := ParseSocketPath(f.Path); {
			case err != nil:
				es.add("forwards", "%s: %v", f, err)
			case p != f.Path || strings.Contains(f.Path, "$"):
				es.add("forwards", "%s: socket path is not clean and expanded", f)
			case f.GuestPort == 0:
				es.add("forwards", "%s: guest port 0 is out of range 1..65535", f)
			case paths[f.Path]:
				es.add("forwards", "%s: socket path is used more than once", f)
			}
			paths[f.Path] = true
			continue
		}
		switch {
		case f.Proto != "tcp" && f.Proto != "udp":
			es.add("forwards", "%s: protocol %q is not tcp or udp", f, f.Proto)
			continue
		case !f.Host.Addr().IsValid():
			es.add("forwards", "%s: host address is missing", f)
			continue
		case f.Host.Port() == 0:
			es.add("forwards", "%s: host port 0 is out of range 1..65535", f)
			continue
		case f.GuestPort == 0:
			es.add("forwards", "%s: guest port 0 is out of range 1..65535", f)
			continue
		}
		k := bindKey{f.Proto, f.Host}
		if seen[k] {
			// Two forwards cannot listen on the same host socket.
			es.add("forwards", "%s:%s is forwarded more than once", f.Proto, f.Host)
			continue
		}
		seen[k] = true
	}
}

func (c *Config) validateExpose(es *Errors) {
	seen := map[uint16]bool{}
	for _, e := range c.Expose {
		p, err := ParseSocketPath(e.Path)
		switch {
		case e.Port == 0:
			es.add("expose", "%s: gateway port 0 is out of range 1..65535", e)
		case err != nil:
			es.add("expose", "%s: %v", e, err)
		case p != e.Path || strings.Contains(e.Path, "$"):
			es.add("expose", "%s: socket path is not clean and expanded", e)
		case seen[e.Port]:
			es.add("expose", "gateway port %d is exposed more than once", e.Port)
		}
		seen[e.Port] = true
	}
}

func (c *Config) validateDNS(es *Errors) {
	for _, u := range c.DNSUpstream {
		switch {
		case !u.Addr().IsValid() || u.Addr().IsUnspecified() || u.Addr().IsMulticast():
			es.add("dns_upstream", "%s is not a usable resolver address", u)
		case u.Port() == 0:
			es.add("dns_upstream", "%s: port 0 is out of range 1..65535", u)
		}
	}
	for _, d := range c.DNSSearch {
		if !validDNSName(d) {
			es.add("dns_search", "%q is not a valid domain name", d)
		}
	}
	// Report in a stable order; map iteration order is random.
	seen := map[string]string{}
	for _, name := range slices.Sorted(maps.Keys(c.Hosts)) {
		key := toml.Key{"hosts", name}.String() // quoted as in the file: hosts."db.example"
		a := c.Hosts[name]
		norm := strings.TrimSuffix(strings.ToLower(name), ".")
		switch {
		case !validDNSName(name):
			es.add(key, "%q is not a valid host name", name)
		case norm == HostGatewayName:
			es.add(key, "%s is reserved: it always resolves to the gateway", HostGatewayName)
		case seen[norm] != "":
			es.add(key, "duplicates %s (names are case-insensitive)", toml.Key{"hosts", seen[norm]})
		case !a.IsValid() || a.IsUnspecified():
			es.add(key, "%s is not a usable address", a)
		}
		if seen[norm] == "" {
			seen[norm] = name
		}
	}
}

func (c *Config) validateTimeouts(es *Errors) {
	for _, t := range []struct {
		key string
		d   time.Duration
	}{
		{"udp_idle_timeout", c.UDPIdleTimeout},
		{"udp_stream_timeout", c.UDPStreamTimeout},
		{"dial_timeout", c.DialTimeout},
	} {
		if t.d <= 0 {
			es.add(t.key, "%s must be positive", formatDuration(t.d))
		}
	}
	if c.UDPStreamTimeout > 0 && c.UDPStreamTimeout < c.UDPIdleTimeout {
		// A flow that has seen replies is more valuable than one that has
		// not; expiring it sooner would make no sense.
		es.add("udp_stream_timeout", "%s is shorter than udp_idle_timeout %s",
			formatDuration(c.UDPStreamTimeout), formatDuration(c.UDPIdleTimeout))
	}
}

func (c *Config) validateBoot(es *Errors) {
	b := c.Boot
	if strings.IndexByte(b.TFTPRoot, 0) >= 0 {
		es.add("boot.tftp_root", "path contains a NUL byte")
	}
	if b.BootFile != "" {
		switch {
		case b.TFTPRoot == "" && b.HTTPBootURL == "":
			es.add("boot.boot_file", "is set but neither boot.tftp_root nor boot.http_boot_url is")
		case b.TFTPRoot != "" && (path.IsAbs(b.BootFile) || !isLocalPath(b.BootFile)):
			es.add("boot.boot_file", "%q must be a relative path inside boot.tftp_root", b.BootFile)
		}
	}
	if b.BootFileEFI != "" {
		switch {
		case b.TFTPRoot == "":
			es.add("boot.boot_file_efi", "is set but boot.tftp_root is not")
		case path.IsAbs(b.BootFileEFI) || !isLocalPath(b.BootFileEFI):
			es.add("boot.boot_file_efi", "%q must be a relative path inside boot.tftp_root", b.BootFileEFI)
		}
	}
	if b.HTTPBootURL != "" && !isURL(b.HTTPBootURL, "http", "https") {
		es.add("boot.http_boot_url", "%q is not an http:// or https:// URL", b.HTTPBootURL)
	}
	if b.IPXEScriptURL != "" && !isURL(b.IPXEScriptURL, "http", "https", "tftp") {
		es.add("boot.ipxe_script_url", "%q is not an http://, https:// or tftp:// URL", b.IPXEScriptURL)
	}
	// Each of these travels in DHCP option 67, whose length is one byte.
	for _, f := range []struct{ key, v string }{
		{"boot.boot_file", b.BootFile},
		{"boot.boot_file_efi", b.BootFileEFI},
		{"boot.http_boot_url", b.HTTPBootURL},
		{"boot.ipxe_script_url", b.IPXEScriptURL},
	} {
		if len(f.v) > 255 {
			es.add(f.key, "is %d bytes; at most 255 fit in a DHCP option", len(f.v))
		}
	}
	// DHCP carries the lease time in seconds as a uint32 (RFC 2132 §9.2).
	// The DHCP server's own bounds: shorter leases only make clients
	// renew constantly, longer ones outlive any VM.
	if b.DHCPLeaseTime < time.Minute || b.DHCPLeaseTime > 365*24*time.Hour {
		es.add("boot.dhcp_lease_time", "%s is out of range 1m..8760h", formatDuration(b.DHCPLeaseTime))
	}
	if b.Hostname != "" && (!validDNSName(b.Hostname) || strings.Contains(strings.TrimSuffix(b.Hostname, "."), ".")) {
		es.add("boot.hostname", "%q is not a valid host name (one DNS label, no dots)", b.Hostname)
	}
	if b.Domain != "" && !validDNSName(b.Domain) {
		es.add("boot.domain", "%q is not a valid domain name", b.Domain)
	}
}

// isURL reports whether s parses as an absolute URL with a host and one of
// the given schemes.
func isURL(s string, schemes ...string) bool {
	u, err := url.Parse(s)
	return err == nil && slices.Contains(schemes, u.Scheme) && u.Host != ""
}

// isLocalPath reports whether p stays inside its root: no ".." element
// escapes it after cleaning.
func isLocalPath(p string) bool {
	c := path.Clean(p)
	return c != ".." && !strings.HasPrefix(c, "../")
}

// validDNSName reports whether s is a syntactically valid DNS name: dot
// separated labels of 1..63 letters, digits, hyphens (not at either end) or
// underscores, 253 bytes at most, an optional trailing dot.
func validDNSName(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			ch := label[i]
			if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '_') {
				return false
			}
		}
	}
	return true
}

// familyName names an address family in messages.
func familyName(is4 bool) string {
	if is4 {
		return "IPv4"
	}
	return "IPv6"
}

// validateSocketAccess checks the vhost-user socket's mode and group.
func (c *Config) validateSocketAccess(es *Errors) {
	if c.SocketMode&^os.ModePerm != 0 {
		es.add("socket_mode", "%v is not permission bits", c.SocketMode)
	}
	if c.Connect != "" && (c.SocketGroup != "" || c.SocketMode != Default().SocketMode) {
		es.add("socket_mode", "socket_mode and socket_group apply to a socket vunet creates (socket), not to connect")
	}
	if c.SocketGroup != "" && c.SocketMode&0o060 != 0o060 {
		es.add("socket_group", "group %s cannot connect with socket_mode %s: use 0660", c.SocketGroup, FormatSocketMode(c.SocketMode))
	}
	if c.SetupTimeout < 0 {
		es.add("setup_timeout", "%s is negative; use 0 to disable", formatDuration(c.SetupTimeout))
	}
	if c.PCAPMaxSize < 0 {
		es.add("pcap_max_size", "%d is negative; use 0 for unlimited", c.PCAPMaxSize)
	}
	if c.PCAPMaxSize > 0 && c.PCAP == "" {
		es.add("pcap_max_size", "is set but pcap is not")
	}
}
