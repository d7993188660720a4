package config

import (
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/vunet/vunet/forward/egress"
)

// fileConfig mirrors Config in the TOML file's vocabulary: plain strings for
// everything typed, so each value is parsed by the same parser the command
// line uses and its error can name the key. Which keys are present is taken
// from toml.MetaData, not from zero values, so `once = false` in a file does
// override an earlier layer.
type fileConfig struct {
	Socket           string            `toml:"socket,omitempty"`
	Connect          string            `toml:"connect,omitempty"`
	SocketMode       string            `toml:"socket_mode"`
	SocketGroup      string            `toml:"socket_group,omitempty"`
	SetupTimeout     string            `toml:"setup_timeout"`
	Once             bool              `toml:"once"`
	PIDFile          string            `toml:"pid_file,omitempty"`
	UnixForwardDir   string            `toml:"unix_forward_dir,omitempty"`
	API              string            `toml:"api,omitempty"`
	LogLevel         string            `toml:"log_level"`
	LogFormat        string            `toml:"log_format"`
	PCAP             string            `toml:"pcap,omitempty"`
	PCAPMaxSize      string            `toml:"pcap_max_size"`
	Sandbox          string            `toml:"sandbox"`
	RunAs            string            `toml:"runas"`
	MTU              int               `toml:"mtu"`
	Queues           int               `toml:"queues"`
	MAC              string            `toml:"mac"`
	GatewayMAC       string            `toml:"gateway_mac"`
	MapHostLoopback  bool              `toml:"map_host_loopback"`
	Forwards         []string          `toml:"forwards,omitempty"`
	Expose           []string          `toml:"expose,omitempty"`
	DNSUpstream      []string          `toml:"dns_upstream,omitempty"`
	DNSSearch        []string          `toml:"dns_search,omitempty"`
	UDPIdleTimeout   string            `toml:"udp_idle_timeout"`
	UDPStreamTimeout string            `toml:"udp_stream_timeout"`
	DialTimeout      string            `toml:"dial_timeout"`
	MaxConnections   int               `toml:"max_connections"`
	MaxInflightDials int               `toml:"max_inflight_dials"`
	MaxInboundConns  int               `toml:"max_inbound_connections"`
	MaxUDPPerSource  int               `toml:"max_udp_flows_per_source"`
	MaxMemory        string            `toml:"max_memory"`
	MaxGuestMemory   string            `toml:"max_guest_memory"`
	MaxGuests        int               `toml:"max_guests"`
	IsolateGuests    bool              `toml:"isolate_guests"`
	MigrateTCP       bool              `toml:"migrate_tcp"`
	Hosts            map[string]string `toml:"hosts,omitempty"`
	IPv4             fileIPv4          `toml:"ipv4"`
	IPv6             fileIPv6          `toml:"ipv6"`
	Boot             fileBoot          `toml:"boot"`
	Egress           fileEgress        `toml:"egress"`
}

type fileEgress struct {
	Mode          string   `toml:"mode"`
	AllowMetadata bool     `toml:"allow_metadata"`
	HostAddresses bool     `toml:"host_addresses"`
	Rules         []string `toml:"rules"`
}

type fileIPv4 struct {
	Subnet  string `toml:"subnet"`
	Gateway string `toml:"gateway"`
	DNS     string `toml:"dns"`
	Guest   string `toml:"guest"`
	// StaticLeases maps MAC → address.
	StaticLeases map[string]string `toml:"static_leases,omitempty"`
}

type fileIPv6 struct {
	Enable  bool   `toml:"enable"`
	Subnet  string `toml:"subnet"`
	Gateway string `toml:"gateway"`
	DNS     string `toml:"dns"`
	DHCPv6  string `toml:"dhcpv6"`
}

type fileBoot struct {
	TFTPRoot      string `toml:"tftp_root,omitempty"`
	BootFile      string `toml:"boot_file,omitempty"`
	BootFileEFI   string `toml:"boot_file_efi,omitempty"`
	HTTPBootURL   string `toml:"http_boot_url,omitempty"`
	IPXEScriptURL string `toml:"ipxe_script_url,omitempty"`
	DHCPLeaseTime string `toml:"dhcp_lease_time"`
	Hostname      string `toml:"hostname,omitempty"`
	Domain        string `toml:"domain,omitempty"`
}

