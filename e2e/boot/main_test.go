// Package boot tests vunet against real network-boot firmware and VM-less
// vhost-user frontends, none of which is the Linux virtio-net driver:
//
//   - iPXE (Debian's ipxe.lkrn under SeaBIOS) fetching a multi-megabyte file
//     over HTTP through the NAT, with a packet capture checked by tshark;
//   - OVMF's UEFI PXE (DHCP with boot options, TFTP from --tftp-root)
//     chainloading ipxe.efi, which then runs on the firmware's network
//     driver, with a modern-only and a transitional (legacy) virtio device;
//   - DPDK testpmd bridging vunet's socket (virtio-user) to a tap device in
//     a network namespace, measured with iperf3 in both directions;
//   - e2e/tapfront, a Go frontend bridging a tap with CSUM/TSO offloads, so
//     that the namespace's Linux stack is a full-speed guest sending and
//     receiving 64 KiB TSO frames (checked transfers, iperf3, CPU per GB).
//
// See docs/boot-clients.md. The test binary re-executes itself in a private
// network namespace (vunettest.IsolateNetwork); every test is skipped under
// -short, and skipped loudly when a tool is missing (a failure with CI=true).
package boot

import (
	"flag"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// qemuNeed is the setup entry for QEMU.
const qemuNeed = "qemu-system-x86_64\tqemu-system-x86"

// isolated is true when the tests run inside their own network namespace.
var isolated bool

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Short() {
		isolated = vunettest.IsolateNetwork()
	}
	os.Exit(m.Run())
}

// setup skips the test under -short or outside the private namespace, and
// checks that every file and command in need exists (skipping loudly, or
// failing under CI). Each entry is "path-or-command\tapt package".
func setup(t *testing.T, need ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("boot-client test: skipped with -short")
	}
	if !isolated {
		unavailable(t, "not running in a private network namespace (needs root and unshare)")
	}
	for _, n := range need {
		what, pkg, _ := strings.Cut(n, "\t")
		var err error
		if strings.Contains(what, "/") {
			_, err = os.Stat(what)
		} else {
			_, err = exec.LookPath(what)
		}
		if err != nil {
			unavailable(t, "%s not found (apt-get install %s)", what, pkg)
		}
	}
}

func unavailable(t *testing.T, format string, args ...any) {
	t.Helper()
	qemutest.Unavailable(t, "BOOT-CLIENT TEST", format, args...)
}
