package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// TestLinuxGuestMultiqueue boots a 2-vCPU Linux guest (TCG, -smp 2) with a
// two-pair multiqueue NIC (vunet --queues 2, QEMU queues=2 and mq=on) and
// checks that the guest uses both pairs in both directions: the driver
// brings up rx-0/rx-1 and tx-0/tx-1, two iperf3 uploads pinned to CPU 0
// and CPU 1 (Linux picks the transmit queue by the sending CPU) and a
// 16-stream download (vunet picks the receive queue by flow hash) all
// complete, and vunet's per-queue counters are non-zero for all four
// queues. (Its first run, before the per-pair ADD_MEM_REG fix, got no
// traffic at all: QEMU 7.2 gave up on vhost.)
func TestLinuxGuestMultiqueue(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
	defer cancel()

	sock := shortSocket(t)
	apiSock := filepath.Join(filepath.Dir(sock), "api.sock")
	vn := vunettest.StartAt(t, sock, e.vunetArgs("--queues", "2", "--api", apiSock)...)
	up0, up1, down := vunettest.FreePort(t), vunettest.FreePort(t), vunettest.FreePort(t)
	for _, port := range []int{up0, up1, down} {
		p, err := harness.StartIperf3(ctx, port)
		if err != nil {
			t.Fatalf("iperf3 server: %v", err)
		}
		t.Cleanup(func() { p.Stop(time.Second) })
	}

	start := time.Now()
	inst := startGuest(t, ctx, &qemutest.Guest{
		Socket:     vn.Socket,
		NetdevOpts: "queues=2",
		DeviceOpts: "mq=on",
		ExtraArgs:  []string{"-smp", "2"},
		Script: script(
			harness.StepDHCP(1500),
			stepQueues(2),
			stepPinnedUploads("upload-cpu0-cpu1", up0, up1),
			harness.StepIperfTCP("download-16", down, 16, 3),
		),
	})
	finish(t, inst, "dhcp", "queues", "upload-cpu0-cpu1", "download-16")
	t.Logf("multiqueue guest wall time: %v", time.Since(start).Round(10*time.Millisecond))

	c := api.NewClient(apiSock)
	defer c.Close()
	st, err := c.Stats(ctx)
	if err != nil {
		t.Fatalf("vunet stats: %v", err)
	}
	var summary string
	for q := range 4 {
		dir := api.ToGuest
		if q%2 == 1 {
			dir = api.FromGuest
		}
		// One guest: the switch's port 0 (the guest label).
		m, ok := st.Find("vunet_link_frames_total", "guest", "0", "queue", strconv.Itoa(q), "direction", dir)
		b, _ := st.Find("vunet_link_bytes_total", "guest", "0", "queue", strconv.Itoa(q), "direction", dir)
		summary += fmt.Sprintf(" queue %d %s: %d frames, %d bytes;", q, dir, m, b)
		if !ok || m == 0 {
			t.Errorf("queue %d (%s) carried no frames", q, dir)
		}
	}
	t.Logf("per-queue counters:%s", summary)
}

// stepQueues checks that the guest's virtio-net driver brought up n queue
// pairs (Linux enables min(pairs, vCPUs) by default) and has n vCPUs.
func stepQueues(n int) string {
	return fmt.Sprintf(`begin
q=$(ls /sys/class/net/eth0/queues | tr '\n' ' ')
cpus=$(nproc)
if [ ! -d /sys/class/net/eth0/queues/rx-%[1]d ] || [ ! -d /sys/class/net/eth0/queues/tx-%[1]d ]; then
	fail queues "want %[2]d pairs: queues $q, cpus $cpus"
elif [ "$cpus" -lt %[2]d ]; then
	fail queues "only $cpus vCPUs: queues $q"
else
	pass queues "queues=$q cpus=$cpus"
fi
`, n-1, n)
}

// stepPinnedUploads runs two 3 s, 2-stream iperf3 uploads at once, one
// pinned to CPU 0 (server port0), one to CPU 1 (port1): Linux's XPS maps
// each CPU to its own transmit queue.
func stepPinnedUploads(name string, port0, port1 int) string {
	return fmt.Sprintf(`begin
taskset -c 0 iperf3 -c %[2]s -p %[3]d -P 2 -t 3 -f m >/tmp/up0.out 2>&1 &
p0=$!
taskset -c 1 iperf3 -c %[2]s -p %[4]d -P 2 -t 3 -f m >/tmp/up1.out 2>&1 &
p1=$!
ok=1
wait $p0 || ok=0
wait $p1 || ok=0
r0=$(grep receiver /tmp/up0.out | tail -n1 | awk '{ for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") print $(i-1) }')
r1=$(grep receiver /tmp/up1.out | tail -n1 | awk '{ for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") print $(i-1) }')
if [ $ok = 1 ]; then
	pass %[1]s "cpu0=${r0}Mbit/s cpu1=${r1}Mbit/s"
else
	tail -n 5 /tmp/up0.out /tmp/up1.out
	fail %[1]s "iperf3 failed"
fi
`, name, harness.Gateway4, port0, port1)
}
