//go:build linux

package qemutest

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseExitCode(t *testing.T) {
	for _, tc := range []struct {
		console string
		want    int
	}{
		{"", -1},
		{"VUNET-GUEST-READY\nhello\n", -1},
		{"VUNET-GUEST-READY\nVUNET-TEST-EXIT 0\n[ 1.0] reboot: Power down\n", 0},
		{"VUNET-TEST-EXIT 3\n", 3},
		{"VUNET-TEST-EXIT 127", 127},
		{"echo VUNET-TEST-EXIT 9\nVUNET-TEST-EXIT 1\n", 1}, // last one wins
		{"VUNET-TEST-EXIT garbage\n", -1},
	} {
		if got := parseExitCode(tc.console); got != tc.want {
			t.Errorf("parseExitCode(%q) = %d, want %d", tc.console, got, tc.want)
		}
	}
}

func TestTail(t *testing.T) {
	r := &Result{Console: "a\nb\nc\n"}
	for n, want := range map[int]string{0: "", 1: "c", 2: "b\nc", 3: "a\nb\nc", 10: "a\nb\nc"} {
		if got := r.Tail(n); got != want {
			t.Errorf("Tail(%d) = %q, want %q", n, got, want)
		}
	}
	if got := (*Result)(nil).Tail(3); got != "" {
		t.Errorf("nil Tail = %q", got)
	}
}

func TestConsoleBufferStripsCR(t *testing.T) {
	c := newConsoleBuffer()
	_, before := c.snapshot()
	c.Write([]byte("one\r\ntwo\r"))
	c.Write([]byte("\nthree"))
	select {
	case <-before:
	default:
		t.Fatal("write did not signal waiters")
	}
	if s, _ := c.snapshot(); s != "one\ntwo\nthree" {
		t.Errorf("console %q", s)
	}
}

func TestArgs(t *testing.T) {
	g := &Guest{Socket: "/tmp/vu.sock", ChardevOpts: ",reconnect=1", DeviceOpts: ",mrg_rxbuf=off", MemMB: 128,
		KernelArgs: "debug", ExtraArgs: []string{"-smp", "2"}}
	args := strings.Join(g.args("K", "I"), " ")
	for _, want := range []string{
		"-accel tcg",
		"-m 128 ",
		"memory-backend-memfd,id=mem0,share=on,size=128M",
		"-append console=ttyS0 panic=-1 quiet debug",
		"-chardev socket,id=chr0,path=/tmp/vu.sock,reconnect=1",
		"-device virtio-net-pci,netdev=n0,romfile=,vectors=0,mrg_rxbuf=off",
		"-no-reboot",
		"-smp 2",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("args lack %q:\n%s", want, args)
		}
	}
	nonet := strings.Join((&Guest{NoNet: true}).args("K", "I"), " ")
	if strings.Contains(nonet, "virtio-net") || !strings.Contains(nonet, "-nic none") {
		t.Errorf("NoNet args: %s", nonet)
	}
}

func TestStartRequiresSocket(t *testing.T) {
	if _, err := (&Guest{Script: "true"}).Start(context.Background(), t); err == nil {
		t.Fatal("Start without Socket or NoNet succeeded")
	}
}

func skipIfShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a QEMU guest; skipped with -short")
	}
}

// TestGuestBoot boots the real guest without a NIC and checks /init's
// contract: modules loaded, script run, exit status reported, power off.
func TestGuestBoot(t *testing.T) {
	skipIfShort(t)
	kernel, _ := EnsureGuest(t)
	kver, err := os.ReadFile(filepath.Join(filepath.Dir(kernel), "kernel-version"))
	if err != nil {
		t.Fatal(err)
	}

	g := &Guest{
		NoNet: true,
		Files: map[string][]byte{"/etc/greeting": []byte("hello from the test\n")},
		Script: `echo "uname: $(uname -r)"
grep -q '^virtio_net ' /proc/modules && echo "virtio_net: loaded"
cat /etc/greeting
iperf3 --version | head -n1
exit 3
`,
	}
	ctx, cancel := context.WithTimeout(context.Background(), DefaultTimeout)
	defer cancel()
	res, err := g.Run(ctx, t)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	t.Logf("guest ran in %v", res.Duration.Round(time.Millisecond))
	if res.ExitCode != 3 {
		t.Errorf("ExitCode = %d, want 3\n%s", res.ExitCode, res.Tail(40))
	}
	for _, want := range []string{
		ReadyMarker + "\n",
		"uname: " + strings.TrimSpace(string(kver)) + "\n",
		"virtio_net: loaded\n",
		"hello from the test\n",
		"iperf 3.",
		ExitMarker + " 3\n",
	} {
		if !strings.Contains(res.Console, want) {
			t.Errorf("console lacks %q:\n%s", want, res.Tail(40))
		}
	}
	if strings.Index(res.Console, ReadyMarker) > strings.Index(res.Console, "uname:") {
		t.Errorf("%s printed after the script's output", ReadyMarker)
	}
}

