package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// guestTimeout bounds one guest run. An idle run of the full scenario takes
// well under a minute; TCG on a loaded machine can be many times slower.
const guestTimeout = 5 * time.Minute

// env is the host side shared by a test's guests: an HTTP server on
// 127.0.0.1 and [::1] and a DNS server used as vunet's upstream.
type env struct {
	http *harness.HTTPServer
	dns  *harness.DNSServer
}

// setup skips under -short and without QEMU (failing instead under CI=true,
// see qemutest.EnsureGuest), requires the private namespace, builds the
// guest and starts the servers.
func setup(t *testing.T) *env {
	t.Helper()
	if testing.Short() {
		t.Skip("boots QEMU guests; skipped with -short")
	}
	if !isolated {
		msg := "needs a private network namespace (run as root with unshare available)"
		if os.Getenv("CI") != "" && os.Getenv("CI") != "false" && os.Getenv("CI") != "0" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	qemutest.EnsureGuest(t)
	vunettest.Binary(t)
	h, err := harness.StartHTTP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	if h.Port6 == 0 {
		t.Fatal("cannot listen on [::1] (IPv6 disabled on loopback?)")
	}
	d, err := harness.StartDNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return &env{http: h, dns: d}
}

// vunetArgs returns the flags every vunet in these tests gets, plus extra.
func (e *env) vunetArgs(extra ...string) []string {
	return append([]string{"--dns-upstream", e.dns.Addr}, extra...)
}

// shortSocket returns a socket path short enough for sun_path (t.TempDir
// paths of long subtest names are not).
func shortSocket(t *testing.T) string {
	dir, err := os.MkdirTemp("", "vu-e2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "vunet.sock")
}

// script assembles a guest script from steps.
func script(steps ...string) string {
	return harness.Prelude + strings.Join(steps, "") + harness.Epilogue
}

// startGuest boots g; on failure the test logs the whole guest console.
func startGuest(t *testing.T, ctx context.Context, g *qemutest.Guest) *qemutest.Instance {
	t.Helper()
	if g.Timeout == 0 {
		g.Timeout = guestTimeout
	}
	inst, err := g.Start(ctx, t)
	if err != nil {
		t.Fatalf("starting QEMU: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("guest console (complete):\n%s", inst.Console())
		}
	})
	return inst
}

// finish waits for the guest to power off, logs every step with its
// in-guest time, and fails the test for each of want that did not pass (and
// for any failed step).
func finish(t *testing.T, inst *qemutest.Instance, want ...string) []harness.Step {
	t.Helper()
	res, err := inst.Wait()
	steps := harness.ParseSteps(res.Console)
	var b strings.Builder
	for _, s := range steps {
		status := "ok  "
		if !s.OK {
			status = "FAIL"
		}
		fmt.Fprintf(&b, "\n  %s %-22s %7.2fs  %s", status, s.Name, s.Elapsed.Seconds(), s.Detail)
	}
	t.Logf("guest ran %v (QEMU start to power-off), exit %d; steps:%s", res.Duration.Round(10*time.Millisecond), res.ExitCode, b.String())
	if err != nil {
		t.Errorf("guest: %v", err)
	}
	for _, name := range want {
		s, ok := harness.Find(steps, name)
		switch {
		case !ok:
			t.Errorf("step %s: no result (guest died or script broken)", name)
		case !s.OK:
			t.Errorf("step %s failed: %s", name, s.Detail)
		}
	}
	for _, s := range steps {
		if !s.OK && !contains(want, s.Name) {
			t.Errorf("step %s failed: %s", s.Name, s.Detail)
		}
	}
	if err == nil && res.ExitCode != 0 && !t.Failed() {
		t.Errorf("guest script exited %d", res.ExitCode)
	}
	return steps
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// checkUpload compares the hash the guest printed for an upload step with
// the one the HTTP server computed from the body it received.
func (e *env) checkUpload(t *testing.T, steps []harness.Step, name string) {
	t.Helper()
	s, ok := harness.Find(steps, name)
	if !ok || !s.OK {
		return // already reported
	}
	u, ok := e.http.Upload(name)
	if !ok {
		t.Errorf("%s: the server recorded no upload", name)
		return
	}
	if u.SHA256 != s.Field("sha256") || u.Bytes != harness.UploadLen {
		t.Errorf("%s: server got %d bytes sha256 %s; guest sent %d bytes sha256 %s",
			name, u.Bytes, u.SHA256, harness.UploadLen, s.Field("sha256"))
	}
}

// iperfLoss parses "lost=L/T" from an iperf step.
func iperfLoss(s harness.Step) (lost, total int, ok bool) {
	l, tot, found := strings.Cut(s.Field("lost"), "/")
	if !found {
		return 0, 0, false
	}
	a, err1 := strconv.Atoi(l)
	b, err2 := strconv.Atoi(tot)
	return a, b, err1 == nil && err2 == nil && b > 0
}
