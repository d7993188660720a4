package boot

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/vunettest"
)

const ovmfFirmware = "/usr/share/ovmf/OVMF.fd"

// TestOVMFPXE boots OVMF (UEFI) from the network: its PXE client does DHCP
// (vunet offers --boot-file and next-server 10.0.2.2) and downloads Debian's
// ipxe.efi over TFTP from vunet's --tftp-root. That iPXE runs on the
// firmware's network driver (SNP) and, driven over the serial console
// through its Ctrl-B shell, does DHCP again (as iPXE: user class "iPXE") and
// downloads a multi-megabyte file over HTTP.
//
// Two devices: modern-only (disable-legacy=on), driven by OVMF's virtio 1.0
// driver, and the default transitional device, which OVMF drives as legacy
// virtio (no VIRTIO_F_VERSION_1, 10-byte header); QMP checks which one the
// firmware actually negotiated.
func TestOVMFPXE(t *testing.T) {
	setup(t, qemuNeed, ovmfFirmware+"\tovmf", ipxeEFI+"\tipxe")
	for _, tc := range []struct {
		name       string
		deviceOpts string
		version1   bool
	}{
		{"modern", "disable-legacy=on", true},
		{"transitional", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testOVMFPXE(t, tc.deviceOpts, tc.version1)
		})
	}
}

func testOVMFPXE(t *testing.T, deviceOpts string, version1 bool) {
	began := time.Now()
	data := payload()
	fs := startFileServer(t, "big.bin", data)

	// The TFTP root must hold a real file: vunet refuses symlinks that
	// lead out of it, and Debian's ipxe.efi is a symlink into /boot.
	efi, err := os.ReadFile(ipxeEFI)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "ipxe.efi"), efi, 0o644); err != nil {
		t.Fatal(err)
	}
	in := vunettest.Start(t, "--tftp-root", root, "--boot-file", "ipxe.efi")

	v := (&firmwareVM{
		Socket:     in.Socket,
		Machine:    "q35",
		Firmware:   []string{"-bios", ovmfFirmware, "-boot", "n"},
		DeviceOpts: deviceOpts,
		Timeout:    8 * time.Minute,
	}).start(t)

	// OVMF's PXE: DHCP with boot options, then TFTP (size query, download).
	m, from := v.waitFor(t, 0, regexp.MustCompile(`(?s)Station IP address is (\S+).*?NBP filename is (\S+)\s+NBP filesize is (\d+) Bytes|PXE-E\d+: [^\n]*\n`), 4*time.Minute)
	if strings.HasPrefix(m[0], "PXE-E") {
		t.Fatalf("OVMF PXE failed: %s", strings.TrimSpace(m[0]))
	}
	if m[1] != "10.0.2.15" || m[2] != "ipxe.efi" || m[3] != fmt.Sprint(len(efi)) {
		t.Errorf("OVMF PXE: station %s, NBP %s of %s bytes; want 10.0.2.15, ipxe.efi of %d bytes", m[1], m[2], m[3], len(efi))
	}
	_, from = v.waitFor(t, from, regexp.MustCompile(`NBP file downloaded successfully`), 4*time.Minute)
	pxeDone := time.Since(began)

	// iPXE (chainloaded): break into its shell. Keep pressing Ctrl-B until
	// the prompt shows, in case a key arrives before iPXE reads the console.
	_, from = v.waitFor(t, from, regexp.MustCompile(`Press Ctrl-B for the iPXE command line`), 3*time.Minute)
	promptRe := regexp.MustCompile(`iPXE> `)
	for i := 0; ; i++ {
		v.send(t, "\x02")
		if promptRe.MatchString(v.text()[from:]) {
			break
		}
		if i == 100 {
			t.Fatalf("no iPXE prompt 20 s after pressing Ctrl-B")
		}
		time.Sleep(200 * time.Millisecond)
	}
	_, from = v.waitFor(t, from, promptRe, time.Minute)
	cmdStart := from
	// One command per prompt: keys typed while a command runs are read
	// (and lost) by its Ctrl-C check.
	for _, c := range append([]string{"ifstat"}, ipxeCommands(fs.Port)...) {
		v.send(t, c+"\r")
		_, from = v.waitFor(t, from, promptRe, 4*time.Minute)
	}
	elapsed := time.Since(began)
	// iPXE's DHCP identifies as iPXE (user class), but vunet has no iPXE
	// boot file setting exposed, so it is offered ipxe.efi again.
	out := v.text()[cmdStart:from]
	checkIPXEOutput(t, out, "ipxe.efi")
	// ifstat names iPXE's driver: "snp" (the firmware's Simple Network
	// Protocol) rather than iPXE's own virtio-net driver.
	driver := regexp.MustCompile(`net0: 52:54:00:12:34:56 using (\S+) on`).FindStringSubmatch(out)
	if driver == nil {
		t.Errorf("ifstat printed no net0 line")
	} else if !strings.EqualFold(driver[1], "snp") {
		t.Errorf("iPXE drives the NIC with %q, want the firmware's SNP", driver[1])
	}
	fs.checkDelivered(t, "/big.bin", len(data))

	features := v.guestFeatures(t)
	hasV1 := slices.ContainsFunc(features, func(f string) bool { return strings.HasPrefix(f, "VIRTIO_F_VERSION_1") })
	if hasV1 != version1 {
		t.Errorf("firmware negotiated VIRTIO_F_VERSION_1 = %v, want %v; features: %q", hasV1, version1, features)
	}
	mode := "legacy virtio"
	if hasV1 {
		mode = "virtio 1.0"
	}
	t.Logf("OVMF PXE (%s): DHCP + TFTP of ipxe.efi (%d bytes) in %v; iPXE DHCP + %d-byte HTTP download done at %v (wall time from vunet start)",
		mode, len(efi), pxeDone.Round(time.Millisecond), payloadSize, elapsed.Round(time.Millisecond))
}
