package main

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/internal/version"
)

// result is what one invocation of the app produced.
type result struct {
	stdout, stderr string
	err            error
	cfg            *config.Config // what the appliance would have run with
}

// line is the error line main would print.
func (r result) line() string {
	if r.err == nil {
		return ""
	}
	return "vunet: " + r.err.Error()
}

// clearEnv unsets every VUNET_ variable for the test, so the developer's
// environment cannot leak into precedence tests.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "VUNET_") {
			t.Setenv(k, "") // registers the restore
			os.Unsetenv(k)
		}
	}
}

// runVunetWith runs the app with args and env, using run as the appliance.
func runVunetWith(t *testing.T, run runFunc, env map[string]string, args ...string) result {
	t.Helper()
	clearEnv(t)
	for k, v := range env {
		t.Setenv(k, v)
	}
	var r result
	if run == nil {
		run = func(_ context.Context, cfg *config.Config, _ *slog.Logger) error {
			r.cfg = cfg
			return nil
		}
	}
	app := buildApp(run)
	var out, errOut bytes.Buffer
	app.Writer, app.ErrWriter = &out, &errOut
	r.err = app.Run(append([]string{"vunet"}, args...))
	r.stdout, r.stderr = out.String(), errOut.String()
	return r
}

func runVunet(t *testing.T, env map[string]string, args ...string) result {
	t.Helper()
	return runVunetWith(t, nil, env, args...)
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFlags(t *testing.T) {
	r := runVunet(t, nil,
		"--socket", "/run/v.sock",
		"--once",
		"--pid-file", filepath.Join(t.TempDir(), "v.pid"),
		"--api", "/run/api.sock",
		"--log-level", "debug",
		"--log-format", "json",
		"--pcap", "/tmp/v.pcap",
		"--mtu", "9000",
		"--queues", "2",
		"--mac", "52:54:00:aa:bb:cc",
		"--subnet", "192.168.77.0/24", "--subnet", "fd77::/64",
		"--gateway", "192.168.77.1",
		"--dns", "fd77::53",
		"--no-ipv6",
		"--dhcpv6", "Stateful",
		"--no-map-host-loopback",
		"--forward", "tcp:2222:22", "--forward", "udp:[::1]:5353-5354:53-54",
		"--dns-upstream", "9.9.9.9", "--dns-upstream", "[2620:fe::fe]:5353",
		"--tftp-root", "/srv/tftp",
		"--boot-file", "pxelinux.0",
		"--boot-file-efi", "efi/ipxe.efi",
		"--ipxe-script-url", "http://10.0.2.2:8000/boot.ipxe",
	)
	if r.err != nil {
		t.Fatal(r.line())
	}
	want := config.Default()
	want.Socket = "/run/v.sock"
	want.Once = true
	want.PIDFile = r.cfg.PIDFile
	want.API = "/run/api.sock"
	want.LogLevel = slog.LevelDebug
	want.LogFormat = config.LogJSON
	want.PCAP = "/tmp/v.pcap"
	want.MTU = 9000
	want.Queues = 2
	want.MAC = net.HardwareAddr{0x52, 0x54, 0, 0xaa, 0xbb, 0xcc}
	want.IPv4 = config.IPv4{
		Subnet:  netip.MustParsePrefix("192.168.77.0/24"),
		Gateway: netip.MustParseAddr("192.168.77.1"),
		DNS:     netip.MustParseAddr("192.168.77.3"), // moved along with the subnet
		Guest:   netip.MustParseAddr("192.168.77.15"),
	}
	want.IPv6 = config.IPv6{
		Enable:  false,
		Subnet:  netip.MustParsePrefix("fd77::/64"),
		Gateway: netip.MustParseAddr("fd77::2"),
		DNS:     netip.MustParseAddr("fd77::53"),
		DHCPv6:  config.DHCPv6Stateful,
	}
	want.MapHostLoopback = false
	want.Forwards = []config.Forward{
		{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:2222"), GuestPort: 22},
		{Proto: "udp", Host: netip.MustParseAddrPort("[::1]:5353"), GuestPort: 53},
		{Proto: "udp", Host: netip.MustParseAddrPort("[::1]:5354"), GuestPort: 54},
	}
	want.DNSUpstream = []netip.AddrPort{netip.MustParseAddrPort("9.9.9.9:53"), netip.MustParseAddrPort("[2620:fe::fe]:5353")}
	want.Boot.TFTPRoot = "/srv/tftp"
	want.Boot.BootFile = "pxelinux.0"
	want.Boot.BootFileEFI = "efi/ipxe.efi"
	want.Boot.IPXEScriptURL = "http://10.0.2.2:8000/boot.ipxe"
	if !reflect.DeepEqual(r.cfg, want) {
		t.Fatalf("config\n got %+v\nwant %+v", r.cfg, want)
	}
}

// TestSandboxSettings: on by default, and each layer can change the mode
// and the user.
func TestSandboxSettings(t *testing.T) {
	file := filepath.Join(t.TempDir(), "v.toml")
	if err := os.WriteFile(file, []byte("socket = \"/run/v.sock\"\nsandbox = \"log\"\nrunas = \"65534:65534\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		env   map[string]string
		args  []string
		mode  config.Sandbox
		runas string
	}{
		{nil, []string{"--socket", "/run/v.sock"}, config.SandboxOn, "nobody"},
		{nil, []string{"--config", file}, config.SandboxLog, "65534:65534"},
		{map[string]string{"VUNET_SANDBOX": "off"}, []string{"--config", file}, config.SandboxOff, "65534:65534"},
		{map[string]string{"VUNET_SANDBOX": "off"}, []string{"--config", file, "--sandbox", "ON", "--runas", "daemon"}, config.SandboxOn, "daemon"},
	}
	for _, tt := range tests {
		r := runVunet(t, tt.env, tt.args...)
		if r.err != nil {
			t.Fatal(r.line())
		}
		if r.cfg.Sandbox != tt.mode || r.cfg.RunAs != tt.runas {
			t.Errorf("%v %v: sandbox %q runas %q, want %q %q", tt.env, tt.args, r.cfg.Sandbox, r.cfg.RunAs, tt.mode, tt.runas)
		}
	}
}

func TestConnectMode(t *testing.T) {
	r := runVunet(t, nil, "--connect", "/run/qemu.sock")
	if r.err != nil || r.cfg.Connect != "/run/qemu.sock" || r.cfg.Socket != "" {
		t.Fatalf("%s %+v", r.line(), r.cfg)
	}
}

// TestBadInvocations checks that each mistake yields one line naming the
// flag and the expected form, and exit status 2.
func TestBadInvocations(t *testing.T) {
	sock := []string{"--socket", "/run/v.sock"}
	tests := []struct {
		args []string
		env  map[string]string
		want string
	}{
		{append(sock, "--forward", "tcp:x:80"), nil, `vunet: --forward "tcp:x:80": expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT`},
		{append(sock, "--forward", "tcp:8080:80", "--forward", "icmp:1:1"), nil, `vunet: --forward "icmp:1:1": expected tcp|udp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT`},
		{append(sock, "--forward", "tcp:::1:8080:80"), nil, `vunet: --forward "tcp:::1:8080:80": IPv6 host address must be in brackets, as in "tcp:[::1]:8080:80"`},
		{sock, map[string]string{"VUNET_FORWARD": "udp:70000:53"}, `vunet: --forward "udp:70000:53": host port 70000 is out of range 1..65535`},
		{append(sock, "--mtu", "big"), nil, `vunet: --mtu "big": expected an integer 68..65520`},
		{append(sock, "--queues", "two"), nil, `vunet: --queues "two": expected an integer 1..16`},
		{append(sock, "--mac", "52:54:00"), nil, `vunet: --mac "52:54:00": expected a MAC address like 52:54:00:12:34:56`},
		{append(sock, "--subnet", "10.0.2/24"), nil, `vunet: --subnet "10.0.2/24": expected a subnet like 10.0.2.0/24 or fd00::/64`},
		{append(sock, "--subnet", "10.1.0.0/24", "--subnet", "10.2.0.0/24"), nil, `vunet: --subnet "10.2.0.0/24": IPv4 already given as "10.1.0.0/24"; give at most one per family`},
		{append(sock, "--gateway", "gw"), nil, `vunet: --gateway "gw": expected an IP address like 10.0.2.2 or fd00::2`},
		{append(sock, "--dns", "fd00::3", "--dns", "fd00::4"), nil, `vunet: --dns "fd00::4": IPv6 already given as "fd00::3"; give at most one per family`},
		{append(sock, "--dns-upstream", "dns.google"), nil, `vunet: --dns-upstream "dns.google": expected IP[:PORT] like 1.1.1.1, 1.1.1.1:53 or [2606:4700::1111]:53`},
		{append(sock, "--log-level", "verbose"), nil, `vunet: --log-level "verbose": expected debug, info, warn or error`},
		{sock, map[string]string{"VUNET_LOG_FORMAT": "xml"}, `vunet: --log-format "xml": expected text or json`},
		{append(sock, "--pid-file", ""), nil, `vunet: --pid-file "": must not be empty`},
		{[]string{"--socket", ""}, nil, `vunet: --socket "": must not be empty`},
		{append(sock, "--config", ""), nil, `vunet: --config "": expected a file name`},
		{append(sock, "--frobnicate"), nil, "vunet: flag provided but not defined: -frobnicate (see 'vunet --help')"},
		{append(sock, "--once=maybe"), nil, `vunet: invalid boolean value "maybe" for -once: parse error (see 'vunet --help')`},
		{append(sock, "qemuargs"), nil, `vunet: unknown command "qemuargs" (see 'vunet --help')`},
		// Values that parse but do not validate are reported under the flag.
		{append(sock, "--mtu", "70000"), nil, "vunet: --mtu: 70000 is out of range 68..65520"},
		{append(sock, "--queues", "17"), nil, "vunet: --queues: 17 is out of range 1..16"},
		{append(sock, "--gateway", "10.9.9.9"), nil, "vunet: --gateway: 10.9.9.9 is not inside ipv4.subnet 10.0.2.0/24"},
		{append(sock, "--forward", "tcp:8080:80", "--forward", "tcp:8079-8080:79-80"), nil, "vunet: --forward: tcp:127.0.0.1:8080 is forwarded more than once"},
		{append(sock, "--connect", "/run/q.sock"), nil, "vunet: --connect: socket and connect are mutually exclusive; set only one"},
		{sock, map[string]string{"VUNET_CONNECT": "/run/q.sock"}, "vunet: --connect: socket and connect are mutually exclusive; set only one"},
		{append(sock, "--boot-file", "x.efi"), nil, "vunet: --boot-file: is set but neither boot.tftp_root nor boot.http_boot_url is"},
		{append(sock, "--boot-file-efi", "x.efi"), nil, "vunet: --boot-file-efi: is set but boot.tftp_root is not"},
		{append(sock, "--tftp-root", "/srv", "--boot-file-efi", "../x.efi"), nil, `vunet: --boot-file-efi: "../x.efi" must be a relative path inside boot.tftp_root`},
		{append(sock, "--ipxe-script-url", "ftp://h/boot.ipxe"), nil, `vunet: --ipxe-script-url: "ftp://h/boot.ipxe" is not an http://, https:// or tftp:// URL`},
		{sock, map[string]string{"VUNET_IPXE_SCRIPT_URL": "boot.ipxe"}, `vunet: --ipxe-script-url: "boot.ipxe" is not an http://, https:// or tftp:// URL`},
		{append(sock, "--ipxe-script-url", ""), nil, `vunet: --ipxe-script-url "": must not be empty`},
		{append(sock, "--sandbox", "strict"), nil, `vunet: --sandbox "strict": expected on, off or log`},
		{append(sock, "--dhcpv6", "dhcp"), nil, `vunet: --dhcpv6 "dhcp": expected stateless or stateful`},
		{sock, map[string]string{"VUNET_RUNAS": "a:b:c"}, `vunet: --runas "a:b:c": expected USER[:GROUP], names or numeric ids`},
		{append(sock, "--runas", "nobody:"), nil, `vunet: --runas "nobody:": expected USER[:GROUP], names or numeric ids`},
	}
	for _, tt := range tests {
		r := runVunet(t, tt.env, tt.args...)
		if r.err == nil {
			t.Errorf("vunet %q: succeeded, want %s", tt.args, tt.want)
			continue
		}
		if got := r.line(); got != tt.want {
			t.Errorf("vunet %q:\n got %s\nwant %s", tt.args, got, tt.want)
		}
		if code := exitCode(r.err); code != 2 {
			t.Errorf("vunet %q: exit code %d, want 2", tt.args, code)
		}
		if r.cfg != nil {
			t.Errorf("vunet %q: appliance ran", tt.args)
		}
		if r.stdout != "" || r.stderr != "" {
			t.Errorf("vunet %q: printed %q %q besides the error", tt.args, r.stdout, r.stderr)
		}
	}
}

func TestConfigFileErrors(t *testing.T) {
	bad := writeFile(t, "bad.toml", "mtu = 70000\nmtuu = 1\n")
	r := runVunet(t, nil, "--socket", "/run/v.sock", "--config", bad)
	want := "vunet: " + bad + ": mtuu: unknown key"
	if r.line() != want || exitCode(r.err) != 1 {
		t.Fatalf("got %q (exit %d), want %q", r.line(), exitCode(r.err), want)
	}

	invalid := writeFile(t, "invalid.toml", "mtu = 70000\nmac = \"01:00:00:00:00:01\"\n")
	r = runVunet(t, nil, "--socket", "/run/v.sock", "--config", invalid)
	want = "vunet: 2 problems:\n\tmtu: 70000 is out of range 68..65520\n\tmac: 01:00:00:00:00:01 is a multicast address; the first octet must be even"
	if r.line() != want || exitCode(r.err) != 1 {
		t.Fatalf("got %q (exit %d), want %q", r.line(), exitCode(r.err), want)
	}

	r = runVunet(t, nil, "--socket", "/run/v.sock", "--config", filepath.Join(t.TempDir(), "missing.toml"))
	if r.err == nil || !errors.Is(r.err, os.ErrNotExist) {
		t.Fatalf("missing config file: %v", r.err)
	}
}

// TestPrecedence checks flag > env > file > default for a scalar, a list, a
// negated boolean and the socket/connect choice.
func TestPrecedence(t *testing.T) {
	file := writeFile(t, "vunet.toml", `
socket = "/file.sock"
mtu = 2000
map_host_loopback = false
forwards = ["tcp:1000:10"]
log_level = "warn"
`)
	empty := writeFile(t, "empty.toml", `socket = "/file.sock"`)
	tests := []struct {
		name string
		file string
		env  map[string]string
		args []string
		// expectations
		mtu     int
		fwdPort uint16 // host port of the only forward, 0 = none
		mapLo   bool
		level   slog.Level
		socket  string
		connect string
	}{
		{name: "default", file: empty,
			mtu: 1500, mapLo: true, level: slog.LevelInfo, socket: "/file.sock"},
		{name: "file", file: file,
			mtu: 2000, fwdPort: 1000, mapLo: false, level: slog.LevelWarn, socket: "/file.sock"},
		{name: "env beats file", file: file,
			env: map[string]string{"VUNET_MTU": "3000", "VUNET_FORWARD": "tcp:3000:30", "VUNET_NO_MAP_HOST_LOOPBACK": "false", "VUNET_LOG_LEVEL": "error", "VUNET_CONNECT": "/env.sock"},
			mtu: 3000, fwdPort: 3000, mapLo: true, level: slog.LevelError, connect: "/env.sock"},
		{name: "flag beats env and file", file: file,
			env:  map[string]string{"VUNET_MTU": "3000", "VUNET_FORWARD": "tcp:3000:30", "VUNET_NO_MAP_HOST_LOOPBACK": "true", "VUNET_LOG_LEVEL": "error", "VUNET_SOCKET": "/env.sock"},
			args: []string{"--mtu", "4000", "--forward", "tcp:4000:40", "--no-map-host-loopback=false", "--log-level", "debug", "--socket", "/flag.sock"},
			mtu:  4000, fwdPort: 4000, mapLo: true, level: slog.LevelDebug, socket: "/flag.sock"},
		{name: "env without file", file: "",
			env: map[string]string{"VUNET_MTU": "3000", "VUNET_SOCKET": "/env.sock", "VUNET_NO_MAP_HOST_LOOPBACK": "1"},
			mtu: 3000, mapLo: false, level: slog.LevelInfo, socket: "/env.sock"},
		{name: "config from env", file: "",
			env: map[string]string{"VUNET_CONFIG": file},
			mtu: 2000, fwdPort: 1000, mapLo: false, level: slog.LevelWarn, socket: "/file.sock"},
		{name: "flag beats default", file: empty,
			args: []string{"--mtu", "5000"},
			mtu:  5000, mapLo: true, level: slog.LevelInfo, socket: "/file.sock"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			if tt.file != "" {
				args = append([]string{"--config", tt.file}, args...)
			}
			r := runVunet(t, tt.env, args...)
			if r.err != nil {
				t.Fatal(r.line())
			}
			c := r.cfg
			var port uint16
			if len(c.Forwards) == 1 {
				port = c.Forwards[0].Host.Port()
			} else if len(c.Forwards) > 1 {
				t.Fatalf("forwards %v: lists must replace, not extend", c.Forwards)
			}
			if c.MTU != tt.mtu || port != tt.fwdPort || c.MapHostLoopback != tt.mapLo || c.LogLevel != tt.level || c.Socket != tt.socket || c.Connect != tt.connect {
				t.Fatalf("got mtu=%d fwd=%d mapLo=%v level=%v socket=%q connect=%q\nwant mtu=%d fwd=%d mapLo=%v level=%v socket=%q connect=%q",
					c.MTU, port, c.MapHostLoopback, c.LogLevel, c.Socket, c.Connect,
					tt.mtu, tt.fwdPort, tt.mapLo, tt.level, tt.socket, tt.connect)
			}
		})
	}
}

// TestNetbootFlags checks the layering of the UEFI and iPXE boot settings:
// file, then environment, then flag.
func TestNetbootFlags(t *testing.T) {
	file := writeFile(t, "vunet.toml", `
socket = "/file.sock"
[boot]
tftp_root = "/srv/tftp"
boot_file_efi = "file.efi"
ipxe_script_url = "tftp://10.0.2.2/file.ipxe"
`)
	for _, tt := range []struct {
		name         string
		env          map[string]string
		args         []string
		efi, ipxeURL string
	}{
		{"file", nil, nil, "file.efi", "tftp://10.0.2.2/file.ipxe"},
		{"env beats file", map[string]string{"VUNET_BOOT_FILE_EFI": "env.efi", "VUNET_IPXE_SCRIPT_URL": "http://10.0.2.2/env.ipxe"}, nil,
			"env.efi", "http://10.0.2.2/env.ipxe"},
		{"flag beats env", map[string]string{"VUNET_BOOT_FILE_EFI": "env.efi", "VUNET_IPXE_SCRIPT_URL": "http://10.0.2.2/env.ipxe"},
			[]string{"--boot-file-efi", "efi/flag.efi", "--ipxe-script-url", "https://boot.example/flag.ipxe"},
			"efi/flag.efi", "https://boot.example/flag.ipxe"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := runVunet(t, tt.env, append([]string{"--config", file}, tt.args...)...)
			if r.err != nil {
				t.Fatal(r.line())
			}
			if b := r.cfg.Boot; b.BootFileEFI != tt.efi || b.IPXEScriptURL != tt.ipxeURL {
				t.Errorf("boot_file_efi %q, ipxe_script_url %q; want %q, %q", b.BootFileEFI, b.IPXEScriptURL, tt.efi, tt.ipxeURL)
			}
		})
	}
}

// TestMaxMemory: --max-memory, its environment variable and its config key
// set the budget in any unit; nonsense and too small budgets are refused,
// naming the flag.
func TestMaxMemory(t *testing.T) {
	if r := runVunet(t, nil, "--socket", "/run/v.sock"); r.err != nil || r.cfg.MaxMemory != config.DefaultMaxMemory {
		t.Fatalf("default: %v, %+v", r.err, r.cfg)
	}
	if r := runVunet(t, nil, "--socket", "/run/v.sock", "--max-memory", "1GiB"); r.err != nil || r.cfg.MaxMemory != 1<<30 {
		t.Fatalf("--max-memory 1GiB: %s", r.line())
	}
	if r := runVunet(t, map[string]string{"VUNET_MAX_MEMORY": "64M"}, "--socket", "/run/v.sock"); r.err != nil || r.cfg.MaxMemory != 64<<20 {
		t.Fatalf("VUNET_MAX_MEMORY=64M: %s", r.line())
	}
	file := writeFile(t, "v.toml", "socket = \"/run/v.sock\"\nmax_memory = \"512MiB\"\n")
	if r := runVunet(t, nil, "--config", file); r.err != nil || r.cfg.MaxMemory != 512<<20 {
		t.Fatalf("max_memory in the file: %s", r.line())
	}
	for _, bad := range []string{"lots", "-5MiB", "1MiB"} {
		r := runVunet(t, nil, "--socket", "/run/v.sock", "--max-memory", bad)
		if r.err == nil || !strings.Contains(r.err.Error(), "--max-memory") {
			t.Errorf("--max-memory %s: err %v, want one naming the flag", bad, r.err)
		}
	}
}

// TestMaxGuestMemory: --max-guest-memory, VUNET_MAX_GUEST_MEMORY and
// max_guest_memory set one guest's memory cap; auto (the default) is 0,
// an equal share; a cap below 1MiB or above --max-memory is refused.
func TestMaxGuestMemory(t *testing.T) {
	if r := runVunet(t, nil, "--socket", "/run/v.sock"); r.err != nil || r.cfg.MaxGuestMemory != 0 {
		t.Fatalf("default: %v, %+v", r.err, r.cfg)
	}
	if r := runVunet(t, nil, "--socket", "/run/v.sock", "--max-guest-memory", "64MiB"); r.err != nil || r.cfg.MaxGuestMemory != 64<<20 {
		t.Fatalf("--max-guest-memory 64MiB: %s", r.line())
	}
	if r := runVunet(t, map[string]string{"VUNET_MAX_GUEST_MEMORY": "32MiB"}, "--socket", "/run/v.sock"); r.err != nil || r.cfg.MaxGuestMemory != 32<<20 {
		t.Fatalf("VUNET_MAX_GUEST_MEMORY=32MiB: %s", r.line())
	}
	file := writeFile(t, "v.toml", "socket = \"/run/v.sock\"\nmax_guest_memory = \"auto\"\n")
	if r := runVunet(t, nil, "--config", file, "--max-guests", "2"); r.err != nil || r.cfg.MaxGuestMemory != 0 {
		t.Fatalf("max_guest_memory = auto in the file: %s", r.line())
	}
	for _, bad := range []string{"lots", "512KiB", "1GiB"} {
		r := runVunet(t, nil, "--socket", "/run/v.sock", "--max-guest-memory", bad)
		if r.err == nil || !strings.Contains(r.err.Error(), "--max-guest-memory") {
			t.Errorf("--max-guest-memory %s: err %v, want one naming the flag", bad, r.err)
		}
	}
}

// TestEveryFlagHasEnvAndKey guards the convention documented in docs/cli.md.
func TestEveryFlagHasEnvAndKey(t *testing.T) {
	noKey := map[string]bool{flagConfig: true, flagPrintConfig: true}
	keyed := map[string]bool{flagOnce: true, flagLogLevel: true, flagLogFormat: true, flagNoIPv6: true, flagNoMapHostLoopback: true,
		flagDeny: true} // --deny shares egress.rules with --allow
	for _, key := range []string{"socket", "connect", "pid_file", "api", "pcap", "mtu", "queues", "mac", "ipv4.subnet", "ipv4.gateway", "ipv4.dns", "forwards", "dns_upstream", "boot.tftp_root", "boot.boot_file", "boot.boot_file_efi", "boot.ipxe_script_url",
		"egress.mode", "egress.allow_metadata", "egress.host_addresses", "egress.rules", "max_memory",
		"socket_mode", "socket_group", "setup_timeout", "pcap_max_size", "sandbox", "runas", "ipv6.dhcpv6", "expose",
		"max_guests", "isolate_guests", "unix_forward_dir", "migrate_tcp", "max_guest_memory"} {
		keyed[flagForKey(key)] = true
	}
	for _, f := range runFlags() {
		name := f.Names()[0]
		if name == flagPrintConfig {
			continue
		}
		want := "VUNET_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
		var env []string
		switch f := f.(type) {
		case *cli.StringFlag:
			env = f.EnvVars
		case *cli.StringSliceFlag:
			env = f.EnvVars
		case *cli.BoolFlag:
			env = f.EnvVars
		case *cli.GenericFlag:
			env = f.EnvVars
		}
		if !reflect.DeepEqual(env, []string{want}) {
			t.Errorf("--%s: env vars %v, want [%s]", name, env, want)
		}
		if !noKey[name] && !keyed[name] {
			t.Errorf("--%s has no config-file key", name)
		}
	}
}

func TestPrintConfig(t *testing.T) {
	r := runVunet(t, nil, "--socket", "/run/v.sock", "--subnet", "192.168.9.0/24", "--print-config")
	if r.err != nil {
		t.Fatal(r.line())
	}
	if r.cfg != nil {
		t.Fatal("--print-config ran the appliance")
	}
	c := config.Default()
	if err := c.ApplyTOML([]byte(r.stdout)); err != nil {
		t.Fatalf("printed config does not read back: %v\n%s", err, r.stdout)
	}
	if c.Socket != "/run/v.sock" || c.IPv4.Gateway.String() != "192.168.9.2" {
		t.Fatalf("printed config:\n%s", r.stdout)
	}
}

func TestPIDFileAndLogger(t *testing.T) {
	pid := filepath.Join(t.TempDir(), "vunet.pid")
	var during string
	run := func(_ context.Context, cfg *config.Config, log *slog.Logger) error {
		b, err := os.ReadFile(pid)
		if err != nil {
			return err
		}
		during = string(b)
		log.Debug("hidden")
		log.Warn("shown", "k", "v")
		return nil
	}
	r := runVunetWith(t, run, nil, "--socket", "/run/v.sock", "--pid-file", pid, "--log-level", "warn", "--log-format", "json")
	if r.err != nil {
		t.Fatal(r.line())
	}
	if during != strconv.Itoa(os.Getpid())+"\n" {
		t.Fatalf("pid file held %q while running", during)
	}
	if _, err := os.Stat(pid); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pid file not removed on exit: %v", err)
	}
	if strings.Contains(r.stderr, "hidden") || !strings.Contains(r.stderr, `"msg":"shown","k":"v"`) {
		t.Fatalf("log output %q", r.stderr)
	}
}

