package perf

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vunet/vunet/e2e/tapfront"
	"github.com/vunet/vunet/internal/testutil"
)

// VM-less frontends (VUNET_PERF_FRONTENDS, default "qemu"). Besides the
// QEMU TCG guest, the comparison can drive the vhost-user backends (vunet,
// passt-vhost) from two frontends without a VM, whose guest is the Linux
// stack of a network namespace the test creates (inside its own private
// one): iperf3 runs there against the servers on the test namespace's
// 127.0.0.1, through the backend, like the QEMU guest's.
//
//   - testpmd: DPDK's dpdk-testpmd, a virtio-user port on the backend's
//     socket forwarding to and from a DPDK tap in the namespace with the
//     csum engine, which recomputes every checksum in software and
//     retries a full TX ring for up to 10 ms (testpmdCmds; --no-huge: its
//     memory is an anonymous memfd shared with the backend). No offloads
//     are negotiated: MTU-sized frames with full checksums. Its
//     forwarding lcore polls, so it keeps one core busy the whole time.
//   - tapfront: e2e/tapfront, this repository's frontend bridging a tap
//     with IFF_VNET_HDR and TUNSETOFFLOAD to the virtqueues; with vunet
//     the namespace negotiates CSUM and TSO both ways (passt offers
//     neither, so its tap gets plain frames; passt's DATA_VALID frames
//     without a checksum are filled in, Options.FillDataValid).
//
// Whenever a VM-less frontend runs, each repetition first measures host
// loopback (the same iperf3 tests against 127.0.0.1 in the test
// namespace, no backend): issue 11's ceiling, against which the VM-less
// columns are reported as a percentage.

const (
	frontQEMU     = "qemu"
	frontTestpmd  = "testpmd"
	frontTapfront = "tapfront"
	frontHost     = "host"
	kindLoopback  = "loopback"

	// nsDev is the guest namespace's interface (the tap), nsMAC its
	// address (the QEMU guest's).
	nsDev = "vpf0"
	nsMAC = "52:54:00:12:34:56"
	// testpmdMaxMTU: testpmd's mbufs (2048 bytes of data, no scatter in
	// io mode) hold an MTU-1500 frame, not more.
	testpmdMaxMTU = 1500
)

func (b backendSpec) isQEMU() bool { return b.Front == "" || b.Front == frontQEMU }

// parseFrontends reads VUNET_PERF_FRONTENDS: a comma-separated subset of
// qemu, testpmd and tapfront, each once.
func parseFrontends(s string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		switch f {
		case "":
			continue
		case frontQEMU, frontTestpmd, frontTapfront:
		default:
			return nil, fmt.Errorf("VUNET_PERF_FRONTENDS: unknown frontend %q (want qemu, testpmd, tapfront)", f)
		}
		for _, o := range out {
			if o == f {
				return nil, fmt.Errorf("VUNET_PERF_FRONTENDS: %s twice", f)
			}
		}
		out = append(out, f)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("VUNET_PERF_FRONTENDS: no frontend in %q", s)
	}
	return out, nil
}

// columns returns the comparison's columns in the order every repetition
// runs them: the QEMU frontend's (all of specs, as before), then, if a
// VM-less frontend is selected, the loopback reference and each VM-less
// frontend's. A VM-less frontend takes only single-queue vhost-user
// backends (testpmd only up to MTU 1500); notes say which specs it left
// out and why.
func columns(fronts []string, specs []backendSpec) (cols []backendSpec, notes []string) {
	loopback := false
	for _, f := range fronts {
		if f == frontQEMU {
			for _, s := range specs {
				s.Front = frontQEMU
				cols = append(cols, s)
			}
			continue
		}
		if !loopback {
			cols = append(cols, backendSpec{Kind: kindLoopback, Front: frontHost})
			loopback = true
		}
		for _, s := range specs {
			why := ""
			switch {
			case s.Kind != "vunet" && s.Kind != "passt-vhost":
				why = "not a vhost-user backend"
			case s.Queues > 1:
				why = "the frontend drives one queue pair"
			case f == frontTestpmd && s.MTU > testpmdMaxMTU:
				why = fmt.Sprintf("testpmd's mbufs hold frames up to MTU %d", testpmdMaxMTU)
			}
			if why != "" {
				notes = append(notes, fmt.Sprintf("%s: %s left out (%s)", f, s, why))
				continue
			}
			s.Front = f
			cols = append(cols, s)
		}
	}
	return cols, notes
}

