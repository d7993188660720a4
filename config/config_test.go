package config

import (
	"bytes"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/forward/egress"
)

// valid returns the default configuration made valid by setting a socket.
func valid() *Config {
	c := Default()
	c.Socket = "/run/vunet.sock"
	return c
}

func TestDefaultValidatesWithSocket(t *testing.T) {
	if err := valid().Validate(); err != nil {
		t.Fatalf("Default()+socket: %v", err)
	}
	c := Default()
	c.Socket, c.Connect = "", "/run/qemu.sock"
	if err := c.Validate(); err != nil {
		t.Fatalf("Default()+connect: %v", err)
	}
}

func TestDefaultIsFresh(t *testing.T) {
	// Callers mutate what Default returns; no two calls may share memory.
	a, b := Default(), Default()
	a.MAC[0] = 0xff
	a.Hosts["x"] = netip.Addr{}
	if b.MAC[0] == 0xff || len(b.Hosts) != 0 {
		t.Fatal("Default() results share state")
	}
}

func TestValidateMessages(t *testing.T) {
	tests := []struct {
		name   string
		modify func(c *Config)
		want   string // the one expected problem, "key: message"
	}{
		{"no endpoint", func(c *Config) { c.Socket = "" }, "socket: one of socket or connect is required"},
		{"both endpoints", func(c *Config) { c.Connect = "/run/q.sock" }, "connect: socket and connect are mutually exclusive; set only one"},
		{"long socket", func(c *Config) { c.Socket = "/" + strings.Repeat("s", 120) }, "socket: path is 121 bytes; unix socket paths are limited to 107 (use a shorter or relative path)"},
		{"nul path", func(c *Config) { c.PIDFile = "a\x00b" }, "pid_file: path contains a NUL byte"},
		{"same paths", func(c *Config) { c.API = "/run/./vunet.sock" }, "api: /run/./vunet.sock is the same path as socket"},
		{"log level", func(c *Config) { c.LogLevel = slog.Level(3) }, "log_level: INFO+3 is not one of debug, info, warn or error"},
		{"log format", func(c *Config) { c.LogFormat = "xml" }, `log_format: "xml" is not one of text or json`},
		{"mtu high", func(c *Config) { c.MTU = 70000 }, "mtu: 70000 is out of range 68..65520"},
		{"mtu low", func(c *Config) { c.MTU = 67 }, "mtu: 67 is out of range 68..65520"},
		{"no queues", func(c *Config) { c.Queues = 0 }, "queues: 0 is out of range 1..16"},
		{"migrate_tcp with guests", func(c *Config) { c.MigrateTCP, c.MaxGuests = true, 2 }, "migrate_tcp: needs max_guests 1 (a state save moves every TCP connection of the network)"},
		{"too many queues", func(c *Config) { c.Queues = 17 }, "queues: 17 is out of range 1..16"},
		{"mac length", func(c *Config) { c.MAC = net.HardwareAddr{1, 2, 3} }, `mac: "01:02:03" is not a 48-bit MAC address`},
		{"mac multicast", func(c *Config) { c.MAC = net.HardwareAddr{1, 0, 0, 0, 0, 1} }, "mac: 01:00:00:00:00:01 is a multicast address; the first octet must be even"},
		{"mac zero", func(c *Config) { c.MAC = make(net.HardwareAddr, 6) }, "mac: 00:00:00:00:00:00 is the all-zero address"},
		{"gateway mac missing", func(c *Config) { c.GatewayMAC = nil }, `gateway_mac: "" is not a 48-bit MAC address`},
		{"same macs", func(c *Config) { c.GatewayMAC = append(net.HardwareAddr(nil), c.MAC...) }, "gateway_mac: 52:54:00:12:34:56 is the same as mac"},

		{"v4 subnet missing", func(c *Config) { c.IPv4.Subnet = netip.Prefix{} }, "ipv4.subnet: is required"},
		{"v4 subnet family", func(c *Config) { c.IPv4.Subnet = netip.MustParsePrefix("fd01::/64") }, "ipv4.subnet: fd01::/64 is not an IPv4 subnet"},
		{"v4 host bits", func(c *Config) { c.IPv4.Subnet = netip.MustParsePrefix("10.0.2.5/24") }, "ipv4.subnet: 10.0.2.5/24 has host bits set; did you mean 10.0.2.0/24?"},
		{"v4 loopback", func(c *Config) { c.IPv4.Subnet = netip.MustParsePrefix("127.0.0.0/8") }, "ipv4.subnet: 127.0.0.0/8 is a loopback, multicast or unspecified range"},
		{"v4 too small", func(c *Config) { c.IPv4.Subnet = netip.MustParsePrefix("10.0.2.0/30") }, "ipv4.subnet: 10.0.2.0/30 is too small; use /29 or larger"},
		{"v4 gateway outside", func(c *Config) { c.IPv4.Gateway = netip.MustParseAddr("10.0.3.2") }, "ipv4.gateway: 10.0.3.2 is not inside ipv4.subnet 10.0.2.0/24"},
		{"v4 gateway missing", func(c *Config) { c.IPv4.Gateway = netip.Addr{} }, "ipv4.gateway: is required"},
		{"v4 dns network", func(c *Config) { c.IPv4.DNS = netip.MustParseAddr("10.0.2.0") }, "ipv4.dns: 10.0.2.0 is the network address of 10.0.2.0/24"},
		{"v4 guest broadcast", func(c *Config) { c.IPv4.Guest = netip.MustParseAddr("10.0.2.255") }, "ipv4.guest: 10.0.2.255 is the broadcast address of 10.0.2.0/24"},
		{"v4 dns = gateway", func(c *Config) { c.IPv4.DNS = c.IPv4.Gateway }, "ipv4.dns: 10.0.2.2 is the same as ipv4.gateway"},
		{"v4 guest = dns", func(c *Config) { c.IPv4.Guest = c.IPv4.DNS }, "ipv4.guest: 10.0.2.3 is the same as ipv4.dns"},

		{"v6 subnet family", func(c *Config) { c.IPv6.Subnet = netip.MustParsePrefix("10.1.0.0/16") }, "ipv6.subnet: 10.1.0.0/16 is not an IPv6 subnet"},
		{"v6 not /64", func(c *Config) { c.IPv6.Subnet = netip.MustParsePrefix("fd00::/48") }, "ipv6.subnet: fd00::/48 must be a /64 (SLAAC needs it)"},
		{"v6 host bits", func(c *Config) { c.IPv6.Subnet = netip.MustParsePrefix("fd00::1/64") }, "ipv6.subnet: fd00::1/64 has host bits set; did you mean fd00::/64?"},
		{"v6 multicast", func(c *Config) { c.IPv6.Subnet = netip.MustParsePrefix("ff02::/64") }, "ipv6.subnet: ff02::/64 is a loopback, multicast or unspecified range"},
		{"v6 gateway outside", func(c *Config) { c.IPv6.Gateway = netip.MustParseAddr("fd01::2") }, "ipv6.gateway: fd01::2 is not inside ipv6.subnet fd00::/64"},
		{"v6 dns anycast", func(c *Config) { c.IPv6.DNS = netip.MustParseAddr("fd00::") }, "ipv6.dns: fd00:: is the network address of fd00::/64"},
		{"v6 dns = gateway", func(c *Config) { c.IPv6.DNS = c.IPv6.Gateway }, "ipv6.dns: fd00::2 is the same as ipv6.gateway"},

		{"forward proto", func(c *Config) { c.Forwards = []Forward{fwd("sctp", "127.0.0.1:1", 1)} }, `forwards: sctp:127.0.0.1:1:1: protocol "sctp" is not tcp or udp`},
		{"forward host port", func(c *Config) { c.Forwards = []Forward{fwd("tcp", "127.0.0.1:0", 1)} }, "forwards: tcp:127.0.0.1:0:1: host port 0 is out of range 1..65535"},
		{"forward guest port", func(c *Config) { c.Forwards = []Forward{fwd("tcp", "127.0.0.1:1", 0)} }, "forwards: tcp:127.0.0.1:1:0: guest port 0 is out of range 1..65535"},
		{"forward no addr", func(c *Config) { c.Forwards = []Forward{{Proto: "tcp", GuestPort: 1}} }, "forwards: tcp:invalid AddrPort:1: host address is missing"},
		{"forward duplicate", func(c *Config) {
			c.Forwards = []Forward{fwd("tcp", "127.0.0.1:8080", 80), fwd("udp", "127.0.0.1:8080", 80), fwd("tcp", "127.0.0.1:8080", 81)}
		}, "forwards: tcp:127.0.0.1:8080 is forwarded more than once"},

		{"upstream unspecified", func(c *Config) { c.DNSUpstream = []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:53")} }, "dns_upstream: 0.0.0.0:53 is not a usable resolver address"},
		{"upstream port", func(c *Config) { c.DNSUpstream = []netip.AddrPort{netip.MustParseAddrPort("1.1.1.1:0")} }, "dns_upstream: 1.1.1.1:0: port 0 is out of range 1..65535"},
		{"search domain", func(c *Config) { c.DNSSearch = []string{"ok.example", "bad..example"} }, `dns_search: "bad..example" is not a valid domain name`},
		{"host name", func(c *Config) { c.Hosts = map[string]netip.Addr{"-bad": netip.MustParseAddr("10.0.2.9")} }, `hosts.-bad: "-bad" is not a valid host name`},
		{"host reserved", func(c *Config) {
			c.Hosts = map[string]netip.Addr{"Host.Vunet.Internal.": netip.MustParseAddr("10.0.2.9")}
		}, `hosts."Host.Vunet.Internal."` + ": host.vunet.internal is reserved: it always resolves to the gateway"},
		{"host duplicate", func(c *Config) {
			c.Hosts = map[string]netip.Addr{"db": netip.MustParseAddr("10.0.2.9"), "DB": netip.MustParseAddr("10.0.2.10")}
		}, "hosts.db: duplicates hosts.DB (names are case-insensitive)"},
		{"host addr", func(c *Config) { c.Hosts = map[string]netip.Addr{"db": {}} }, "hosts.db: invalid IP is not a usable address"},

		{"udp idle", func(c *Config) { c.UDPIdleTimeout = 0 }, "udp_idle_timeout: 0s must be positive"},
		{"dial timeout", func(c *Config) { c.DialTimeout = -time.Second }, "dial_timeout: -1s must be positive"},
		{"udp stream < idle", func(c *Config) { c.UDPStreamTimeout = 10 * time.Second }, "udp_stream_timeout: 10s is shorter than udp_idle_timeout 30s"},
		{"max connections", func(c *Config) { c.MaxConnections = -1 }, "max_connections: -1 is negative; use 0 for unlimited"},
		{"max dials", func(c *Config) { c.MaxInflightDials = -2 }, "max_inflight_dials: -2 is negative; use 0 for unlimited"},

		{"boot file alone", func(c *Config) { c.Boot.BootFile = "pxelinux.0" }, "boot.boot_file: is set but neither boot.tftp_root nor boot.http_boot_url is"},
		{"boot file escapes", func(c *Config) { c.Boot.TFTPRoot, c.Boot.BootFile = "/srv/tftp", "../etc/passwd" }, `boot.boot_file: "../etc/passwd" must be a relative path inside boot.tftp_root`},
		{"boot file absolute", func(c *Config) { c.Boot.TFTPRoot, c.Boot.BootFile = "/srv/tftp", "/pxelinux.0" }, `boot.boot_file: "/pxelinux.0" must be a relative path inside boot.tftp_root`},
		{"tftp nul", func(c *Config) { c.Boot.TFTPRoot = "/srv\x00" }, "boot.tftp_root: path contains a NUL byte"},
		{"http boot url", func(c *Config) { c.Boot.HTTPBootURL = "ftp://x/boot.efi" }, `boot.http_boot_url: "ftp://x/boot.efi" is not an http:// or https:// URL`},
		{"http boot url tftp", func(c *Config) { c.Boot.HTTPBootURL = "tftp://x/boot.efi" }, `boot.http_boot_url: "tftp://x/boot.efi" is not an http:// or https:// URL`},
		{"efi file alone", func(c *Config) { c.Boot.BootFileEFI = "bootx64.efi" }, "boot.boot_file_efi: is set but boot.tftp_root is not"},
		{"efi file with http boot only", func(c *Config) { c.Boot.HTTPBootURL, c.Boot.BootFileEFI = "http://h/x.efi", "bootx64.efi" }, "boot.boot_file_efi: is set but boot.tftp_root is not"},
		{"efi file escapes", func(c *Config) { c.Boot.TFTPRoot, c.Boot.BootFileEFI = "/srv/tftp", "efi/../../x.efi" }, `boot.boot_file_efi: "efi/../../x.efi" must be a relative path inside boot.tftp_root`},
		{"efi file absolute", func(c *Config) { c.Boot.TFTPRoot, c.Boot.BootFileEFI = "/srv/tftp", "/bootx64.efi" }, `boot.boot_file_efi: "/bootx64.efi" must be a relative path inside boot.tftp_root`},
		{"efi file too long", func(c *Config) { c.Boot.TFTPRoot, c.Boot.BootFileEFI = "/srv/tftp", strings.Repeat("e", 256) }, "boot.boot_file_efi: is 256 bytes; at most 255 fit in a DHCP option"},
		{"boot file too long", func(c *Config) { c.Boot.TFTPRoot, c.Boot.BootFile = "/srv/tftp", strings.Repeat("b", 300) }, "boot.boot_file: is 300 bytes; at most 255 fit in a DHCP option"},
		{"ipxe url ftp", func(c *Config) { c.Boot.IPXEScriptURL = "ftp://10.0.2.2/boot.ipxe" }, `boot.ipxe_script_url: "ftp://10.0.2.2/boot.ipxe" is not an http://, https:// or tftp:// URL`},
		{"ipxe url relative", func(c *Config) { c.Boot.IPXEScriptURL = "boot.ipxe" }, `boot.ipxe_script_url: "boot.ipxe" is not an http://, https:// or tftp:// URL`},
		{"ipxe url no host", func(c *Config) { c.Boot.IPXEScriptURL = "http:///boot.ipxe" }, `boot.ipxe_script_url: "http:///boot.ipxe" is not an http://, https:// or tftp:// URL`},
		{"ipxe url unparsable", func(c *Config) { c.Boot.IPXEScriptURL = "http://10.0.2.2:x/boot.ipxe" }, `boot.ipxe_script_url: "http://10.0.2.2:x/boot.ipxe" is not an http://, https:// or tftp:// URL`},
		{"ipxe url too long", func(c *Config) { c.Boot.IPXEScriptURL = "http://h/" + strings.Repeat("i", 250) }, "boot.ipxe_script_url: is 259 bytes; at most 255 fit in a DHCP option"},
		{"lease zero", func(c *Config) { c.Boot.DHCPLeaseTime = 0 }, "boot.dhcp_lease_time: 0s is out of range 1m..8760h"},
		{"lease huge", func(c *Config) { c.Boot.DHCPLeaseTime = 2000000 * time.Hour }, "boot.dhcp_lease_time: 2000000h is out of range 1m..8760h"},
		{"hostname dots", func(c *Config) { c.Boot.Hostname = "a.b" }, `boot.hostname: "a.b" is not a valid host name (one DNS label, no dots)`},
		{"domain", func(c *Config) { c.Boot.Domain = "exa mple" }, `boot.domain: "exa mple" is not a valid domain name`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := valid()
			tt.modify(c)
			err := c.Validate()
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("Validate() = %v, want Errors", err)
			}
			if len(es) != 1 || es[0].Error() != tt.want {
				t.Fatalf("Validate() =\n%v\nwant exactly\n%s", err, tt.want)
			}
		})
	}
}

