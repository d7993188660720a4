package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/devstate"
)

// stateCommand moves a live-migrated VM's device state from the source
// vunet to the destination over their API sockets, for frontends that do
// not transfer back-end state themselves (QEMU before 10.0, see
// docs/migration.md):
//
//	vunet state save --api SRC.sock | vunet state load --api DST.sock
func stateCommand() *cli.Command {
	return &cli.Command{
		Name:  "state",
		Usage: "save the device state of a migrating VM's vunet or load it into the destination's (over --api)",
		UsageText: "vunet state save --api PATH [--output FILE]\n" +
			"vunet state load --api PATH [--input FILE] [--json]\n" +
			"vunet state save --api SRC | vunet state load --api DST",
		Subcommands: []*cli.Command{
			{
				Name:      "save",
				Usage:     "write the device state (leases, runtime forwards, UDP flows) of the source vunet",
				UsageText: "vunet state save --api PATH [--output FILE]   (standard output by default, not a terminal)",
				Flags: []cli.Flag{apiFlag(), &cli.StringFlag{Name: "output", Aliases: []string{"o"},
					Usage: "write the state to `FILE` (mode 0600) instead of standard output", TakesFile: true}},
				Action:       stateSaveAction,
				OnUsageError: onUsageError,
			},
			{
				Name:      "load",
				Usage:     "apply a device state from the source vunet to this (destination) vunet",
				UsageText: "vunet state load --api PATH [--input FILE] [--json]   (standard input by default)",
				Flags: []cli.Flag{apiFlag(), &cli.StringFlag{Name: "input", Aliases: []string{"i"},
					Usage: "read the state from `FILE` instead of standard input", TakesFile: true},
					&cli.BoolFlag{Name: "json", Usage: "print what was restored as JSON (docs/api.md)"}},
				Action:       stateLoadAction,
				OnUsageError: onUsageError,
			},
		},
		HideHelpCommand: true,
		OnUsageError:    onUsageError,
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usagef("state: unknown command %q (save or load)", c.Args().First())
			}
			return usagef("state: expected a command: save or load (see 'vunet state --help')")
		},
	}
}

func stateSaveAction(c *cli.Context) error {
	if c.NArg() > 0 {
		return usagef("state save: unexpected argument %q", c.Args().First())
	}
	out := c.App.Writer
	path := c.String("output")
	if path == "" && isTerminal(out) {
		return usagef("state save: the state is binary; redirect standard output, pipe it into 'vunet state load', or use --output FILE")
	}
	cl, err := apiClient(c, "state save")
	if err != nil {
		return err
	}
	defer cl.Close()
	b, err := cl.SaveState(c.Context)
	if err != nil {
		return err
	}
	if path != "" {
		// The state names the guest's addresses and ports: the owner's only.
		return os.WriteFile(path, b, 0o600)
	}
	_, err = out.Write(b)
	return err
}

func stateLoadAction(c *cli.Context) error {
	if c.NArg() > 0 {
		return usagef("state load: unexpected argument %q", c.Args().First())
	}
	var in io.Reader = c.App.Reader
	if path := c.String("input"); path != "" {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	} else if readsTerminal(in) {
		return usagef("state load: expected the state on standard input (from 'vunet state save') or --input FILE")
	}
	b, err := io.ReadAll(io.LimitReader(in, devstate.MaxSize+1))
	if err != nil {
		return err
	}
	// Checked here too, so that a wrong file gets its reason without a
	// round trip; the destination decodes it again, as it must.
	if _, err := devstate.Decode(b); err != nil {
		return fmt.Errorf("state load: %w", err)
	}
	cl, err := apiClient(c, "state load")
	if err != nil {
		return err
	}
	defer cl.Close()
	sum, err := cl.LoadState(c.Context, b)
	if err != nil {
		return err
	}
	w := c.App.Writer
	if c.Bool("json") {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(sum)
	}
	fmt.Fprintf(w, "restored %d leases, %d port forwards, %d gateway exposes, %d UDP flows, %d TCP connections (state saved %s)\n",
		sum.Leases, sum.Forwards, sum.Exposes, sum.UDPFlows, sum.TCP, sum.SavedAt.Format("2006-01-02 15:04:05.000 MST"))
	if sum.Pending > 0 {
		fmt.Fprintf(w, "%d port forwards wait for their host port (still held by the source vunet?); retried for 30 s\n", sum.Pending)
	}
	for _, p := range sum.Problems {
		fmt.Fprintf(w, "not restored: %s\n", p)
	}
	return nil
}

// readsTerminal reports whether r is a terminal.
func readsTerminal(r io.Reader) bool {
	f, ok := r.(*os.File)
	return ok && isTerminal(f)
}
