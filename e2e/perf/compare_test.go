package perf

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/qemutest"
)

// Knobs, all environment variables (go test flags would have to be passed
// after -args through the namespace re-exec; environment variables just
// work):
//
//	VUNET_PERF=1                 required, or the test skips
//	VUNET_PERF_BACKENDS          default "vunet,passt,gvproxy"; also
//	                             "passt-vhost" (passt --vhost-user); each
//	                             entry may carry ":mtu=N" (e.g.
//	                             vunet:mtu=65520), vunet also
//	                             ":queues=N" (multiqueue; the NIC gets
//	                             queues=N,mq=on)
//	VUNET_PERF_FRONTENDS         default "qemu"; also "testpmd" and
//	                             "tapfront", the VM-less frontends of
//	                             frontends_test.go (throughput of the
//	                             vhost-user backends against host loopback
//	                             measured in the same repetition), e.g.
//	                             "qemu,testpmd,tapfront"
//	VUNET_PERF_TESTPMD           dpdk-testpmd binary (default: PATH)
//	VUNET_PERF_TESTPMD_ARGS      replaces testpmd's own arguments (after
//	                             "--"; default: the csum engine with
//	                             testpmdCmds, frontends_test.go), e.g.
//	                             "--forward-mode=io --auto-start"
//	VUNET_PERF_SMP               guest vCPUs, -smp (default 1)
//	VUNET_PERF_REPS              repetitions of the whole round (default 3)
//	VUNET_PERF_SECONDS           iperf3 -t (default 10)
//	VUNET_PERF_STREAMS           iperf3 -P values (default "1,4")
//	VUNET_PERF_MEM               guest RAM in MiB (default 512)
//	VUNET_PERF_OUT               also write the markdown report to this file
//	VUNET_PERF_JSON              write every sample as JSON to this file
//	VUNET_PERF_MAX_OTHER         noise threshold, percent of one core (default
//	                             10): a test during which the rest of the
//	                             machine (not the backend, not QEMU) was busier
//	                             than this is "noisy"; the backend's round is
//	                             then repeated (VUNET_PERF_RETRIES, default 2)
//	                             and the medians use quiet samples only
//	VUNET_PERF_PROFILE           a directory: `perf record -g` each vunet
//	                             during its guest run (perturbs the numbers)
//	VUNET_PERF_VUNET, VUNET_PERF_PASST, VUNET_PERF_PASST_VHOST,
//	VUNET_PERF_GVPROXY           binaries (passt-vhost defaults to the
//	                             passt binary)
//	VUNET_PERF_PASST_REV, VUNET_PERF_GVPROXY_REV  source revision of a
//	                             self-built passt/gvproxy, for the report
func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// perfTest is one iperf3 run inside the guest.
type perfTest struct {
	Name    string // e.g. "up-1"
	Reverse bool   // -R: host to guest
	Streams int    // -P
	// Lat is "rr" or "crr" for a latency test (latclient instead of
	// iperf3; Reverse and Streams unused).
	Lat string
}

func (p perfTest) Dir() string {
	if p.Lat != "" {
		return "guest↔host"
	}
	if p.Reverse {
		return "host→guest"
	}
	return "guest→host"
}

// sample is one measurement: a test on a backend in one repetition.
type sample struct {
	Spec    backendSpec
	Rep     int
	Test    perfTest
	Mbps    float64       // iperf3 receiver rate
	Bytes   float64       // Mbps × receiver interval
	Wall    time.Duration // host wall time between the guest's markers
	CPU     time.Duration // backend process CPU (user+sys) in that window
	QEMUCPU time.Duration // QEMU process CPU in that window
	// FrontCPU is a VM-less frontend's CPU in that window (testpmd's
	// process, or this test process for tapfront); 0 for QEMU.
	FrontCPU time.Duration
	// GuestCPU is the CPU of the iperf3 client and server processes of a
	// VM-less or loopback test (the namespace's Linux stack is the
	// guest); 0 for QEMU, whose guest is in QEMUCPU.
	GuestCPU time.Duration
	// SoftIRQ is the machine's interrupt and softirq time in a VM-less or
	// loopback test's window, for information: the namespaces' packet
	// processing shows there, and mostly also in the times of the
	// processes it ran on behalf of (subtracting it as well made
	// loopback's "other" negative), so Other does not subtract it.
	SoftIRQ time.Duration
	VCPU    time.Duration // QEMU's vCPU thread(s) in that window
	Host    time.Duration // the whole machine's busy CPU time in that window
	Retr    int           // TCP retransmissions of iperf3's sender (-1: not reported)
	Lat     latResult     // a latency test's round-trip times
	HWMKB   int64         // backend's VmHWM (peak RSS, KiB) at the test's end
	AnonKB  int64         // backend's RssAnon (KiB) at the test's end
	// Net is what moved in the namespace's TCP counters during the test
	// (netCounters: the loopback TCP between iperf3 and the backend).
	Net map[string]uint64
	// Vunet is what moved in vunet's own counters (vunetCounters; nil for
	// other backends).
	Vunet map[string]uint64
	// GuestNet is what moved in the guest's own TCP counters (nil if the
	// guest did not print them).
	GuestNet map[string]uint64
	// FrontCounters is what moved in a VM-less frontend's own counters
	// (tapfront's Stats: frames, GSO frames, drops, kicks); nil otherwise.
	FrontCounters map[string]uint64
	Err           string
	Noisy         bool // Other() exceeded the threshold
}

