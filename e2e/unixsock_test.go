package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// TestLinuxGuestUnixSockets is the real-client test of Unix socket
// forwards (docs/forwarding.md), with the sandbox on (vunet started as root
// runs as nobody): a host client on the --forward unix:PATH:8080 socket
// reaches the guest's nc, which sees it coming from the gateway; the
// guest's wget of http://10.0.2.2:2375/ reaches an HTTP server on a host
// Unix socket through --expose tcp:2375:unix:PATH. The client goes
// through a unix forward added at run time (vunet forward add, in
// --unix-forward-dir): the socket the confined vunet created after
// start-up; the --forward one is checked for its mode and that it
// accepts. Two gateway ports exposed at run time (vunet expose add, to a
// socket in --unix-forward-dir and to one next to the --expose socket)
// answer the guest's wget as well: the confined vunet connects to them as
// nobody.
func TestLinuxGuestUnixSockets(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*guestTimeout)
	defer cancel()

	// The exposed socket must be reachable by the user vunet runs as
	// (nobody when the test runs as root).
	dir, err := os.MkdirTemp("", "vu-e2e-unix")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	api := filepath.Join(dir, "api.sock")
	const body = "unix-exposed"
	serveHTTPUnix(t, api, body)

	fwd := filepath.Join(dir, "app.sock")
	apiSock := filepath.Join(dir, "vunet-api.sock")
	fwdDir := filepath.Join(dir, "fwd")
	vn := vunettest.Start(t, e.vunetArgs(
		"--forward", fmt.Sprintf("unix:%s:%d", fwd, guestFwdPort),
		"--expose", "tcp:2375:unix:"+api,
		"--api", apiSock, "--unix-forward-dir", fwdDir)...)
	if fi, err := os.Lstat(fwd); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("unix forward socket %s: %v, %v; want mode 0600", fwd, fi, err)
	}
	if c, err := net.Dial("unix", fwd); err != nil {
		t.Errorf("unix forward socket %s: %v", fwd, err)
	} else {
		c.Close()
	}
	// Added while vunet is confined (as root it runs as nobody).
	runtimeFwd := filepath.Join(fwdDir, "app.sock")
	vunetCLI(t, nil, "forward", "add", "--api", apiSock, fmt.Sprintf("unix:%s:%d", runtimeFwd, guestFwdPort))
	// The directory vunet made (its user's, 0700) holds the service's
	// socket; the test, root, may put it there.
	inDir, nextTo := filepath.Join(fwdDir, "svc.sock"), filepath.Join(dir, "next.sock")
	serveHTTPUnix(t, inDir, "runtime-in-dir")
	serveHTTPUnix(t, nextTo, "runtime-next-to")
	vunetCLI(t, nil, "expose", "add", "--api", apiSock, "tcp:2376:unix:"+inDir, "tcp:2377:unix:"+nextTo)
	inst := startGuest(t, ctx, &qemutest.Guest{
		Socket: vn.Socket,
		Script: script(
			harness.StepDHCP(1500),
			harness.StepFetch("expose", "http://"+harness.Gateway4+":2375/", body),
			harness.StepFetch("expose-runtime-dir", "http://"+harness.Gateway4+":2376/", "runtime-in-dir"),
			harness.StepFetch("expose-runtime-next", "http://"+harness.Gateway4+":2377/", "runtime-next-to"),
			harness.StepForward(guestFwdPort),
		),
	})
	if err := inst.WaitFor(ctx, harness.ReadyLine("forward")); err != nil {
		t.Fatal(err)
	}
	fctx, fcancel := context.WithTimeout(ctx, time.Minute)
	peer, err := harness.ProbeForward(fctx, "unix:"+runtimeFwd)
	fcancel()
	if err != nil {
		t.Errorf("runtime unix forward %s: %v", runtimeFwd, err)
	} else {
		host := peer
		if i := strings.LastIndexByte(peer, ':'); i >= 0 {
			host = peer[:i]
		}
		// nc's socket is dual-stack: netstat shows the v4-mapped form.
		host = strings.TrimPrefix(host, "::ffff:")
		if host != harness.Gateway4 {
			t.Errorf("guest saw the unix forward's client as %q, want the gateway %s", peer, harness.Gateway4)
		}
		t.Logf("runtime unix forward %s -> guest:%d: guest saw %s", runtimeFwd, guestFwdPort, peer)
	}
	finish(t, inst, "dhcp", "expose", "expose-runtime-dir", "expose-runtime-next", "forward")
}

// serveHTTPUnix serves body over HTTP on a Unix socket at path that any
// user may connect to (vunet runs as nobody when the test runs as root).
func serveHTTPUnix(t *testing.T, path, body string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, body)
	}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
}