func TestRunErrorIsReturned(t *testing.T) {
	boom := errors.New("boom")
	r := runVunetWith(t, func(context.Context, *config.Config, *slog.Logger) error { return boom }, nil, "--socket", "/run/v.sock")
	if !errors.Is(r.err, boom) || exitCode(r.err) != 1 {
		t.Fatalf("err %v exit %d", r.err, exitCode(r.err))
	}
}

func TestSignalStopsCleanly(t *testing.T) {
	run := func(ctx context.Context, _ *config.Config, _ *slog.Logger) error {
		if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Second):
			return errors.New("SIGTERM did not cancel the context")
		}
	}
	r := runVunetWith(t, run, nil, "--socket", "/run/v.sock")
	if r.err != nil {
		t.Fatalf("stopping on SIGTERM: %v", r.err)
	}
}

func TestVersion(t *testing.T) {
	r := runVunet(t, nil, "version")
	want := "vunet " + version.Version + "\n" + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH + "\n"
	if r.err != nil || r.stdout != want {
		t.Fatalf("version: %v\n got %q\nwant %q", r.err, r.stdout, want)
	}
}

func TestCompletion(t *testing.T) {
	r := runVunet(t, nil, "completion", "bash")
	if r.err != nil || !strings.Contains(r.stdout, "complete -o default -F _vunet_complete vunet") {
		t.Fatalf("completion: %v %q", r.err, r.stdout)
	}
	// urfave/cli derives the candidates from os.Args, which in a test are
	// the test binary's flags, so only check that completion mode does not
	// start the appliance.
	r = runVunet(t, nil, "--socket", "/run/v.sock", "--generate-bash-completion")
	if r.err != nil || r.cfg != nil {
		t.Error("completion ran the appliance")
	}
}

