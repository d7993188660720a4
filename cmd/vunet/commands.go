package main

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/internal/unixsock"
	"github.com/vunet/vunet/internal/version"
)

// validMemSize reports whether s is in the QEMU size syntax accepted for
// --mem: a positive number with an optional K/M/G/T suffix.
func validMemSize(s string) bool {
	if n := len(s); n > 0 && strings.IndexByte("KMGTkmgt", s[n-1]) >= 0 {
		s = s[:n-1]
	}
	return s != "" && s[0] != '0' && strings.Trim(s, "0123456789") == ""
}

// qemuArgsCommand prints the QEMU arguments (and libvirt XML) that attach a
// VM to vunet, so users need not remember the vhost-user incantation.
func qemuArgsCommand() *cli.Command {
	return &cli.Command{
		Name:      "qemu-args",
		Usage:     "print the QEMU arguments and libvirt XML that attach a VM to vunet",
		UsageText: "vunet qemu-args [--socket PATH | --connect PATH] [--mem 512M] [--mac MAC] [--queues N] [--accel kvm|tcg] [--packed] [--plain]",
		Description: "The memory size must equal the guest's -m: vhost-user needs the guest RAM in a\n" +
			"shared memory backend so vunet can access the virtqueues. With --plain only the\n" +
			"arguments are printed, one per line, for `mapfile -t args < <(vunet qemu-args --plain ...)`.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: flagConfig, Usage: "take socket, connect and mac from this TOML `FILE`", EnvVars: envVar(flagConfig), TakesFile: true},
			&cli.StringFlag{Name: flagSocket, Usage: "the vhost-user socket `PATH` vunet listens on (default: the one vunet picks without --socket)", EnvVars: envVar(flagSocket), TakesFile: true},
			&cli.StringFlag{Name: flagConnect, Usage: "the socket `PATH` QEMU listens on (vunet --connect)", EnvVars: envVar(flagConnect), TakesFile: true},
			&cli.StringFlag{Name: flagMAC, Usage: "guest `MAC` address", EnvVars: envVar(flagMAC), DefaultText: config.Default().MAC.String()},
			&cli.StringFlag{Name: flagQueues, Usage: "queue pairs vunet offers (its --queues `N`): above 1, queues=N on the netdev and mq=on on the device", EnvVars: envVar(flagQueues), DefaultText: strconv.Itoa(config.Default().Queues)},
			&cli.StringFlag{Name: "mem", Usage: "guest RAM `SIZE`; must equal -m", EnvVars: envVar("mem"), Value: "512M"},
			&cli.StringFlag{Name: "accel", Usage: "the VM's accelerator, `kvm` or tcg (libvirt domain type='qemu'): tcg adds the vectors=0 workaround QEMU 7.2 needs", EnvVars: envVar("accel"), Value: accelKVM},
			&cli.BoolFlag{Name: "packed", Usage: "give the NIC packed virtqueues (packed=on, VIRTIO_F_RING_PACKED) instead of split ones", EnvVars: envVar("packed")},
			&cli.BoolFlag{Name: "plain", Usage: "print only the arguments, one per line, without comments or XML"},
		},
		Action:          qemuArgsAction,
		HideHelpCommand: true,
		OnUsageError:    onUsageError,
	}
}

