package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/internal/sandbox"
	"github.com/vunet/vunet/internal/systemd"
	"github.com/vunet/vunet/internal/unixsock"
)

// Flag names. Each is also an environment variable VUNET_<NAME> (upper
// case, '-' → '_') and, except config and print-config, a config-file key
// (see flagForKey).
const (
	flagConfig            = "config"
	flagSocket            = "socket"
	flagConnect           = "connect"
	flagOnce              = "once"
	flagPIDFile           = "pid-file"
	flagAPI               = "api"
	flagLogLevel          = "log-level"
	flagLogFormat         = "log-format"
	flagPCAP              = "pcap"
	flagMTU               = "mtu"
	flagQueues            = "queues"
	flagMAC               = "mac"
	flagSubnet            = "subnet"
	flagGateway           = "gateway"
	flagDNS               = "dns"
	flagNoIPv6            = "no-ipv6"
	flagDHCPv6            = "dhcpv6"
	flagNoMapHostLoopback = "no-map-host-loopback"
	flagForward           = "forward"
	flagExpose            = "expose"
	flagDNSUpstream       = "dns-upstream"
	flagTFTPRoot          = "tftp-root"
	flagBootFile          = "boot-file"
	flagBootFileEFI       = "boot-file-efi"
	flagIPXEScriptURL     = "ipxe-script-url"
	flagMaxMemory         = "max-memory"
	flagMaxGuests         = "max-guests"
	flagMaxGuestMemory    = "max-guest-memory"
	flagIsolateGuests     = "isolate-guests"
	flagPrintConfig       = "print-config"
	flagSandbox           = "sandbox"
	flagRunAs             = "runas"
	flagMigrateTCP        = "migrate-tcp"
)

// flagForKey returns the flag that sets a config key (as named in
// validation errors), so a bad value given on the command line is reported
// under the flag the user typed; "" when no flag sets the key.
func flagForKey(key string) string {
	switch key {
	case "socket", "connect", "api", "pcap", "mtu", "queues", "mac", "sandbox", "runas":
		return key
	case "max_guests":
		return flagMaxGuests
	case "max_guest_memory":
		return flagMaxGuestMemory
	case "isolate_guests":
		return flagIsolateGuests
	case "migrate_tcp":
		return flagMigrateTCP
	case "pid_file":
		return flagPIDFile
	case "ipv4.subnet", "ipv6.subnet":
		return flagSubnet
	case "ipv4.gateway", "ipv6.gateway":
		return flagGateway
	case "ipv4.dns", "ipv6.dns":
		return flagDNS
	case "forwards":
		return flagForward
	case "expose":
		return flagExpose
	case "max_memory":
		return flagMaxMemory
	case "dns_upstream":
		return flagDNSUpstream
	case "boot.tftp_root":
		return flagTFTPRoot
	case "boot.boot_file":
		return flagBootFile
	case "boot.boot_file_efi":
		return flagBootFileEFI
	case "boot.ipxe_script_url":
		return flagIPXEScriptURL
	case "socket_mode":
		return flagSocketMode
	case "socket_group":
		return flagSocketGroup
	case "unix_forward_dir":
		return flagUnixForwardDir
	case "setup_timeout":
		return flagSetupTimeout
	case "pcap_max_size":
		return flagPCAPMaxSize
	case "ipv6.dhcpv6":
		return flagDHCPv6
	case "egress.mode":
		return flagEgress
	case "egress.allow_metadata":
		return flagAllowMetadata
	case "egress.host_addresses":
		return flagNoHostAddresses
	case "egress.rules":
		return flagAllow // and --deny
	}
	return ""
}