// Other is the machine's busy CPU time not spent by the backend or QEMU
// (or a VM-less frontend and the namespace's iperf3 processes): the
// iperf3 server of a QEMU test, kernel work accounted elsewhere, and
// anything else running on the machine.
func (s sample) Other() time.Duration {
	return s.Host - s.CPU - s.QEMUCPU - s.FrontCPU - s.GuestCPU
}

func TestCompare(t *testing.T) {
	if os.Getenv(enabledEnv) != "1" {
		t.Skipf("set %s=1 to run the throughput comparison (see docs/performance.md)", enabledEnv)
	}
	if testing.Short() {
		t.Skip("boots QEMU guests; skipped with -short")
	}
	if !isolated {
		t.Fatal("needs a private network namespace: run as root with unshare(1) available")
	}
	root, err := qemutest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	specs, err := parseBackends(cmp.Or(os.Getenv("VUNET_PERF_BACKENDS"), "vunet,passt,gvproxy"))
	if err != nil {
		t.Fatal(err)
	}
	fronts, err := parseFrontends(cmp.Or(os.Getenv("VUNET_PERF_FRONTENDS"), frontQEMU))
	if err != nil {
		t.Fatal(err)
	}
	cols, leftOut := columns(fronts, specs)
	withQEMU := slices.Contains(fronts, frontQEMU)
	reps := envInt(t, "VUNET_PERF_REPS", 3)
	secs := envInt(t, "VUNET_PERF_SECONDS", 10)
	memMB := envInt(t, "VUNET_PERF_MEM", 512)
	smp := envInt(t, "VUNET_PERF_SMP", 1)
	maxOther := float64(envInt(t, "VUNET_PERF_MAX_OTHER", 10)) / 100
	retries := 2
	if v := os.Getenv("VUNET_PERF_RETRIES"); v != "" {
		if retries, err = strconv.Atoi(v); err != nil || retries < 0 {
			t.Fatalf("VUNET_PERF_RETRIES=%q: want a non-negative integer", v)
		}
	}
	var tests []perfTest
	for _, f := range strings.Split(cmp.Or(os.Getenv("VUNET_PERF_STREAMS"), "1,4"), ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 128 {
			t.Fatalf("VUNET_PERF_STREAMS: bad entry %q", f)
		}
		tests = append(tests,
			perfTest{Name: fmt.Sprintf("up-%d", n), Streams: n},
			perfTest{Name: fmt.Sprintf("down-%d", n), Reverse: true, Streams: n})
	}
	lat, err := latTests(cmp.Or(os.Getenv("VUNET_PERF_LATENCY"), "rr,crr"))
	if err != nil {
		t.Fatal(err)
	}
	tput := slices.Clone(tests) // the VM-less frontends run these only
	tests = append(tests, lat...)
	latSecs := envInt(t, "VUNET_PERF_LAT_SECONDS", 5)
	profDir := os.Getenv("VUNET_PERF_PROFILE")
	if profDir != "" {
		if err := os.MkdirAll(profDir, 0o755); err != nil {
			t.Fatal(err)
		}
	}

	if withQEMU {
		qemutest.EnsureGuest(t)
	}
	bins := findBinaries(t, root)
	if slices.Contains(fronts, frontTestpmd) {
		bins.findTestpmd()
	}
	var gf guestFiles
	if len(lat) > 0 && withQEMU {
		gf.latClient = buildLatClient(t, root, t.TempDir())
		gf.echoPort = echoServer(t)
		gf.latSecs = latSecs
	}
	meta := describeMachine(root, bins)
	for _, n := range leftOut {
		meta += "- left out: " + n + "\n"
	}
	t.Logf("machine:\n%s", meta)

	dir, err := os.MkdirTemp("", "vuperf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// passt runs as "nobody" and must reach its socket's directory.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}

	var samples []sample
	unavailable := map[string]string{}
	failed := map[string]string{} // column -> its first failure after it started
	start := time.Now()
	// Interleaved: every repetition runs each backend once, so a drift of
	// the machine over time hits all backends alike.
	for rep := 1; rep <= reps; rep++ {
		for _, spec := range cols {
			if why, ok := unavailable[spec.String()]; ok {
				t.Logf("rep %d %s: skipped (%s)", rep, spec, why)
				continue
			}
			var res []sample
			for attempt := 0; ; attempt++ {
				var err error
				var started bool
				if spec.isQEMU() {
					res, started, err = runOne(t, bins, spec, rep, tests, secs, memMB, smp, dir, profDir, gf)
				} else {
					res, started, err = runVMLess(bins, spec, rep, tput, secs, dir, t.Logf)
				}
				if err != nil {
					// Reported, and failing the run only by
					// runProblems' rule (a vunet column's failure,
					// or nothing compared).
					t.Logf("rep %d %s: %v", rep, spec, err)
					if !started {
						// The backend itself cannot run here: say why
						// once instead of failing every repetition.
						unavailable[spec.String()] = firstLine(err.Error())
					} else if _, ok := failed[spec.String()]; !ok {
						failed[spec.String()] = fmt.Sprintf("rep %d: %s", rep, firstLine(err.Error()))
					}
					break
				}
				noisy := 0
				for i := range res {
					if res[i].Wall > 0 && res[i].Other().Seconds() > maxOther*res[i].Wall.Seconds() {
						res[i].Noisy = true
						noisy++
					}
				}
				if noisy == 0 || attempt >= retries {
					break
				}
				t.Logf("rep %d %s: %d test(s) noisy (something else used the CPUs), repeating: %s", rep, spec, noisy, summarize(res))
			}
			samples = append(samples, res...)
			for _, s := range res {
				if !spec.isQEMU() {
					t.Logf("[%6.0fs] rep %d %-22s %-7s %8.1f Mbit/s  backend %6.2fs cpu  frontend %6.2fs cpu  iperf3 %6.2fs cpu  softirq %6.2fs  other %6.2fs cpu  wall %5.2fs  retr %d  tcp %s  guest %s  vunet %s  frontend %s %s",
						time.Since(start).Seconds(), rep, spec, s.Test.Name, s.Mbps, s.CPU.Seconds(), s.FrontCPU.Seconds(), s.GuestCPU.Seconds(), s.SoftIRQ.Seconds(), s.Other().Seconds(),
						s.Wall.Seconds(), s.Retr, formatNet(s.Net), formatNet(s.GuestNet), formatVunet(s.Vunet), formatFront(s.FrontCounters), noisyMark(s)+s.Err)
					continue
				}
				t.Logf("[%6.0fs] rep %d %-18s %-7s %8.1f Mbit/s  lat p50/p99 %d/%d µs  backend %6.2fs cpu  qemu %6.2fs cpu (vcpu %6.2fs)  other %6.2fs cpu  wall %5.2fs  retr %d  tcp %s  guest %s  vunet %s %s",
					time.Since(start).Seconds(), rep, spec, s.Test.Name, s.Mbps, s.Lat.P50, s.Lat.P99,
					s.CPU.Seconds(), s.QEMUCPU.Seconds(), s.VCPU.Seconds(), s.Other().Seconds(), s.Wall.Seconds(), s.Retr, formatNet(s.Net), formatNet(s.GuestNet), formatVunet(s.Vunet), noisyMark(s)+s.Err)
			}
		}
	}

	report := formatReport(cols, tests, samples, unavailable, failed, reps, secs, memMB, smp, maxOther, meta)
	fmt.Fprintf(os.Stdout, "\n%s\n", report)
	if out := os.Getenv("VUNET_PERF_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(report), 0o644); err != nil {
			t.Errorf("writing %s: %v", out, err)
		}
	}
	if out := os.Getenv("VUNET_PERF_JSON"); out != "" {
		data, err := jsonReport(samples, unavailable, failed, meta)
		if err == nil {
			err = os.WriteFile(out, data, 0o644)
		}
		if err != nil {
			t.Errorf("writing %s: %v", out, err)
		}
	}
	for _, p := range runProblems(cols, samples, unavailable, failed) {
		t.Error(p)
	}
}