func qemuArgsAction(c *cli.Context) error {
	if c.NArg() > 0 {
		return usagef("qemu-args: unexpected argument %q", c.Args().First())
	}
	cfg := config.Default()
	if c.IsSet(flagConfig) {
		if err := cfg.ApplyFile(c.String(flagConfig)); err != nil {
			return err
		}
	}
	if c.IsSet(flagSocket) || c.IsSet(flagConnect) {
		cfg.Socket, cfg.Connect = c.String(flagSocket), c.String(flagConnect)
	}
	if err := parseFlag(c, flagMAC, config.ParseMAC, &cfg.MAC); err != nil {
		return err
	}
	if c.IsSet(flagQueues) {
		v := c.String(flagQueues)
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > config.MaxQueues {
			return flagError(flagQueues, v, fmt.Errorf("expected an integer 1..%d", config.MaxQueues))
		}
		cfg.Queues = n
	}
	switch {
	case cfg.Socket == "" && cfg.Connect == "":
		// The socket vunet listens on when it is given none.
		cfg.Socket = unixsock.DefaultPath()
	case cfg.Socket != "" && cfg.Connect != "":
		return usagef("qemu-args: --socket and --connect are mutually exclusive")
	}
	mem := c.String("mem")
	if !validMemSize(mem) {
		return flagError("mem", mem, fmt.Errorf("expected a size like 512M or 4G"))
	}
	// The other keys do not affect the QEMU side, but a bad MAC or socket
	// path would produce arguments that fail later, in QEMU.
	if err := cfg.Validate(); err != nil {
		var es config.Errors
		if errors.As(err, &es) {
			for _, e := range es {
				if e.Key == "mac" || e.Key == "socket" || e.Key == "connect" || e.Key == "queues" {
					return usagef("qemu-args: %v", e)
				}
			}
		}
	}
	accel := c.String("accel")
	if accel != accelKVM && accel != accelTCG {
		return flagError("accel", accel, fmt.Errorf("expected %s or %s", accelKVM, accelTCG))
	}
	return writeQEMUArgs(c.App.Writer, cfg, mem, accel, c.Bool("packed"), c.Bool("plain"))
}

// qemuArg is one QEMU option with its value and the reason it is needed.
type qemuArg struct{ opt, val, why string }

// qemuArgs returns the arguments that attach a VM with mem of RAM to the
// vunet cfg describes, and the socket path and whether QEMU listens on it.
func qemuArgs(cfg *config.Config, mem, accel string, packed bool) (args []qemuArg, sock string, qemuServer bool) {
	sock, qemuServer = cfg.Socket, false
	if cfg.Connect != "" {
		sock, qemuServer = cfg.Connect, true
	}
	mac := cfg.MAC.String()
	chardev := "socket,id=vunet0,path=" + qemuEscape(sock)
	chardevWhy := "the vhost-user control socket; vunet listens on it and QEMU connects"
	if qemuServer {
		chardev += ",server=on,wait=off"
		chardevWhy = "the vhost-user control socket; QEMU listens on it and vunet --connect attaches"
	}
	args = []qemuArg{
		{"-object", "memory-backend-memfd,id=mem0,share=on,size=" + mem,
			"guest RAM as shared memory, so vunet can reach the virtqueues (size must equal -m)"},
		{"-machine", "memory-backend=mem0", "use that shared backend as the machine's RAM"},
		{"-chardev", chardev, chardevWhy},
		{"-netdev", "vhost-user,id=net0,chardev=vunet0", "a vhost-user network backend on that socket"},
		{"-device", "virtio-net-pci,netdev=net0,mac=" + mac,
			"the guest NIC; the MAC matches vunet's (DHCP hands it " + cfg.IPv4.Guest.String() + ")"},
	}
	if packed {
		args[len(args)-1].val += ",packed=on"
		args[len(args)-1].why += "; packed=on for packed virtqueues (vunet serves both ring formats)"
	}
	if q := cfg.Queues; q > 1 {
		n := strconv.Itoa(q)
		args[3].val += ",queues=" + n
		args[3].why += ", with " + n + " queue pairs (vunet --queues " + n + ")"
		args[4].val += ",mq=on"
		args[4].why += "; mq=on: multiqueue, one pair per vCPU up to " + n
	}
	if accel == accelTCG {
		args[len(args)-1].val += ",vectors=0"
		args[len(args)-1].why += "; vectors=0 because QEMU 7.2 crashes with vhost-user and MSI-X under TCG"
	}
	return args, sock, qemuServer
}

