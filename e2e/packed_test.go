package e2e

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// TestLinuxGuestPacked runs a Linux guest whose virtio-net device uses
// packed virtqueues (packed=on, VIRTIO_F_RING_PACKED): DHCP, ping, and an
// 8 MB download and a 3 MB upload with sha256 checks. vunet must count
// both queues as started in the packed format, so the test cannot pass
// on split rings (QEMU silently falls back to split if the backend does
// not offer the bit).
func TestLinuxGuestPacked(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
	defer cancel()
	apiSock := filepath.Join(t.TempDir(), "api.sock")
	vn := vunettest.Start(t, e.vunetArgs("--api", apiSock)...)
	start := time.Now()
	inst := startGuest(t, ctx, &qemutest.Guest{Socket: vn.Socket, DeviceOpts: "packed=on", Script: e.variantScript(1500)})
	steps := finish(t, inst, "dhcp", "ping", "download", "upload")
	e.checkUpload(t, steps, "upload")
	packed := metric(t, apiSock, "vunet_vhost_packed_queue_starts_total")
	all := metric(t, apiSock, "vunet_vhost_queue_starts_total")
	if packed < 2 || packed != all {
		t.Errorf("%d of %d queue starts in the packed format, want all (at least RX and TX)", packed, all)
	}
	t.Logf("packed rings: %d of %d queue starts packed; wall time %v", packed, all, time.Since(start).Round(10*time.Millisecond))
}
