// Package config holds vunet's typed configuration: the defaults, the TOML
// file format, the parsers shared by the file and the command line, and the
// validation that runs before the appliance starts.
//
// A configuration is built in layers: Default, then ApplyFile (or ApplyTOML),
// then whatever the caller sets directly (the command line), and finally
// Validate, which reports every problem at once. Load does the first, second
// and last step for callers that only have a file.
package config

import (
	"log/slog"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/vunet/vunet/forward/egress"
	"github.com/vunet/vunet/services/names"
)

// HostGatewayName is the DNS name the appliance always resolves to the
// gateway address, so the guest can reach services on the host. It cannot be
// redefined in Hosts.
const HostGatewayName = "host." + names.Domain

// LogFormat selects the log/slog handler.
type LogFormat string

// The supported log formats.
const (
	LogText LogFormat = "text" // slog.TextHandler: key=value lines
	LogJSON LogFormat = "json" // slog.JSONHandler: one JSON object per line
)

// Sandbox says how vunet confines itself once its sockets and files are
// open (see docs/security.md).
type Sandbox string

// The sandbox modes.
const (
	// SandboxOn: no_new_privs, the switch to RunAs when started as root,
	// Landlock, and a seccomp allow-list that fails other calls with EPERM.
	SandboxOn Sandbox = "on"
	// SandboxLog: the same, but calls outside the allow-list are allowed
	// and logged by the kernel (for finding what a new code path needs).
	SandboxLog Sandbox = "log"
	// SandboxOff: no confinement at all, the escape hatch.
	SandboxOff Sandbox = "off"
)

// DefaultRunAs is the user vunet switches to when started as root.
const DefaultRunAs = "nobody"

// MTU limits. 68 is the IPv4 minimum (RFC 791). 65520 is the largest
// payload that keeps an Ethernet frame, with its 14-byte header, within the
// 16-bit lengths used along the path, rounded down to a multiple of 4.
const (
	MinMTU = 68
	MaxMTU = 65520
)

// MaxGuestsLimit bounds max_guests (the switch's ports; endpoint.MaxPorts).
const MaxGuestsLimit = 64

// MaxQueues bounds Queues (virtio-net queue pairs); the endpoint's
// endpoint.MaxQueuePairs, which appliance tests check it equals.
const MaxQueues = 16

// DefaultMaxMemory is the default memory budget: fits a laptop, and is
// enough for a few fast connections plus the minimum share of thousands
// of stalled ones. MinMaxMemory is the least vunet runs with.
const (
	DefaultMaxMemory = 256 << 20
	MinMaxMemory     = 8 << 20
	// MinMaxGuestMemory is the least max_guest_memory may be set to (one
	// guest's share; 0 means an equal share).
	MinMaxGuestMemory = 1 << 20
)

