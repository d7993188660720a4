package main

import (
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/config"
)

// exposeCommand groups the gateway expose commands: `vunet expose` is to
// --expose what `vunet forward` is to --forward.
func exposeCommand() *cli.Command {
	return &cli.Command{
		Name:  "expose",
		Usage: "add, list or remove gateway ports that reach host Unix sockets, on a running vunet (over its --api socket)",
		UsageText: "vunet expose add --api PATH SPEC...\n" +
			"vunet expose list --api PATH [--json]\n" +
			"vunet expose remove --api PATH SPEC...",
		Description: "An exposed gateway port is the gateway's, shared by every guest (with --max-guests above 1\n" +
			"too). Under the sandbox the socket must be directly in vunet's --unix-forward-dir or in the\n" +
			"directory of an --expose socket it was started with. Removing an expose stops new guest\n" +
			"connections; those already relayed go on until either side closes them.",
		Subcommands: []*cli.Command{
			{
				Name:         "add",
				Usage:        "relay guest connections to gateway ports to host Unix sockets",
				UsageText:    "vunet expose add --api PATH SPEC...   (SPEC is tcp:GATEWAYPORT:unix:PATH, as for --expose; PATH directly in vunet's --unix-forward-dir or next to an --expose socket it was started with, unless it runs with --sandbox=off)",
				Flags:        []cli.Flag{apiFlag()},
				Action:       exposeAddAction,
				OnUsageError: onUsageError,
			},
			{
				Name:         "list",
				Aliases:      []string{"ls"},
				Usage:        "list the exposed gateway ports (from --expose and added at run time)",
				UsageText:    "vunet expose list --api PATH [--json]",
				Flags:        []cli.Flag{apiFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON (docs/api.md) instead of a table"}},
				Action:       exposeListAction,
				OnUsageError: onUsageError,
			},
			{
				Name:         "remove",
				Aliases:      []string{"rm"},
				Usage:        "stop exposing gateway ports",
				UsageText:    "vunet expose remove --api PATH SPEC...   (tcp:GATEWAYPORT, or the SPEC it was added with, whose PATH must then match)",
				Flags:        []cli.Flag{apiFlag()},
				Action:       exposeRemoveAction,
				OnUsageError: onUsageError,
			},
		},
		HideHelpCommand: true,
		OnUsageError:    onUsageError,
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usagef("expose: unknown command %q (add, list or remove)", c.Args().First())
			}
			return usagef("expose: expected a command: add, list or remove (see 'vunet expose --help')")
		},
	}
}

// parseExposeSpecs parses every SPEC argument with parse before anything
// is sent, so a typo in the third does not leave the first two applied.
func parseExposeSpecs(c *cli.Context, name, form string, parse func(string) (config.Expose, error)) ([]api.Expose, error) {
	if c.NArg() == 0 {
		return nil, usagef("%s: expected at least one SPEC, %s", name, form)
	}
	var out []api.Expose
	for _, spec := range c.Args().Slice() {
		if strings.HasPrefix(spec, "-") {
			return nil, usagef("%s: flag %s after a SPEC; put flags first", name, spec)
		}
		e, err := parse(spec)
		if err != nil {
			return nil, usagef("%s %q: %v", name, spec, err)
		}
		out = append(out, api.Expose{Proto: "tcp", GatewayPort: e.Port, Path: e.Path})
	}
	return out, nil
}

// eachExpose applies do to each parsed SPEC in turn over the API,
// stopping at the first failure.
func eachExpose(c *cli.Context, name, verb string, es []api.Expose, do func(*api.Client, api.Expose) error) error {
	cl, err := apiClient(c, name)
	if err != nil {
		return err
	}
	defer cl.Close()
	for n, e := range es {
		if err := do(cl, e); err != nil {
			return partial(name, exposeSpec(e), n, len(es), verb, err)
		}
	}
	return nil
}

// exposeSpec is e as a removal names it: the port alone without a path.
func exposeSpec(e api.Expose) string {
	if e.Path == "" {
		return "tcp:" + strconv.Itoa(int(e.GatewayPort))
	}
	return e.String()
}

func exposeAddAction(c *cli.Context) error {
	es, err := parseExposeSpecs(c, "expose add", "tcp:GATEWAYPORT:unix:PATH", config.ParseExpose)
	if err != nil {
		return err
	}
	return eachExpose(c, "expose add", "added", es, func(cl *api.Client, e api.Expose) error {
		got, err := cl.AddExpose(c.Context, e)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "added %s (guests connect to %s)\n", got, joinAddrs(got))
		return nil
	})
}

func exposeRemoveAction(c *cli.Context) error {
	es, err := parseExposeSpecs(c, "expose remove", "tcp:GATEWAYPORT[:unix:PATH]", config.ParseExposeRef)
	if err != nil {
		return err
	}
	return eachExpose(c, "expose remove", "removed", es, func(cl *api.Client, e api.Expose) error {
		if err := cl.RemoveExpose(c.Context, e); err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "removed %s\n", exposeSpec(e))
		return nil
	})
}

// joinAddrs lists the gateway addresses of e.
func joinAddrs(e api.Expose) string {
	var s []string
	for _, a := range e.Gateway {
		s = append(s, a.String())
	}
	return strings.Join(s, ", ")
}

func exposeListAction(c *cli.Context) error {
	if c.NArg() > 0 {
		return usagef("expose list: unexpected argument %q", c.Args().First())
	}
	cl, err := apiClient(c, "expose list")
	if err != nil {
		return err
	}
	defer cl.Close()
	es, err := cl.Exposes(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if es == nil {
			es = []api.Expose{}
		}
		return writeJSON(c.App.Writer, api.Exposes{Exposes: es})
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "GATEWAY\tSOCKET\tSPEC")
	for _, e := range es {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", joinAddrs(e), e.Path, e)
	}
	return tw.Flush()
}
