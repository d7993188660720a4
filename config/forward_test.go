package config

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func fwd(proto, host string, guest uint16) Forward {
	return Forward{Proto: proto, Host: netip.MustParseAddrPort(host), GuestPort: guest}
}

func TestParseForward(t *testing.T) {
	tests := []struct {
		spec string
		want []Forward
	}{
		{"tcp:8080:80", []Forward{fwd("tcp", "127.0.0.1:8080", 80)}},
		{"udp:5353:53", []Forward{fwd("udp", "127.0.0.1:5353", 53)}},
		{"tcp:0.0.0.0:2222:22", []Forward{fwd("tcp", "0.0.0.0:2222", 22)}},
		{"tcp:192.0.2.1:1:65535", []Forward{fwd("tcp", "192.0.2.1:1", 65535)}},
		{"tcp:[::1]:8443:443", []Forward{fwd("tcp", "[::1]:8443", 443)}},
		{"udp:[::]:53:53", []Forward{fwd("udp", "[::]:53", 53)}},
		{"tcp:[fe80::1%eth0]:80:80", []Forward{fwd("tcp", "[fe80::1%eth0]:80", 80)}},
		{"tcp:8000-8002:9000-9002", []Forward{
			fwd("tcp", "127.0.0.1:8000", 9000),
			fwd("tcp", "127.0.0.1:8001", 9001),
			fwd("tcp", "127.0.0.1:8002", 9002),
		}},
		{"udp:[::1]:7-8:7-8", []Forward{fwd("udp", "[::1]:7", 7), fwd("udp", "[::1]:8", 8)}},
		{"tcp:65535-65535:1-1", []Forward{fwd("tcp", "127.0.0.1:65535", 1)}},
		{"tcp:0080:080", []Forward{fwd("tcp", "127.0.0.1:80", 80)}},
	}
	for _, tt := range tests {
		got, err := ParseForward(tt.spec)
		if err != nil {
			t.Errorf("ParseForward(%q): %v", tt.spec, err)
			continue
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("ParseForward(%q) = %v, want %v", tt.spec, got, tt.want)
		}
	}
}

func TestParseForwardErrors(t *testing.T) {
	const tcpForm = "expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT"
	tests := []struct{ spec, want string }{
		{"", "expected tcp|udp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT"},
		{"8080:80", "expected tcp|udp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT"},
		{"sctp:8080:80", "expected tcp|udp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT"},
		{"TCP:8080:80", "expected tcp|udp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT"},
		{"tcp", tcpForm},
		{"tcp:80", tcpForm},
		{"tcp:x:80", tcpForm},
		{"tcp:80:x", tcpForm},
		{"tcp:80:", tcpForm},
		{"tcp::80:80", tcpForm},
		{"tcp:localhost:80:80", tcpForm},
		{"tcp:1.2.3:80:80", tcpForm},
		{"tcp:+80:80", tcpForm},
		{"tcp:-80:80", tcpForm},
		{"tcp:80-:80", tcpForm},
		{"tcp:1.2.3.4:5:6:7", tcpForm},
		{"udp:80:80:", "expected udp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT"},
		{"tcp:[::1:80:80", tcpForm},
		{"tcp:[::1]80:80", tcpForm},
		{"tcp:[::1]:80", tcpForm},
		{"tcp:[::1]:1.2.3.4:80:80", tcpForm},
		{"tcp:[1.2.3.4]:80:80", `host address "1.2.3.4": ` + tcpForm + " with an IPv6 address in brackets"},
		{"tcp:[zz]:80:80", `host address "zz": ` + tcpForm + " with an IPv6 address in brackets"},
		{"tcp:::1:8080:80", `IPv6 host address must be in brackets, as in "tcp:[::1]:8080:80"`},
		{"tcp:0:80", "host port 0 is out of range 1..65535"},
		{"tcp:80:0", "guest port 0 is out of range 1..65535"},
		{"tcp:70000:80", "host port 70000 is out of range 1..65535"},
		{"tcp:80:99999999999999999999", "guest port 99999999999999999999 is out of range 1..65535"},
		{"tcp:8010-8000:80-90", "host port range 8010-8000 is reversed; write 8000-8010"},
		{"tcp:8000-8010:9000-9005", "host ports 8000-8010 cover 11 port(s) but guest ports 9000-9005 cover 6; ranges must be the same length"},
		{"tcp:8000-8001:80", "host ports 8000-8001 cover 2 port(s) but guest ports 80 cover 1; ranges must be the same length"},
	}
	for _, tt := range tests {
		got, err := ParseForward(tt.spec)
		if err == nil {
			t.Errorf("ParseForward(%q) = %v, want error %q", tt.spec, got, tt.want)
			continue
		}
		if err.Error() != tt.want {
			t.Errorf("ParseForward(%q) error\n got %q\nwant %q", tt.spec, err, tt.want)
		}
	}
}

