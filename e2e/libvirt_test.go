package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/testutil"
	"github.com/vunet/vunet/internal/vunettest"
)

// libvirtQEMUUser is the user Debian's libvirt runs QEMU as.
const libvirtQEMUUser = "libvirt-qemu"

// libvirt is a private libvirtd (and virtlogd) run by the test, inside the
// test binary's network namespace.
type libvirt struct {
	uri  string
	logs []*testutil.Buffer
}

// startLibvirt starts virtlogd and libvirtd in the foreground, as children
// killed with the test: libvirtd with its own config file (no TCP, its
// sockets in dir), so virsh reaches it and nothing else does.
func startLibvirt(t *testing.T, dir string) *libvirt {
	t.Helper()
	for _, bin := range []string{"libvirtd", "virtlogd", "virsh"} {
		if _, err := exec.LookPath(bin); err != nil {
			qemutest.Unavailable(t, "REAL-LIBVIRT TEST", "%s not found (apt-get install --no-install-recommends libvirt-daemon-system, or run scripts/install-deps.sh)", bin)
		}
	}
	if _, err := user.Lookup(libvirtQEMUUser); err != nil {
		qemutest.Unavailable(t, "REAL-LIBVIRT TEST", "no user %s (Debian's libvirt-daemon-system creates it)", libvirtQEMUUser)
	}
	// The daemons share /run/libvirt (the QEMU driver's lock, virtlogd's
	// socket) with a system libvirt: they cannot run next to one.
	for _, sock := range []string{"/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock", "/run/libvirt/virtlogd-sock"} {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			qemutest.Unavailable(t, "REAL-LIBVIRT TEST", "a libvirt daemon is already running (%s answers); this test starts its own and cannot share /run/libvirt with it", sock)
		}
	}
	sockDir := filepath.Join(dir, "libvirt")
	if err := os.Mkdir(sockDir, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "libvirtd.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("unix_sock_dir = %q\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n", sockDir)), 0o644); err != nil {
		t.Fatal(err)
	}
	lv := &libvirt{uri: "qemu:///system?socket=" + filepath.Join(sockDir, "libvirt-sock")}
	run := func(name string, args ...string) {
		log := &testutil.Buffer{}
		lv.logs = append(lv.logs, log)
		cmd := exec.Command(name, args...)
		cmd.Stdout, cmd.Stderr = log, log
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatalf("starting %s: %v", name, err)
		}
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		t.Cleanup(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				cmd.Process.Kill()
				<-done
			}
			if t.Failed() {
				t.Logf("%s output:\n%s", name, log.String())
			}
		})
	}
	run("virtlogd", "-p", filepath.Join(dir, "virtlogd.pid"))
	run("libvirtd", "-f", conf, "-p", filepath.Join(dir, "libvirtd.pid"))
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := lv.virsh(5*time.Second, "version"); err == nil {
			return lv
		} else if time.Now().After(deadline) {
			t.Fatalf("libvirtd not answering after 30 s: %v\n%s", err, lv.logs[len(lv.logs)-1].String())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// virsh runs virsh against the private daemon.
func (lv *libvirt) virsh(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "virsh", append([]string{"-c", lv.uri}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("virsh %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (lv *libvirt) must(t *testing.T, args ...string) string {
	t.Helper()
	out, err := lv.virsh(60*time.Second, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// waitState polls virsh domstate until the domain is in state.
func (lv *libvirt) waitState(ctx context.Context, name, state string) error {
	for {
		out, _ := lv.virsh(10*time.Second, "domstate", name)
		if strings.TrimSpace(out) == state {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("domain %s never reached %q (last: %q)", name, state, strings.TrimSpace(out))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// block returns the lines from the one containing open to the one
// containing close in s, or fails.
func block(t *testing.T, s, open, close string) string {
	t.Helper()
	i := strings.Index(s, open)
	j := strings.Index(s, close)
	if i < 0 || j < i {
		t.Fatalf("qemu-args output has no %s...%s block:\n%s", open, close, s)
	}
	return s[i : j+len(close)]
}

// domainXML is a whole domain for direct kernel boot of the test guest,
// built around the fragment `vunet qemu-args` printed (its memoryBacking,
// interface and qemu:override blocks, taken verbatim).
func domainXML(t *testing.T, name, kernel, initrd, console, fragment string) string {
	t.Helper()
	if !strings.Contains(fragment, "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>") {
		t.Fatalf("qemu-args --accel tcg printed no TCG domain:\n%s", fragment)
	}
	return fmt.Sprintf(`<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>%s</name>
  <memory unit='MiB'>256</memory>
  %s
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/%s</emulator>
    %s
    <serial type='file'><source path='%s'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  %s
</domain>
`, name, block(t, fragment, "<memoryBacking>", "</memoryBacking>"), kernel, initrd, qemutest.QEMUBinary,
		block(t, fragment, "<interface type='vhostuser'>", "</interface>"), console,
		block(t, fragment, "<qemu:override>", "</qemu:override>"))
}

// TestLibvirt runs the test guest under a real libvirt 9 (Debian 12's
// libvirtd, type='qemu' domain, direct kernel boot) with the XML `vunet
// qemu-args --accel tcg` prints. First mode='server' (libvirt's QEMU owns
// the socket, vunet --connect runs as libvirt-qemu): the guest does DHCP and
// a download, `virsh destroy` + `virsh start`, and the new guest works too
// through vunet's re-dial. Then mode='client' (vunet listens, the socket
// given to QEMU's group with --socket-group/--socket-mode): DHCP and a
// download again. Skipped loudly without libvirt, failed under CI=true.
func TestLibvirt(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*guestTimeout)
	defer cancel()
	dir, err := os.MkdirTemp("", "vu-lv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// libvirt's QEMU runs as libvirt-qemu and opens the kernel, initrd,
	// console file and socket in here.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	lv := startLibvirt(t, dir)
	qu, err := user.Lookup(libvirtQEMUUser)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(qu.Uid)
	gid, _ := strconv.Atoi(qu.Gid)

	kernel, base := qemutest.EnsureGuest(t)
	vmlinuz, initrd := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.gz")
	copyFile(t, kernel, vmlinuz)
	// Ends with a pause so that the host can destroy the first boot while
	// the guest still runs; the second one powers off, which (with ACPI)
	// ends the domain.
	guestScript := script(
		harness.StepDHCP(1500),
		harness.StepDownload("download", e.http.Port4, e.http.BlobSHA256),
		"echo "+harness.ReadyLine("booted")+"\nsleep 2\n",
	)
	if err := qemutest.WriteInitrd(initrd, base, guestScript, nil); err != nil {
		t.Fatal(err)
	}
	console := filepath.Join(dir, "console.log")

	// boot starts the defined domain and waits for the guest's ready
	// line; with wantEnd it also waits for the domain to end by itself
	// and checks the script's result.
	boot := func(t *testing.T, name string, wantEnd bool) {
		t.Helper()
		// A fresh console file per boot: the ready line of the last
		// boot must not count for this one.
		if err := os.Remove(console); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		start := time.Now()
		lv.must(t, "start", name)
		deadline := time.Now().Add(3 * time.Minute)
		for i := 0; !strings.Contains(readFile(console), harness.ReadyLine("booted")); i++ {
			ended := false
			if i%20 == 19 {
				out, _ := lv.virsh(10*time.Second, "domstate", name)
				ended = strings.TrimSpace(out) == "shut off"
			}
			if ctx.Err() != nil || ended || time.Now().After(deadline) {
				t.Fatalf("%s: guest never got ready (domain ended: %v); console:\n%s", name, ended, readFile(console))
			}
			time.Sleep(100 * time.Millisecond)
		}
		steps := harness.ParseSteps(readFile(console))
		for _, step := range []string{"dhcp", "download"} {
			if s, ok := harness.Find(steps, step); !ok || !s.OK {
				t.Fatalf("%s: step %s did not pass (%+v); console:\n%s", name, step, s, readFile(console))
			}
		}
		t.Logf("%s: DHCP and download ok %v after virsh start", name, time.Since(start).Round(10*time.Millisecond))
		if !wantEnd {
			return
		}
		wctx, wcancel := context.WithTimeout(ctx, time.Minute)
		defer wcancel()
		if err := lv.waitState(wctx, name, "shut off"); err != nil {
			t.Fatalf("%v: the guest's poweroff did not end the domain; console:\n%s", err, readFile(console))
		}
		if !strings.Contains(readFile(console), "E2E-DONE fails=0") {
			t.Fatalf("%s: the guest script failed; console:\n%s", name, readFile(console))
		}
	}

	vunet := vunettest.Binary(t)
	qemuArgs := func(t *testing.T, mode, path string) string {
		out, err := exec.Command(vunet, "qemu-args", mode, path, "--accel", "tcg", "--mem", "256M").CombinedOutput()
		if err != nil {
			t.Fatalf("vunet qemu-args: %v\n%s", err, out)
		}
		return string(out)
	}

	t.Run("server", func(t *testing.T) {
		// libvirt's QEMU creates the socket here, vunet (as that user)
		// connects to it.
		sockDir := filepath.Join(dir, "server")
		if err := os.Mkdir(sockDir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(sockDir, uid, gid); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(sockDir, "vm.sock")
		name := "vunet-e2e-server"
		xml := filepath.Join(dir, name+".xml")
		writeText(t, xml, domainXML(t, name, vmlinuz, initrd, console, qemuArgs(t, "--connect", sock)))
		lv.must(t, "define", xml)
		defer lv.virsh(30*time.Second, "undefine", name)
		defer lv.virsh(30*time.Second, "destroy", name)
		vn := vunettest.StartConnect(t, sock, e.vunetArgs("--runas", libvirtQEMUUser)...)

		boot(t, name, false)
		destroyed := time.Now()
		lv.must(t, "destroy", name)
		wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
		err := vn.WaitLog(wctx, "frontend went away")
		wcancel()
		if err != nil {
			t.Fatal(err)
		}
		boot(t, name, true)
		if !strings.Contains(vn.Log(), "reconnected to the frontend") {
			t.Errorf("vunet log does not show the re-dial:\n%s", vn.Log())
		}
		t.Logf("virsh destroy + start: the new guest was served by the same vunet, %v from destroy to its power-off", time.Since(destroyed).Round(10*time.Millisecond))
		if err := vn.Stop(); err != nil {
			t.Errorf("vunet: %v", err)
		}
	})

	t.Run("client", func(t *testing.T) {
		sockDir := filepath.Join(dir, "client")
		if err := os.Mkdir(sockDir, 0o755); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(sockDir, "vunet.sock")
		name := "vunet-e2e-client"
		xml := filepath.Join(dir, name+".xml")
		writeText(t, xml, domainXML(t, name, vmlinuz, initrd, console, qemuArgs(t, "--socket", sock)))
		lv.must(t, "define", xml)
		defer lv.virsh(30*time.Second, "undefine", name)
		defer lv.virsh(30*time.Second, "destroy", name)
		vn := vunettest.StartAt(t, sock, e.vunetArgs("--socket-group", libvirtQEMUUser, "--socket-mode", "0660")...)
		boot(t, name, true)
		if err := vn.Stop(); err != nil {
			t.Errorf("vunet: %v", err)
		}
	})
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

func writeText(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