// TestQEMUArgsGolden compares qemu-args output with testdata/*.golden. Set
// VUNET_UPDATE_GOLDEN=1 to rewrite the files after an intended change.
func TestQEMUArgsGolden(t *testing.T) {
	tests := []struct {
		golden string
		args   []string
	}{
		{"qemu-args.golden", []string{"qemu-args", "--socket", "/run/user/1000/vunet.sock"}},
		{"qemu-args-connect.golden", []string{"qemu-args", "--connect", "/tmp/a,b'<c>.sock", "--mem", "4G", "--mac", "52:54:00:00:00:01"}},
		{"qemu-args-plain.golden", []string{"qemu-args", "--socket", "/run/vunet.sock", "--plain"}},
		{"qemu-args-tcg.golden", []string{"qemu-args", "--connect", "/var/lib/vunet/vm1.sock", "--accel", "tcg", "--mem", "1G"}},
		{"qemu-args-packed.golden", []string{"qemu-args", "--socket", "/run/vunet.sock", "--accel", "tcg", "--packed"}},
		{"qemu-args-mq-tcg.golden", []string{"qemu-args", "--socket", "/run/vunet.sock", "--queues", "2", "--accel", "tcg"}},
		{"qemu-args-mq-plain.golden", []string{"qemu-args", "--socket", "/run/vunet.sock", "--queues", "4", "--plain"}},
	}
	update := os.Getenv("VUNET_UPDATE_GOLDEN") == "1"
	for _, tt := range tests {
		r := runVunet(t, nil, tt.args...)
		if r.err != nil {
			t.Fatalf("%v: %s", tt.args, r.line())
		}
		path := filepath.Join("testdata", tt.golden)
		if update {
			if err := os.WriteFile(path, []byte(r.stdout), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if r.stdout != string(want) {
			t.Errorf("%v output differs from %s:\n got:\n%s\nwant:\n%s", tt.args, path, r.stdout, want)
		}
	}
}

func TestQEMUArgsFromConfigAndEnv(t *testing.T) {
	file := writeFile(t, "vunet.toml", "socket = \"/file.sock\"\nmac = \"52:54:00:00:00:99\"\nqueues = 3\n")
	r := runVunet(t, map[string]string{"VUNET_MEM": "1G"}, "qemu-args", "--config", file, "--plain")
	if r.err != nil {
		t.Fatal(r.line())
	}
	for _, want := range []string{"size=1G\n", "path=/file.sock\n", "mac=52:54:00:00:00:99,mq=on\n", "chardev=vunet0,queues=3\n"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("output lacks %q:\n%s", want, r.stdout)
		}
	}
}

func TestQEMUArgsErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"qemu-args", "--socket", "/s", "--mem", "lots"}, `vunet: --mem "lots": expected a size like 512M or 4G`},
		{[]string{"qemu-args", "--socket", "/s", "--mem", "512MM"}, `vunet: --mem "512MM": expected a size like 512M or 4G`},
		{[]string{"qemu-args", "--socket", "/s", "--mac", "zz"}, `vunet: --mac "zz": expected a MAC address like 52:54:00:12:34:56`},
		{[]string{"qemu-args", "--socket", "/s", "--mac", "01:00:00:00:00:01"}, "vunet: qemu-args: mac: 01:00:00:00:00:01 is a multicast address; the first octet must be even"},
		{[]string{"qemu-args", "--socket", "/s", "--connect", "/c"}, "vunet: qemu-args: --socket and --connect are mutually exclusive"},
		{[]string{"qemu-args", "--socket", "/s", "extra"}, `vunet: qemu-args: unexpected argument "extra"`},
		{[]string{"qemu-args", "--socket", "/s", "--accel", "hvf"}, `vunet: --accel "hvf": expected kvm or tcg`},
		{[]string{"qemu-args", "--socket", "/s", "--queues", "0"}, `vunet: --queues "0": expected an integer 1..16`},
		{[]string{"qemu-args", "--socket", "/s", "--queues", "two"}, `vunet: --queues "two": expected an integer 1..16`},
		{[]string{"qemu-args", "--bogus"}, "vunet: flag provided but not defined: -bogus (see 'vunet qemu-args --help')"},
	}
	for _, tt := range tests {
		r := runVunet(t, nil, tt.args...)
		if r.line() != tt.want || exitCode(r.err) != 2 {
			t.Errorf("vunet %q:\n got %s (exit %d)\nwant %s", tt.args, r.line(), exitCode(r.err), tt.want)
		}
	}
}

func TestValidMemSize(t *testing.T) {
	for s, want := range map[string]bool{"512M": true, "4G": true, "1073741824": true, "2t": true, "0": false, "0M": false, "M": false, "": false, "1.5G": false, "512MB": false, "-1G": false} {
		if got := validMemSize(s); got != want {
			t.Errorf("validMemSize(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestManPage(t *testing.T) {
	var out bytes.Buffer
	app := newApp()
	app.Writer = &out
	if err := app.Run([]string{"vunet", "man"}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{".SH NAME", "vunet", "--socket", "--forward", "qemu-args"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("man page lacks %q", want)
		}
	}
}