// Load reads a complete configuration from the TOML file at path: Default,
// overlaid with the file, then validated.
func Load(path string) (*Config, error) {
	c := Default()
	if err := c.ApplyFile(path); err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// ApplyFile overlays the keys present in the TOML file at path onto c. It
// does not validate, because a later layer (the command line) may still
// supply what the file leaves out.
func (c *Config) ApplyFile(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err // *PathError already names the file
	}
	if err := c.ApplyTOML(data); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// ApplyTOML overlays the keys present in the TOML document data onto c.
// Unknown keys and unparsable values are reported together as Errors;
// syntax errors come from the TOML decoder with their line number. On error
// c may be partly updated.
func (c *Config) ApplyTOML(data []byte) error {
	var f fileConfig
	md, err := toml.Decode(string(data), &f)
	if err != nil {
		return err
	}
	var es Errors
	undecoded := md.Undecoded()
	unknown := make(map[string]bool, len(undecoded))
	for _, k := range undecoded {
		unknown[k.String()] = true
	}
	for _, k := range undecoded {
		// An unknown table lists its keys as unknown too; name only the
		// outermost unknown key.
		inUnknown := false
		for i := 1; i < len(k); i++ {
			inUnknown = inUnknown || unknown[k[:i].String()]
		}
		if !inUnknown {
			es.add(k.String(), "unknown key")
		}
	}
	c.applyFile(&f, md, &es)
	return es.err()
}

// applyFile copies every key present in md from f to c.
func (c *Config) applyFile(f *fileConfig, md toml.MetaData, es *Errors) {
	has := func(key ...string) bool { return md.IsDefined(key...) }
	setPath := func(dst *string, v string, key ...string) {
		if !has(key...) {
			return
		}
		if v == "" {
			es.add(toml.Key(key).String(), "must not be empty (leave the key out instead)")
			return
		}
		*dst = v
	}
	str := func(key []string, v string, parse func(string) error) {
		if !has(key...) {
			return
		}
		if err := parse(v); err != nil {
			es.add(toml.Key(key).String(), "%q: %v", v, err)
		}
	}
	dur := func(key []string, dst *time.Duration, v string) {
		str(key, v, func(s string) (err error) { *dst, err = ParseDuration(s); return })
	}
	addr := func(key []string, dst *netip.Addr, v string, want4 bool) {
		str(key, v, func(s string) error {
			a, err := ParseAddr(s)
			if err != nil {
				return err
			}
			if a.Is4() != want4 {
				return fmt.Errorf("expected an %s address", familyName(want4))
			}
			*dst = a
			return nil
		})
	}
	subnet := func(key []string, v string, want4 bool) {
		str(key, v, func(s string) error {
			p, err := ParsePrefix(s)
			if err != nil {
				return err
			}
			if p.Addr().Is4() != want4 {
				return fmt.Errorf("expected an %s subnet", familyName(want4))
			}
			c.SetSubnet(p)
			return nil
		})
	}

	// socket and connect are one choice (which side listens), so a file
	// that sets one also clears the other one inherited from a lower layer.
	if has("socket") || has("connect") {
		c.Socket, c.Connect = "", ""
	}
	setPath(&c.Socket, f.Socket, "socket")
	setPath(&c.Connect, f.Connect, "connect")
	str([]string{"socket_mode"}, f.SocketMode, func(s string) (err error) { c.SocketMode, err = ParseSocketMode(s); return })
	str([]string{"socket_group"}, f.SocketGroup, func(s string) error { c.SocketGroup = s; return nil })
	dur([]string{"setup_timeout"}, &c.SetupTimeout, f.SetupTimeout)
	if has("once") {
		c.Once = f.Once
	}
	setPath(&c.PIDFile, f.PIDFile, "pid_file")
	str([]string{"unix_forward_dir"}, f.UnixForwardDir, func(s string) (err error) { c.UnixForwardDir, err = ParseSocketDir(s); return })
	setPath(&c.API, f.API, "api")
	str([]string{"log_level"}, f.LogLevel, func(s string) (err error) { c.LogLevel, err = ParseLogLevel(s); return })
	str([]string{"log_format"}, f.LogFormat, func(s string) (err error) { c.LogFormat, err = ParseLogFormat(s); return })
	setPath(&c.PCAP, f.PCAP, "pcap")
	str([]string{"pcap_max_size"}, f.PCAPMaxSize, func(s string) (err error) { c.PCAPMaxSize, err = ParseSize(s); return })
	str([]string{"sandbox"}, f.Sandbox, func(s string) (err error) { c.Sandbox, err = ParseSandbox(s); return })
	str([]string{"runas"}, f.RunAs, func(s string) (err error) { c.RunAs, err = ParseRunAs(s); return })
	if has("mtu") {
		c.MTU = f.MTU
	}
	if has("queues") {
		c.Queues = f.Queues
	}
	str([]string{"mac"}, f.MAC, func(s string) (err error) { c.MAC, err = ParseMAC(s); return })
	str([]string{"gateway_mac"}, f.GatewayMAC, func(s string) (err error) { c.GatewayMAC, err = ParseMAC(s); return })

	// The subnet goes first so that SetSubnet's rebasing cannot undo
	// addresses the same file sets explicitly.
	subnet([]string{"ipv4", "subnet"}, f.IPv4.Subnet, true)
	addr([]string{"ipv4", "gateway"}, &c.IPv4.Gateway, f.IPv4.Gateway, true)
	addr([]string{"ipv4", "dns"}, &c.IPv4.DNS, f.IPv4.DNS, true)
	addr([]string{"ipv4", "guest"}, &c.IPv4.Guest, f.IPv4.Guest, true)
	if has("ipv4", "static_leases") {
		c.IPv4.StaticLeases = nil
		for _, m := range slices.Sorted(maps.Keys(f.IPv4.StaticLeases)) {
			key := toml.Key{"ipv4", "static_leases", m}.String()
			hw, err := ParseMAC(m)
			if err != nil {
				es.add(key, "%q: %v", m, err)
				continue
			}
			a, err := ParseAddr(f.IPv4.StaticLeases[m])
			if err != nil {
				es.add(key, "%q: %v", f.IPv4.StaticLeases[m], err)
				continue
			}
			c.IPv4.StaticLeases = append(c.IPv4.StaticLeases, StaticLease{MAC: hw, Addr: a})
		}
	}
	if has("ipv6", "enable") {
		c.IPv6.Enable = f.IPv6.Enable
	}
	subnet([]string{"ipv6", "subnet"}, f.IPv6.Subnet, false)
	addr([]string{"ipv6", "gateway"}, &c.IPv6.Gateway, f.IPv6.Gateway, false)
	addr([]string{"ipv6", "dns"}, &c.IPv6.DNS, f.IPv6.DNS, false)
	str([]string{"ipv6", "dhcpv6"}, f.IPv6.DHCPv6, func(s string) (err error) { c.IPv6.DHCPv6, err = ParseDHCPv6Mode(s); return })

	if has("map_host_loopback") {
		c.MapHostLoopback = f.MapHostLoopback
	}
	// Lists replace rather than extend the lower layer, like scalar keys do.
	if has("forwards") {
		c.Forwards = nil
		for i, spec := range f.Forwards {
			fw, err := ParseForward(spec)
			if err != nil {
				es.add(fmt.Sprintf("forwards[%d]", i), "%q: %v", spec, err)
				continue
			}
			c.Forwards = append(c.Forwards, fw...)
		}
	}
	if has("expose") {
		c.Expose = nil
		for i, spec := range f.Expose {
			e, err := ParseExpose(spec)
			if err != nil {
				es.add(fmt.Sprintf("expose[%d]", i), "%q: %v", spec, err)
				continue
			}
			c.Expose = append(c.Expose, e)
		}
	}
	if has("dns_upstream") {
		c.DNSUpstream = nil
		for i, s := range f.DNSUpstream {
			u, err := ParseDNSUpstream(s)
			if err != nil {
				es.add(fmt.Sprintf("dns_upstream[%d]", i), "%q: %v", s, err)
				continue
			}
			c.DNSUpstream = append(c.DNSUpstream, u)
		}
	}
	if has("dns_search") {
		c.DNSSearch = slices.Clone(f.DNSSearch)
	}
	if has("hosts") {
		c.Hosts = make(map[string]netip.Addr, len(f.Hosts))
		for _, name := range slices.Sorted(maps.Keys(f.Hosts)) {
			a, err := ParseAddr(f.Hosts[name])
			if err != nil {
				es.add(toml.Key{"hosts", name}.String(), "%q: %v", f.Hosts[name], err)
				continue
			}
			c.Hosts[name] = a
		}
	}

	dur([]string{"udp_idle_timeout"}, &c.UDPIdleTimeout, f.UDPIdleTimeout)
	dur([]string{"udp_stream_timeout"}, &c.UDPStreamTimeout, f.UDPStreamTimeout)
	dur([]string{"dial_timeout"}, &c.DialTimeout, f.DialTimeout)
	if has("max_connections") {
		c.MaxConnections = f.MaxConnections
	}
	if has("max_inflight_dials") {
		c.MaxInflightDials = f.MaxInflightDials
	}
	if has("max_inbound_connections") {
		c.MaxInboundConnections = f.MaxInboundConns
	}
	if has("max_udp_flows_per_source") {
		c.MaxUDPFlowsPerSource = f.MaxUDPPerSource
	}
	if has("max_guests") {
		c.MaxGuests = f.MaxGuests
	}
	if has("isolate_guests") {
		c.IsolateGuests = f.IsolateGuests
	}
	if has("migrate_tcp") {
		c.MigrateTCP = f.MigrateTCP
	}
	str([]string{"max_memory"}, f.MaxMemory, func(s string) (err error) { c.MaxMemory, err = ParseSize(s); return })
	str([]string{"max_guest_memory"}, f.MaxGuestMemory, func(s string) (err error) { c.MaxGuestMemory, err = ParseGuestMemory(s); return })

	setPath(&c.Boot.TFTPRoot, f.Boot.TFTPRoot, "boot", "tftp_root")
	str([]string{"boot", "boot_file"}, f.Boot.BootFile, func(s string) error { c.Boot.BootFile = s; return nil })
	str([]string{"boot", "boot_file_efi"}, f.Boot.BootFileEFI, func(s string) error { c.Boot.BootFileEFI = s; return nil })
	str([]string{"boot", "http_boot_url"}, f.Boot.HTTPBootURL, func(s string) error { c.Boot.HTTPBootURL = s; return nil })
	str([]string{"boot", "ipxe_script_url"}, f.Boot.IPXEScriptURL, func(s string) error { c.Boot.IPXEScriptURL = s; return nil })
	dur([]string{"boot", "dhcp_lease_time"}, &c.Boot.DHCPLeaseTime, f.Boot.DHCPLeaseTime)
	str([]string{"boot", "hostname"}, f.Boot.Hostname, func(s string) error { c.Boot.Hostname = s; return nil })
	str([]string{"boot", "domain"}, f.Boot.Domain, func(s string) error { c.Boot.Domain = s; return nil })

	str([]string{"egress", "mode"}, f.Egress.Mode, func(s string) (err error) { c.Egress.Mode, err = egress.ParseMode(s); return })
	if has("egress", "allow_metadata") {
		c.Egress.AllowMetadata = f.Egress.AllowMetadata
	}
	if has("egress", "host_addresses") {
		c.Egress.HostAddresses = f.Egress.HostAddresses
	}
	if has("egress", "rules") {
		c.Egress.Rules = nil
		for i, s := range f.Egress.Rules {
			r, err := egress.ParseRule(s)
			if err != nil {
				es.add(fmt.Sprintf("egress.rules[%d]", i), "%q: %v", s, err)
				continue
			}
			c.Egress.Rules = append(c.Egress.Rules, r)
		}
	}
}

// WriteTOML writes c as a TOML document that ApplyTOML reads back to the
// same configuration (forward ranges come out expanded). vunet uses it to
// show the effective configuration.
func (c *Config) WriteTOML(w io.Writer) error {
	f := fileConfig{
		Socket:           c.Socket,
		Connect:          c.Connect,
		SocketMode:       FormatSocketMode(c.SocketMode),
		SocketGroup:      c.SocketGroup,
		SetupTimeout:     formatDuration(c.SetupTimeout),
		Once:             c.Once,
		PIDFile:          c.PIDFile,
		UnixForwardDir:   c.UnixForwardDir,
		API:              c.API,
		LogLevel:         levelName(c.LogLevel),
		LogFormat:        string(c.LogFormat),
		PCAP:             c.PCAP,
		PCAPMaxSize:      FormatSize(c.PCAPMaxSize),
		Sandbox:          string(c.Sandbox),
		RunAs:            c.RunAs,
		MTU:              c.MTU,
		Queues:           c.Queues,
		MAC:              c.MAC.String(),
		GatewayMAC:       c.GatewayMAC.String(),
		MapHostLoopback:  c.MapHostLoopback,
		DNSSearch:        c.DNSSearch,
		UDPIdleTimeout:   formatDuration(c.UDPIdleTimeout),
		UDPStreamTimeout: formatDuration(c.UDPStreamTimeout),
		DialTimeout:      formatDuration(c.DialTimeout),
		MaxConnections:   c.MaxConnections,
		MaxInflightDials: c.MaxInflightDials,
		MaxInboundConns:  c.MaxInboundConnections,
		MaxUDPPerSource:  c.MaxUDPFlowsPerSource,
		MaxMemory:        FormatSize(c.MaxMemory),
		MaxGuestMemory:   FormatGuestMemory(c.MaxGuestMemory),
		MaxGuests:        c.MaxGuests,
		IsolateGuests:    c.IsolateGuests,
		MigrateTCP:       c.MigrateTCP,
		IPv4: fileIPv4{
			Subnet:       c.IPv4.Subnet.String(),
			Gateway:      c.IPv4.Gateway.String(),
			DNS:          c.IPv4.DNS.String(),
			Guest:        c.IPv4.Guest.String(),
			StaticLeases: staticLeaseMap(c.IPv4.StaticLeases),
		},
		IPv6: fileIPv6{
			Enable:  c.IPv6.Enable,
			Subnet:  c.IPv6.Subnet.String(),
			Gateway: c.IPv6.Gateway.String(),
			DNS:     c.IPv6.DNS.String(),
			DHCPv6:  string(c.IPv6.DHCPv6),
		},
		Boot: fileBoot{
			TFTPRoot:      c.Boot.TFTPRoot,
			BootFile:      c.Boot.BootFile,
			BootFileEFI:   c.Boot.BootFileEFI,
			HTTPBootURL:   c.Boot.HTTPBootURL,
			IPXEScriptURL: c.Boot.IPXEScriptURL,
			DHCPLeaseTime: formatDuration(c.Boot.DHCPLeaseTime),
			Hostname:      c.Boot.Hostname,
			Domain:        c.Boot.Domain,
		},
		Egress: fileEgress{
			Mode:          c.Egress.Mode.String(),
			AllowMetadata: c.Egress.AllowMetadata,
			HostAddresses: c.Egress.HostAddresses,
			Rules:         []string{},
		},
	}
	for _, r := range c.Egress.Rules {
		f.Egress.Rules = append(f.Egress.Rules, r.String())
	}
	for _, fw := range c.Forwards {
		f.Forwards = append(f.Forwards, fw.String())
	}
	for _, e := range c.Expose {
		f.Expose = append(f.Expose, e.String())
	}
	for _, u := range c.DNSUpstream {
		f.DNSUpstream = append(f.DNSUpstream, u.String())
	}
	if len(c.Hosts) > 0 {
		f.Hosts = make(map[string]string, len(c.Hosts))
		for name, a := range c.Hosts {
			f.Hosts[name] = a.String()
		}
	}
	enc := toml.NewEncoder(w)
	enc.Indent = "" // flat tables read like the hand-written example file
	return enc.Encode(f)
}

// staticLeaseMap is the file form of static leases (nil without any).
func staticLeaseMap(ls []StaticLease) map[string]string {
	if len(ls) == 0 {
		return nil
	}
	m := make(map[string]string, len(ls))
	for _, l := range ls {
		m[l.MAC.String()] = l.Addr.String()
	}
	return m
}
