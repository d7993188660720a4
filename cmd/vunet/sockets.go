package main

import (
	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/config"
)

// Flags for who may reach the vhost-user socket, and how the pcap file is
// bounded.
const (
	flagSocketMode   = "socket-mode"
	flagSocketGroup  = "socket-group"
	flagSetupTimeout = "setup-timeout"
	flagPCAPMaxSize  = "pcap-max-size"
	// flagUnixForwardDir is where runtime unix forwards and exposes live.
	flagUnixForwardDir = "unix-forward-dir"
)

func socketFlags() []cli.Flag {
	d := config.Default()
	str := func(name, cat, usage, def string) *cli.StringFlag {
		return &cli.StringFlag{Name: name, Category: cat, Usage: usage, DefaultText: def, EnvVars: envVar(name)}
	}
	return []cli.Flag{
		str(flagSocketMode, catEndpoint, "permission bits of the --socket file, in octal, whatever the umask (0660 with --socket-group)", config.FormatSocketMode(d.SocketMode)),
		str(flagSocketGroup, catEndpoint, "give the --socket file to `GROUP` (name or number) and let frontends running with that group connect, e.g. libvirt's QEMU user", ""),
		str(flagSetupTimeout, catEndpoint, "drop a frontend that has not finished the vhost-user handshake (SET_OWNER) within `DURATION`; 0 disables", d.SetupTimeout.String()),
		str(flagUnixForwardDir, catForward, "let unix forwards be added at run time (vunet forward add unix:PATH:PORT, the API, a migrated device state), with their sockets in `DIR`: vunet creates it (0700; with --socket-group, that group's and setgid), and the sandbox allows creating and removing sockets there and nowhere else; gateway exposes added at run time (vunet expose add) may connect to sockets there", ""),
		str(flagPCAPMaxSize, catOps, "stop capturing when the --pcap file reaches `SIZE` (K, M, G suffixes); 0 is unlimited", "0"),
	}
}

func applySocketFlags(c *cli.Context, cfg *config.Config) error {
	if err := parseFlag(c, flagSocketMode, config.ParseSocketMode, &cfg.SocketMode); err != nil {
		return err
	}
	if c.IsSet(flagSocketGroup) {
		cfg.SocketGroup = c.String(flagSocketGroup)
	}
	if err := parseFlag(c, flagUnixForwardDir, config.ParseSocketDir, &cfg.UnixForwardDir); err != nil {
		return err
	}
	if err := parseFlag(c, flagSetupTimeout, config.ParseDuration, &cfg.SetupTimeout); err != nil {
		return err
	}
	return parseFlag(c, flagPCAPMaxSize, config.ParseSize, &cfg.PCAPMaxSize)
}
