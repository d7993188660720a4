package main

import (
	"errors"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/forward/egress"
)

// Egress flags.
const (
	flagAllow           = "allow"
	flagDeny            = "deny"
	flagAllowMetadata   = "allow-metadata"
	flagNoHostAddresses = "no-host-addresses"
	flagEgress          = "egress"
	catEgress           = "Egress policy"
)

// ruleSpec is one --allow or --deny value, not yet parsed.
type ruleSpec struct {
	action egress.Action
	spec   string
}

// ruleFlags collects --allow and --deny. The rules are first-match, so the
// order between the two flags matters: both flags append to one list, in
// command-line order. urfave sets a GenericFlag's environment value through
// Value and its command-line values through Destination, which is how the
// two sources are told apart: the environment (VUNET_ALLOW, then
// VUNET_DENY, each a comma-separated list) is used only when neither flag is
// on the command line, as flag > environment for every other setting.
type ruleFlags struct {
	cli []ruleSpec
	env map[egress.Action][]string
}

// ruleValue is the flag.Value of one of the two flags, from one source.
type ruleValue struct {
	rf     *ruleFlags
	action egress.Action
	env    bool
}

func (v *ruleValue) Set(s string) error {
	if v.env {
		for _, part := range strings.Split(s, ",") {
			if part = strings.TrimSpace(part); part != "" {
				v.rf.env[v.action] = append(v.rf.env[v.action], part)
			}
		}
		return nil
	}
	v.rf.cli = append(v.rf.cli, ruleSpec{v.action, s})
	return nil
}

func (v *ruleValue) String() string { return "" }

// specs returns the rules to use and whether any were given.
func (rf *ruleFlags) specs() ([]ruleSpec, bool) {
	if len(rf.cli) > 0 {
		return rf.cli, true
	}
	var out []ruleSpec
	for _, a := range []egress.Action{egress.Allow, egress.Deny} {
		for _, s := range rf.env[a] {
			out = append(out, ruleSpec{a, s})
		}
	}
	return out, len(out) > 0
}

// egressFlags returns the flags of the egress policy. They share one
// ruleFlags, so each call (each App) has its own.
func egressFlags() []cli.Flag {
	rf := &ruleFlags{env: map[egress.Action][]string{}}
	rule := func(name string, a egress.Action, usage string) *cli.GenericFlag {
		return &cli.GenericFlag{Name: name, Category: catEgress, Usage: usage, EnvVars: envVar(name),
			Value: &ruleValue{rf: rf, action: a, env: true}, Destination: &ruleValue{rf: rf, action: a}}
	}
	const spec = "`SPEC` is [tcp:|udp:|icmp:]CIDR[:PORT[-PORT]], IPv6 with ports in brackets ([fd00::/8]:53), CIDR may be \"any\"; " +
		"rules match in command-line order, first match wins, before the defaults (repeatable)"
	return []cli.Flag{
		rule(flagAllow, egress.Allow, "allow guest traffic to a destination; "+spec),
		rule(flagDeny, egress.Deny, "deny guest traffic to a destination; "+spec),
		&cli.BoolFlag{Name: flagAllowMetadata, Category: catEgress, EnvVars: envVar(flagAllowMetadata),
			Usage: "let the guest reach link-local addresses (169.254.0.0/16, fe80::/10) and fd00:ec2::254, where clouds serve instance metadata"},
		&cli.BoolFlag{Name: flagNoHostAddresses, Category: catEgress, EnvVars: envVar(flagNoHostAddresses),
			Usage: "deny every address the host owns (kept current as interfaces change); the gateway alias to the host's loopback still works"},
		&cli.StringFlag{Name: flagEgress, Category: catEgress, EnvVars: envVar(flagEgress), DefaultText: "all",
			Usage: "`MODE` all, or none: nothing leaves but what --allow permits, the gateway alias and DNS through vunet's resolver"},
	}
}

// applyEgressFlags overlays the egress flags onto cfg. Rules given by flag
// (or environment) replace the file's list, as every list setting does.
func applyEgressFlags(c *cli.Context, cfg *config.Config) error {
	if c.IsSet(flagAllowMetadata) {
		cfg.Egress.AllowMetadata = c.Bool(flagAllowMetadata)
	}
	if c.IsSet(flagNoHostAddresses) {
		cfg.Egress.HostAddresses = !c.Bool(flagNoHostAddresses)
	}
	if err := parseFlag(c, flagEgress, egress.ParseMode, &cfg.Egress.Mode); err != nil {
		return err
	}
	v, ok := c.Generic(flagAllow).(*ruleValue)
	if !ok {
		return errors.New("internal error: --allow has no rule list")
	}
	specs, given := v.rf.specs()
	if !given {
		return nil
	}
	cfg.Egress.Rules = nil
	for _, s := range specs {
		r, err := egress.ParseSpec(s.action, s.spec)
		if err != nil {
			return flagError(s.action.String(), s.spec, err)
		}
		cfg.Egress.Rules = append(cfg.Egress.Rules, r)
	}
	return nil
}
