package config

import (
	"bytes"
	"strings"
	"testing"
)

// TestUnixForwardDirKey: unix_forward_dir is read from a config file
// (cleaned, $XDG_RUNTIME_DIR expanded), refused when relative or too long
// for a socket name to fit after it, and written back by WriteTOML.
func TestUnixForwardDirKey(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	c := Default()
	if err := c.ApplyTOML([]byte(`unix_forward_dir = "$XDG_RUNTIME_DIR/vunet//fwd/"`)); err != nil {
		t.Fatal(err)
	}
	if c.UnixForwardDir != "/run/user/1000/vunet/fwd" {
		t.Fatalf("UnixForwardDir = %q", c.UnixForwardDir)
	}
	var b bytes.Buffer
	if err := c.WriteTOML(&b); err != nil {
		t.Fatal(err)
	}
	back := Default()
	if err := back.ApplyTOML(b.Bytes()); err != nil || back.UnixForwardDir != c.UnixForwardDir {
		t.Fatalf("round trip: %q, %v\n%s", back.UnixForwardDir, err, b.String())
	}
	for _, bad := range []string{"fwd", "/" + strings.Repeat("d", 106), ""} {
		c := Default()
		if err := c.ApplyTOML([]byte(`unix_forward_dir = "` + bad + `"`)); err == nil || !strings.Contains(err.Error(), "unix_forward_dir") {
			t.Errorf("unix_forward_dir = %q: %v, want an error naming the key", bad, err)
		}
	}
}
