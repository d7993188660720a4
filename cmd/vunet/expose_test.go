package main

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/vunet/vunet/api"
)

func (f *fakeAPI) Exposes() []api.Expose {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]api.Expose(nil), f.exposes...)
}

func (f *fakeAPI) AddExpose(e api.Expose) (api.Expose, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, o := range f.exposes {
		if o.GatewayPort == e.GatewayPort {
			return api.Expose{}, api.Errorf(api.ErrConflict, "gateway port %d is exposed already (to unix:%s)", e.GatewayPort, o.Path)
		}
	}
	e.Gateway = []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("10.0.2.2"), e.GatewayPort),
		netip.AddrPortFrom(netip.MustParseAddr("fd00::2"), e.GatewayPort)}
	f.exposes = append(f.exposes, e)
	return e, nil
}

func (f *fakeAPI) RemoveExpose(e api.Expose) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, o := range f.exposes {
		if o.GatewayPort == e.GatewayPort && (e.Path == "" || e.Path == o.Path) {
			f.exposes = append(f.exposes[:i], f.exposes[i+1:]...)
			f.removedExposes = append(f.removedExposes, e)
			return nil
		}
	}
	return api.Errorf(api.ErrNotFound, "gateway port %d is not exposed", e.GatewayPort)
}

// TestExposeCommands: vunet expose add, list and remove send what the
// specs say, print what the API answered, report a conflict in one line
// with how far the batch got, and remove by port alone or by the spec.
func TestExposeCommands(t *testing.T) {
	b := &fakeAPI{}
	sock := fakeServer(t, b)
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	r := runVunet(t, nil, "expose", "add", "--api", sock, "tcp:2375:unix:$XDG_RUNTIME_DIR/vunet/podman.sock", "tcp:8080:unix:/run/vunet/web.sock")
	want := "added tcp:2375:unix:/run/user/1000/vunet/podman.sock (guests connect to 10.0.2.2:2375, [fd00::2]:2375)\n" +
		"added tcp:8080:unix:/run/vunet/web.sock (guests connect to 10.0.2.2:8080, [fd00::2]:8080)\n"
	if r.err != nil || r.stdout != want {
		t.Fatalf("add: %q\n%s\nwant\n%s", r.line(), r.stdout, want)
	}
	r = runVunet(t, map[string]string{"VUNET_API": sock}, "expose", "list")
	if r.err != nil {
		t.Fatal(r.line())
	}
	for _, w := range []string{"GATEWAY", "SOCKET", "10.0.2.2:8080, [fd00::2]:8080  /run/vunet/web.sock", "tcp:2375:unix:/run/user/1000/vunet/podman.sock\n"} {
		if !strings.Contains(r.stdout, w) {
			t.Errorf("list lacks %q:\n%s", w, r.stdout)
		}
	}
	if n := strings.Count(r.stdout, "\n"); n != 3 {
		t.Errorf("list printed %d lines, want header + 2:\n%s", n, r.stdout)
	}
	r = runVunet(t, nil, "expose", "ls", "--api", sock, "--json")
	var es api.Exposes
	if err := json.Unmarshal([]byte(r.stdout), &es); err != nil || len(es.Exposes) != 2 || es.Exposes[1].GatewayPort != 8080 || len(es.Exposes[1].Gateway) != 2 {
		t.Errorf("list --json: %v %+v\n%s", err, es, r.stdout)
	}

	r = runVunet(t, nil, "expose", "add", "--api", sock, "tcp:9000:unix:/run/vunet/a.sock", "tcp:2375:unix:/run/vunet/b.sock")
	if !errors.Is(r.err, api.ErrConflict) || exitCode(r.err) != 1 ||
		r.line() != "vunet: expose add tcp:2375:unix:/run/vunet/b.sock: gateway port 2375 is exposed already (to unix:/run/user/1000/vunet/podman.sock) (1 of 2 already added)" {
		t.Errorf("conflicting add: %q", r.line())
	}

	r = runVunet(t, nil, "expose", "rm", "--api", sock, "tcp:2375", "tcp:8080:unix:/run/vunet/web.sock")
	if r.err != nil || r.stdout != "removed tcp:2375\nremoved tcp:8080:unix:/run/vunet/web.sock\n" {
		t.Errorf("remove: %q %q", r.line(), r.stdout)
	}
	if len(b.removedExposes) != 2 || b.removedExposes[0].Path != "" || b.removedExposes[1].Path != "/run/vunet/web.sock" {
		t.Errorf("backend saw removals %+v (the path is sent when given)", b.removedExposes)
	}
	r = runVunet(t, nil, "expose", "remove", "--api", sock, "tcp:2375")
	if !errors.Is(r.err, api.ErrNotFound) || r.line() != "vunet: expose remove tcp:2375: gateway port 2375 is not exposed" {
		t.Errorf("removing a missing expose: %q", r.line())
	}
}

func TestExposeUsageErrors(t *testing.T) {
	b := &fakeAPI{}
	sock := fakeServer(t, b)
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"expose", "add", "--api", sock}, "expose add: expected at least one SPEC, tcp:GATEWAYPORT:unix:PATH"},
		{[]string{"expose", "add", "--api", sock, "tcp:1:unix:/a.sock", "tcp:0:unix:/b.sock"}, `expose add "tcp:0:unix:/b.sock": gateway port 0 is out of range 1..65535`},
		{[]string{"expose", "add", "--api", sock, "tcp:70000:unix:/b.sock"}, "gateway port 70000 is out of range 1..65535"},
		{[]string{"expose", "add", "--api", sock, "tcp:2375"}, "expected tcp:GATEWAYPORT:unix:PATH"},
		{[]string{"expose", "add", "--api", sock, "tcp:2375:unix:rel.sock"}, "not absolute"},
		{[]string{"expose", "add", "tcp:2375:unix:/a.sock"}, "expose add: --api PATH is required (or VUNET_API)"},
		{[]string{"expose", "add", "tcp:2375:unix:/a.sock", "--api", sock}, "expose add: flag --api after a SPEC; put flags first"},
		{[]string{"expose", "remove", "--api", sock, "udp:53"}, `expose remove "udp:53": expected tcp:GATEWAYPORT or tcp:GATEWAYPORT:unix:PATH`},
		{[]string{"expose", "list", "--api", sock, "extra"}, `expose list: unexpected argument "extra"`},
		{[]string{"expose"}, "expose: expected a command"},
		{[]string{"expose", "frob"}, `expose: unknown command "frob"`},
	} {
		r := runVunet(t, nil, tt.args...)
		if r.err == nil || exitCode(r.err) != 2 || !strings.Contains(r.line(), tt.want) || strings.Contains(r.line(), "\n") {
			t.Errorf("%q: exit %d %q, want usage error containing %q", tt.args, exitCode(r.err), r.line(), tt.want)
		}
	}
	if len(b.exposes) != 0 {
		t.Errorf("a usage error still added %+v (a bad spec must stop the batch before any request)", b.exposes)
	}
}
