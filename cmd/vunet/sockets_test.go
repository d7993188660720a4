package main

import (
	"strings"
	"testing"
	"time"
)

func TestSocketFlags(t *testing.T) {
	file := writeFile(t, "v.toml", "socket_mode = \"0640\"\nsetup_timeout = \"30s\"\npcap_max_size = \"1G\"\npcap = \"/tmp/x.pcap\"\n")
	r := runVunet(t, map[string]string{"VUNET_SOCKET_GROUP": "kvm"},
		"--socket", "/run/v.sock", "--config", file, "--socket-mode", "0660", "--pcap-max-size", "500M")
	if r.err != nil {
		t.Fatal(r.err)
	}
	c := r.cfg
	if c.SocketMode != 0o660 || c.SocketGroup != "kvm" || c.SetupTimeout != 30*time.Second || c.PCAPMaxSize != 500<<20 {
		t.Fatalf("mode %o group %q setup %v pcap max %d", c.SocketMode, c.SocketGroup, c.SetupTimeout, c.PCAPMaxSize)
	}
	// Defaults.
	r = runVunet(t, nil, "--socket", "/run/v.sock")
	if r.err != nil || r.cfg.SocketMode != 0o600 || r.cfg.SetupTimeout != 10*time.Second || r.cfg.PCAPMaxSize != 0 {
		t.Fatalf("defaults: %v %+v", r.err, r.cfg)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--socket-group", "kvm"}, "--socket-group: group kvm cannot connect with socket_mode 0600: use 0660"},
		{[]string{"--socket-mode", "999"}, "--socket-mode"},
		{[]string{"--setup-timeout", "-1s"}, "--setup-timeout"},
		{[]string{"--pcap-max-size", "12Q"}, "--pcap-max-size"},
		{[]string{"--pcap-max-size", "1M"}, "--pcap-max-size: is set but pcap is not"},
	} {
		r := runVunet(t, nil, append([]string{"--socket", "/run/v.sock"}, tc.args...)...)
		if r.err == nil || !strings.Contains(r.line(), tc.want) {
			t.Errorf("%v: %q, want %q", tc.args, r.line(), tc.want)
		}
	}
	r = runVunet(t, nil, "--connect", "/run/q.sock", "--socket-group", "kvm", "--socket-mode", "0660")
	if r.err == nil {
		t.Error("--socket-group accepted with --connect")
	}
}