// envVar returns the environment variable for a flag name.
func envVar(flag string) []string {
	return []string{"VUNET_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))}
}

// Help categories.
const (
	catEndpoint = "Endpoint"
	catNetwork  = "Network"
	catForward  = "Forwarding and DNS"
	catBoot     = "Network boot"
	catOps      = "Operation"
	catSecurity = "Security"
)

// runFlags returns the flags of the appliance (the root command). Typed
// values are declared as strings and parsed by the config package so that
// flags, environment variables and the config file share parsers and error
// messages; the defaults shown in --help come from config.Default.
func runFlags() []cli.Flag {
	d := config.Default()
	str := func(name, cat, usage, def string) *cli.StringFlag {
		return &cli.StringFlag{Name: name, Category: cat, Usage: usage, DefaultText: def, EnvVars: envVar(name)}
	}
	path := func(name, cat, usage string) *cli.StringFlag {
		f := str(name, cat, usage, "")
		f.TakesFile = true
		return f
	}
	list := func(name, cat, usage, def string) *cli.StringSliceFlag {
		return &cli.StringSliceFlag{Name: name, Category: cat, Usage: usage, DefaultText: def, EnvVars: envVar(name)}
	}
	boolean := func(name, cat, usage string) *cli.BoolFlag {
		return &cli.BoolFlag{Name: name, Category: cat, Usage: usage, EnvVars: envVar(name)}
	}
	flags := []cli.Flag{
		path(flagConfig, catOps, "read settings from this TOML `FILE` (see docs/configuration.md)"),
		path(flagSocket, catEndpoint, "listen on vhost-user socket `PATH`; QEMU connects to it (without --socket or --connect: $XDG_RUNTIME_DIR/vunet/vunet.sock, else vunet-UID/vunet.sock in the temporary directory)"),
		path(flagConnect, catEndpoint, "connect to QEMU's vhost-user socket `PATH` (chardev server=on, libvirt mode='server'), and dial it again whenever the VM goes away"),
		boolean(flagOnce, catEndpoint, "exit when the first VM disconnects (with --connect: instead of dialling again)"),

		str(flagMTU, catNetwork, "link `MTU` ("+strconv.Itoa(config.MinMTU)+".."+strconv.Itoa(config.MaxMTU)+")", strconv.Itoa(d.MTU)),
		str(flagQueues, catNetwork, "offer `N` virtio-net queue pairs (multiqueue above 1, 1.."+strconv.Itoa(config.MaxQueues)+"); start QEMU with queues=N on the netdev and mq=on on the device (vunet qemu-args --queues N)", strconv.Itoa(d.Queues)),
		str(flagMAC, catNetwork, "guest `MAC` address", d.MAC.String()),
		list(flagSubnet, catNetwork, "guest `SUBNET`, IPv4 or IPv6 (repeatable: once per family)", d.IPv4.Subnet.String()+", "+d.IPv6.Subnet.String()),
		list(flagGateway, catNetwork, "gateway `ADDR`, IPv4 or IPv6 (repeatable: once per family)", d.IPv4.Gateway.String()+", "+d.IPv6.Gateway.String()),
		list(flagDNS, catNetwork, "built-in DNS server `ADDR`, IPv4 or IPv6 (repeatable: once per family)", d.IPv4.DNS.String()+", "+d.IPv6.DNS.String()),
		boolean(flagNoIPv6, catNetwork, "disable IPv6 for the guest"),
		str(flagDHCPv6, catNetwork, "DHCPv6 `MODE`: stateless (addresses from SLAAC; DHCPv6 gives DNS only) or stateful (also leases addresses from the guest prefix's ::100-::1ff and sets the M flag in router advertisements)", string(d.IPv6.DHCPv6)),
		boolean(flagNoMapHostLoopback, catNetwork, "do not map the gateway address to the host's loopback"),
		str(flagMaxGuests, catNetwork, "serve up to `N` VMs at once on one network, each on its own switch port with its own MAC (QEMU's mac=), DHCP lease and SLAAC address; guests reach each other unless --isolate-guests ("+"1.."+strconv.Itoa(config.MaxGuestsLimit)+")", strconv.Itoa(d.MaxGuests)),
		boolean(flagIsolateGuests, catNetwork, "with --max-guests above 1: drop frames between guests (each still reaches the gateway, the host and the outside)"),

		list(flagForward, catForward, "forward a host port to the guest; `SPEC` is tcp|udp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT, HOSTADDR defaults to 127.0.0.1, ports may be ranges like 8000-8010:8000-8010; an IPv6 HOSTADDR reaches the guest over IPv6 when its address is known (DHCPv6 lease or SLAAC), else over IPv4; GUEST names the guest when several share the network (DHCP host name, MAC with dashes, IPv4 or [IPv6] address; default the first guest); or unix:PATH:[GUEST:]GUESTPORT, a Unix socket (created like --socket: --socket-mode, --socket-group) whose connections reach the guest's TCP port (repeatable)", ""),
		list(flagExpose, catForward, "let the guest reach a host Unix socket: `SPEC` is tcp:GATEWAYPORT:unix:PATH; connections to the gateway address on GATEWAYPORT are relayed to PATH, whatever --no-map-host-loopback and the egress policy say (repeatable)", ""),
		list(flagDNSUpstream, catForward, "upstream resolver `ADDR`, IP[:PORT] (repeatable)", "from /etc/resolv.conf"),

		path(flagTFTPRoot, catBoot, "serve `DIR` over TFTP"),
		str(flagBootFile, catBoot, "DHCP boot file `NAME` (relative to --tftp-root)", ""),
		str(flagBootFileEFI, catBoot, "boot file `NAME` for UEFI PXE clients, instead of --boot-file (relative to --tftp-root)", ""),
		str(flagIPXEScriptURL, catBoot, "boot file `URL` (http, https or tftp) for clients that identify as iPXE, e.g. an iPXE script", ""),

		str(flagMaxMemory, catOps, "memory budget `SIZE` for what the guest can make vunet hold (TCP and UDP buffers, queued frames), e.g. 256MiB or 1GiB; the Go runtime's soft memory limit follows it", config.FormatSize(d.MaxMemory)),
		str(flagMaxGuestMemory, catOps, "with --max-guests above 1: the most of the memory budget one guest's own flows may hold (`SIZE`), so one VM cannot pin the memory another needs; auto is an equal share of the outbound part (3/4 of --max-memory divided by --max-guests)", config.FormatGuestMemory(d.MaxGuestMemory)),
		path(flagAPI, catOps, "serve the control API on unix socket `PATH`"),
		path(flagPCAP, catOps, "write every guest frame to pcap `FILE`"),
		path(flagPIDFile, catOps, "write the process id to `FILE` while running"),
		str(flagLogLevel, catOps, "log `LEVEL`: debug, info, warn or error", "info"),
		str(flagLogFormat, catOps, "log `FORMAT`: text or json", "text"),

		str(flagSandbox, catSecurity, "confine vunet once started: `MODE` on (no_new_privs, Landlock, seccomp allow-list, switch from root to --runas), log (the same, but system calls outside the list are only logged by the kernel) or off", string(d.Sandbox)),
		str(flagRunAs, catSecurity, "when started as root, switch to `USER[:GROUP]` once the sockets are bound", d.RunAs),
		boolean(flagMigrateTCP, catSecurity, "move established TCP connections with a live-migrated VM (TCP repair mode: needs CAP_NET_ADMIN, which vunet then keeps, alone, across --runas; a state save hands every connection over); off: they are reset"),
		// An action, not a setting: no environment variable, which left set
		// in a shell would silently stop every later run from starting.
		&cli.BoolFlag{Name: flagPrintConfig, Category: catOps, Usage: "validate the configuration, print it as TOML and exit"},
	}
	flags = append(flags, socketFlags()...)
	return append(flags, egressFlags()...)
}

// flagError reports a bad value for a flag in the one-line form
// `--forward "tcp:x:80": expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT`.
func flagError(flag, value string, err error) error {
	return usagef("--%s %q: %v", flag, value, err)
}

// resolveConfig builds the configuration: defaults, then the config file,
// then every flag that was given on the command line or through its
// environment variable (urfave's IsSet covers both, and a flag wins over its
// environment variable, which yields flag > env > file > default), then
// validation.
func resolveConfig(c *cli.Context) (*config.Config, error) {
	cfg := config.Default()
	if c.IsSet(flagConfig) {
		file := c.String(flagConfig)
		if file == "" {
			return nil, flagError(flagConfig, file, errors.New("expected a file name"))
		}
		if err := cfg.ApplyFile(file); err != nil {
			return nil, err
		}
	}
	if err := applyFlags(c, cfg); err != nil {
		return nil, err
	}
	if cfg.Socket == "" && cfg.Connect == "" {
		// Under socket activation the socket systemd passed is the one to
		// serve; its path stands in for --socket.
		cfg.Socket = systemd.ActivatedPath()
	}
	if cfg.Socket == "" && cfg.Connect == "" {
		// Like passt: pick a per-user socket and say how to use it
		// (runAppliance prints the QEMU arguments once it listens).
		cfg.Socket = unixsock.DefaultPath()
		if !c.Bool(flagPrintConfig) {
			if err := unixsock.PrivateDir(filepath.Dir(cfg.Socket)); err != nil {
				return nil, err
			}
		}
	}
	if err := cfg.Validate(); err != nil {
		return nil, renameKeys(c, err)
	}
	return cfg, nil
}

// renameKeys rewrites validation errors about keys that were set by a flag
// to name the flag instead.
func renameKeys(c *cli.Context, err error) error {
	var es config.Errors
	if !errors.As(err, &es) {
		return err
	}
	out := make(config.Errors, len(es))
	fromFlags := false
	for i, e := range es {
		out[i] = e
		if flag := flagForKey(e.Key); flag != "" && c.IsSet(flag) {
			out[i] = &config.FieldError{Key: "--" + flag, Msg: e.Msg}
			fromFlags = true
		}
	}
	if fromFlags {
		return usageError{out}
	}
	return out
}

// applyFlags overlays the flags that were set onto cfg.
func applyFlags(c *cli.Context, cfg *config.Config) error {
	// socket and connect choose which side listens; picking one on the
	// command line overrides the other one from the file.
	if c.IsSet(flagSocket) || c.IsSet(flagConnect) {
		cfg.Socket, cfg.Connect = "", ""
	}
	paths := []struct {
		flag string
		dst  *string
	}{
		{flagSocket, &cfg.Socket},
		{flagConnect, &cfg.Connect},
		{flagPIDFile, &cfg.PIDFile},
		{flagAPI, &cfg.API},
		{flagPCAP, &cfg.PCAP},
		{flagTFTPRoot, &cfg.Boot.TFTPRoot},
		{flagBootFile, &cfg.Boot.BootFile},
		{flagBootFileEFI, &cfg.Boot.BootFileEFI},
		{flagIPXEScriptURL, &cfg.Boot.IPXEScriptURL},
	}
	for _, p := range paths {
		if !c.IsSet(p.flag) {
			continue
		}
		v := c.String(p.flag)
		if v == "" {
			return flagError(p.flag, v, errors.New("must not be empty"))
		}
		*p.dst = v
	}
	if c.IsSet(flagOnce) {
		cfg.Once = c.Bool(flagOnce)
	}
	if c.IsSet(flagNoIPv6) {
		cfg.IPv6.Enable = !c.Bool(flagNoIPv6)
	}
	if c.IsSet(flagNoMapHostLoopback) {
		cfg.MapHostLoopback = !c.Bool(flagNoMapHostLoopback)
	}

	if c.IsSet(flagIsolateGuests) {
		cfg.IsolateGuests = c.Bool(flagIsolateGuests)
	}
	if c.IsSet(flagMigrateTCP) {
		cfg.MigrateTCP = c.Bool(flagMigrateTCP)
	}
	if c.IsSet(flagMaxGuests) {
		v := c.String(flagMaxGuests)
		n, err := strconv.Atoi(v)
		if err != nil {
			return flagError(flagMaxGuests, v, fmt.Errorf("expected an integer 1..%d", config.MaxGuestsLimit))
		}
		cfg.MaxGuests = n
	}
	if c.IsSet(flagMTU) {
		v := c.String(flagMTU)
		n, err := strconv.Atoi(v)
		if err != nil {
			return flagError(flagMTU, v, fmt.Errorf("expected an integer %d..%d", config.MinMTU, config.MaxMTU))
		}
		cfg.MTU = n
	}
	if c.IsSet(flagQueues) {
		v := c.String(flagQueues)
		n, err := strconv.Atoi(v)
		if err != nil {
			return flagError(flagQueues, v, fmt.Errorf("expected an integer 1..%d", config.MaxQueues))
		}
		cfg.Queues = n
	}
	if err := parseFlag(c, flagMAC, config.ParseMAC, &cfg.MAC); err != nil {
		return err
	}
	if err := parseFlag(c, flagLogLevel, config.ParseLogLevel, &cfg.LogLevel); err != nil {
		return err
	}
	if err := parseFlag(c, flagLogFormat, config.ParseLogFormat, &cfg.LogFormat); err != nil {
		return err
	}
	if err := parseFlag(c, flagMaxMemory, config.ParseSize, &cfg.MaxMemory); err != nil {
		return err
	}
	if err := parseFlag(c, flagMaxGuestMemory, config.ParseGuestMemory, &cfg.MaxGuestMemory); err != nil {
		return err
	}
	if err := parseFlag(c, flagDHCPv6, config.ParseDHCPv6Mode, &cfg.IPv6.DHCPv6); err != nil {
		return err
	}
	if err := parseFlag(c, flagSandbox, config.ParseSandbox, &cfg.Sandbox); err != nil {
		return err
	}
	if err := parseFlag(c, flagRunAs, config.ParseRunAs, &cfg.RunAs); err != nil {
		return err
	}

	// Subnets before addresses: SetSubnet moves the gateway, DNS and guest
	// addresses into the new subnet, and explicit --gateway/--dns must win.
	if err := eachFamily(c, flagSubnet, func(v string) (bool, error) {
		p, err := config.ParsePrefix(v)
		if err != nil {
			return false, err
		}
		cfg.SetSubnet(p)
		return p.Addr().Is4(), nil
	}); err != nil {
		return err
	}
	if err := eachFamily(c, flagGateway, func(v string) (bool, error) {
		return setAddr(v, &cfg.IPv4.Gateway, &cfg.IPv6.Gateway)
	}); err != nil {
		return err
	}
	if err := eachFamily(c, flagDNS, func(v string) (bool, error) {
		return setAddr(v, &cfg.IPv4.DNS, &cfg.IPv6.DNS)
	}); err != nil {
		return err
	}

	// Lists replace the file's list rather than extend it, consistent with
	// every other setting.
	if c.IsSet(flagForward) {
		cfg.Forwards = nil
		for _, v := range c.StringSlice(flagForward) {
			fw, err := config.ParseForward(v)
			if err != nil {
				return flagError(flagForward, v, err)
			}
			cfg.Forwards = append(cfg.Forwards, fw...)
		}
	}
	if c.IsSet(flagExpose) {
		cfg.Expose = nil
		for _, v := range c.StringSlice(flagExpose) {
			e, err := config.ParseExpose(v)
			if err != nil {
				return flagError(flagExpose, v, err)
			}
			cfg.Expose = append(cfg.Expose, e)
		}
	}
	if err := applyEgressFlags(c, cfg); err != nil {
		return err
	}
	if err := applySocketFlags(c, cfg); err != nil {
		return err
	}
	if c.IsSet(flagDNSUpstream) {
		cfg.DNSUpstream = nil
		for _, v := range c.StringSlice(flagDNSUpstream) {
			u, err := config.ParseDNSUpstream(v)
			if err != nil {
				return flagError(flagDNSUpstream, v, err)
			}
			cfg.DNSUpstream = append(cfg.DNSUpstream, u)
		}
	}
	return nil
}

// parseFlag stores parse's value of flag in *dst if the flag was set.
func parseFlag[T any](c *cli.Context, flag string, parse func(string) (T, error), dst *T) error {
	if !c.IsSet(flag) {
		return nil
	}
	v := c.String(flag)
	x, err := parse(v)
	if err != nil {
		return flagError(flag, v, err)
	}
	*dst = x
	return nil
}

// eachFamily applies set to every value of a repeatable per-family flag
// (--subnet, --gateway, --dns); set reports whether the value was IPv4.
// Giving the same family twice is an error rather than last-one-wins,
// because it is almost certainly a mistake.
func eachFamily(c *cli.Context, flag string, set func(string) (is4 bool, err error)) error {
	if !c.IsSet(flag) {
		return nil
	}
	seen := map[bool]string{}
	for _, v := range c.StringSlice(flag) {
		is4, err := set(v)
		if err != nil {
			return flagError(flag, v, err)
		}
		if prev, dup := seen[is4]; dup {
			family := "IPv6"
			if is4 {
				family = "IPv4"
			}
			return flagError(flag, v, fmt.Errorf("%s already given as %q; give at most one per family", family, prev))
		}
		seen[is4] = v
	}
	return nil
}

// setAddr parses v and stores it in v4 or v6 by its family.
func setAddr(v string, v4, v6 *netip.Addr) (bool, error) {
	a, err := config.ParseAddr(v)
	if err != nil {
		return false, err
	}
	if a.Is4() {
		*v4 = a
	} else {
		*v6 = a
	}
	return a.Is4(), nil
}

// runAction is the root command: resolve the configuration and run the
// appliance in the foreground until SIGINT or SIGTERM.
func runAction(c *cli.Context, run runFunc) error {
	if c.NArg() > 0 {
		return usagef("unknown command %q (see 'vunet --help')", c.Args().First())
	}
	cfg, err := resolveConfig(c)
	if err != nil {
		return err
	}
	if c.Bool(flagPrintConfig) {
		return cfg.WriteTOML(c.App.Writer)
	}

	log := newLogger(c.App.ErrWriter, cfg)
	if cfg.PIDFile != "" {
		if err := writePIDFile(cfg.PIDFile); err != nil {
			return err
		}
		defer func() {
			if sandbox.Confined() {
				// A confined vunet may not remove files; the next start
				// replaces the pid file (see docs/security.md).
				log.Debug("leaving pid file in place (sandboxed)", "path", cfg.PIDFile)
				return
			}
			if err := os.Remove(cfg.PIDFile); err != nil && !errors.Is(err, os.ErrNotExist) {
				log.Warn("removing pid file", "path", cfg.PIDFile, "err", err)
			}
		}()
	}

	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	finished := make(chan struct{})
	defer close(finished)
	go func() {
		// After the first signal, restore default handling so that a second
		// Ctrl-C kills a shutdown that hangs instead of being swallowed.
		<-ctx.Done()
		stop()
		// A shutdown that hangs (a bug: every layer is meant to stop at
		// once) must not keep the process alive: a stop is a stop.
		select {
		case <-finished:
		case <-time.After(shutdownGrace):
			log.Error("shutdown did not finish in time: exiting anyway", "after", shutdownGrace)
			if cfg.PIDFile != "" {
				os.Remove(cfg.PIDFile)
			}
			os.Exit(1)
		}
	}()

	err = run(ctx, cfg, log)
	if err != nil && errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return nil // stopping on a signal is a normal exit
	}
	return err
}

