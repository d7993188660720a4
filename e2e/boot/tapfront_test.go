package boot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/tapfront"
	"github.com/vunet/vunet/endpoint"
	"github.com/vunet/vunet/internal/vunettest"
)

// TestTapFrontOffloads runs the Linux stack of a network namespace as a
// full-speed guest with offloads: e2e/tapfront bridges a tap device
// (IFF_VNET_HDR, TUNSETOFFLOAD CSUM|TSO4|TSO6) in the namespace to vunet's
// virtqueues. Data crosses both ways with its SHA-256 checked (socat to
// servers on this namespace's 127.0.0.1 through vunet's NAT), 64 KiB TSO
// frames with partial checksums must have crossed in both directions (the
// frontend counts them), and iperf3 reports the throughput each way next
// to host loopback and vunet's CPU seconds per GB.
func TestTapFrontOffloads(t *testing.T) {
	setup(t, "iperf3\tiperf3", "ip\tiproute2", "socat\tsocat", "sha256sum\tcoreutils")
	in := vunettest.Start(t)

	ns := fmt.Sprintf("vunettf%d", os.Getpid())
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	nsRun := func(args ...string) string { return run(t, append([]string{"ip", "netns", "exec", ns}, args...)...) }
	nsRun("ip", "link", "set", "lo", "up")

	// The tap is created here and moved into the namespace before any
	// frame flows; its file keeps working across the move.
	const dev = "vtf0"
	tap, err := tapfront.OpenTap(dev)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("ip", "link", "set", dev, "netns", ns).CombinedOutput(); err != nil {
		tap.Close()
		t.Fatalf("ip link set %s netns %s: %v\n%s", dev, ns, err, out)
	}
	b, err := tapfront.Dial(in.Socket, tap, tapfront.Options{})
	if err != nil {
		tap.Close()
		t.Fatal(err)
	}
	for _, bit := range []int{endpoint.FeatureCsum, endpoint.FeatureGuestCsum, endpoint.FeatureHostTSO4, endpoint.FeatureHostTSO6,
		endpoint.FeatureGuestTSO4, endpoint.FeatureGuestTSO6, endpoint.FeatureMrgRxbuf} {
		if b.Features()&(1<<bit) == 0 {
			t.Errorf("feature bit %d not negotiated (features %#x)", bit, b.Features())
		}
	}
	if err := b.SetTapOffload(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- b.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("tapfront: %v", err)
		}
	})
	nsRun("ip", "link", "set", dev, "address", "52:54:00:12:34:56")
	nsRun("ip", "addr", "add", "10.0.2.15/24", "dev", dev)
	nsRun("ip", "link", "set", dev, "up")
	nsRun("ip", "route", "add", "default", "via", "10.0.2.2")

	// Checked transfers first: a download and an upload of 32 MiB each.
	const size = 32 << 20
	blob := make([]byte, size)
	rand.New(rand.NewSource(time.Now().UnixNano())).Read(blob)
	sum := sha256.Sum256(blob)
	want := hex.EncodeToString(sum[:])
	down := listen(t)
	go func() {
		c, err := down.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write(blob)
	}()
	gotDown := nsRun("sh", "-c", fmt.Sprintf("socat -u TCP:10.0.2.2:%d STDOUT | sha256sum", down.Addr().(*net.TCPAddr).Port))
	if f := strings.Fields(gotDown); len(f) == 0 || f[0] != want {
		t.Errorf("download: sha256 %q, want %s", gotDown, want)
	}
	file := filepath.Join(t.TempDir(), "upload")
	if err := os.WriteFile(file, blob, 0o644); err != nil {
		t.Fatal(err)
	}
	up := listen(t)
	upSum := make(chan string, 1)
	go func() {
		c, err := up.Accept()
		if err != nil {
			upSum <- err.Error()
			return
		}
		defer c.Close()
		h := sha256.New()
		n, err := io.Copy(h, c)
		upSum <- fmt.Sprintf("%x %d %v", h.Sum(nil), n, err)
	}()
	nsRun("socat", "-u", "FILE:"+file, fmt.Sprintf("TCP:10.0.2.2:%d", up.Addr().(*net.TCPAddr).Port))
	select {
	case got := <-upSum:
		if got != fmt.Sprintf("%s %d <nil>", want, size) {
			t.Errorf("upload: host received %q, want %s %d", got, want, size)
		}
	case <-time.After(time.Minute):
		t.Fatal("upload: the host side never finished")
	}

	port := vunettest.FreePort(t)
	srv := startLogged(t, "iperf3 server", "iperf3", "-s", "--forceflush", "-B", "127.0.0.1", "-p", strconv.Itoa(port))
	t.Cleanup(func() { srv.stop(syscall.SIGTERM) })
	if err := srv.waitFor("Server listening", 30*time.Second); err != nil {
		t.Fatalf("iperf3 server: %v\n%s", err, srv.output())
	}
	loop := iperf3(t, nil, "127.0.0.1", port, "")
	t.Logf("host loopback (same run, this namespace): %.2f Gbit/s", loop.gbps)
	for _, dir := range []struct{ name, flag string }{{"upload (namespace to host)", ""}, {"download (host to namespace, -R)", "-R"}} {
		cpu0 := cpuSeconds(t, in.Pid())
		r := iperf3(t, nsRun, "10.0.2.2", port, dir.flag)
		cpu := cpuSeconds(t, in.Pid()) - cpu0
		t.Logf("tapfront %s: %.2f Gbit/s received (%d bytes, %d retransmits), %.0f%% of loopback; vunet %.2f CPU s (%.2f CPU s per GB)",
			dir.name, r.gbps, r.bytes, r.retransmits, 100*r.gbps/loop.gbps, cpu, cpu/(float64(r.bytes)/1e9))
		if r.bytes < 10<<20 {
			t.Errorf("iperf3 %s: only %d bytes received", dir.name, r.bytes)
		}
	}

	st := &b.Stats
	t.Logf("tapfront: to vunet %d frames (%d GSO, %d > 1514 bytes, %d NEEDS_CSUM, %d dropped); from vunet %d frames (%d GSO, %d > 1514 bytes, %d NEEDS_CSUM, %d merged, %d bad, %d tap errors); %d kicks, %d call waits",
		st.TXFrames.Load(), st.TXGSO.Load(), st.TXBig.Load(), st.TXNeedsCsum.Load(), st.TXDropped.Load(),
		st.RXFrames.Load(), st.RXGSO.Load(), st.RXBig.Load(), st.RXNeedsCsum.Load(), st.RXMerged.Load(), st.RXBad.Load(), st.RXTapErrors.Load(),
		st.Kicks.Load(), st.Calls.Load())
	// On a 1500-byte MTU, frames over 1514 bytes are TSO frames: the
	// offloads really worked in both directions.
	if st.TXGSO.Load() == 0 || st.TXBig.Load() == 0 || st.TXNeedsCsum.Load() == 0 {
		t.Errorf("no TSO frames with partial checksums went from the namespace to vunet")
	}
	if st.RXGSO.Load() == 0 || st.RXBig.Load() == 0 || st.RXNeedsCsum.Load() == 0 {
		t.Errorf("no TSO frames with partial checksums came from vunet to the namespace")
	}
	if st.TXDropped.Load() != 0 || st.RXBad.Load() != 0 || st.RXTapErrors.Load() != 0 {
		t.Errorf("frontend errors: %d dropped, %d bad, %d tap errors", st.TXDropped.Load(), st.RXBad.Load(), st.RXTapErrors.Load())
	}
	select {
	case <-in.Done():
		t.Errorf("vunet exited during the test")
	default:
	}
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