// measured reports whether spec has at least one successful sample: a
// rate, or round trips for a latency test.
func measured(samples []sample, spec backendSpec) bool {
	for _, s := range samples {
		if s.Spec == spec && s.Err == "" && (s.Mbps > 0 || s.Lat.N > 0) {
			return true
		}
	}
	return false
}

// runProblems is why a finished comparison fails: a vunet column that
// could not run or failed (unavailable, failed: column -> reason), nothing
// measured at all, or vunet measured but none of the other backends'
// columns although some were asked for (the loopback reference does not
// count). Any other column that could not run or failed is only reported
// (unavailable or failed, in the markdown and the JSON): the run completes
// and passes as long as one comparison ran.
func runProblems(cols []backendSpec, samples []sample, unavailable, failed map[string]string) []string {
	var out []string
	var any, vunet, others, othersMeasured bool
	for _, c := range cols {
		m := measured(samples, c)
		any = any || m
		switch c.Kind {
		case "vunet":
			vunet = vunet || m
			if why, ok := unavailable[c.String()]; ok {
				out = append(out, fmt.Sprintf("%s unavailable: %s", c, why))
			}
			if why, ok := failed[c.String()]; ok {
				out = append(out, fmt.Sprintf("%s failed (%s)", c, why))
			}
		case kindLoopback:
		default:
			others = true
			othersMeasured = othersMeasured || m
		}
	}
	switch {
	case len(cols) > 0 && !any:
		out = append(out, "nothing was measured: every column was unavailable or failed")
	case vunet && others && !othersMeasured:
		out = append(out, "no comparison ran: every column of the other backends was unavailable or failed")
	}
	return out
}