func TestForwardString(t *testing.T) {
	for _, tt := range []struct {
		f    Forward
		want string
	}{
		{fwd("tcp", "127.0.0.1:8080", 80), "tcp:127.0.0.1:8080:80"},
		{fwd("udp", "[::1]:53", 53), "udp:[::1]:53:53"},
	} {
		if got := tt.f.String(); got != tt.want {
			t.Errorf("%#v.String() = %q, want %q", tt.f, got, tt.want)
		}
	}
}

// FuzzParseForward checks that the parser never panics, that everything it
// accepts is well formed, and that String gives a spec parsing back to the
// same forward. Seeds live in testdata/fuzz/FuzzParseForward.
func FuzzParseForward(f *testing.F) {
	f.Add("tcp:8080:80")
	f.Add("unix:/run/user/1000/app.sock:80")
	f.Add("unix:$XDG_RUNTIME_DIR/a:b.sock:22")
	f.Fuzz(func(t *testing.T, spec string) {
		fws, err := ParseForward(spec)
		if err != nil {
			// Errors end up as one line of CLI output.
			if msg := err.Error(); msg == "" || strings.Contains(msg, "\n") {
				t.Fatalf("ParseForward(%q): bad error message %q", spec, msg)
			}
			return
		}
		if len(fws) == 0 || len(fws) > 65535 {
			t.Fatalf("ParseForward(%q) returned %d forwards", spec, len(fws))
		}
		for i, fw := range fws {
			if fw.Proto == "unix" {
				if len(fws) != 1 || fw.GuestPort == 0 || fw.Host.IsValid() || !strings.HasPrefix(fw.Path, "/") || len(fw.Path) >= maxSocketPath {
					t.Fatalf("ParseForward(%q) = %#v is malformed", spec, fws)
				}
			} else if fw.Proto != "tcp" && fw.Proto != "udp" || fw.Host.Port() == 0 || fw.GuestPort == 0 || !fw.Host.Addr().IsValid() || fw.Path != "" {
				t.Fatalf("ParseForward(%q)[%d] = %#v is malformed", spec, i, fw)
			}
			if i > 0 && (fw.Host.Port() != fws[i-1].Host.Port()+1 || fw.GuestPort != fws[i-1].GuestPort+1) {
				t.Fatalf("ParseForward(%q): range not consecutive at %d", spec, i)
			}
			again, err := ParseForward(fw.String())
			if err != nil || len(again) != 1 || again[0] != fw {
				t.Fatalf("round trip of %q (from %q) = %v, %v", fw.String(), spec, again, err)
			}
		}
	})
}

func TestParseUnixForward(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	for spec, want := range map[string]Forward{
		"unix:/tmp/app.sock:80":                {Proto: "unix", Path: "/tmp/app.sock", GuestPort: 80},
		"unix:$XDG_RUNTIME_DIR/app.sock:2375":  {Proto: "unix", Path: "/run/user/1000/app.sock", GuestPort: 2375},
		"unix:${XDG_RUNTIME_DIR}//x/../a.s:22": {Proto: "unix", Path: "/run/user/1000/a.s", GuestPort: 22},
		"unix:/tmp/with:colon.sock:8080":       {Proto: "unix", Path: "/tmp/with:colon.sock", GuestPort: 8080},
	} {
		got, err := ParseForward(spec)
		if err != nil || len(got) != 1 || got[0] != want {
			t.Errorf("ParseForward(%q) = %v, %v; want %v", spec, got, err, want)
			continue
		}
		if again, err := ParseForward(got[0].String()); err != nil || again[0] != want {
			t.Errorf("round trip of %q: %v, %v", got[0].String(), again, err)
		}
	}
	for spec, msg := range map[string]string{
		"unix:/tmp/app.sock":                       "expected unix:PATH:[GUEST:]GUESTPORT",
		"unix:app.sock:80":                         "not absolute",
		"unix::80":                                 "empty",
		"unix:/tmp/a.sock:0":                       "out of range",
		"unix:/tmp/a.sock:80-81":                   "expected unix:PATH:[GUEST:]GUESTPORT",
		"unix:/" + strings.Repeat("a", 120) + ":1": "must be shorter than 108",
	} {
		if _, err := ParseForward(spec); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("ParseForward(%q) error %v, want one containing %q", spec, err, msg)
		}
	}
	t.Setenv("XDG_RUNTIME_DIR", "")
	if _, err := ParseForward("unix:$XDG_RUNTIME_DIR/app.sock:80"); err == nil || !strings.Contains(err.Error(), "not set") {
		t.Errorf("unset XDG_RUNTIME_DIR: %v", err)
	}
}

