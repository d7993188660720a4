package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// serverSocket returns a socket path for a QEMU that listens (chardev
// server=on) and that vunet, switched from root to nobody by the sandbox,
// may reach: the directory searchable by all.
func serverSocket(t *testing.T) string {
	sock := shortSocket(t)
	if err := os.Chmod(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	return sock
}

// openSocket waits for the frontend to create sock and lets every user
// connect to it: QEMU runs as root here and creates it with root's umask,
// while vunet runs as nobody (the default sandbox). A real deployment runs
// vunet as QEMU's user (--runas) or gives the socket to its group.
func openSocket(t *testing.T, ctx context.Context, sock string) {
	t.Helper()
	for {
		if err := os.Chmod(sock, 0o666); err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("QEMU never created its socket %s", sock)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// TestLinuxConnectRedial: QEMU owns the socket (server=on), vunet
// --connect serves the guest; then the VM goes away (QEMU killed) and a
// new QEMU listens on the same path, as after `virsh destroy` + `virsh
// start` with libvirt's mode='server'. vunet must stay up, dial again and
// serve the new guest (DHCP + download), and still stop on SIGTERM within
// 2 s while it waits for a frontend. (The old behaviour, exiting when the
// session ends, fails the vn.Done check; the re-dial itself is
// mutation-checked by vhost's TestDialLoopRedials.)
func TestLinuxConnectRedial(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*guestTimeout)
	defer cancel()
	sock := serverSocket(t)
	chardev := "server=on,wait=off"

	first := startGuest(t, ctx, &qemutest.Guest{
		Socket:      sock,
		ChardevOpts: chardev,
		Script: script(
			harness.StepDHCP(1500),
			harness.StepDownload("download", e.http.Port4, e.http.BlobSHA256),
			"echo "+harness.ReadyLine("first")+"\nsleep 600\n",
		),
	})
	openSocket(t, ctx, sock)
	vn := vunettest.StartConnect(t, sock, e.vunetArgs()...)
	if err := first.WaitFor(ctx, harness.ReadyLine("first")); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"dhcp", "download"} {
		if s, ok := harness.Find(harness.ParseSteps(first.Console()), name); !ok || !s.OK {
			t.Fatalf("first VM: step %s did not pass: %+v\n%s", name, s, first.Console())
		}
	}
	first.Kill()
	// QEMU leaves its socket file behind when killed; the next QEMU
	// replaces it. Removing it here lets openSocket wait for the new one.
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	err := vn.WaitLog(wctx, "frontend went away")
	wcancel()
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-vn.Done():
		t.Fatalf("vunet --connect exited when the VM went away (%v)", vn.ExitErr())
	case <-time.After(300 * time.Millisecond):
	}

	restart := time.Now()
	second := startGuest(t, ctx, &qemutest.Guest{
		Socket:      sock,
		ChardevOpts: chardev,
		Script: script(
			harness.StepDHCP(1500),
			harness.StepDownload("download", e.http.Port4, e.http.BlobSHA256),
			harness.StepUpload("upload", e.http.Port4),
		),
	})
	openSocket(t, ctx, sock)
	wctx, wcancel = context.WithTimeout(ctx, 30*time.Second)
	err = vn.WaitLog(wctx, "reconnected to the frontend")
	wcancel()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("vunet re-dialled the new QEMU %v after it started", time.Since(restart).Round(time.Millisecond))
	steps := finish(t, second, "dhcp", "download", "upload")
	e.checkUpload(t, steps, "upload")

	// The second VM powered off: vunet is dialling again. A stop now
	// must still be prompt.
	wctx, wcancel = context.WithTimeout(ctx, 10*time.Second)
	err = waitLogCount(wctx, vn, "frontend went away", 2)
	wcancel()
	if err != nil {
		t.Fatal(err)
	}
	stop := time.Now()
	if err := vn.Stop(); err != nil {
		t.Errorf("vunet exited with %v on SIGTERM while re-dialling", err)
	}
	if d := time.Since(stop); d > 2*time.Second {
		t.Errorf("vunet took %v to stop on SIGTERM while re-dialling, want < 2 s", d)
	} else {
		t.Logf("SIGTERM while re-dialling: vunet gone in %v", d.Round(time.Millisecond))
	}
}

// waitLogCount polls vunet's log until s appears n times.
func waitLogCount(ctx context.Context, vn *vunettest.Instance, s string, n int) error {
	for strings.Count(vn.Log(), s) < n {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}