// jsonSample is one sample in the JSON report, in plain units.
type jsonSample struct {
	Backend   string  `json:"backend"`
	MTU       int     `json:"mtu,omitempty"` // 0: the backend's default
	Bin       string  `json:"bin,omitempty"` // a vunet column's own binary
	Rep       int     `json:"rep"`
	Test      string  `json:"test"`
	Reverse   bool    `json:"reverse"` // host→guest
	Streams   int     `json:"streams"`
	Mbps      float64 `json:"mbit_per_s"`
	Bytes     float64 `json:"bytes"`
	WallS     float64 `json:"wall_s"`
	CPUS      float64 `json:"backend_cpu_s"`
	QEMUCPUS  float64 `json:"qemu_cpu_s"`
	VCPUS     float64 `json:"vcpu_s"`
	OtherCPUS float64 `json:"other_cpu_s"`
	// Frontend is "qemu", "testpmd", "tapfront" or, for the loopback
	// reference (backend "loopback"), "host"; empty in old reports.
	Frontend string `json:"frontend,omitempty"`
	// FrontCPUS: a VM-less frontend's CPU (testpmd's process; for
	// tapfront this test process); GuestCPUS: the namespace's iperf3
	// client and the host's iperf3 server (VM-less and loopback tests).
	FrontCPUS float64 `json:"frontend_cpu_s,omitempty"`
	GuestCPUS float64 `json:"iperf3_cpu_s,omitempty"`
	// SoftIRQS: the machine's irq+softirq time (VM-less and loopback
	// tests), for information: it overlaps the processes' times.
	SoftIRQS float64 `json:"softirq_cpu_s,omitempty"`
	// FrontCounters: what moved in tapfront's own counters.
	FrontCounters map[string]uint64 `json:"frontend_counters,omitempty"`
	Retr          int               `json:"retransmits"` // -1: not reported
	// Latency tests (test "rr" or "crr"): round trips measured and their
	// percentiles, microseconds.
	LatN   int   `json:"round_trips,omitempty"`
	LatP50 int64 `json:"p50_us,omitempty"`
	LatP90 int64 `json:"p90_us,omitempty"`
	LatP99 int64 `json:"p99_us,omitempty"`
	LatMax int64 `json:"max_us,omitempty"`
	HWMKB  int64 `json:"backend_vmhwm_kib"`
	AnonKB int64 `json:"backend_rssanon_kib"`
	// HostTCP: the namespace's Tcp/TcpExt counters that grew during the
	// test ("Tcp:RetransSegs", "TcpExt:TCPRcvQDrop", ...).
	HostTCP map[string]uint64 `json:"host_tcp,omitempty"`
	// Vunet: vunet's counters that grew during the test.
	Vunet map[string]uint64 `json:"vunet_counters,omitempty"`
	// GuestTCP: the guest's Tcp/TcpExt counters that grew.
	GuestTCP map[string]uint64 `json:"guest_tcp,omitempty"`
	Noisy    bool              `json:"noisy"`
	Err      string            `json:"error,omitempty"`
}

// jsonReport renders every sample, the unavailable backends and the machine
// description as JSON, for tools that want the raw numbers.
func jsonReport(samples []sample, unavailable, failed map[string]string, meta string) ([]byte, error) {
	out := struct {
		Machine string `json:"machine"`
		// Unavailable: columns that never started (backend or frontend),
		// with the reason; Failed: columns that started but failed in a
		// repetition, with the first failure.
		Unavailable map[string]string `json:"unavailable,omitempty"`
		Failed      map[string]string `json:"failed,omitempty"`
		Samples     []jsonSample      `json:"samples"`
	}{Machine: meta, Unavailable: unavailable, Failed: failed, Samples: []jsonSample{}}
	for _, s := range samples {
		out.Samples = append(out.Samples, jsonSample{
			Backend: s.Spec.Kind, MTU: s.Spec.MTU, Bin: s.Spec.Bin, Rep: s.Rep, Test: s.Test.Name, Reverse: s.Test.Reverse, Streams: s.Test.Streams,
			Mbps: s.Mbps, Bytes: s.Bytes, WallS: s.Wall.Seconds(), CPUS: s.CPU.Seconds(), QEMUCPUS: s.QEMUCPU.Seconds(),
			VCPUS: s.VCPU.Seconds(), OtherCPUS: s.Other().Seconds(), Retr: s.Retr,
			Frontend: s.Spec.Front, FrontCPUS: s.FrontCPU.Seconds(), GuestCPUS: s.GuestCPU.Seconds(), SoftIRQS: s.SoftIRQ.Seconds(), FrontCounters: s.FrontCounters,
			LatN: s.Lat.N, LatP50: s.Lat.P50, LatP90: s.Lat.P90, LatP99: s.Lat.P99, LatMax: s.Lat.MaxUS, HWMKB: s.HWMKB, AnonKB: s.AnonKB,
			HostTCP: s.Net, Vunet: s.Vunet, GuestTCP: s.GuestNet, Noisy: s.Noisy, Err: s.Err,
		})
	}
	return json.MarshalIndent(out, "", "  ")
}

func noisyMark(s sample) string {
	if s.Noisy {
		return "NOISY "
	}
	return ""
}