func TestParseExpose(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	for spec, want := range map[string]Expose{
		"tcp:2375:unix:/run/podman/podman.sock":          {Port: 2375, Path: "/run/podman/podman.sock"},
		"tcp:8080:unix:$XDG_RUNTIME_DIR/podman/api.sock": {Port: 8080, Path: "/run/user/1000/podman/api.sock"},
	} {
		got, err := ParseExpose(spec)
		if err != nil || got != want {
			t.Errorf("ParseExpose(%q) = %v, %v; want %v", spec, got, err, want)
			continue
		}
		if again, err := ParseExpose(got.String()); err != nil || again != want {
			t.Errorf("round trip of %q: %v, %v", got.String(), again, err)
		}
	}
	for spec, msg := range map[string]string{
		"udp:53:unix:/run/x.sock":  "expected tcp:GATEWAYPORT:unix:PATH",
		"tcp:2375:/run/x.sock":     "expected tcp:GATEWAYPORT:unix:PATH",
		"tcp:0:unix:/run/x.sock":   "out of range",
		"tcp:x:unix:/run/x.sock":   "expected tcp:GATEWAYPORT:unix:PATH",
		"tcp:2375:unix:run/x.sock": "not absolute",
	} {
		if _, err := ParseExpose(spec); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("ParseExpose(%q) error %v, want one containing %q", spec, err, msg)
		}
	}
}

func TestExposeAndUnixForwardInFile(t *testing.T) {
	c := Default()
	c.Forwards = []Forward{{Proto: "unix", Path: "/tmp/a.sock", GuestPort: 22}}
	c.Expose = []Expose{{Port: 2375, Path: "/run/podman.sock"}, {Port: 2375, Path: "/run/other.sock"}}
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "gateway port 2375 is exposed more than once") {
		t.Errorf("Validate: %v", err)
	}
}

func TestUnixForwardAndExposeKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vunet.toml")
	body := "forwards = [\"unix:/tmp/app.sock:22\", \"tcp:2222:22\"]\nexpose = [\"tcp:2375:unix:/run/podman/podman.sock\"]\n"
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	c := Default()
	if err := c.ApplyFile(path); err != nil {
		t.Fatal(err)
	}
	if len(c.Forwards) != 2 || c.Forwards[0] != (Forward{Proto: "unix", Path: "/tmp/app.sock", GuestPort: 22}) {
		t.Errorf("forwards %v", c.Forwards)
	}
	if len(c.Expose) != 1 || c.Expose[0] != (Expose{Port: 2375, Path: "/run/podman/podman.sock"}) {
		t.Errorf("expose %v", c.Expose)
	}
	c.Socket = "/tmp/vunet.sock"
	if err := c.Validate(); err != nil {
		t.Error(err)
	}
	if err := os.WriteFile(path, []byte("expose = [\"tcp:2375:unix:rel.sock\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Default().ApplyFile(path); err == nil || !strings.Contains(err.Error(), "expose[0]") {
		t.Errorf("bad expose key: %v", err)
	}
}

