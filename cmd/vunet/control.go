package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/config"
)

// apiFlag is --api on the commands that talk to a running vunet; it reads
// the same VUNET_API variable the appliance does, so one exported variable
// serves both sides.
func apiFlag() cli.Flag {
	return &cli.StringFlag{Name: flagAPI, Usage: "the control API socket `PATH` of the running vunet (its --api)",
		EnvVars: envVar(flagAPI), TakesFile: true}
}

// apiClient returns a client for --api; name prefixes the usage error.
func apiClient(c *cli.Context, name string) (*api.Client, error) {
	path := c.String(flagAPI)
	if path == "" {
		return nil, usagef("%s: --api PATH is required (or VUNET_API): the socket the running vunet was given with --api", name)
	}
	return api.NewClient(path), nil
}

// forwardCommand groups the port-forward commands.
func forwardCommand() *cli.Command {
	return &cli.Command{
		Name:  "forward",
		Usage: "add, list or remove port forwards of a running vunet (over its --api socket)",
		UsageText: "vunet forward add --api PATH SPEC...\n" +
			"vunet forward list --api PATH [--json]\n" +
			"vunet forward remove --api PATH SPEC...",
		Subcommands: []*cli.Command{
			{
				Name:         "add",
				Usage:        "start forwarding host ports to the guest",
				UsageText:    "vunet forward add --api PATH SPEC...   (SPEC is tcp|udp:[HOSTADDR:]HOSTPORT:GUESTPORT or unix:PATH:GUESTPORT with PATH in vunet's --unix-forward-dir, as for --forward, with an optional GUEST: before GUESTPORT naming the guest by DHCP host name, MAC or address, resolved per connection; default the first guest)",
				Flags:        []cli.Flag{apiFlag()},
				Action:       forwardAddAction,
				OnUsageError: onUsageError,
			},
			{
				Name:         "list",
				Aliases:      []string{"ls"},
				Usage:        "list the active port forwards",
				UsageText:    "vunet forward list --api PATH [--json]",
				Flags:        []cli.Flag{apiFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON (docs/api.md) instead of a table"}},
				Action:       forwardListAction,
				OnUsageError: onUsageError,
			},
			{
				Name:         "remove",
				Aliases:      []string{"rm"},
				Usage:        "stop port forwards",
				UsageText:    "vunet forward remove --api PATH SPEC...   (the SPEC it was added with, or as printed by list)",
				Flags:        []cli.Flag{apiFlag()},
				Action:       forwardRemoveAction,
				OnUsageError: onUsageError,
			},
		},
		HideHelpCommand: true,
		OnUsageError:    onUsageError,
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usagef("forward: unknown command %q (add, list or remove)", c.Args().First())
			}
			return usagef("forward: expected a command: add, list or remove (see 'vunet forward --help')")
		},
	}
}

// parseSpecs parses every argument in the --forward syntax, expanding
// ranges, before anything is sent: a typo in the third spec must not leave
// the first two half-applied.
func parseSpecs(c *cli.Context, name string) ([]config.Forward, error) {
	if c.NArg() == 0 {
		return nil, usagef("%s: expected at least one SPEC, tcp|udp:[HOSTADDR:]HOSTPORT:GUESTPORT or unix:PATH:GUESTPORT", name)
	}
	var out []config.Forward
	for _, spec := range c.Args().Slice() {
		if strings.HasPrefix(spec, "-") {
			// urfave/cli stops parsing flags at the first argument.
			return nil, usagef("%s: flag %s after a SPEC; put flags first", name, spec)
		}
		fs, err := config.ParseForward(spec)
		if err != nil {
			return nil, usagef("%s %q: %v", name, spec, err)
		}
		out = append(out, fs...)
	}
	return out, nil
}

func forwardAddAction(c *cli.Context) error {
	return eachForward(c, "forward add", "added", func(cl *api.Client, f api.Forward) error {
		got, err := cl.AddForward(c.Context, f)
		if err != nil {
			return err
		}
		to := got.Guest.String()
		if got.GuestSelector != "" {
			to = got.GuestSelector // resolved per connection
		}
		fmt.Fprintf(c.App.Writer, "added %s (to guest %s)\n", got, to)
		return nil
	})
}

func forwardRemoveAction(c *cli.Context) error {
	return eachForward(c, "forward remove", "removed", func(cl *api.Client, f api.Forward) error {
		if err := cl.RemoveForward(c.Context, f); err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "removed %s\n", f)
		return nil
	})
}

// eachForward parses the SPEC arguments of command name and applies do to
// each forward in turn over the API, stopping at the first failure; verb
// says what was done to the forwards before it.
func eachForward(c *cli.Context, name, verb string, do func(*api.Client, api.Forward) error) error {
	fs, err := parseSpecs(c, name)
	if err != nil {
		return err
	}
	cl, err := apiClient(c, name)
	if err != nil {
		return err
	}
	defer cl.Close()
	for n, f := range fs {
		// The guest a SPEC names travels as the selector (remove
		// matches by host socket and ignores it).
		af := api.Forward{Proto: f.Proto, Host: f.Host, Path: f.Path, GuestPort: f.GuestPort}
		if !f.Guest.IsZero() && name == "forward add" {
			af.GuestSelector = f.Guest.String()
		}
		if err := do(cl, af); err != nil {
			return partial(name, f.String(), n, len(fs), verb, err)
		}
	}
	return nil
}

// partial reports a failure in a batch of forwards, saying how many were
// already applied, since they stay applied.
func partial(name, spec string, done, total int, verb string, err error) error {
	var ue *api.UnreachableError
	if errors.As(err, &ue) {
		return err // nothing else can have worked; say just that
	}
	if done > 0 {
		return fmt.Errorf("%s %s: %w (%d of %d already %s)", name, spec, err, done, total, verb)
	}
	return fmt.Errorf("%s %s: %w", name, spec, err)
}

func forwardListAction(c *cli.Context) error {
	if c.NArg() > 0 {
		return usagef("forward list: unexpected argument %q", c.Args().First())
	}
	cl, err := apiClient(c, "forward list")
	if err != nil {
		return err
	}
	defer cl.Close()
	fs, err := cl.Forwards(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if fs == nil {
			fs = []api.Forward{}
		}
		return writeJSON(c.App.Writer, api.Forwards{Forwards: fs})
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PROTO\tHOST\tGUEST\tSPEC")
	for _, f := range fs {
		host := f.Host.String()
		if f.Proto == "unix" {
			host = f.Path
		}
		guest := f.Guest.String()
		if f.GuestSelector != "" {
			guest = f.GuestSelector + ":" + strconv.Itoa(int(f.GuestPort))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f.Proto, host, guest, f)
	}
	return tw.Flush()
}

// statsCommand prints the counters of a running vunet.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// humanBytes formats n with a binary unit.
func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