// findTestpmd resolves dpdk-testpmd (VUNET_PERF_TESTPMD or PATH).
func (b *binaries) findTestpmd() {
	if p := os.Getenv("VUNET_PERF_TESTPMD"); p != "" {
		if _, err := os.Stat(p); err != nil {
			b.missing[frontTestpmd] = fmt.Sprintf("VUNET_PERF_TESTPMD=%s: %v", p, err)
			return
		}
		b.testpmd = p
		return
	}
	p, err := exec.LookPath("dpdk-testpmd")
	if err != nil {
		b.missing[frontTestpmd] = "dpdk-testpmd not found (apt-get install dpdk, or set VUNET_PERF_TESTPMD)"
		return
	}
	b.testpmd = p
}

// iperfJSON is what the harness reads of `iperf3 -J`: the receiver's
// bytes and rate and the sender's retransmissions (with -R the server's,
// which iperf3 reports back), summed over the streams.
type iperfJSON struct {
	End struct {
		SumSent struct {
			Retransmits *int `json:"retransmits"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
	} `json:"end"`
	Error string `json:"error"`
}

// parseIperfJSON returns the receiver's rate (Mbit/s) and bytes and the
// sender's retransmissions (-1 if not reported) of one `iperf3 -J` run.
func parseIperfJSON(data []byte) (mbps, bytes float64, retr int, err error) {
	var r iperfJSON
	if err := json.Unmarshal(data, &r); err != nil {
		return 0, 0, -1, fmt.Errorf("iperf3 output is not JSON: %v", err)
	}
	if r.Error != "" {
		return 0, 0, -1, fmt.Errorf("iperf3: %s", r.Error)
	}
	e := r.End
	if e.SumReceived.Bytes <= 0 || e.SumReceived.BitsPerSecond <= 0 {
		return 0, 0, -1, errors.New("iperf3: nothing received")
	}
	retr = -1
	if e.SumSent.Retransmits != nil {
		retr = *e.SumSent.Retransmits
	}
	return e.SumReceived.BitsPerSecond / 1e6, e.SumReceived.Bytes, retr, nil
}

// nsGuest is a network namespace behind a running VM-less frontend.
type nsGuest struct {
	ns       string
	target   string // the backend's gateway, mapped to the host's 127.0.0.1
	frontPid int    // the process whose CPU is the frontend's
	// counters snapshots the frontend's own counters (nil: none).
	counters func() netCounters
	// stop ends the frontend and returns what it reported (testpmd's
	// statistics) and any error; idempotent.
	stop func() (string, error)
	// output is what the frontend printed so far (nil: nothing).
	output func() string
}

func (g *nsGuest) close() {
	if g.stop != nil {
		g.stop()
	}
	exec.Command("ip", "netns", "del", g.ns).Run()
}

// netCounters reads the guest namespace's TCP counters.
func (g *nsGuest) netCounters() (netCounters, error) {
	out, err := exec.Command("ip", "netns", "exec", g.ns, "cat", "/proc/net/snmp", "/proc/net/netstat").Output()
	if err != nil {
		return nil, fmt.Errorf("guest namespace counters: %v", err)
	}
	c := netCounters{}
	if err := parseNetCounters(string(out), c); err != nil {
		return nil, err
	}
	// What the namespace's own devices and queues dropped before a frame
	// reached the frontend (a frontend that reads the tap late overflows
	// its qdisc: loss no backend counter can see).
	q, err := exec.Command("ip", "netns", "exec", g.ns, "tc", "-s", "qdisc", "show").Output()
	if err != nil {
		return nil, fmt.Errorf("guest namespace qdiscs: %v", err)
	}
	c["Qdisc:Dropped"] = qdiscDrops(string(q))
	dev, err := exec.Command("ip", "netns", "exec", g.ns, "cat", "/proc/net/dev").Output()
	if err != nil {
		return nil, fmt.Errorf("guest namespace devices: %v", err)
	}
	c["Dev:TxDrop"] = devTxDrops(string(dev))
	return c, nil
}

// devTxDrops sums the transmit "drop" column of /proc/net/dev (a tap
// whose reader falls behind drops there, past its qdisc).
func devTxDrops(out string) uint64 {
	var n uint64
	for _, line := range strings.Split(out, "\n") {
		_, stats, ok := strings.Cut(line, ":")
		f := strings.Fields(stats)
		if !ok || len(f) < 16 {
			continue // the two header lines
		}
		if d, err := strconv.ParseUint(f[11], 10, 64); err == nil {
			n += d
		}
	}
	return n
}

// testpmdTxQueueLen is the testpmd bridge's tap queue. testpmd's one
// forwarding lcore reads the tap only between its bursts toward the
// backend; while it waits for room in the backend's ring the kernel's
// default 1000-frame tap queue overflows and drops (Dev:TxDrop): 24 000-32 000
// of a 5 s 4-stream upload through vunet, and passt's upload collapsed
// to 41 Mbit/s. A VM's driver would stop its queue instead. With 10 000
// neither backend loses a frame there (2026-12-02, docs/performance.md).
const testpmdTxQueueLen = "10000"

// tapTxQueueLen is the txqueuelen set on the namespace's device: env
// (VUNET_PERF_TAP_TXQUEUELEN) if given ("0" leaves the kernel's
// default), else testpmdTxQueueLen on the testpmd bridge.
func tapTxQueueLen(front, env string) string {
	switch {
	case env == "0":
		return ""
	case env != "":
		return env
	case front == frontTestpmd:
		return testpmdTxQueueLen
	}
	return ""
}

// qdiscDrops sums the "dropped N" of `tc -s qdisc show` output.
func qdiscDrops(out string) uint64 {
	var n uint64
	for _, f := range strings.Split(out, "(dropped ")[1:] {
		v, _, _ := strings.Cut(f, ",")
		d, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err == nil {
			n += d
		}
	}
	return n
}

func ipNS(ns string, args ...string) error {
	if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
		return fmt.Errorf("ip -n %s %s: %v: %s", ns, strings.Join(args, " "), err, out)
	}
	return nil
}

// startNSGuest creates the guest namespace, starts spec's frontend on
// b's socket with its tap there, configures the guest's address (static,
// what the backend's DHCP would hand out) and waits until one TCP
// connection crosses to the host's loopback.
func startNSGuest(ctx context.Context, bins *binaries, spec backendSpec, b *backend) (_ *nsGuest, err error) {
	g := &nsGuest{ns: fmt.Sprintf("vunetperf%d", os.Getpid())}
	_ = exec.Command("ip", "netns", "del", g.ns).Run()
	if out, err := exec.Command("ip", "netns", "add", g.ns).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add: %v: %s", err, out)
	}
	defer func() {
		if err != nil {
			g.close()
		}
	}()
	if err := ipNS(g.ns, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	switch spec.Front {
	case frontTapfront:
		if err := startTapfront(ctx, g, spec, b); err != nil {
			return nil, err
		}
	case frontTestpmd:
		if err := startTestpmd(ctx, g, bins, b); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("not a VM-less frontend: %q", spec.Front)
	}
	gn := scaleGuestNet(spec.Kind)
	g.target = gn.gateway
	steps := [][]string{{"link", "set", nsDev, "address", nsMAC}, {"addr", "add", gn.addr, "dev", nsDev}}
	if spec.MTU != 0 {
		steps = append(steps, []string{"link", "set", nsDev, "mtu", strconv.Itoa(spec.MTU)})
	}
	if q := tapTxQueueLen(spec.Front, os.Getenv("VUNET_PERF_TAP_TXQUEUELEN")); q != "" {
		steps = append(steps, []string{"link", "set", nsDev, "txqueuelen", q})
	}
	steps = append(steps, []string{"link", "set", nsDev, "up"}, []string{"route", "add", "default", "via", gn.gateway})
	for _, args := range steps {
		if err := ipNS(g.ns, args...); err != nil {
			return nil, err
		}
	}
	// One connection through the backend first: ARP, and a frontend
	// that starts forwarding late (testpmd), are not charged to the
	// first test.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	warm := net.JoinHostPort(g.target, strconv.Itoa(l.Addr().(*net.TCPAddr).Port))
	var last string
	// One dial waits up to 30 s (SYN retransmissions cover a frontend
	// that starts forwarding late); quick failures are retried.
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline) && ctx.Err() == nil; time.Sleep(200 * time.Millisecond) {
		d, err := dialInNS(g.ns, 1, warm)
		if err != nil {
			last = err.Error()
			continue
		}
		ok := d.opened == 1
		last = d.first
		d.close()
		if ok {
			return g, nil
		}
	}
	diag, _ := exec.Command("sh", "-c", "ip -n "+g.ns+" neigh; ip -n "+g.ns+" -s link show "+nsDev+
		"; ip netns exec "+g.ns+" nstat -az | grep -E 'InCsumErrors|InSegs|OutSegs|InReceives|InHdrErrors|InAddrErrors|InDiscards|TcpExtTCPSynRetrans|InErrs'").CombinedOutput()
	hint := ""
	if m := regexp.MustCompile(`TcpInCsumErrors\s+([1-9]\d*)`).FindSubmatch(diag); m != nil {
		// passt --vhost-user leaves the TCP checksum out of frames it
		// marks DATA_VALID; testpmd's io engine (VUNET_PERF_TESTPMD_ARGS
		// with --forward-mode=io) passes them on untouched and the tap's
		// kernel stack drops them.
		hint = fmt.Sprintf(" (the namespace dropped %s TCP segments with bad checksums: the backend left checksums out, which a tap verifies)", m[1])
	}
	front := ""
	if g.output != nil {
		front = fmt.Sprintf("\n%s output:\n%s", spec.Front, lastLines(g.output(), 40))
	}
	return nil, fmt.Errorf("no TCP connection from the namespace to %s through %s: %s%s\nguest namespace:\n%s%s", warm, spec, last, hint, diag, front)
}

// startTapfront opens the tap, moves it into g's namespace and bridges it
// to the backend's virtqueues in this process.
func startTapfront(ctx context.Context, g *nsGuest, spec backendSpec, b *backend) error {
	tap, err := tapfront.OpenTap(nsDev)
	if err != nil {
		return err
	}
	if out, err := exec.Command("ip", "link", "set", nsDev, "netns", g.ns).CombinedOutput(); err != nil {
		tap.Close()
		return fmt.Errorf("ip link set %s netns: %v: %s", nsDev, err, out)
	}
	fe, err := tapfront.Dial(b.socket, tap, tapfront.Options{FillDataValid: spec.Kind == "passt-vhost"})
	if err != nil {
		tap.Close()
		return err
	}
	if err := fe.SetTapOffload(); err != nil {
		// Run with an ended context only closes the connection and tap.
		dead, end := context.WithCancel(ctx)
		end()
		fe.Run(dead)
		return err
	}
	feCtx, feStop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- fe.Run(feCtx) }()
	g.frontPid = os.Getpid()
	g.counters = func() netCounters { return tapfrontCounters(&fe.Stats) }
	var stopped bool
	var runErr error
	g.stop = func() (string, error) {
		if !stopped {
			stopped = true
			feStop()
			runErr = <-done
		}
		return fmt.Sprintf("tapfront: features %#x", fe.Features()), runErr
	}
	return nil
}

// tapfrontCounters snapshots tapfront's Stats (TX: namespace → backend).
func tapfrontCounters(st *tapfront.Stats) netCounters {
	return netCounters{
		"tx_frames": st.TXFrames.Load(), "tx_gso": st.TXGSO.Load(), "tx_big": st.TXBig.Load(),
		"tx_needs_csum": st.TXNeedsCsum.Load(), "tx_dropped": st.TXDropped.Load(),
		"rx_frames": st.RXFrames.Load(), "rx_gso": st.RXGSO.Load(), "rx_big": st.RXBig.Load(),
		"rx_needs_csum": st.RXNeedsCsum.Load(), "rx_merged": st.RXMerged.Load(), "rx_bad": st.RXBad.Load(),
		"rx_tap_errors": st.RXTapErrors.Load(), "kicks": st.Kicks.Load(), "calls": st.Calls.Load(),
	}
}

// testpmdCmds is what testpmd runs from --cmdline-file before it starts
// forwarding. The csum engine recomputes the IPv4, TCP and UDP checksums
// of every frame in software (no port has a checksum offload, so nothing
// is left to a device): passt --vhost-user sends TCP frames with the
// checksum left out and marked VIRTIO_NET_HDR_F_DATA_VALID whether or not
// the driver negotiated VIRTIO_NET_F_GUEST_CSUM (it offers neither that
// nor any other offload), and DPDK's virtio driver, which requests
// GUEST_CSUM only with an Rx checksum offload, ignores the header, so
// without this the tap's kernel drops them (TcpInCsumErrors). mac-swap
// off: the engine would otherwise rewrite both MAC addresses like the mac
// engine. retry with a 10 ms budget (200 × 50 µs): without it testpmd
// drops a burst whenever the backend's TX ring is full (the io engine
// too), which a VM's virtio-net driver never does (it stops its queue),
// and passt's upload then collapses into retransmission timeouts (6-30
// Mbit/s, 840-1150 retransmissions in 3 s here; 1.6-1.9 Gbit/s and none
// with the retry).
const testpmdCmds = `csum mac-swap off 0
csum mac-swap off 1
set fwd csum retry
set burst tx delay 50 retry 200
`

// testpmdArgs is the testpmd command line after bin: EAL options (two
// lcores, no hugepages, no PCI, the runtime directory under prefix), the
// virtio-user port on socket (port 0) and the DPDK tap nsDev (port 1),
// then testpmd's own: the commands of cmdFile (testpmdCmds), then
// forwarding. VUNET_PERF_TESTPMD_ARGS, if set, replaces everything after
// "--" (split at spaces).
func testpmdArgs(prefix, socket, cmdFile, override string) []string {
	args := []string{"-l", "0,1", "--no-huge", "--no-pci", "-m", "1024", "--file-prefix", prefix,
		"--vdev=net_virtio_user0,path=" + socket, "--vdev=net_tap0,iface=" + nsDev, "--"}
	if override != "" {
		return append(args, strings.Fields(override)...)
	}
	return append(args, "--total-num-mbufs=16384", "--forward-mode=csum", "--cmdline-file="+cmdFile, "--auto-start")
}

// startTestpmd runs dpdk-testpmd in g's namespace: a virtio-user port on
// the backend's socket and a DPDK tap (nsDev) there, csum-forwarding
// between them (testpmdCmds). e2e/boot's TestTestpmdIperf3 io-forwards
// instead: vunet's frames carry their checksums.
func startTestpmd(ctx context.Context, g *nsGuest, bins *binaries, b *backend) error {
	if bins.testpmd == "" {
		return errors.New(bins.missing[frontTestpmd])
	}
	prefix := g.ns // DPDK's runtime directory, /var/run/dpdk/PREFIX
	cmdFile := filepath.Join(filepath.Dir(b.socket), "testpmd-"+g.ns+".cmds")
	if err := os.WriteFile(cmdFile, []byte(testpmdCmds), 0o644); err != nil {
		return err
	}
	args := append([]string{"netns", "exec", g.ns, bins.testpmd}, testpmdArgs(prefix, b.socket, cmdFile, os.Getenv("VUNET_PERF_TESTPMD_ARGS"))...)
	cmd := exec.Command("ip", args...)
	out := &testutil.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("testpmd: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	g.frontPid = cmd.Process.Pid // ip netns exec execs testpmd in place
	g.output = out.String
	var stopped bool
	var stopErr error
	g.stop = func() (string, error) {
		if !stopped {
			stopped = true
			// Enter stops testpmd cleanly (ports closed, statistics
			// printed); a signal may hit its forwarding lcore, which then
			// waits for itself (see TestTestpmdIperf3).
			stdin.Write([]byte("\n"))
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				<-done
				stopErr = errors.New("testpmd did not quit on Enter within 30 s")
			}
			os.RemoveAll("/var/run/dpdk/" + prefix)
		}
		return testpmdStats(out.String()), stopErr
	}
	// Its stdout is block-buffered in a pipe: readiness is the tap
	// appearing in the namespace (the forwarding starts right after).
	deadline := time.Now().Add(time.Minute)
	for exec.Command("ip", "-n", g.ns, "link", "show", nsDev).Run() != nil {
		select {
		case <-done:
			return fmt.Errorf("testpmd exited:\n%s", lastLines(out.String(), 30))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("testpmd: no %s after a minute:\n%s", nsDev, lastLines(out.String(), 30))
		}
	}
	return nil
}

// testpmdStats returns testpmd's final per-port statistics (port 0 is the
// backend's virtio-user, port 1 the tap).
func testpmdStats(out string) string {
	i := strings.LastIndex(out, "---------------------- Forward statistics for port 0")
	if i < 0 {
		return ""
	}
	rest := out[i:]
	if j := strings.Index(rest, "Done."); j >= 0 {
		rest = rest[:j]
	}
	return strings.TrimSpace(rest)
}

// nsMark is one sampling point of a VM-less or loopback test.
type nsMark struct {
	at                     time.Time
	cpu, front, host, irq  time.Duration
	hwm, anon              int64
	net, vunet, guest, fco netCounters
}

// runVMLess measures one VM-less column (or the loopback one): a fresh
// backend and frontend (none for loopback), then every throughput test,
// each with a one-shot iperf3 server on the test namespace's 127.0.0.1
// and the client in the guest namespace. started is false if the backend
// or the frontend never came up.
func runVMLess(bins *binaries, spec backendSpec, rep int, tests []perfTest, secs int, dir string, logf func(string, ...any)) (_ []sample, started bool, _ error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(len(tests)*(secs+40)+180)*time.Second)
	defer cancel()

	var (
		b       *backend
		g       *nsGuest
		backPid int
	)
	target := "127.0.0.1"
	if spec.Kind != kindLoopback {
		if spec.Front == frontTestpmd && bins.testpmd == "" {
			return nil, false, errors.New(bins.missing[frontTestpmd])
		}
		var err error
		if b, err = startBackend(ctx, bins, spec, dir); err != nil {
			return nil, false, err
		}
		defer b.proc.Stop(5 * time.Second)
		if g, err = startNSGuest(ctx, bins, spec, b); err != nil {
			return nil, false, fmt.Errorf("%s: %w\n%s log:\n%s", spec.Front, err, spec.Kind, lastLines(b.proc.Output(), 20))
		}
		defer g.close()
		target = g.target
		backPid = b.pidOf()
	}

	var sampleErr error
	keep := func(err error) {
		if err != nil && sampleErr == nil {
			sampleErr = err
		}
	}
	sampleNow := func() nsMark {
		m := nsMark{at: time.Now()}
		var err error
		m.host, m.irq, err = hostTimes()
		keep(err)
		m.net, err = readNetCounters()
		keep(err)
		if b == nil {
			return m
		}
		m.cpu, err = cpuTime(backPid)
		keep(err)
		m.front, err = cpuTime(g.frontPid)
		keep(err)
		m.hwm, m.anon, err = memKB(backPid)
		keep(err)
		if b.api != "" {
			m.vunet, err = vunetCounters(ctx, b.api)
			keep(err)
		}
		m.guest, err = g.netCounters()
		keep(err)
		if g.counters != nil {
			m.fco = g.counters()
		}
		return m
	}

	var out []sample
	var runErr error
	for i, pt := range tests {
		s := sample{Spec: spec, Rep: rep, Test: pt, Retr: -1}
		port := basePort + i
		srv, err := startProc("iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", strconv.Itoa(port), "--forceflush")
		if err == nil {
			sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
			err = srv.WaitOutput(sctx, "Server listening")
			scancel()
		}
		if err != nil {
			s.Err = "iperf3 server: " + firstLine(err.Error())
			out = append(out, s)
			runErr = fmt.Errorf("%s: %s", pt.Name, s.Err)
			break
		}
		args := []string{"iperf3", "-c", target, "-p", strconv.Itoa(port), "-t", strconv.Itoa(secs), "-J"}
		if pt.Reverse {
			args = append(args, "-R")
		}
		if pt.Streams > 1 {
			args = append(args, "-P", strconv.Itoa(pt.Streams))
		}
		if g != nil {
			args = append([]string{"ip", "netns", "exec", g.ns}, args...)
		}
		cctx, ccancel := context.WithTimeout(ctx, time.Duration(secs+30)*time.Second)
		cmd := exec.CommandContext(cctx, args[0], args[1:]...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		m0 := sampleNow()
		data, cerr := cmd.Output()
		m1 := sampleNow()
		ccancel()
		select {
		case <-srv.Done():
		case <-time.After(5 * time.Second):
			srv.Stop(time.Second)
		}
		s.Wall = m1.at.Sub(m0.at)
		s.CPU, s.FrontCPU, s.Host, s.SoftIRQ = m1.cpu-m0.cpu, m1.front-m0.front, m1.host-m0.host, m1.irq-m0.irq
		s.HWMKB, s.AnonKB = m1.hwm, m1.anon
		s.Net = m1.net.delta(m0.net)
		if m0.vunet != nil {
			s.Vunet = m1.vunet.delta(m0.vunet)
		}
		if m0.guest != nil {
			s.GuestNet = m1.guest.delta(m0.guest)
		}
		if m0.fco != nil {
			s.FrontCounters = m1.fco.delta(m0.fco)
		}
		if st := cmd.ProcessState; st != nil {
			s.GuestCPU = st.UserTime() + st.SystemTime()
		}
		s.GuestCPU += srv.CPUTime()
		var perr error
		s.Mbps, s.Bytes, s.Retr, perr = parseIperfJSON(data)
		if perr != nil {
			s.Err = firstLine(perr.Error())
			if cerr != nil {
				s.Err += fmt.Sprintf(" (client: %v %s)", cerr, firstLine(stderr.String()))
			}
		}
		out = append(out, s)
		if s.Err != "" && runErr == nil {
			runErr = fmt.Errorf("%s: %s", pt.Name, s.Err)
		}
	}
	if runErr == nil {
		runErr = sampleErr
	}
	if g != nil {
		stats, err := g.stop()
		if stats != "" {
			logf("rep %d %s: %s", rep, spec, stats)
		}
		if err != nil && runErr == nil {
			runErr = err
		}
	}
	if runErr != nil && b != nil {
		runErr = fmt.Errorf("%w\n%s log:\n%s", runErr, spec.Kind, lastLines(b.proc.Output(), 20))
	}
	return out, true, runErr
}

// loopbackTarget is issue 11's target for the offload frontend: both
// directions at least this share of host loopback in the same run.
const loopbackTarget = 0.5

// formatVMLess renders the VM-less frontends' columns and the loopback
// reference: medians (min–max) as in the QEMU table, each rate also as a
// share of loopback's median for the same test, the ratios of vunet to
// passt-vhost per frontend, issue 11's loopback target for tapfront, and
// every run.
func formatVMLess(b *strings.Builder, specs []backendSpec, tests []perfTest, samples []sample, maxOther float64) {
	type key struct{ spec, test string }
	med := map[key]float64{}
	for _, spec := range specs {
		for _, pt := range tests {
			picked, _ := pick(samples, spec, pt)
			var rates []float64
			for _, s := range picked {
				rates = append(rates, s.Mbps)
			}
			if len(rates) > 0 {
				med[key{spec.String(), pt.Name}] = median(rates)
			}
		}
	}
	ofLoop := func(spec backendSpec, pt perfTest) (float64, bool) {
		x, l := med[key{spec.String(), pt.Name}], med[key{kindLoopback, pt.Name}]
		if x == 0 || l == 0 {
			return 0, false
		}
		return x / l, true
	}

	fmt.Fprintf(b, "\n### VM-less frontends\n\nThe guest is the Linux stack of a network namespace behind a tap: `testpmd` is DPDK's dpdk-testpmd forwarding between a virtio-user port on the backend's socket and a DPDK tap with its csum engine (no offloads negotiated; testpmd recomputes every IPv4/TCP/UDP checksum in software, since passt leaves TCP checksums out, and retries a full TX ring for up to 10 ms instead of dropping), `tapfront` is e2e/tapfront bridging a tap with IFF_VNET_HDR and TUNSETOFFLOAD to the virtqueues (checksum and TSO both ways where the backend offers them). iperf3 runs in the namespace against the same servers on 127.0.0.1 (guest→host: namespace to host). `loopback` is the same iperf3 test straight over the host's loopback in the same repetition, the ceiling for any user-mode backend here; \"of loopback\" is each median over loopback's median for the same test. Medians as above (quiet samples only where there is one; noisy: the rest of the machine used more than %.0f%% of a core). CPU %% columns over the client's wall time: the backend; the frontend (testpmd's process, whose forwarding core polls all the time; for tapfront the test process that runs it); the namespace's iperf3 client plus the host's iperf3 server.\n\n", 100*maxOther)
	b.WriteString("| frontend | backend | test | direction | streams | n | Mbit/s | of loopback | backend CPU s/GB | backend CPU % | frontend CPU % | iperf3 CPU % | Retr | RSS MiB | anon MiB |\n")
	b.WriteString("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, spec := range specs {
		for _, pt := range tests {
			picked, noisy := pick(samples, spec, pt)
			n := ""
			if noisy {
				n = " noisy"
			}
			if len(picked) == 0 {
				fmt.Fprintf(b, "| %s | %s | %s | %s | %d | 0 | – | – | – | – | – | – | – | – | – |\n", spec.Front, spec.Kind, pt.Name, pt.Dir(), pt.Streams)
				continue
			}
			var rates, cpuGB, cpuPct, frontPct, iperfPct, retr, hwm, anon []float64
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
					frontPct = append(frontPct, 100*s.FrontCPU.Seconds()/s.Wall.Seconds())
					iperfPct = append(iperfPct, 100*s.GuestCPU.Seconds()/s.Wall.Seconds())
				}
			}
			share := "–"
			if f, ok := ofLoop(spec, pt); ok {
				share = fmt.Sprintf("%.0f %%", 100*f)
			}
			backend := [...]string{spread(cpuGB, "%.2f"), fmtMedian(cpuPct, "%.0f"), fmtMedian(frontPct, "%.0f")}
			if spec.Kind == kindLoopback {
				backend = [...]string{"–", "–", "–"}
			}
			fmt.Fprintf(b, "| %s | %s | %s | %s | %d | %d%s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", spec.Front, spec.Kind, pt.Name, pt.Dir(), pt.Streams, len(rates), n,
				spread(rates, "%.0f"), share, backend[0], backend[1], backend[2], fmtMedian(iperfPct, "%.0f"),
				spread(retr, "%.0f"), fmtMedian(hwm, "%.0f"), fmtMedian(anon, "%.1f"))
		}
	}

	var pairs [][2]backendSpec
	for _, a := range specs {
		for _, o := range specs {
			if a.Kind == "vunet" && o.Kind != "vunet" && o.Kind != kindLoopback && a.Front == o.Front {
				pairs = append(pairs, [2]backendSpec{a, o})
			}
		}
	}
	if len(pairs) > 0 {
		b.WriteString("\nRatios of the medians, VM-less frontends (> 1: vunet faster).\n\n| ratio |")
		for _, pt := range tests {
			fmt.Fprintf(b, " %s |", pt.Name)
		}
		fmt.Fprintf(b, "\n|---|%s\n", strings.Repeat("---:|", len(tests)))
		for _, p := range pairs {
			fmt.Fprintf(b, "| %s / %s |", p[0], p[1])
			for _, pt := range tests {
				x, y := med[key{p[0].String(), pt.Name}], med[key{p[1].String(), pt.Name}]
				if x == 0 || y == 0 {
					b.WriteString(" – |")
				} else {
					fmt.Fprintf(b, " %.2f |", x/y)
				}
			}
			b.WriteString("\n")
		}
	}

	// Issue 11: through the offload frontend, both directions at least
	// half of loopback.
	for _, spec := range specs {
		if spec.Front != frontTapfront || spec.Kind != "vunet" {
			continue
		}
		lowest, lowestTest, missing := 2.0, "", 0
		for _, pt := range tests {
			f, ok := ofLoop(spec, pt)
			if !ok {
				missing++
				continue
			}
			if f < lowest {
				lowest, lowestTest = f, pt.Name
			}
		}
		switch {
		case lowestTest == "":
			fmt.Fprintf(b, "\n%s against loopback (target: every test ≥ %.0f %%): not measured.\n", spec, 100*loopbackTarget)
		case lowest >= loopbackTarget && missing == 0:
			fmt.Fprintf(b, "\n%s against loopback (target: every test ≥ %.0f %%): **met**, lowest %s at %.0f %%.\n", spec, 100*loopbackTarget, lowestTest, 100*lowest)
		case lowest >= loopbackTarget:
			fmt.Fprintf(b, "\n%s against loopback (target: every test ≥ %.0f %%): lowest %s at %.0f %%, but %d test(s) not measured.\n", spec, 100*loopbackTarget, lowestTest, 100*lowest, missing)
		default:
			fmt.Fprintf(b, "\n%s against loopback (target: every test ≥ %.0f %%): **missed**, lowest %s at %.0f %%.\n", spec, 100*loopbackTarget, lowestTest, 100*lowest)
		}
	}

	b.WriteString("\nEvery run, VM-less frontends (softirq: the machine's interrupt and softirq time, where the namespaces' packet processing shows, most of it also inside the processes' times; \"other\": the machine's busy CPU time minus the backend's, the frontend's and the iperf3 processes', i.e. anything else running):\n\n")
	b.WriteString("| rep | column | test | Mbit/s | backend CPU s | frontend CPU s | iperf3 CPU s | softirq s | other CPU s | wall s | Retr | frontend counters | error |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n")
	for _, s := range samples {
		if s.Spec.isQEMU() {
			continue
		}
		retr := "–"
		if s.Retr >= 0 {
			retr = strconv.Itoa(s.Retr)
		}
		fmt.Fprintf(b, "| %d | %s | %s | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %s | %s |\n", s.Rep, s.Spec, s.Test.Name, s.Mbps,
			s.CPU.Seconds(), s.FrontCPU.Seconds(), s.GuestCPU.Seconds(), s.SoftIRQ.Seconds(), s.Other().Seconds(), s.Wall.Seconds(), retr,
			formatFront(s.FrontCounters), noisyMark(s)+strings.ReplaceAll(s.Err, "|", "/"))
	}
}

// formatFront renders a frontend counter delta, sorted by name; "–" when
// there is none.
func formatFront(d map[string]uint64) string {
	if len(d) == 0 {
		return "–"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(d)) {
		parts = append(parts, fmt.Sprintf("%s=%d", k, d[k]))
	}
	return strings.Join(parts, " ")
}