func TestParseForwardGuest(t *testing.T) {
	g := func(f Forward, sel GuestSelector) Forward { f.Guest = sel; return f }
	name := GuestSelector{Name: "vm1"}
	for _, tt := range []struct {
		spec string
		want []Forward
	}{
		{"tcp:2222:vm1:22", []Forward{g(fwd("tcp", "127.0.0.1:2222", 22), name)}},
		{"tcp:2222:VM1:22", []Forward{g(fwd("tcp", "127.0.0.1:2222", 22), name)}},
		{"tcp:0.0.0.0:2222:vm1:22", []Forward{g(fwd("tcp", "0.0.0.0:2222", 22), name)}},
		{"tcp:[::1]:2222:vm1:22", []Forward{g(fwd("tcp", "[::1]:2222", 22), name)}},
		{"udp:5353:10.0.2.16:53", []Forward{g(fwd("udp", "127.0.0.1:5353", 53), GuestSelector{Addr: netip.MustParseAddr("10.0.2.16")})}},
		{"tcp:2222:[fd00::16]:22", []Forward{g(fwd("tcp", "127.0.0.1:2222", 22), GuestSelector{Addr: netip.MustParseAddr("fd00::16")})}},
		{"tcp:[::1]:2222:[fd00::16]:22", []Forward{g(fwd("tcp", "[::1]:2222", 22), GuestSelector{Addr: netip.MustParseAddr("fd00::16")})}},
		{"tcp:2222:52-54-00-12-34-56:22", []Forward{g(fwd("tcp", "127.0.0.1:2222", 22), GuestSelector{MAC: "52:54:00:12:34:56"})}},
		{"tcp:2222:[52:54:00:12:34:5A]:22", []Forward{g(fwd("tcp", "127.0.0.1:2222", 22), GuestSelector{MAC: "52:54:00:12:34:5a"})}},
		{"tcp:8000-8001:web-2:80-81", []Forward{
			g(fwd("tcp", "127.0.0.1:8000", 80), GuestSelector{Name: "web-2"}),
			g(fwd("tcp", "127.0.0.1:8001", 81), GuestSelector{Name: "web-2"}),
		}},
		// The forms without a guest keep their meaning.
		{"tcp:127.0.0.1:8080:80", []Forward{fwd("tcp", "127.0.0.1:8080", 80)}},
		{"tcp:[::1]:8443:443", []Forward{fwd("tcp", "[::1]:8443", 443)}},
	} {
		got, err := ParseForward(tt.spec)
		if err != nil || !slices.Equal(got, tt.want) {
			t.Errorf("ParseForward(%q) = %v, %v; want %v", tt.spec, got, err, tt.want)
			continue
		}
		if again, err := ParseForward(got[0].String()); err != nil || again[0] != got[0] {
			t.Errorf("round trip of %q: %v, %v", got[0].String(), again, err)
		}
	}
	for spec, msg := range map[string]string{
		"tcp:2222:vm_1:22":                            `guest "vm_1": a guest is`,
		"tcp:2222:-vm:22":                             `guest "-vm": a guest is`,
		"tcp:2222:[vm1]:22":                           `guest "[vm1]": a guest is`,
		"tcp:2222:[fe80::1%eth0]:22":                  `guest "[fe80::1%eth0]": a guest is`,
		"tcp:2222:52:54:00:12:34:56:22":               `a guest MAC must be in brackets or written with dashes, as in "2222:[52:54:00:12:34:56]:22"`,
		"tcp:2222:1.2.3:22":                           `guest "1.2.3": a guest is`,
		"tcp:127.0.0.1:2222:vm1":                      "expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT",
		"tcp:127.0.0.1:2222:22:22":                    "expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT",
		"tcp:vm1:2222:22":                             "expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT",
		"tcp:2222:vm1:vm2:22":                         "expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT",
		"tcp:2222:[fd00::16:22":                       "expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT",
		"tcp:2222:x[fd00::16]:22":                     "expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT",
		"tcp:2222:" + strings.Repeat("a", 64) + ":22": "a guest is",
	} {
		if got, err := ParseForward(spec); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("ParseForward(%q) = %v, %v; want an error containing %q", spec, got, err, msg)
		}
	}
}