func summarize(res []sample) string {
	var parts []string
	for _, s := range res {
		parts = append(parts, fmt.Sprintf("%s %.0f Mbit/s other %.1fs", s.Test.Name, s.Mbps, s.Other().Seconds()))
	}
	return strings.Join(parts, ", ")
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

// guestScript gets a DHCP lease, prints it, then runs each iperf3 test
// against target:port+i, framing it with PERF-BEGIN/PERF-END (the host
// samples CPU times there) and a PERF-RESULT line with iperf3's receiver
// summary.
func guestScript(target string, port int, tests []perfTest, secs int, gf guestFiles) string {
	var b strings.Builder
	fmt.Fprintf(&b, `if ! udhcpc -i eth0 -n -q -t 10 -T 2 -O mtu >/tmp/udhcpc.log 2>&1 || [ ! -f /run/dhcp-eth0 ]; then
	cat /tmp/udhcpc.log
	echo "PERF-FAIL dhcp"
	exit 1
fi
. /run/dhcp-eth0
echo "PERF-LEASE ip=$ip/$mask router=$router lease_mtu=$mtu link_mtu=$(cat /sys/class/net/eth0/mtu)"
gnet() { # name phase: the guest's TCP counters, one prefixed line each
	grep -h -E '^(Tcp|TcpExt):' /proc/net/snmp /proc/net/netstat | sed "s/^/PERF-GNET $1 $2 /"
}
run() { # name port iperf3-args...
	name=$1 port=$2
	shift 2
	gnet "$name" 0
	echo "PERF-BEGIN $name"
	# timeout: a stalled transfer costs 30 s, not the whole guest run.
	timeout %d iperf3 -c %s -p "$port" -t %d -f m "$@" >/tmp/iperf.out 2>&1
	rc=$?
	echo "PERF-END $name"
	gnet "$name" 1
	cat /tmp/iperf.out
	echo "PERF-RESULT $name rc=$rc $(grep receiver /tmp/iperf.out | tail -n1)"
	echo "PERF-SENDER $name $(grep sender /tmp/iperf.out | tail -n1)"
}
lat() { # name mode
	gnet "$1" 0
	echo "PERF-BEGIN $1"
	timeout %d /bin/latclient -mode "$2" -addr %s:%d -d %ds >/tmp/lat.out 2>&1
	rc=$?
	echo "PERF-END $1"
	gnet "$1" 1
	cat /tmp/lat.out
	echo "PERF-LAT $1 $(grep '^LAT ' /tmp/lat.out | tail -n1) rc=$rc"
}
`, secs+30, target, secs, gf.latSecs+30, target, gf.echoPort, gf.latSecs)
	for i, pt := range tests {
		if pt.Lat != "" {
			fmt.Fprintf(&b, "lat %s %s\n", pt.Name, pt.Lat)
			continue
		}
		args := ""
		if pt.Reverse {
			args += " -R"
		}
		if pt.Streams > 1 {
			args += fmt.Sprintf(" -P %d", pt.Streams)
		}
		fmt.Fprintf(&b, "run %s %d%s\n", pt.Name, port+i, args)
	}
	// Stay up a moment so the host's last CPU sample finds QEMU alive.
	b.WriteString("sleep 2\necho PERF-DONE\n")
	return b.String()
}

const basePort = 5201

// runOne boots the guest once against a fresh instance of spec and runs
// every test.
// started is false if the backend never came up.
// guestFiles is what the latency tests add to the guest: the latclient
// binary and where the host's echo server listens.
type guestFiles struct {
	latClient []byte
	echoPort  int
	latSecs   int
}

func runOne(t *testing.T, bins *binaries, spec backendSpec, rep int, tests []perfTest, secs, memMB, smp int, dir, profDir string, gf guestFiles) (_ []sample, started bool, _ error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(len(tests)*(secs+30)+180)*time.Second)
	defer cancel()

	// One one-shot iperf3 server per test, so a failed test cannot wedge
	// the next one.
	var servers []*proc
	defer func() {
		for _, s := range servers {
			s.Stop(time.Second)
		}
	}()
	for i := range tests {
		if tests[i].Lat != "" {
			continue
		}
		s, err := startProc("iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", strconv.Itoa(basePort+i), "--forceflush")
		if err != nil {
			return nil, true, err
		}
		servers = append(servers, s)
		for !strings.Contains(s.Output(), "Server listening") {
			select {
			case <-s.Done():
				return nil, true, fmt.Errorf("iperf3 server exited: %v\n%s", s.Err(), s.Output())
			case <-ctx.Done():
				return nil, true, fmt.Errorf("iperf3 server never listened: %w", ctx.Err())
			case <-time.After(20 * time.Millisecond):
			}
		}
	}

	b, err := startBackend(ctx, bins, spec, dir)
	if err != nil {
		return nil, false, err
	}
	defer b.proc.Stop(5 * time.Second)

	g := b.guest(guestScript(b.target, basePort, tests, secs, gf), memMB, smp, time.Duration(len(tests)*(secs+30)+120)*time.Second)
	if gf.latClient != nil {
		g.Files = map[string][]byte{"/bin/latclient": gf.latClient}
	}
	inst, err := g.Start(ctx, t)
	if err != nil {
		return nil, true, err
	}
	defer inst.Kill()
	backendPid := b.pidOf()

	if profDir != "" && spec.Kind == "vunet" {
		out := filepath.Join(profDir, fmt.Sprintf("%s-rep%d.data", strings.ReplaceAll(spec.String(), ":", "_"), rep))
		pr, err := startProc("perf", "record", "-F", "499", "-g", "-p", strconv.Itoa(backendPid), "-o", out)
		if err != nil {
			t.Logf("perf record: %v", err)
		} else {
			defer func() {
				syscall.Kill(pr.Pid(), syscall.SIGINT) // perf writes its data on SIGINT
				select {
				case <-pr.Done():
				case <-time.After(30 * time.Second):
					pr.Stop(time.Second)
				}
			}()
		}
	}

	type mark struct {
		at                    time.Time
		cpu, qemu, vcpu, host time.Duration
		hwm, anon             int64
		net, vunet            netCounters
	}
	var sampleErr error
	sampleNow := func() mark {
		m := mark{at: time.Now()}
		var err1, err2, err3, err4 error
		m.cpu, err1 = cpuTime(backendPid)
		m.qemu, err2 = cpuTime(inst.Pid())
		m.vcpu, err3 = vcpuTime(inst.Pid())
		m.host, err4 = hostBusy()
		var err5, err6 error
		m.hwm, m.anon, err5 = memKB(backendPid)
		m.net, err6 = readNetCounters()
		if b.api != "" {
			var err7 error
			if m.vunet, err7 = vunetCounters(ctx, b.api); err7 != nil && sampleErr == nil {
				sampleErr = fmt.Errorf("vunet stats: %w", err7)
			}
		}
		if err := cmp.Or(err1, err2, err3, err4, err5, err6); err != nil && sampleErr == nil {
			sampleErr = fmt.Errorf("sampling CPU times: %w", err)
		}
		return m
	}
	marks := map[string][2]mark{}
	var waitErr error
	for _, pt := range tests {
		if waitErr = inst.WaitFor(ctx, "PERF-BEGIN "+pt.Name+"\n"); waitErr != nil {
			break
		}
		begin := sampleNow()
		if waitErr = inst.WaitFor(ctx, "PERF-END "+pt.Name+"\n"); waitErr != nil {
			break
		}
		marks[pt.Name] = [2]mark{begin, sampleNow()}
	}
	res, err := inst.Wait()
	if waitErr == nil {
		waitErr = err
	}
	console := res.Console
	if lease := regexp.MustCompile(`PERF-LEASE .*`).FindString(console); lease != "" {
		t.Logf("rep %d %s: %s", rep, spec, lease)
	}

	var out []sample
	for _, pt := range tests {
		s := sample{Spec: spec, Rep: rep, Test: pt}
		if m, ok := marks[pt.Name]; ok {
			s.Wall = m[1].at.Sub(m[0].at)
			s.CPU = m[1].cpu - m[0].cpu
			s.QEMUCPU = m[1].qemu - m[0].qemu
			s.VCPU = m[1].vcpu - m[0].vcpu
			s.Host = m[1].host - m[0].host
			s.HWMKB, s.AnonKB = m[1].hwm, m[1].anon
			s.Net = m[1].net.delta(m[0].net)
			if m[0].vunet != nil {
				s.Vunet = m[1].vunet.delta(m[0].vunet)
			}
		}
		if pt.Lat != "" {
			s.Lat, s.Err = parseLat(console, pt.Name)
			s.Retr = -1
		} else {
			s.Mbps, s.Bytes, s.Err = parseResult(console, pt.Name)
			s.Retr = parseRetr(console, pt.Name)
		}
		s.GuestNet = parseGuestNet(console, pt.Name)
		out = append(out, s)
	}
	if waitErr == nil {
		waitErr = sampleErr
	}
	if waitErr == nil && res.ExitCode != 0 {
		waitErr = fmt.Errorf("guest script exited %d", res.ExitCode)
	}
	for _, s := range out {
		if waitErr == nil && s.Err != "" {
			waitErr = fmt.Errorf("%s: %s", s.Test.Name, s.Err)
		}
	}
	if waitErr != nil {
		stats := ""
		if b.api != "" {
			o, _ := exec.Command(cmp.Or(spec.Bin, bins.vunet), "stats", "--api", b.api).CombinedOutput()
			stats = "\nvunet stats after the failure:\n" + string(o)
		}
		return out, true, fmt.Errorf("%w\nconsole tail:\n%s\n%s log:\n%s%s", waitErr, res.Tail(40), spec.Kind, lastLines(b.proc.Output(), 20), stats)
	}
	return out, true, nil
}

