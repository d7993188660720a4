package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/internal/version"
)

// runFunc runs the appliance; it is runAppliance except in tests, which
// substitute a function that records the configuration it was given.
type runFunc func(ctx context.Context, cfg *config.Config, log *slog.Logger) error

// newApp returns the vunet command-line application.
func newApp() *cli.App { return buildApp(runAppliance) }

// buildApp assembles the application around run. Each subcommand comes from
// its own constructor, so commands slot into the Commands list without
// touching the rest.
func buildApp(run runFunc) *cli.App {
	return &cli.App{
		Name:  "vunet",
		Usage: "user-mode networking for QEMU virtual machines over vhost-user",
		UsageText: "vunet --socket PATH [flags]        run the appliance (QEMU connects to PATH)\n" +
			"vunet --connect PATH [flags]       run the appliance, connecting to QEMU's socket\n" +
			"vunet qemu-args --socket PATH      print the matching QEMU arguments\n" +
			"vunet forward add|list|remove ...  change the port forwards of a running vunet (--api)\n" +
			"vunet expose add|list|remove ...   change the gateway ports that reach host sockets (--api)\n" +
			"vunet stats --api PATH             print the counters of a running vunet\n" +
			"vunet state save|load --api PATH   move a migrating VM's device state between vunets",
		Description: "Flags may also be given as VUNET_<FLAG> environment variables (VUNET_LOG_LEVEL=debug)\n" +
			"and as keys of the --config TOML file. A flag beats its environment variable, which\n" +
			"beats the file, which beats the default. See docs/cli.md and docs/configuration.md.",
		Version:              version.Version,
		EnableBashCompletion: true,
		HideHelpCommand:      true,
		Flags:                runFlags(),
		Action:               func(c *cli.Context) error { return runAction(c, run) },
		Commands: []*cli.Command{
			qemuArgsCommand(),
			forwardCommand(),
			exposeCommand(),
			stateCommand(),
			statsCommand(),
			guestsCommand(),
			completionCommand(),
			versionCommand(),
			manCommand(),
		},
		OnUsageError: onUsageError,
		// main prints the error and chooses the exit code; urfave must not
		// call os.Exit itself, which would also end tests.
		ExitErrHandler: func(*cli.Context, error) {},
	}
}

// usageError marks errors caused by how vunet was invoked (a bad flag or
// value) rather than by something failing at run time.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

// exitCode maps an error to the process exit status: 2 for usage errors
// (the convention of most Unix tools), 1 for everything else.
func exitCode(err error) int {
	if errors.As(err, new(usageError)) {
		return 2
	}
	return 1
}

// onUsageError replaces urfave's default (the message followed by the whole
// help text) with one line pointing at --help.
func onUsageError(c *cli.Context, err error, _ bool) error {
	return usagef("%v (see '%s --help')", err, c.Command.HelpName)
}