func TestValidateAcceptsEdgeCases(t *testing.T) {
	c := valid()
	c.MTU = MinMTU
	c.IPv4 = IPv4{
		Subnet:  netip.MustParsePrefix("192.168.7.0/29"),
		Gateway: netip.MustParseAddr("192.168.7.1"),
		DNS:     netip.MustParseAddr("192.168.7.2"),
		Guest:   netip.MustParseAddr("192.168.7.6"),
	}
	c.IPv6 = IPv6{Enable: false, Subnet: netip.MustParsePrefix("10.0.0.0/8")} // ignored while disabled
	c.Hosts = map[string]netip.Addr{"_srv.example": netip.MustParseAddr("2001:db8::1")}
	c.Boot = Boot{TFTPRoot: "/srv/tftp", BootFile: "efi/./grubx64.efi", BootFileEFI: "efi/x/../ipxe.efi", HTTPBootURL: "https://boot.example/x.efi",
		IPXEScriptURL: "tftp://10.0.2.2/" + strings.Repeat("s", 255-len("tftp://10.0.2.2/")), DHCPLeaseTime: time.Minute, Hostname: "vm1", Domain: "example."}
	c.MaxConnections, c.MaxInflightDials = 0, 0
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	// Each network boot setting stands on its own: an EFI-only TFTP setup,
	// and an iPXE script URL without any other boot setting.
	for _, b := range []Boot{
		{TFTPRoot: "/srv/tftp", BootFileEFI: "ipxe.efi"},
		{IPXEScriptURL: "HTTPS://boot.example:8443/menu.ipxe?mac=${net0/mac}"},
		{IPXEScriptURL: "http://10.0.2.2:8000/boot.ipxe"},
	} {
		c := valid()
		b.DHCPLeaseTime = time.Hour
		c.Boot = b
		if err := c.Validate(); err != nil {
			t.Errorf("%+v: %v", b, err)
		}
	}
}