// resultRE matches "PERF-RESULT name rc=N [SUM]   0.00-10.04  sec  1.10 MBytes  943 Mbits/sec ... receiver".
var resultRE = regexp.MustCompile(`(?m)^PERF-RESULT (\S+) rc=(\d+)(.*)$`)
var rateRE = regexp.MustCompile(`([0-9.]+)-([0-9.]+)\s+sec\s+.*?([0-9.]+)\s+Mbits/sec`)

func parseResult(console, name string) (mbps, bytes float64, errText string) {
	for _, m := range resultRE.FindAllStringSubmatch(console, -1) {
		if m[1] != name {
			continue
		}
		if m[2] != "0" {
			return 0, 0, "iperf3 exited " + m[2]
		}
		r := rateRE.FindStringSubmatch(m[3])
		if r == nil {
			return 0, 0, "no receiver line"
		}
		from, _ := strconv.ParseFloat(r[1], 64)
		to, _ := strconv.ParseFloat(r[2], 64)
		mbps, _ = strconv.ParseFloat(r[3], 64)
		return mbps, mbps * 1e6 / 8 * (to - from), ""
	}
	return 0, 0, "no result (guest did not get that far)"
}

// senderRE matches "PERF-SENDER name [SUM]   0.00-10.00  sec  1.10 GBytes  943 Mbits/sec  12  sender":
// the number before "sender" is iperf3's Retr column (the sender's TCP
// retransmissions; with -R the host's side, which iperf3 reports back).
var senderRE = regexp.MustCompile(`(?m)^PERF-SENDER (\S+) .*Mbits/sec\s+(\d+)\s+sender`)