// writeQEMUArgs prints the arguments for cfg. In listen mode (--socket)
// QEMU is the vhost-user client; in connect mode it must be the server.
func writeQEMUArgs(w io.Writer, cfg *config.Config, mem, accel string, packed, plain bool) error {
	args, sock, qemuServer := qemuArgs(cfg, mem, accel, packed)

	var b strings.Builder
	if plain {
		for _, a := range args {
			fmt.Fprintf(&b, "%s\n%s\n", a.opt, a.val)
		}
		_, err := io.WriteString(w, b.String())
		return err
	}
	b.WriteString("# QEMU arguments for vunet\n")
	for _, a := range args {
		fmt.Fprintf(&b, "# %s\n%s %s\n", a.why, a.opt, a.val)
	}
	writeLibvirtXML(&b, cfg, sock, qemuServer, mem, accel, packed)
	_, err := io.WriteString(w, b.String())
	return err
}

// writeStartupHint tells a user who gave no socket where vunet listens and
// how to attach QEMU to it, as one shell-ready line (passt does the same).
func writeStartupHint(w io.Writer, cfg *config.Config) error {
	const mem = "512M"
	args, sock, _ := qemuArgs(cfg, mem, accelKVM, false)
	var b strings.Builder
	fmt.Fprintf(&b, "vunet listens on the default socket %s (no --socket or --connect given); attach a VM with\n", sock)
	fmt.Fprintf(&b, "  qemu-system-x86_64 -m %s ...", mem)
	for _, a := range args {
		fmt.Fprintf(&b, " %s %s", a.opt, shellQuote(a.val))
	}
	b.WriteString("\n(size= must equal -m; under TCG add vectors=0 to the device; libvirt XML: vunet qemu-args)\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// shellQuote quotes s for a POSIX shell when it holds anything but
// characters that are safe unquoted.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,._+:@%/=-") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Accelerators qemu-args knows (--accel).
const (
	accelKVM = "kvm"
	accelTCG = "tcg"
)

// libvirtAlias is the user alias of vunet's interface, which the TCG
// override names; libvirt requires user aliases to start with "ua-".
const libvirtAlias = "ua-vunet0"

// writeLibvirtXML writes a libvirt <domain> fragment (libvirt 9.0, Debian
// 12) for the same setup: shared memfd RAM, the vhostuser interface and,
// under TCG, the vectors=0 override (libvirt ≥ 8.2).
func writeLibvirtXML(b *strings.Builder, cfg *config.Config, sock string, qemuServer bool, mem, accel string, packed bool) {
	mode, who := "client", "vunet listens on the socket (vunet --socket); libvirt's QEMU (user libvirt-qemu on Debian) must be able to connect: --socket-group libvirt-qemu --socket-mode 0660, in a directory that user may enter"
	if qemuServer {
		mode, who = "server", "QEMU listens on the socket and vunet --connect dials it (again after every restart of the domain); libvirt starts QEMU with server=on and without wait=off, so the VM waits for vunet before it runs; vunet's user (--runas libvirt-qemu when started as root) must be able to connect"
	}
	domType, ns := "kvm", ""
	if accel == accelTCG {
		domType, ns = "qemu", " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"
	}
	num, unit := libvirtSize(mem)
	b.WriteString("\n# libvirt domain XML (libvirt 9.0 or later; docs/libvirt.md): merge into your <domain>.\n")
	fmt.Fprintf(b, "# %s.\n", who)
	fmt.Fprintf(b, "<domain type='%s'%s>\n", domType, ns)
	fmt.Fprintf(b, "  <memory unit='%s'>%s</memory>\n", unit, num)
	b.WriteString("  <!-- vhost-user needs all guest RAM shared with vunet -->\n")
	b.WriteString("  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='shared'/>\n  </memoryBacking>\n")
	b.WriteString("  <devices>\n")
	fmt.Fprintf(b, "    <interface type='vhostuser'>\n      <alias name='%s'/>\n      <mac address='%s'/>\n", libvirtAlias, xmlAttr(cfg.MAC.String()))
	fmt.Fprintf(b, "      <source type='unix' path='%s' mode='%s'/>\n      <model type='virtio'/>\n", xmlAttr(sock), mode)
	var driver []string
	if cfg.Queues > 1 {
		driver = append(driver, fmt.Sprintf("queues='%d'", cfg.Queues))
	}
	if packed {
		driver = append(driver, "packed='on'")
	}
	if len(driver) > 0 {
		fmt.Fprintf(b, "      <driver %s/>\n", strings.Join(driver, " "))
	}
	b.WriteString("    </interface>\n")
	b.WriteString("  </devices>\n")
	if accel == accelTCG {
		b.WriteString("  <!-- TCG only: QEMU 7.2 crashes with vhost-user and MSI-X, so the NIC gets vectors=0 (libvirt 8.2 or later) -->\n")
		fmt.Fprintf(b, "  <qemu:override>\n    <qemu:device alias='%s'>\n      <qemu:frontend>\n", libvirtAlias)
		b.WriteString("        <qemu:property name='vectors' type='unsigned' value='0'/>\n      </qemu:frontend>\n    </qemu:device>\n  </qemu:override>\n")
	}
	b.WriteString("</domain>\n")
}

// libvirtSize turns a --mem size (QEMU syntax, validated) into a libvirt
// <memory> value and unit.
func libvirtSize(mem string) (num, unit string) {
	units := map[byte]string{'k': "KiB", 'm': "MiB", 'g': "GiB", 't': "TiB"}
	last := mem[len(mem)-1] | 0x20 // lower case
	if u, ok := units[last]; ok {
		return mem[:len(mem)-1], u
	}
	return mem, "b"
}

// qemuEscape escapes a value for QEMU's comma-separated option syntax, where
// a literal comma is written twice.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// xmlAttr escapes s for a single-quoted XML attribute.
func xmlAttr(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", "'", "&apos;", `"`, "&quot;").Replace(s)
}

// versionCommand prints the vunet version and the Go toolchain it was built
// with, which matters for bug reports (netstack behaviour varies with both).
func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the vunet and Go versions",
		Action: func(c *cli.Context) error {
			_, err := fmt.Fprintf(c.App.Writer, "vunet %s\n%s %s/%s\n", version.Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
			return err
		},
	}
}

// manCommand prints a man page generated from the CLI definition itself,
// so the page cannot drift from the flags (make man writes docs/vunet.8).
func manCommand() *cli.Command {
	return &cli.Command{
		Name:   "man",
		Usage:  "print the vunet(8) man page (roff)",
		Hidden: true,
		Action: func(c *cli.Context) error {
			page, err := c.App.ToMan()
			if err != nil {
				return err
			}
			_, err = fmt.Fprint(c.App.Writer, page)
			return err
		},
	}
}

// bashCompletion asks vunet itself for candidates (urfave/cli's
// --generate-bash-completion protocol): subcommand names, or flag names when
// the word being completed starts with '-'.
const bashCompletion = `# bash completion for vunet; load with: source <(vunet completion bash)
_vunet_complete() {
	local cur=${COMP_WORDS[COMP_CWORD]}
	local words=("${COMP_WORDS[@]:1:COMP_CWORD-1}")
	# A lone "--" would end flag parsing and disable completion; "-" asks
	# for every flag just the same.
	[[ $cur == -* ]] && words+=("${cur/#--/-}")
	local IFS=$'\n'
	COMPREPLY=($(compgen -W "$("${COMP_WORDS[0]}" "${words[@]}" --generate-bash-completion 2>/dev/null)" -- "$cur"))
}
complete -o default -F _vunet_complete vunet
`

// completionCommand prints the shell completion script.
func completionCommand() *cli.Command {
	return &cli.Command{
		Name:      "completion",
		Usage:     "print the bash completion script",
		UsageText: "source <(vunet completion bash)",
		Action: func(c *cli.Context) error {
			if shell := c.Args().First(); shell != "bash" && shell != "" {
				return usagef("completion: only bash is supported, not %q", shell)
			}
			_, err := io.WriteString(c.App.Writer, bashCompletion)
			return err
		},
	}
}
