package harness

import (
	"os/exec"
	"strings"
	"testing"
)

// Tshark runs tshark on a capture file with args (a display filter, fields
// to print...) and returns its trimmed output; an error fails the test.
func Tshark(t testing.TB, file string, args ...string) string {
	t.Helper()
	cmd := exec.Command("tshark", append([]string{"-n", "-r", file}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("tshark %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}