// shutdownGrace bounds a shutdown after SIGTERM/SIGINT: vunet promises to
// be gone within 2 s; a clean shutdown takes milliseconds.
const shutdownGrace = 1500 * time.Millisecond

// newLogger returns the slog logger cfg asks for, writing to w.
func newLogger(w io.Writer, cfg *config.Config) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == config.LogJSON {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// writePIDFile writes the process id to path atomically (temporary file and
// rename), so a supervisor polling the file never reads a partial number.
func writePIDFile(path string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("pid file: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if _, err := fmt.Fprintf(tmp, "%d\n", os.Getpid()); err != nil {
		tmp.Close()
		return fmt.Errorf("pid file: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("pid file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("pid file: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("pid file: %w", err)
	}
	return nil
}

// setMemoryLimit sets the Go runtime's soft memory limit from the memory
// budget, unless GOMEMLIMIT chose one: the budget plus half again for what
// it does not account (per-connection structures, goroutine stacks, gVisor's
// bookkeeping, garbage not yet collected) plus a fixed 64 MiB for the
// runtime and the rest of vunet. Near the limit the collector works harder
// instead of letting garbage pile up; it is soft, so vunet never fails
// because of it.
func setMemoryLimit(budget int64) (int64, bool) {
	if os.Getenv("GOMEMLIMIT") != "" || budget <= 0 {
		return 0, false
	}
	limit := budget + budget/2 + 64<<20
	debug.SetMemoryLimit(limit)
	return limit, true
}
