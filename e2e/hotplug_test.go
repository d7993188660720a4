package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// qmp runs one QMP command on QEMU's monitor socket and returns its
// "return" value.
func qmp(t *testing.T, path, command string, args any) (ret json.RawMessage) {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("qmp: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	call := func(cmd string, a any) {
		m := map[string]any{"execute": cmd}
		if a != nil {
			m["arguments"] = a
		}
		b, _ := json.Marshal(m)
		if _, err := c.Write(append(b, '\n')); err != nil {
			t.Fatalf("qmp write: %v", err)
		}
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				t.Fatalf("qmp %s: %v", cmd, err)
			}
			var reply struct {
				Return json.RawMessage `json:"return"`
				Error  *struct{ Desc string }
			}
			if err := json.Unmarshal(line, &reply); err != nil {
				t.Fatalf("qmp: %v: %s", err, line)
			}
			if reply.Error != nil {
				t.Fatalf("qmp %s: %s", cmd, reply.Error.Desc)
			}
			if reply.Return != nil {
				ret = reply.Return
				return
			}
			// the greeting or an event
		}
	}
	call("qmp_capabilities", nil)
	call(command, args)
	return ret
}

// metric reads one counter from vunet's /metrics.
func metric(t *testing.T, apiSock, name string) uint64 {
	t.Helper()
	c := api.NewClient(apiSock)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	text, err := c.Metrics(ctx)
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			n, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return uint64(n)
		}
	}
	t.Fatalf("no %s in /metrics", name)
	return 0
}

// TestLinuxMemoryHotplug hot-adds 256 MiB to a running guest: a pc-dimm
// backed by a shared memfd (QMP object-add + device_add), which QEMU
// hands vunet with ADD_MEM_REG. The guest onlines it as kernel memory
// (memhp_default_state=online_kernel) and, since the new memory is
// ZONE_NORMAL above 4 GiB while the boot RAM is all DMA32, the guest's
// allocator takes its network buffers from it from then on: a download
// and an upload must work, and vunet must count descriptor buffers in the
// hot-added region. (The counting itself is mutation-checked by
// vhost/memory's TestCountHits and vhost's TestHotplugCounters; without it
// this test sees 0 buffers.)
func TestLinuxMemoryHotplug(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*guestTimeout)
	defer cancel()
	apiSock := filepath.Join(t.TempDir(), "api.sock")
	vn := vunettest.Start(t, e.vunetArgs("--api", apiSock)...)
	qmpSock := filepath.Join(t.TempDir(), "qmp.sock")

	inst := startGuest(t, ctx, &qemutest.Guest{
		Socket:     vn.Socket,
		MemOpts:    "slots=2,maxmem=1G",
		KernelArgs: "memhp_default_state=online_kernel",
		ExtraArgs:  []string{"-qmp", "unix:" + qmpSock + ",server=on,wait=off"},
		Script: script(
			harness.StepDHCP(1500),
			`begin
mem_kb() { sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo; }
before=$(mem_kb)
echo "`+harness.ReadyLine("hotplug")+`"
grown() { [ "$(mem_kb)" -gt $((before + 200000)) ]; }
if wait_for grown; then
	online=$(grep -l online /sys/devices/system/memory/memory*/state | wc -l)
	pass hotplug "memtotal_kb=$before->$(mem_kb) online_blocks=$online"
	grep -E '^Node|present' /proc/zoneinfo
else
	fail hotplug "MemTotal stayed $(mem_kb) kB"
fi
`,
			harness.StepDownload("download", e.http.Port4, e.http.BlobSHA256),
			harness.StepUpload("upload", e.http.Port4),
			harness.StepDownload("download2", e.http.Port4, e.http.BlobSHA256),
		),
	})
	if err := inst.WaitFor(ctx, harness.ReadyLine("hotplug")); err != nil {
		t.Fatal(err)
	}
	before := metric(t, apiSock, "vunet_vhost_hotplugged_memory_buffers_total")
	qmp(t, qmpSock, "object-add", map[string]any{"qom-type": "memory-backend-memfd", "id": "m1", "size": 256 << 20, "share": true})
	qmp(t, qmpSock, "device_add", map[string]any{"driver": "pc-dimm", "id": "d1", "memdev": "m1"})
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	err := vn.WaitLog(wctx, "guest memory region added (hotplug)")
	wcancel()
	if err != nil {
		t.Fatalf("vunet never got the new region: %v", err)
	}
	steps := finish(t, inst, "dhcp", "hotplug", "download", "upload", "download2")
	e.checkUpload(t, steps, "upload")
	// One DIMM is one region (the boot-time RAM, which QEMU also sends
	// with ADD_MEM_REG, is not counted: the rings were not running).
	if n := metric(t, apiSock, "vunet_vhost_mem_regions_added_total"); n != 1 {
		t.Errorf("vhost_mem_regions_added_total %d, want 1", n)
	}
	if before != 0 {
		t.Errorf("%d buffers counted in hot-plugged memory before the hotplug", before)
	}
	hot := metric(t, apiSock, "vunet_vhost_hotplugged_memory_buffers_total") - before
	t.Logf("descriptor buffers in the hot-added region: %d (before the hotplug: %d)", hot, before)
	// 8 MB down twice and 3 MB up take thousands of buffers; most of
	// the refills after the hotplug come from the new zone.
	if hot < 1000 {
		t.Errorf("only %d descriptor buffers pointed into the hot-added memory, want >= 1000", hot)
	}
}