func TestValidateReportsEverything(t *testing.T) {
	c := Default() // no socket
	c.MTU = 1
	c.IPv4.Gateway = netip.MustParseAddr("192.168.0.1")
	c.Boot.Domain = "-"
	err := c.Validate()
	var es Errors
	if !errors.As(err, &es) || len(es) != 4 {
		t.Fatalf("Validate() = %v, want 4 problems", err)
	}
	want := "4 problems:\n\tsocket: one of socket or connect is required\n\tmtu: 1 is out of range 68..65520\n" +
		"\tipv4.gateway: 192.168.0.1 is not inside ipv4.subnet 10.0.2.0/24\n\tboot.domain: \"-\" is not a valid domain name"
	if err.Error() != want {
		t.Fatalf("Validate() =\n%s\nwant\n%s", err, want)
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Key != "socket" {
		t.Fatalf("errors.As(*FieldError) = %v", fe)
	}
}

func TestSetSubnet(t *testing.T) {
	c := Default()
	c.SetSubnet(netip.MustParsePrefix("192.168.50.0/24"))
	if got := []netip.Addr{c.IPv4.Gateway, c.IPv4.DNS, c.IPv4.Guest}; got[0].String() != "192.168.50.2" || got[1].String() != "192.168.50.3" || got[2].String() != "192.168.50.15" {
		t.Fatalf("rebased v4 = %v", got)
	}
	c.SetSubnet(netip.MustParsePrefix("172.16.0.8/29")) // .15 does not fit into .8/29's 3 host bits
	if c.IPv4.Gateway.String() != "172.16.0.10" || c.IPv4.DNS.String() != "172.16.0.11" || c.IPv4.Guest.String() != "192.168.50.15" {
		t.Fatalf("rebased v4 = %v %v %v", c.IPv4.Gateway, c.IPv4.DNS, c.IPv4.Guest)
	}
	c.SetSubnet(netip.MustParsePrefix("fd12:3456::/64"))
	if c.IPv6.Gateway.String() != "fd12:3456::2" || c.IPv6.DNS.String() != "fd12:3456::3" {
		t.Fatalf("rebased v6 = %v %v", c.IPv6.Gateway, c.IPv6.DNS)
	}
	// An address set outside the old subnet is left for Validate to report.
	c.IPv4.Gateway = netip.MustParseAddr("8.8.8.8")
	c.SetSubnet(netip.MustParsePrefix("10.1.0.0/16"))
	if c.IPv4.Gateway.String() != "8.8.8.8" {
		t.Fatalf("gateway outside old subnet moved to %v", c.IPv4.Gateway)
	}
}

func TestParsers(t *testing.T) {
	if _, err := ParseMAC("01:02:03:04:05:06:07:08"); err == nil || err.Error() != "expected a MAC address like 52:54:00:12:34:56" {
		t.Errorf("ParseMAC(EUI-64) error = %v", err)
	}
	if l, err := ParseLogLevel("WARN"); err != nil || l != slog.LevelWarn {
		t.Errorf("ParseLogLevel(WARN) = %v, %v", l, err)
	}
	if _, err := ParseLogLevel("verbose"); err == nil || err.Error() != "expected debug, info, warn or error" {
		t.Errorf("ParseLogLevel(verbose) error = %v", err)
	}
	if _, err := ParseLogFormat("xml"); err == nil || err.Error() != "expected text or json" {
		t.Errorf("ParseLogFormat(xml) error = %v", err)
	}
	for in, want := range map[string]string{
		"1.1.1.1":            "1.1.1.1:53",
		"1.1.1.1:5353":       "1.1.1.1:5353",
		"2606:4700::1111":    "[2606:4700::1111]:53",
		"[2606:4700::1]:853": "[2606:4700::1]:853",
	} {
		if got, err := ParseDNSUpstream(in); err != nil || got.String() != want {
			t.Errorf("ParseDNSUpstream(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, in := range []string{"", "dns.google", "1.1.1.1:0", "1.1.1.1:x", "2606:4700::1111:53:"} {
		if _, err := ParseDNSUpstream(in); err == nil {
			t.Errorf("ParseDNSUpstream(%q) succeeded", in)
		}
	}
	for in, want := range map[time.Duration]string{time.Hour: "1h", 90 * time.Minute: "1h30m", 3 * time.Minute: "3m", 90 * time.Second: "1m30s", 1500 * time.Millisecond: "1.5s", 0: "0s"} {
		if got := formatDuration(in); got != want {
			t.Errorf("formatDuration(%v) = %q, want %q", in, got, want)
		}
	}
}

func TestApplyTOMLOverlaysOnlyPresentKeys(t *testing.T) {
	c := Default()
	c.Socket = "/from/lower/layer"
	c.Once = true
	err := c.ApplyTOML([]byte(`
mtu = 9000
queues = 4
once = false
log_level = "debug"
log_format = "json"
forwards = ["tcp:8000-8001:80-81", "udp:[::1]:53:53"]
dns_upstream = ["9.9.9.9"]
dns_search = ["a.example", "b.example"]
udp_idle_timeout = "45s"
max_connections = 0

[hosts]
"db.example" = "10.0.2.50"

[ipv4]
subnet = "192.168.9.0/24"
guest = "192.168.9.100"

[ipv6]
enable = false

[boot]
tftp_root = "/srv/tftp"
boot_file = "pxelinux.0"
boot_file_efi = "efi/ipxe.efi"
ipxe_script_url = "http://10.0.2.2:8000/boot.ipxe"
dhcp_lease_time = "12h"
hostname = "vm"
`))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Socket = "/from/lower/layer" // untouched: not in the file
	want.Once = false                 // explicitly false in the file wins
	want.MTU = 9000
	want.Queues = 4
	want.LogLevel = slog.LevelDebug
	want.LogFormat = LogJSON
	want.Forwards = []Forward{fwd("tcp", "127.0.0.1:8000", 80), fwd("tcp", "127.0.0.1:8001", 81), fwd("udp", "[::1]:53", 53)}
	want.DNSUpstream = []netip.AddrPort{netip.MustParseAddrPort("9.9.9.9:53")}
	want.DNSSearch = []string{"a.example", "b.example"}
	want.UDPIdleTimeout = 45 * time.Second
	want.MaxConnections = 0
	want.Hosts = map[string]netip.Addr{"db.example": netip.MustParseAddr("10.0.2.50")}
	want.IPv4 = IPv4{ // gateway and DNS follow the subnet, guest is explicit
		Subnet:  netip.MustParsePrefix("192.168.9.0/24"),
		Gateway: netip.MustParseAddr("192.168.9.2"),
		DNS:     netip.MustParseAddr("192.168.9.3"),
		Guest:   netip.MustParseAddr("192.168.9.100"),
	}
	want.IPv6.Enable = false
	want.Boot = Boot{TFTPRoot: "/srv/tftp", BootFile: "pxelinux.0", BootFileEFI: "efi/ipxe.efi", IPXEScriptURL: "http://10.0.2.2:8000/boot.ipxe",
		DHCPLeaseTime: 12 * time.Hour, Hostname: "vm"}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("ApplyTOML result\n got %+v\nwant %+v", c, want)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestApplyTOMLSocketClearsConnect(t *testing.T) {
	c := Default()
	c.Connect = "/lower/qemu.sock"
	if err := c.ApplyTOML([]byte(`socket = "/file/vunet.sock"`)); err != nil {
		t.Fatal(err)
	}
	if c.Socket != "/file/vunet.sock" || c.Connect != "" {
		t.Fatalf("socket %q connect %q", c.Socket, c.Connect)
	}
}

func TestApplyTOMLUnknownKeys(t *testing.T) {
	err := Default().ApplyTOML([]byte("mtu = 1500\nmtuu = 1500\n[ipv4]\ngatway = \"10.0.2.2\"\n[nat]\nx = 1\n"))
	want := "3 problems:\n\tmtuu: unknown key\n\tipv4.gatway: unknown key\n\tnat: unknown key"
	if err == nil || err.Error() != want {
		t.Fatalf("ApplyTOML error =\n%v\nwant\n%s", err, want)
	}
}

func TestApplyTOMLBadValues(t *testing.T) {
	err := Default().ApplyTOML([]byte(`
socket = ""
log_level = "loud"
mac = "52:54:00"
forwards = ["tcp:8080:80", "tcp:x:80"]
dns_upstream = ["dns.google"]
dial_timeout = "10"
[ipv4]
subnet = "fd00::/64"
gateway = "fd00::1"
[ipv6]
dns = "nope"
[hosts]
"a.b" = "c"
[boot]
tftp_root = ""
`))
	want := []string{
		"socket: must not be empty (leave the key out instead)",
		`log_level: "loud": expected debug, info, warn or error`,
		`mac: "52:54:00": expected a MAC address like 52:54:00:12:34:56`,
		`ipv4.subnet: "fd00::/64": expected an IPv4 subnet`,
		`ipv4.gateway: "fd00::1": expected an IPv4 address`,
		`ipv6.dns: "nope": expected an IP address like 10.0.2.2 or fd00::2`,
		`forwards[1]: "tcp:x:80": expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT`,
		`dns_upstream[0]: "dns.google": expected IP[:PORT] like 1.1.1.1, 1.1.1.1:53 or [2606:4700::1111]:53`,
		`hosts."a.b": "c": expected an IP address like 10.0.2.2 or fd00::2`,
		`dial_timeout: "10": expected a duration like 30s, 5m or 1h`,
		"boot.tftp_root: must not be empty (leave the key out instead)",
	}
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("ApplyTOML error = %v, want Errors", err)
	}
	var got []string
	for _, e := range es {
		got = append(got, e.Error())
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ApplyTOML problems\n got %q\nwant %q", got, want)
	}
}

func TestApplyTOMLSyntaxAndTypeErrors(t *testing.T) {
	for in, want := range map[string]string{
		"mtu = ":       "toml: line 1",
		`mtu = "1500"`: `toml: line 1 (last key "mtu"): incompatible types`,
	} {
		err := Default().ApplyTOML([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ApplyTOML(%q) = %v, want it to contain %q", in, err, want)
		}
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vunet.toml")
	if err := os.WriteFile(path, []byte("mtu = 70000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	want := path + ": 2 problems:\n\tsocket: one of socket or connect is required\n\tmtu: 70000 is out of range 68..65520"
	if err == nil || err.Error() != want {
		t.Fatalf("Load() error =\n%v\nwant\n%s", err, want)
	}
	if _, err := Load(filepath.Join(dir, "missing.toml")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load(missing) = %v", err)
	}
	if err := os.WriteFile(path, []byte("bogus = 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil || err.Error() != path+": bogus: unknown key" {
		t.Fatalf("Load(unknown key) = %v", err)
	}
}

// TestExampleFile keeps testdata/vunet.toml, the documented example, valid
// and complete.
func TestExampleFile(t *testing.T) {
	c, err := Load("../testdata/vunet.toml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Forwards) != 7 || len(c.Hosts) != 2 || c.Boot.Hostname != "guest" {
		t.Fatalf("example file not fully read: %+v", c)
	}
}

func TestWriteTOMLRoundTrip(t *testing.T) {
	c := valid()
	c.PIDFile, c.API, c.PCAP = "/run/vunet.pid", "/run/api.sock", "/tmp/x.pcap"
	c.Once = true
	c.MapHostLoopback = false
	c.LogLevel = slog.LevelError
	c.Forwards = []Forward{fwd("tcp", "[::1]:8080", 80), fwd("udp", "0.0.0.0:5353", 53)}
	c.DNSUpstream = []netip.AddrPort{netip.MustParseAddrPort("[2606:4700::1111]:53")}
	c.DNSSearch = []string{"example"}
	c.Hosts = map[string]netip.Addr{"db.example": netip.MustParseAddr("10.0.2.40")}
	c.MaxInflightDials = 0
	c.MaxGuests, c.IsolateGuests = 4, true
	c.IPv4.StaticLeases = []StaticLease{{MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}, Addr: netip.MustParseAddr("10.0.2.50")}}
	c.Boot = Boot{TFTPRoot: "/srv", BootFile: "boot.efi", BootFileEFI: "uefi/boot.efi", HTTPBootURL: "http://h/x", IPXEScriptURL: "tftp://h/boot.ipxe",
		DHCPLeaseTime: 90 * time.Minute, Hostname: "h", Domain: "d"}

	for _, in := range []*Config{valid(), c} {
		var buf bytes.Buffer
		if err := in.WriteTOML(&buf); err != nil {
			t.Fatal(err)
		}
		out := Default()
		if err := out.ApplyTOML(buf.Bytes()); err != nil {
			t.Fatalf("reading back:\n%s\n%v", buf.String(), err)
		}
		if !reflect.DeepEqual(in, out) {
			t.Fatalf("round trip differs\nTOML:\n%s\n got %+v\nwant %+v", buf.String(), out, in)
		}
	}
}

func TestApplyTOMLEgress(t *testing.T) {
	c := Default()
	if c.Egress.Mode != egress.AllowAll || !c.Egress.HostAddresses || c.Egress.AllowMetadata || len(c.Egress.Rules) != 0 {
		t.Fatalf("default egress %+v", c.Egress)
	}
	err := c.ApplyTOML([]byte(`
[egress]
mode = "none"
allow_metadata = true
host_addresses = false
rules = ["allow tcp:10.0.0.0/8:80-443", "deny [fd00::/8]:53"]
`))
	if err != nil {
		t.Fatal(err)
	}
	e := c.Egress
	if e.Mode != egress.AllowNone || !e.AllowMetadata || e.HostAddresses || len(e.Rules) != 2 ||
		e.Rules[0].String() != "allow tcp:10.0.0.0/8:80-443" || e.Rules[1].String() != "deny [fd00::/8]:53" {
		t.Fatalf("egress %+v", e)
	}
	err = Default().ApplyTOML([]byte(`
[egress]
mode = "most"
rules = ["allow 10.0.0.0/8", "permit any", "deny 10.0.0.1/8"]
`))
	for _, want := range []string{`egress.mode: "most": expected all or none`, `egress.rules[1]: "permit any": expected allow or deny`,
		`egress.rules[2]: "deny 10.0.0.1/8"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v, want it to contain %q", err, want)
		}
	}
}

func TestParseSizeAndMode(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "4096": 4096, "500M": 500 << 20, "2G": 2 << 30, "2GiB": 2 << 30, "64k": 64 << 10, "10MB": 10 << 20} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
		if got, err := ParseSize(FormatSize(want)); err != nil || got != want {
			t.Errorf("round trip of %d: %d, %v", want, got, err)
		}
	}
	for _, bad := range []string{"", "-1", "1.5G", "12Q", "G", "99999999999G"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) accepted", bad)
		}
	}
	for in, want := range map[string]uint32{"0600": 0o600, "660": 0o660, "0o640": 0o640} {
		if got, err := ParseSocketMode(in); err != nil || uint32(got) != want {
			t.Errorf("ParseSocketMode(%q) = %o, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "1000", "0689", "rw-"} {
		if _, err := ParseSocketMode(bad); err == nil {
			t.Errorf("ParseSocketMode(%q) accepted", bad)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "4096": 4096, "512KiB": 512 << 10, "256MiB": 256 << 20, "256m": 256 << 20,
		"1G": 1 << 30, "2 GiB": 2 << 30, "1TiB": 1 << 40, "100B": 100,
	} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
		if err == nil {
			if back, err := ParseSize(FormatSize(got)); err != nil || back != got {
				t.Errorf("FormatSize(%d) = %q does not parse back", got, FormatSize(got))
			}
		}
	}
	for _, in := range []string{"", "MiB", "-1", "1.5GiB", "12XB", "99999999999TiB"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

// TestStaticLeasesFromFile: ipv4.static_leases maps MACs to addresses;
// bad MACs, addresses outside the subnet, the gateway, duplicates are
// reported under their key.
func TestStaticLeasesFromFile(t *testing.T) {
	c := valid()
	if err := c.ApplyTOML([]byte(`
[ipv4.static_leases]
"52:54:00:00:00:02" = "10.0.2.60"
"52:54:00:00:00:01" = "10.0.2.50"
`)); err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	want := []StaticLease{
		{MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}, Addr: netip.MustParseAddr("10.0.2.50")},
		{MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 2}, Addr: netip.MustParseAddr("10.0.2.60")},
	}
	if !reflect.DeepEqual(c.IPv4.StaticLeases, want) {
		t.Fatalf("static leases %v, want %v", c.IPv4.StaticLeases, want)
	}
	for _, bad := range []string{
		`"nope" = "10.0.2.50"`,
		`"52:54:00:00:00:01" = "10.0.3.50"`,
		`"52:54:00:00:00:01" = "10.0.2.2"`,
		`"53:54:00:00:00:01" = "10.0.2.50"`,
		`"52:54:00:00:00:01" = "10.0.2.50"` + "\n" + `"52:54:00:00:00:02" = "10.0.2.50"`,
	} {
		c := valid()
		err := c.ApplyTOML([]byte("[ipv4.static_leases]\n" + bad))
		if err == nil {
			err = c.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), "ipv4.static_leases") {
			t.Errorf("%s: err %v, want one naming ipv4.static_leases", bad, err)
		}
	}
}