func TestParseUnixForwardGuest(t *testing.T) {
	for spec, want := range map[string]Forward{
		"unix:/tmp/app.sock:vm1:80":          {Proto: "unix", Path: "/tmp/app.sock", GuestPort: 80, Guest: GuestSelector{Name: "vm1"}},
		"unix:/tmp/app.sock:[fd00::16]:80":   {Proto: "unix", Path: "/tmp/app.sock", GuestPort: 80, Guest: GuestSelector{Addr: netip.MustParseAddr("fd00::16")}},
		"unix:/tmp/app.sock:10.0.2.16:80":    {Proto: "unix", Path: "/tmp/app.sock", GuestPort: 80, Guest: GuestSelector{Addr: netip.MustParseAddr("10.0.2.16")}},
		"unix:/tmp/a:b.sock:80":              {Proto: "unix", Path: "/tmp/a:b.sock", GuestPort: 80},
		"unix:/tmp/a:b.sock:vm1:80":          {Proto: "unix", Path: "/tmp/a:b.sock", GuestPort: 80, Guest: GuestSelector{Name: "vm1"}},
		"unix:/tmp/x:vm1/./:80":              {Proto: "unix", Path: "/tmp/x:vm1", GuestPort: 80},
		"unix:/tmp/s:[52:54:00:12:34:56]:22": {Proto: "unix", Path: "/tmp/s", GuestPort: 22, Guest: GuestSelector{MAC: "52:54:00:12:34:56"}},
	} {
		got, err := ParseForward(spec)
		if err != nil || len(got) != 1 || got[0] != want {
			t.Errorf("ParseForward(%q) = %v, %v; want %v", spec, got, err, want)
			continue
		}
		if again, err := ParseForward(got[0].String()); err != nil || again[0] != want {
			t.Errorf("round trip of %q: %v, %v", got[0].String(), again, err)
		}
	}
}

// FuzzParseExpose checks ParseExpose and ParseExposeRef (the specs of
// vunet expose add and remove): no panic, one-line errors, everything
// accepted well formed, and String parsing back to the same expose.
func FuzzParseExpose(f *testing.F) {
	f.Add("tcp:2375:unix:/run/user/1000/podman/podman.sock")
	f.Add("tcp:2375")
	f.Add("tcp:1:unix:$XDG_RUNTIME_DIR/a:unix:b.sock")
	f.Add("tcp:70000")
	f.Fuzz(func(t *testing.T, spec string) {
		t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
		e, err := ParseExpose(spec)
		r, rerr := ParseExposeRef(spec)
		for _, err := range []error{err, rerr} {
			if err != nil {
				if msg := err.Error(); msg == "" || strings.Contains(msg, "\n") {
					t.Fatalf("%q: bad error message %q", spec, msg)
				}
			}
		}
		if err == nil {
			if e.Port == 0 || !strings.HasPrefix(e.Path, "/") || len(e.Path) >= maxSocketPath || strings.ContainsRune(e.Path, 0) {
				t.Fatalf("ParseExpose(%q) = %#v is malformed", spec, e)
			}
			if again, err := ParseExpose(e.String()); err != nil || again != e {
				t.Fatalf("ParseExpose(%q) = %#v; String %q parses to %#v, %v", spec, e, e.String(), again, err)
			}
			// A spec add accepts, remove accepts as the same expose.
			if rerr != nil || r != e {
				t.Fatalf("ParseExposeRef(%q) = %#v, %v; want %#v", spec, r, rerr, e)
			}
		}
		if rerr == nil && r.Path == "" {
			again, err := ParseExposeRef(strings.TrimSuffix(r.String(), ":unix:"))
			if r.Port == 0 || err != nil || again != r {
				t.Fatalf("ParseExposeRef(%q) = %#v; its port alone parses to %#v, %v", spec, r, again, err)
			}
		}
	})
}

func TestParseExposeRef(t *testing.T) {
	for spec, want := range map[string]Expose{
		"tcp:2375":                  {Port: 2375},
		"tcp:2375:unix:/run/a.sock": {Port: 2375, Path: "/run/a.sock"},
	} {
		if got, err := ParseExposeRef(spec); err != nil || got != want {
			t.Errorf("ParseExposeRef(%q) = %#v, %v; want %#v", spec, got, err, want)
		}
	}
	for spec, msg := range map[string]string{
		"tcp:0":              "gateway port 0 is out of range 1..65535",
		"tcp:70000":          "out of range",
		"udp:53":             exposeRefForm,
		"tcp:":               exposeRefForm,
		"tcp:2375:unix:rel":  "not absolute",
		"tcp:x:unix:/a.sock": "expected tcp:GATEWAYPORT:unix:PATH",
	} {
		if _, err := ParseExposeRef(spec); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("ParseExposeRef(%q) = %v; want an error with %q", spec, err, msg)
		}
	}
}