// TestGuestWaitForAndKill covers long-lived guests: wait for a line the
// script prints, then kill QEMU and make sure the process is gone.
func TestGuestWaitForAndKill(t *testing.T) {
	skipIfShort(t)
	g := &Guest{NoNet: true, Script: "echo serving-now\nexec sleep 600\n"}
	inst, err := g.Start(context.Background(), t)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := inst.WaitFor(ctx, "serving-now"); err != nil {
		t.Fatal(err)
	}
	pid := inst.Pid()
	inst.Kill()
	inst.Kill() // idempotent
	res, err := inst.Wait()
	if err == nil || !strings.Contains(err.Error(), "Kill") {
		t.Errorf("Wait after Kill: err = %v, want it to mention Kill", err)
	}
	if res.ExitCode != -1 {
		t.Errorf("ExitCode = %d, want -1", res.ExitCode)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("QEMU pid %d still exists after Kill (kill -0: %v)", pid, err)
	}
	if err := inst.WaitFor(ctx, "never printed"); err == nil || !strings.Contains(err.Error(), "exited") {
		t.Errorf("WaitFor on an exited guest: %v", err)
	}
}

// TestGuestTimeout needs no boot: the timeout fires while the kernel is
// still starting.
func TestGuestTimeout(t *testing.T) {
	skipIfShort(t)
	start := time.Now()
	res, err := (&Guest{NoNet: true, Script: "sleep 600", Timeout: time.Second}).Run(context.Background(), t)
	if err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("Run: err = %v, want a timeout", err)
	}
	if res == nil || res.ExitCode != -1 {
		t.Errorf("result %+v, want ExitCode -1", res)
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("timeout took %v", d)
	}

	ctx, cancel := context.WithCancel(context.Background())
	inst, err := (&Guest{NoNet: true, Script: "sleep 600"}).Start(ctx, t)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := inst.Wait(); err == nil || !strings.Contains(err.Error(), "canceled") {
		t.Errorf("Wait after ctx cancel: err = %v", err)
	}
}

// TestGuestVhostUserConnects checks the vhost-user wiring without a backend:
// QEMU must connect to Socket and open with VHOST_USER_GET_FEATURES.
func TestGuestVhostUserConnects(t *testing.T) {
	skipIfShort(t)
	// t.TempDir can exceed the 108-byte sun_path limit for long test names.
	dir, err := os.MkdirTemp("", "qt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "vu.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	g := &Guest{Socket: sock, Script: "true", DeviceOpts: "mrg_rxbuf=off"}
	inst, err := g.Start(context.Background(), t)
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Kill()

	ln.(*net.UnixListener).SetDeadline(time.Now().Add(2 * time.Minute))
	conn, err := ln.Accept()
	if err != nil {
		t.Fatalf("QEMU did not connect: %v\n%s", err, inst.Console())
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(time.Minute))
	var hdr [12]byte // request, flags, size: little-endian u32 each
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		t.Fatalf("reading the first vhost-user message: %v\n%s", err, inst.Console())
	}
	req, flags := binary.LittleEndian.Uint32(hdr[0:]), binary.LittleEndian.Uint32(hdr[4:])
	const getFeatures, version = 1, 1
	if req != getFeatures || flags&3 != version {
		t.Errorf("first message request=%d flags=%#x, want GET_FEATURES (1) version 1", req, flags)
	}
	if !slices.Contains(inst.cmd.Args, "virtio-net-pci,netdev=n0,romfile=,vectors=0,mrg_rxbuf=off") {
		t.Errorf("device args: %q", inst.cmd.Args)
	}
}

// TestGuestDHCPScript runs the guest's udhcpc hook the way udhcpc would after
// a lease (there is no DHCP server without a backend) and checks it
// configures address, MTU, default route and resolv.conf, and records the
// lease for test scripts.
func TestGuestDHCPScript(t *testing.T) {
	skipIfShort(t)
	// lo is the only interface without a NIC; the hook flushes its
	// 127.0.0.1, which nothing here needs.
	g := &Guest{NoNet: true, Script: `set -e
interface=lo ip=10.9.8.7 mask=24 router=10.9.8.1 dns="10.9.8.53 10.9.8.54" domain=test mtu=1400 \
	/etc/udhcpc/default.script bound
ip -4 addr show dev lo
ip -4 route show
ip link show dev lo
cat /etc/resolv.conf
. /run/dhcp-lo
echo "lease: ip=$ip router=$router mtu=$mtu"
`}
	ctx, cancel := context.WithTimeout(context.Background(), DefaultTimeout)
	defer cancel()
	res, err := g.Run(ctx, t)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("ExitCode = %d\n%s", res.ExitCode, res.Tail(40))
	}
	for _, want := range []string{
		"udhcpc: bound",
		"inet 10.9.8.7/24",
		"default via 10.9.8.1",
		"mtu 1400",
		"search test\nnameserver 10.9.8.53\nnameserver 10.9.8.54\n",
		"lease: ip=10.9.8.7 router=10.9.8.1 mtu=1400",
	} {
		if !strings.Contains(res.Console, want) {
			t.Errorf("console lacks %q:\n%s", want, res.Tail(40))
		}
	}
}