// parseRetr returns the sender's retransmissions of test name, or -1 if
// iperf3 did not print them (a sender without TCP_INFO).
func parseRetr(console, name string) int {
	for _, m := range senderRE.FindAllStringSubmatch(console, -1) {
		if m[1] != name {
			continue
		}
		n, err := strconv.Atoi(m[2])
		if err != nil {
			return -1
		}
		return n
	}
	return -1
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// describeMachine collects what the report needs to be reproducible.
func describeMachine(root string, bins *binaries) string {
	run := func(name string, args ...string) string {
		cmd := exec.Command(name, args...)
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil && len(out) == 0 {
			return "unknown (" + err.Error() + ")"
		}
		// Skip passt's notice that its AVX2 build is missing (a self-built
		// passt has none): the version is the next line.
		text := strings.TrimSpace(string(out))
		for strings.HasPrefix(text, "Can't run AVX2 build") {
			_, text, _ = strings.Cut(text, "\n")
		}
		return firstLine(strings.TrimSpace(text))
	}
	cpu := "unknown"
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		if m := regexp.MustCompile(`(?m)^model name\s*:\s*(.*)$`).FindStringSubmatch(string(data)); m != nil {
			cpu = m[1]
		}
	}
	kver, _ := os.ReadFile(filepath.Join(root, "build", "guest", "kernel-version"))
	load, _ := os.ReadFile("/proc/loadavg")
	var b strings.Builder
	fmt.Fprintf(&b, "- host: %s, %d CPUs (%s), kernel %s, loadavg at start %s\n", cpu, runtime.NumCPU(), run("uname", "-m"), run("uname", "-r"), strings.TrimSpace(string(load)))
	fmt.Fprintf(&b, "- %s\n", run(qemutest.QEMUBinary, "--version"))
	fmt.Fprintf(&b, "- guest: kernel %s, 1 vCPU, TCG, %s\n", strings.TrimSpace(string(kver)), run("iperf3", "--version"))
	fmt.Fprintf(&b, "- vunet: %s (%s; tree: %s)\n", run(bins.vunet, "version"), bins.vunet, run("git", "describe", "--always", "--dirty"))
	passtVersion := func(bin string) string {
		if src := os.Getenv("VUNET_PERF_PASST_REV"); src != "" {
			return "source " + src
		}
		if p, err := filepath.EvalSymlinks(bin); err == nil && strings.HasPrefix(p, "/usr/") {
			return run("dpkg-query", "-W", "-f", "${Package} ${Version}", "passt")
		}
		return run(bin, "--version") // "unknown version" when built from a plain archive
	}
	if bins.passt != "" {
		fmt.Fprintf(&b, "- passt: %s (%s)\n", passtVersion(bins.passt), bins.passt)
	}
	if bins.passtVhost != "" && bins.passtVhost != bins.passt {
		fmt.Fprintf(&b, "- passt-vhost: %s (%s)\n", passtVersion(bins.passtVhost), bins.passtVhost)
	}
	if bins.testpmd != "" {
		v := run("sh", "-c", `dpkg-query -W -f '${Package} ${Version}' "$(dpkg -S "$1" | cut -d: -f1)"`, "sh", bins.testpmd)
		fmt.Fprintf(&b, "- testpmd: %s (%s)\n", v, bins.testpmd)
	}
	if bins.gvproxy != "" {
		v := run(bins.gvproxy, "-version")
		if src := os.Getenv("VUNET_PERF_GVPROXY_REV"); src != "" {
			v += ", source " + src
		}
		fmt.Fprintf(&b, "- gvproxy: %s (%s)\n", v, bins.gvproxy)
	}
	return b.String()
}

// formatReport renders the per-run results, the summary and the ratios as
// markdown.
func formatReport(specs []backendSpec, tests []perfTest, samples []sample, unavailable, failed map[string]string, reps, secs, memMB, smp int, maxOther float64, meta string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "## Throughput comparison (%s)\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&b, "%s- iperf3 -t %d, %d repetition(s) interleaved, guest RAM %d MiB, %d vCPU(s)\n\n", meta, secs, reps, memMB, smp)
	for _, k := range slices.Sorted(maps.Keys(unavailable)) {
		fmt.Fprintf(&b, "**%s unavailable**: %s\n\n", k, unavailable[k])
	}
	for _, k := range slices.Sorted(maps.Keys(failed)) {
		fmt.Fprintf(&b, "**%s failed** (%s)\n\n", k, failed[k])
	}

	var vmSpecs []backendSpec
	all := specs
	specs = nil
	for _, s := range all {
		if s.isQEMU() {
			specs = append(specs, s)
		} else {
			vmSpecs = append(vmSpecs, s)
		}
	}
	var latT []perfTest
	tests, latT = splitTests(tests)
	if len(specs) > 0 {
		formatQEMU(&b, specs, tests, samples, maxOther)
	}
	if len(vmSpecs) > 0 {
		formatVMLess(&b, vmSpecs, tests, samples, maxOther)
	}
	if len(latT) > 0 && len(specs) > 0 {
		b.WriteString(formatLatency(specs, latT, samples))
	}
	if len(specs) > 0 {
		formatRuns(&b, samples)
	}
	return b.String()
}

// pick returns the samples of spec's test pt that the medians use: the
// quiet ones where there are any, else all that succeeded; noisy is true
// in the second case.
func pick(samples []sample, spec backendSpec, pt perfTest) (picked []sample, noisy bool) {
	quiet := 0
	for _, s := range samples {
		if s.Spec == spec && s.Test == pt && s.Err == "" && s.Mbps > 0 && !s.Noisy {
			quiet++
		}
	}
	for _, s := range samples {
		if s.Spec != spec || s.Test != pt || s.Err != "" || s.Mbps == 0 || (quiet > 0 && s.Noisy) {
			continue
		}
		noisy = noisy || s.Noisy
		picked = append(picked, s)
	}
	return picked, noisy
}