// Config is the complete vunet configuration. The zero value is not useful;
// start from Default.
type Config struct {
	// Socket is the vhost-user socket path vunet listens on (QEMU connects as
	// the client). Exactly one of Socket and Connect must be set.
	Socket string
	// Connect is the vhost-user socket path of a QEMU that listens
	// (chardev server=on); vunet connects to it as the client.
	Connect string
	// SocketMode is the permission bits of the Socket file (0600 by
	// default, whatever the umask).
	SocketMode os.FileMode
	// SocketGroup, if set, is the group (name or number) that owns the
	// Socket file; frontends running with it as their group may connect
	// (with a SocketMode that gives the group rw, e.g. 0660).
	SocketGroup string
	// SetupTimeout bounds a frontend's vhost-user handshake (until
	// SET_OWNER); 0 disables it.
	SetupTimeout time.Duration
	// Once makes vunet exit when the first frontend disconnects instead of
	// waiting for the next one.
	Once bool
	// PIDFile, if set, receives vunet's process id while it runs.
	PIDFile string
	// UnixForwardDir, if set, is the directory in which unix forwards
	// added at run time (API, `vunet forward add unix:PATH:PORT`, a
	// loaded device state) create their sockets. vunet creates it (0700;
	// with SocketGroup, that group's and setgid, so every socket in it
	// gets the group) and the sandbox keeps creating, removing and
	// connecting to sockets allowed there only. Without it, a sandboxed
	// vunet refuses unix forwards at run time.
	UnixForwardDir string
	// API, if set, is the unix socket path of the control API.
	API string
	// LogLevel is one of slog.LevelDebug, LevelInfo, LevelWarn, LevelError.
	LogLevel slog.Level
	// LogFormat is LogText or LogJSON.
	LogFormat LogFormat
	// PCAP, if set, is a file that receives every guest frame in pcap format.
	PCAP string
	// PCAPMaxSize caps the pcap file in bytes; capture stops there. 0 is
	// unlimited.
	PCAPMaxSize int64
	// Sandbox is SandboxOn, SandboxLog or SandboxOff.
	Sandbox Sandbox
	// RunAs is the user (USER or UID, optionally :GROUP or :GID) vunet
	// switches to, when started as root, once its sockets are bound. Not
	// used when not started as root, or with SandboxOff.
	RunAs string

	// MTU is the link MTU offered to the guest.
	MTU int
	// Queues is the number of virtio-net queue pairs offered (multiqueue
	// above 1; QEMU's -netdev vhost-user,queues= must not exceed it).
	Queues int
	// MAC is the guest's MAC address; DHCP reserves IPv4.Guest for it.
	MAC net.HardwareAddr
	// GatewayMAC is the MAC address the appliance answers with for the
	// gateway and DNS addresses.
	GatewayMAC net.HardwareAddr

	// IPv4 is the guest's IPv4 network.
	IPv4 IPv4
	// IPv6 is the guest's IPv6 network.
	IPv6 IPv6

	// MapHostLoopback makes connections to the gateway address reach the
	// host's loopback interface (like slirp's 10.0.2.2 → 127.0.0.1).
	MapHostLoopback bool
	// Forwards are host→guest port forwards, ranges already expanded.
	Forwards []Forward
	// Expose maps gateway TCP ports to host Unix sockets (--expose).
	Expose []Expose

	// DNSUpstream are the resolvers the DNS forwarder asks. Empty means read
	// /etc/resolv.conf when the appliance starts.
	DNSUpstream []netip.AddrPort
	// DNSSearch is the search domain list handed out by DHCP and RA.
	DNSSearch []string
	// Hosts are static name→address answers of the built-in DNS server, in
	// addition to HostGatewayName.
	Hosts map[string]netip.Addr

	// UDPIdleTimeout is how long a UDP flow that has seen traffic in one
	// direction only is kept.
	UDPIdleTimeout time.Duration
	// UDPStreamTimeout is how long a UDP flow that has seen replies is kept
	// after its last packet.
	UDPStreamTimeout time.Duration
	// DialTimeout bounds outbound TCP connection attempts on the host.
	DialTimeout time.Duration
	// MaxConnections caps each guest's concurrent NATed TCP connections
	// (with several guests, every guest has this many); 0 is unlimited.
	MaxConnections int
	// MaxInflightDials caps each guest's concurrent outbound connection
	// attempts, so a guest port scan cannot exhaust host file descriptors;
	// 0 is unlimited.
	MaxInflightDials int
	// MaxInboundConnections caps connections accepted by TCP port
	// forwards, separately from MaxConnections; 0 is unlimited.
	MaxInboundConnections int
	// MaxUDPFlowsPerSource caps the flows one remote address may hold on
	// one UDP port forward; 0 is unlimited.
	MaxUDPFlowsPerSource int
	// MaxGuests is how many VMs (vhost-user frontends) may share the
	// network at once, each on its own port of vunet's switch; a frontend
	// beyond it is refused at once. 1..MaxGuests.
	MaxGuests int
	// IsolateGuests drops frames between guests: each reaches the gateway
	// (and through it the host and the outside) but not the others.
	IsolateGuests bool
	// MigrateTCP moves established TCP connections with a live-migrated
	// guest (docs/migration.md): needs CAP_NET_ADMIN for TCP repair mode,
	// which the sandbox then keeps across RunAs. Off: they are reset.
	MigrateTCP bool
	// MaxMemory is the byte budget for everything the guest (and clients
	// of port forwards) can make vunet hold: TCP buffers, UDP flow
	// buffers, frames waiting for guest RX buffers. The Go runtime's soft
	// memory limit is derived from it.
	MaxMemory int64
	// MaxGuestMemory caps what one guest's own flows may hold of the
	// memory budget's outbound share, so one guest cannot pin the memory
	// another needs; 0 (auto) is an equal share: the outbound share (3/4
	// of MaxMemory) divided by MaxGuests, all of it with one guest.
	MaxGuestMemory int64

	// Boot holds DHCP lease and network boot settings.
	Boot Boot

	// Egress is the outbound policy: which destinations guest flows may
	// reach.
	Egress Egress
}