type iperfResult struct {
	gbps        float64
	bytes       int64
	retransmits int
}

// iperf3 runs a 5-second client (in the namespace when nsRun is set) and
// returns what the receiver got.
func iperf3(t *testing.T, nsRun func(...string) string, host string, port int, flag string) iperfResult {
	t.Helper()
	args := []string{"iperf3", "-c", host, "-p", strconv.Itoa(port), "-t", "5", "-J"}
	if flag != "" {
		args = append(args, flag)
	}
	var out string
	if nsRun != nil {
		out = nsRun(args...)
	} else {
		out = run(t, args...)
	}
	var res struct {
		End struct {
			SumSent struct {
				Retransmits int `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived struct {
				Bytes         int64   `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("iperf3 %v: %v\n%s", args, err, out)
	}
	if res.Error != "" {
		t.Fatalf("iperf3 %v: %s", args, res.Error)
	}
	e := res.End
	return iperfResult{e.SumReceived.BitsPerSecond / 1e9, e.SumReceived.Bytes, e.SumSent.Retransmits}
}

// cpuSeconds is the user plus system CPU time of process pid so far.
func cpuSeconds(t *testing.T, pid int) float64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command name (which may hold spaces) in ")".
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		t.Fatalf("/proc/%d/stat: %q", pid, s)
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ is 100 on Linux
}
