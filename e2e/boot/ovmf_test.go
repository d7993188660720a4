package boot

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/vunettest"
)

const ovmfFirmware = "/usr/share/ovmf/OVMF.fd"

// TestOVMFPXE boots OVMF (UEFI) from the network: its PXE client does DHCP
// (vunet offers a boot file and next-server 10.0.2.2) and downloads
// Debian's ipxe.efi over TFTP from vunet's --tftp-root. That iPXE runs on
// the firmware's network driver (SNP), does DHCP again (as iPXE: user class
// "iPXE") and downloads a multi-megabyte file over HTTP.
//
// Two devices: modern-only (disable-legacy=on), driven by OVMF's virtio 1.0
// driver, and the default transitional device, which OVMF drives as legacy
// virtio (no VIRTIO_F_VERSION_1, 10-byte header); QMP checks which one the
// firmware actually negotiated. Both are driven over the serial console
// through iPXE's Ctrl-B shell: with only --boot-file, iPXE's DHCP is offered
// ipxe.efi again.
//
// The script case instead gives ipxe.efi as --boot-file-efi (--boot-file
// names a file that does not exist, so OVMF must be offered the EFI one) and
// an iPXE script as --ipxe-script-url: iPXE's own DHCP gets the script's URL
// and runs it unattended, without chainloading itself again.
func TestOVMFPXE(t *testing.T) {
	setup(t, qemuNeed, ovmfFirmware+"\tovmf", ipxeEFI+"\tipxe")
	for _, tc := range []struct {
		name       string
		deviceOpts string
		version1   bool
		script     bool
	}{
		{"modern", "disable-legacy=on", true, false},
		{"transitional", "", false, false},
		{"script", "disable-legacy=on", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testOVMFPXE(t, tc.deviceOpts, tc.version1, tc.script)
		})
	}
}

func testOVMFPXE(t *testing.T, deviceOpts string, version1, script bool) {
	began := time.Now()
	data := payload()
	fs := startFileServer(t, "big.bin", data)

	// The TFTP root must hold a real file: vunet refuses symlinks that
	// lead out of it, and Debian's ipxe.efi is a symlink into /boot.
	efi, err := os.ReadFile(ipxeEFI)
	if err != nil {
		t.Fatal(err)
	}
	// vunet, started as root, serves TFTP as nobody (the sandbox): the
	// root must be readable for others, as for dnsmasq's TFTP server.
	root := t.TempDir()
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "ipxe.efi"), efi, 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"--tftp-root", root, "--boot-file", "ipxe.efi"}
	var ss *scriptServer
	if script {
		ss = startScriptServer(t, ovmfScript(fs.Port))
		args = []string{"--tftp-root", root, "--boot-file", "missing-bios.0", "--boot-file-efi", "ipxe.efi",
			"--ipxe-script-url", ss.URL}
	}
	in := vunettest.Start(t, args...)

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

	promptRe := regexp.MustCompile(`iPXE> `)
	var out string
	if script {
		// iPXE (chainloaded) autoboots: DHCP as iPXE, which is offered the
		// script URL, then the script runs and ends in iPXE's shell, so
		// QEMU is still up for the QMP query below.
		_, end := v.waitFor(t, from, reIPXEEnd, 4*time.Minute)
		v.waitFor(t, end, promptRe, time.Minute)
		out = v.text()[from:end]
		checkIPXEOutput(t, out, ss.URL)
		if n := ss.gets(); n != 1 {
			t.Errorf("GET %s: %d requests, want 1", ss.URL, n)
		}
		// No second PXE/TFTP round: iPXE did not load ipxe.efi again.
		if strings.Contains(out, "ipxe.efi") {
			t.Errorf("iPXE mentions ipxe.efi after the PXE download (chainloading itself again?)")
		}
	} else {
		// iPXE (chainloaded): break into its shell. Keep pressing Ctrl-B
		// until the prompt shows, in case a key arrives before iPXE reads
		// the console.
		_, from = v.waitFor(t, from, regexp.MustCompile(`Press Ctrl-B for the iPXE command line`), 3*time.Minute)
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
		for _, c := range typedCommands(append([]string{"ifstat"}, ipxeCommands(fs.Port)...)) {
			v.send(t, c+"\r")
			_, from = v.waitFor(t, from, promptRe, 4*time.Minute)
		}
		// iPXE's DHCP identifies as iPXE (user class), but without
		// --ipxe-script-url it is offered ipxe.efi again.
		out = v.text()[cmdStart:from]
		checkIPXEOutput(t, out, "ipxe.efi")
	}
	elapsed := time.Since(began)
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
	how := "commands typed at iPXE's prompt"
	if script {
		how = "script from --ipxe-script-url"
	}
	t.Logf("OVMF PXE (%s): DHCP + TFTP of ipxe.efi (%d bytes) in %v; iPXE DHCP + %d-byte HTTP download (%s) done at %v (wall time from vunet start)",
		mode, len(efi), pxeDone.Round(time.Millisecond), payloadSize, how, elapsed.Round(time.Millisecond))
}

// ovmfScript is the iPXE script the script case serves: the same commands
// as the typed case, minus "dhcp" (iPXE's autoboot has just configured net0
// through the DHCP exchange that handed it this script, and that exchange's
// filename is what the VUNET-ADDR line must show). The script ends in
// iPXE's shell either way, which keeps the VM running for QMP.
func ovmfScript(port int) string {
	cmds := slices.DeleteFunc(append([]string{"ifstat"}, ipxeCommands(port)...), func(c string) bool { return c == "dhcp" })
	return "#!ipxe\n" + scriptCommands(cmds) + "shell\n:failed\necho VUNET-${net0/mac}-FAILED\nshell\n"
}

// scriptServer serves an iPXE script at /boot.ipxe on 127.0.0.1, which the
// guest reaches as 10.0.2.2 (URL is the guest's view), and counts GETs.
type scriptServer struct {
	URL string
	n   atomic.Int32
}

func startScriptServer(t *testing.T, script string) *scriptServer {
	t.Helper()
	ss := &scriptServer{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/boot.ipxe" {
			http.NotFound(w, r)
			return
		}
		if r.Method == http.MethodGet {
			ss.n.Add(1)
		}
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, script)
	}))
	t.Cleanup(srv.Close)
	ss.URL = fmt.Sprintf("http://10.0.2.2:%d/boot.ipxe", srv.Listener.Addr().(*net.TCPAddr).Port)
	return ss
}

func (ss *scriptServer) gets() int { return int(ss.n.Load()) }