// Egress is the outbound policy (see package forward/egress and
// docs/security.md).
type Egress struct {
	// Mode is egress.AllowAll, or egress.AllowNone for nothing but the
	// gateway alias and what Rules allow.
	Mode egress.Mode
	// AllowMetadata drops the default denial of link-local destinations
	// (169.254.0.0/16, fe80::/10) and of fd00:ec2::254.
	AllowMetadata bool
	// HostAddresses, when false, denies every address the host owns (the
	// gateway alias to the host's loopback keeps working).
	HostAddresses bool
	// Rules are matched first, in order; the first match decides.
	Rules []egress.Rule
}

// IPv4 describes the guest's IPv4 network.
type IPv4 struct {
	// Subnet is the guest network, e.g. 10.0.2.0/24.
	Subnet netip.Prefix
	// Gateway is the appliance's router address.
	Gateway netip.Addr
	// DNS is the address of the appliance's DNS forwarder.
	DNS netip.Addr
	// Guest is the first address DHCP hands out (to MAC).
	Guest netip.Addr
	// StaticLeases are fixed DHCP leases by MAC (ipv4.static_leases):
	// that guest always gets its address, and no other guest does.
	StaticLeases []StaticLease
}

// StaticLease is one fixed DHCP lease.
type StaticLease struct {
	MAC  net.HardwareAddr
	Addr netip.Addr
}

// IPv6 describes the guest's IPv6 network.
type IPv6 struct {
	// Enable turns IPv6 (router advertisements, DHCPv6, NAT66) on.
	Enable bool
	// Subnet is the guest prefix; it must be a /64 for SLAAC.
	Subnet netip.Prefix
	// Gateway is the appliance's router address.
	Gateway netip.Addr
	// DNS is the address of the appliance's DNS forwarder.
	DNS netip.Addr
	// DHCPv6 is DHCPv6Stateless (addresses from SLAAC, DHCPv6 only for DNS)
	// or DHCPv6Stateful (also leases addresses, and sets the RA's M flag).
	DHCPv6 DHCPv6Mode
}

// DHCPv6Mode says whether the DHCPv6 server assigns addresses.
type DHCPv6Mode string

// The DHCPv6 modes.
const (
	// DHCPv6Stateless answers INFORMATION-REQUEST only (RFC 8415 6.1).
	DHCPv6Stateless DHCPv6Mode = "stateless"
	// DHCPv6Stateful also leases addresses (IA_NA) from a pool in the
	// guest prefix, by default ::100 to ::1ff.
	DHCPv6Stateful DHCPv6Mode = "stateful"
)

// Boot holds the DHCP lease and network boot (PXE/TFTP, UEFI HTTP boot)
// settings.
type Boot struct {
	// TFTPRoot, if set, is the directory served read-only over TFTP.
	TFTPRoot string
	// BootFile is the DHCP boot file name (relative to TFTPRoot).
	BootFile string
	// BootFileEFI, if set, replaces BootFile for UEFI PXE clients (client
	// architecture, DHCP option 93, of a UEFI kind such as 7 or 9), so one
	// configuration boots BIOS and UEFI guests. Relative to TFTPRoot.
	BootFileEFI string
	// HTTPBootURL, if set, is offered to UEFI HTTP boot clients.
	HTTPBootURL string
	// IPXEScriptURL, if set, is the boot file offered to clients that
	// identify as iPXE (user class "iPXE", option 77): an http, https or
	// tftp URL, typically of an iPXE script. Without it an iPXE chainloaded
	// over PXE would be offered BootFile again and load itself in a loop.
	IPXEScriptURL string
	// DHCPLeaseTime is the lease duration DHCP hands out.
	DHCPLeaseTime time.Duration
	// Hostname, if set, is the host name DHCP gives the guest.
	Hostname string
	// Domain, if set, is the domain name DHCP gives the guest.
	Domain string
}

