package main

import (
	"strings"
	"testing"

	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/forward/egress"
)

func ruleStrings(rs []egress.Rule) string {
	var out []string
	for _, r := range rs {
		out = append(out, r.String())
	}
	return strings.Join(out, "; ")
}

func TestEgressFlags(t *testing.T) {
	file := writeFile(t, "v.toml", `
[egress]
mode = "none"
rules = ["allow udp:192.0.2.53:53"]
`)
	for _, tc := range []struct {
		name  string
		env   map[string]string
		args  []string
		rules string
		mode  egress.Mode
		meta  bool
		host  bool
	}{
		{name: "defaults", rules: "", mode: egress.AllowAll, host: true},
		{name: "command-line order is kept across --allow and --deny",
			args:  []string{"--deny", "10.0.0.0/8", "--allow", "tcp:10.1.0.0/16:443", "--deny", "[fd00::/8]:53", "--allow", "fd00:ec2::254"},
			rules: "deny 10.0.0.0/8; allow tcp:10.1.0.0/16:443; deny [fd00::/8]:53; allow fd00:ec2::254", host: true},
		{name: "booleans and mode", args: []string{"--allow-metadata", "--no-host-addresses", "--egress", "none"},
			mode: egress.AllowNone, meta: true},
		{name: "environment: allows, then denies",
			env:   map[string]string{"VUNET_DENY": "any", "VUNET_ALLOW": "tcp:192.0.2.1:80,udp:[2001:db8::1]:53", "VUNET_EGRESS": "none"},
			rules: "allow tcp:192.0.2.1:80; allow udp:[2001:db8::1]:53; deny any", mode: egress.AllowNone, host: true},
		{name: "flags beat the environment", env: map[string]string{"VUNET_DENY": "any"},
			args: []string{"--allow", "192.0.2.1"}, rules: "allow 192.0.2.1", host: true},
		{name: "file", args: []string{"--config", file}, rules: "allow udp:192.0.2.53:53", mode: egress.AllowNone, host: true},
		{name: "flags replace the file's rules", args: []string{"--config", file, "--deny", "icmp:any"},
			rules: "deny icmp:any", mode: egress.AllowNone, host: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := runVunet(t, tc.env, append([]string{"--socket", "/run/v.sock"}, tc.args...)...)
			if r.err != nil {
				t.Fatal(r.line())
			}
			e := r.cfg.Egress
			if got := ruleStrings(e.Rules); got != tc.rules || e.Mode != tc.mode || e.AllowMetadata != tc.meta || e.HostAddresses != tc.host {
				t.Errorf("rules %q mode %v metadata %v host %v; want %q %v %v %v", got, e.Mode, e.AllowMetadata, e.HostAddresses,
					tc.rules, tc.mode, tc.meta, tc.host)
			}
		})
	}
}

func TestEgressFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--deny", "10.1.2.3/8"}, `--deny "10.1.2.3/8": 10.1.2.3/8 has host bits set`},
		{[]string{"--allow", "fd00::1:53:x"}, `--allow "fd00::1:53:x"`},
		{[]string{"--egress", "some"}, `--egress "some": expected all or none`},
	} {
		r := runVunet(t, nil, append([]string{"--socket", "/run/v.sock"}, tc.args...)...)
		if r.err == nil || !strings.Contains(r.err.Error(), tc.want) || exitCode(r.err) != 2 {
			t.Errorf("%v: err %v (exit %d), want usage error containing %q", tc.args, r.err, exitCode(r.err), tc.want)
		}
	}
}

func TestEgressPrintConfigRoundTrips(t *testing.T) {
	r := runVunet(t, nil, "--socket", "/run/v.sock", "--deny", "tcp:[fd00::/8]:22-23", "--allow", "any", "--egress", "none",
		"--no-host-addresses", "--print-config")
	if r.err != nil {
		t.Fatal(r.line())
	}
	c := config.Default()
	if err := c.ApplyTOML([]byte(r.stdout)); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	if got := ruleStrings(c.Egress.Rules); got != "deny tcp:[fd00::/8]:22-23; allow any" || c.Egress.Mode != egress.AllowNone || c.Egress.HostAddresses {
		t.Fatalf("read back %q %+v from\n%s", got, c.Egress, r.stdout)
	}
}