// formatQEMU renders the QEMU frontend's throughput table and ratios.
func formatQEMU(b *strings.Builder, specs []backendSpec, tests []perfTest, samples []sample, maxOther float64) {
	// Medians per (spec, test).
	type key struct{ spec, test string }
	med := map[key]float64{}
	fmt.Fprintf(b, "Median of the repetitions (min–max in brackets; quiet samples only where there is one, \"n\" counts them: a sample is noisy when the rest of the machine used more than %.0f%% of a core during it);", 100*maxOther)
	fmt.Fprintf(b, " CPU is the backend process's user+system time per GB moved; CPU %% columns are CPU time over the wall time between the guest's markers (100%% = one core): the backend, all of QEMU, and QEMU's vCPU thread (the emulated guest; near 100%% means the guest is the bottleneck). Retr is iperf3's sender retransmissions; RSS is the backend's peak resident set (VmHWM, which for a vhost-user backend includes the guest RAM pages it touched) and anon its private anonymous memory (RssAnon), both MiB at the test's end.\n\n")
	fmt.Fprintf(b, "| backend | test | direction | streams | n | Mbit/s | backend CPU s/GB | backend CPU %% | QEMU %% | vCPU %% | Retr | RSS MiB | anon MiB |\n")
	fmt.Fprintf(b, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, spec := range specs {
		for _, pt := range tests {
			var rates, cpuGB, cpuPct, qemuPct, vcpuPct, retr, hwm, anon []float64
			picked, noisy := pick(samples, spec, pt)
			n := ""
			if noisy {
				n = " noisy"
			}
			for _, s := range picked {
				rates = append(rates, s.Mbps)
				if s.Retr >= 0 {
					retr = append(retr, float64(s.Retr))
				}
				if s.HWMKB > 0 {
					hwm = append(hwm, float64(s.HWMKB)/1024)
					anon = append(anon, float64(s.AnonKB)/1024)
				}
				if s.Bytes > 0 && s.Wall > 0 {
					cpuGB = append(cpuGB, s.CPU.Seconds()/(s.Bytes/1e9))
					cpuPct = append(cpuPct, 100*s.CPU.Seconds()/s.Wall.Seconds())
					qemuPct = append(qemuPct, 100*s.QEMUCPU.Seconds()/s.Wall.Seconds())
					vcpuPct = append(vcpuPct, 100*s.VCPU.Seconds()/s.Wall.Seconds())
				}
			}
			if len(rates) == 0 {
				fmt.Fprintf(b, "| %s | %s | %s | %d | 0 | – | – | – | – | – | – | – | – |\n", spec, pt.Name, pt.Dir(), pt.Streams)
				continue
			}
			med[key{spec.String(), pt.Name}] = median(rates)
			fmt.Fprintf(b, "| %s | %s | %s | %d | %d%s | %s | %s | %s | %s | %s | %s | %s | %s |\n", spec, pt.Name, pt.Dir(), pt.Streams, len(rates), n,
				spread(rates, "%.0f"), spread(cpuGB, "%.2f"), fmtMedian(cpuPct, "%.0f"), fmtMedian(qemuPct, "%.0f"), fmtMedian(vcpuPct, "%.0f"),
				spread(retr, "%.0f"), fmtMedian(hwm, "%.0f"), fmtMedian(anon, "%.1f"))
		}
	}

	// Ratios of every vunet column against every other backend.
	var pairs [][2]backendSpec
	for _, a := range specs {
		for _, o := range specs {
			if a.Kind == "vunet" && o.Kind != "vunet" && a.Front == o.Front {
				pairs = append(pairs, [2]backendSpec{a, o})
			}
		}
	}
	if len(pairs) > 0 {
		fmt.Fprintf(b, "\nRatios of the medians (> 1: vunet faster).\n\n| ratio |")
		for _, pt := range tests {
			fmt.Fprintf(b, " %s |", pt.Name)
		}
		fmt.Fprintf(b, "\n|---|%s\n", strings.Repeat("---:|", len(tests)))
		for _, p := range pairs {
			fmt.Fprintf(b, "| %s / %s |", p[0], p[1])
			for _, pt := range tests {
				x, y := med[key{p[0].String(), pt.Name}], med[key{p[1].String(), pt.Name}]
				if x == 0 || y == 0 {
					fmt.Fprintf(b, " – |")
				} else {
					fmt.Fprintf(b, " %.2f |", x/y)
				}
			}
			b.WriteString("\n")
		}
	}
}

// formatRuns renders every QEMU sample.
func formatRuns(b *strings.Builder, samples []sample) {
	fmt.Fprintf(b, "\nEvery run (\"other\": the machine's busy CPU time minus the backend's and QEMU's, i.e. the iperf3 server, kernel softirq work and anything else running; large values mean interference):\n\n")
	fmt.Fprintf(b, "| rep | backend | test | Mbit/s or p50/p99 µs | backend CPU s | QEMU CPU s | vCPU s | other CPU s | wall s | Retr | error |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, s := range samples {
		if !s.Spec.isQEMU() {
			continue
		}
		retr := "–"
		if s.Retr >= 0 {
			retr = strconv.Itoa(s.Retr)
		}
		rate := fmt.Sprintf("%.1f", s.Mbps)
		if s.Test.Lat != "" {
			rate = fmt.Sprintf("%d / %d", s.Lat.P50, s.Lat.P99)
		}
		fmt.Fprintf(b, "| %d | %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %s |\n", s.Rep, s.Spec, s.Test.Name, rate,
			s.CPU.Seconds(), s.QEMUCPU.Seconds(), s.VCPU.Seconds(), s.Other().Seconds(), s.Wall.Seconds(), retr, noisyMark(s)+s.Err)
	}
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func fmtMedian(v []float64, f string) string {
	if len(v) == 0 {
		return "–"
	}
	return fmt.Sprintf(f, median(v))
}

func spread(v []float64, f string) string {
	if len(v) == 0 {
		return "–"
	}
	if len(v) == 1 {
		return fmt.Sprintf(f, v[0])
	}
	return fmt.Sprintf(f+" ("+f+"–"+f+")", median(v), slices.Min(v), slices.Max(v))
}