// Default returns the default configuration. It is the single place where
// defaults live; docs/configuration.md mirrors it. The result does not
// validate on its own: Socket or Connect must still be set.
func Default() *Config {
	return &Config{
		SocketMode:   0o600,
		SetupTimeout: 10 * time.Second,
		LogLevel:     slog.LevelInfo,
		LogFormat:    LogText,
		Sandbox:      SandboxOn,
		RunAs:        DefaultRunAs,
		MTU:          1500,
		Queues:       1,
		MAC:          net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}, // QEMU's default guest MAC
		GatewayMAC:   net.HardwareAddr{0x52, 0x55, 0x0a, 0x00, 0x02, 0x02}, // locally administered, embeds 10.0.2.2 like slirp
		IPv4: IPv4{
			Subnet:  netip.MustParsePrefix("10.0.2.0/24"),
			Gateway: netip.MustParseAddr("10.0.2.2"),
			DNS:     netip.MustParseAddr("10.0.2.3"),
			Guest:   netip.MustParseAddr("10.0.2.15"),
		},
		IPv6: IPv6{
			Enable:  true,
			Subnet:  netip.MustParsePrefix("fd00::/64"),
			Gateway: netip.MustParseAddr("fd00::2"),
			DNS:     netip.MustParseAddr("fd00::3"),
			DHCPv6:  DHCPv6Stateless,
		},
		MapHostLoopback:  true,
		Hosts:            map[string]netip.Addr{},
		UDPIdleTimeout:   30 * time.Second,
		UDPStreamTimeout: 180 * time.Second,
		DialTimeout:      10 * time.Second,
		MaxConnections:   4096,
		MaxInflightDials: 128,
		// Inbound forwards are for an administrator's few sessions
		// (ssh, a web UI), not a public server.
		MaxInboundConnections: 256,
		MaxUDPFlowsPerSource:  64,
		MaxMemory:             DefaultMaxMemory,
		// One VM per vunet unless asked: guest-to-guest traffic is a
		// reachability the user opts into.
		MaxGuests: 1,
		Boot: Boot{
			DHCPLeaseTime: time.Hour,
		},
		Egress: Egress{Mode: egress.AllowAll, HostAddresses: true},
	}
}

// SetSubnet replaces the IPv4 or IPv6 subnet (the family of p decides) and
// moves the gateway, DNS and guest addresses along when they were inside the
// old subnet, keeping their host part. That way changing only the subnet
// (say to 192.168.50.0/24) yields .2/.3/.15 in the new one instead of a
// configuration that fails validation. Addresses whose host part does not
// fit the new subnet are left alone for Validate to report.
func (c *Config) SetSubnet(p netip.Prefix) {
	if p.Addr().Is4() {
		old := c.IPv4.Subnet
		c.IPv4.Gateway = rebase(c.IPv4.Gateway, old, p)
		c.IPv4.DNS = rebase(c.IPv4.DNS, old, p)
		c.IPv4.Guest = rebase(c.IPv4.Guest, old, p)
		c.IPv4.Subnet = p
		return
	}
	old := c.IPv6.Subnet
	c.IPv6.Gateway = rebase(c.IPv6.Gateway, old, p)
	c.IPv6.DNS = rebase(c.IPv6.DNS, old, p)
	c.IPv6.Subnet = p
}

// rebase moves a from prefix old to prefix new keeping its host bits, or
// returns a unchanged when that is not possible.
func rebase(a netip.Addr, old, new netip.Prefix) netip.Addr {
	if !a.IsValid() || !old.IsValid() || !new.IsValid() || !old.Contains(a) ||
		a.BitLen() != new.Addr().BitLen() {
		return a
	}
	ab := a.AsSlice()
	ob := old.Masked().Addr().AsSlice()
	nb := new.Masked().Addr().AsSlice()
	out := make([]byte, len(ab))
	for i := range ab {
		host := ab[i] ^ ob[i] // a is inside old, so this is exactly its host bits
		if nb[i]&host != 0 {
			return a // host part overlaps the new network part
		}
		out[i] = nb[i] | host
	}
	r, _ := netip.AddrFromSlice(out)
	if !new.Contains(r) {
		return a // host part too large for the new prefix
	}
	return r
}
