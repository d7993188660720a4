package perf

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// Addressing inside the namespace. passt copies the address and default
// route of a host interface, so the test gives it a fake uplink (a veth
// pair); its guest then reaches the host's loopback through the gateway
// (passt maps the gateway address to the host by default; --no-map-gw would
// turn that off).
const (
	fakeIf      = "perf0"
	fakeAddr    = "192.0.2.1/24"
	fakeGateway = "192.0.2.254"

	vunetTarget   = "10.0.2.2"        // vunet's gateway, mapped to 127.0.0.1
	passtTarget   = fakeGateway       // passt's gateway, mapped to 127.0.0.1
	gvproxyTarget = "192.168.127.254" // gvproxy's "host" address, NAT to 127.0.0.1
)

// backendSpec is one column of the comparison: a backend and its options.
type backendSpec struct {
	Kind string // vunet, passt, passt-vhost or gvproxy
	MTU  int    // 0: the backend's default
	// Bin, for vunet only, runs this vunet binary instead of the default
	// one: two builds compared in one interleaved run (before/after).
	Bin string
	// Queues is vunet's --queues (0: the default, 1); above 1 the guest's
	// NIC gets queues=N and mq=on.
	Queues int
	// Front is the frontend that drives this column (frontends_test.go):
	// "" or "qemu" for the QEMU TCG guest, "testpmd" or "tapfront" for a
	// VM-less one, "host" for the loopback reference (Kind "loopback").
	// parseBackends leaves it empty; columns sets it.
	Front string
}

func (b backendSpec) String() string {
	if b.Kind == kindLoopback {
		return kindLoopback
	}
	s := b.Kind
	if !b.isQEMU() {
		s = b.Front + "/" + s
	}
	if b.MTU != 0 {
		s += fmt.Sprintf(":mtu=%d", b.MTU)
	}
	if b.Bin != "" {
		s += ":bin=" + b.Bin
	}
	if b.Queues != 0 {
		s += fmt.Sprintf(":queues=%d", b.Queues)
	}
	return s
}

// parseBackends reads a comma-separated list such as
// "vunet,passt-vhost,passt,gvproxy,vunet:mtu=65520"; options follow the
// kind, each after a colon: mtu=N (576..65520) and, for vunet,
// bin=PATH ("vunet:mtu=65520:bin=/tmp/vunet-old") and queues=N (1..16).
func parseBackends(s string) ([]backendSpec, error) {
	var out []backendSpec
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		parts := strings.Split(f, ":")
		kind := parts[0]
		switch kind {
		case "vunet", "passt", "passt-vhost", "gvproxy":
		default:
			return nil, fmt.Errorf("unknown backend %q (want vunet, passt, passt-vhost or gvproxy)", kind)
		}
		spec := backendSpec{Kind: kind}
		for _, opt := range parts[1:] {
			k, v, _ := strings.Cut(opt, "=")
			switch {
			case k == "mtu":
				n, err := strconv.Atoi(v)
				if err != nil || n < 576 || n > 65520 {
					return nil, fmt.Errorf("backend %q: mtu=N wants 576..65520", f)
				}
				spec.MTU = n
			case k == "bin" && kind == "vunet" && v != "":
				spec.Bin = v
			case k == "queues" && kind == "vunet":
				n, err := strconv.Atoi(v)
				if err != nil || n < 1 || n > 16 {
					return nil, fmt.Errorf("backend %q: queues=N wants 1..16", f)
				}
				spec.Queues = n
			default:
				return nil, fmt.Errorf("backend %q: unknown option %q (mtu=N; bin=PATH and queues=N for vunet)", f, opt)
			}
		}
		out = append(out, spec)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no backends in %q", s)
	}
	return out, nil
}

// binaries are the backend executables, resolved once.
type binaries struct {
	vunet, passt, passtVhost, gvproxy string
	testpmd                           string            // set by findTestpmd, only when a testpmd frontend runs
	missing                           map[string]string // kind -> why unavailable
}

// findBinaries locates the backends. vunet is built from this tree
// (vunettest.Binary) unless VUNET_PERF_VUNET names a binary; passt comes from
// VUNET_PERF_PASST or PATH; passt-vhost (passt --vhost-user) from
// VUNET_PERF_PASST_VHOST, else the same binary as passt (one passt binary
// serves both modes if it is new enough: --vhost-user arrived in 2024; an
// older one fails to start and is reported unavailable); gvproxy from
// VUNET_PERF_GVPROXY, build/perf/gvproxy or PATH.
func findBinaries(t *testing.T, root string) *binaries {
	b := &binaries{missing: map[string]string{}}
	if p := os.Getenv("VUNET_PERF_VUNET"); p != "" {
		b.vunet = p
	} else {
		b.vunet = vunettest.Binary(t)
	}
	look := func(kind, env string, candidates ...string) string {
		if p := os.Getenv(env); p != "" {
			if _, err := os.Stat(p); err != nil {
				b.missing[kind] = fmt.Sprintf("%s=%s: %v", env, p, err)
				return ""
			}
			return p
		}
		for _, c := range candidates {
			if _, err := os.Stat(c); err == nil {
				return c
			}
		}
		if p, err := exec.LookPath(kind); err == nil {
			return p
		}
		b.missing[kind] = fmt.Sprintf("%s not found (set %s or put it in PATH)", kind, env)
		return ""
	}
	b.passt = look("passt", "VUNET_PERF_PASST")
	if p := os.Getenv("VUNET_PERF_PASST_VHOST"); p != "" {
		if _, err := os.Stat(p); err != nil {
			b.missing["passt-vhost"] = fmt.Sprintf("VUNET_PERF_PASST_VHOST=%s: %v", p, err)
		} else {
			b.passtVhost = p
		}
	} else if b.passt != "" {
		b.passtVhost = b.passt
	} else {
		b.missing["passt-vhost"] = "passt not found (set VUNET_PERF_PASST_VHOST or VUNET_PERF_PASST, or put it in PATH)"
	}
	b.gvproxy = look("gvproxy", "VUNET_PERF_GVPROXY", filepath.Join(root, "build", "perf", "gvproxy"))
	return b
}

// setupFakeUplink gives the namespace an interface with an address and a
// default route for passt to copy. Only ever called inside the private
// namespace.
func setupFakeUplink() error {
	if !vunettest.Isolated() {
		return fmt.Errorf("refusing to add %s outside the private network namespace", fakeIf)
	}
	// Not /sys/class/net: the re-exec does not remount sysfs, so it still
	// shows the original namespace's interfaces.
	if exec.Command("ip", "link", "show", "dev", fakeIf).Run() == nil {
		return nil
	}
	for _, args := range [][]string{
		// A veth pair rather than a dummy interface: some kernels (this
		// one's firecracker build) lack the dummy driver. Its peer stays
		// in the namespace, unused; it only gives perf0 a carrier.
		{"link", "add", fakeIf, "type", "veth", "peer", "name", fakeIf + "p"},
		{"addr", "add", fakeAddr, "dev", fakeIf},
		{"link", "set", fakeIf + "p", "up"},
		{"link", "set", fakeIf, "up"},
		{"route", "add", "default", "via", fakeGateway, "dev", fakeIf},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// backend is a running backend process serving one guest.
type backend struct {
	spec   backendSpec
	socket string
	target string // the address the guest runs iperf3 against
	proc   *proc
	pidOf  func() int // the process whose CPU time counts (passt may fork)
	api    string     // vunet's --api socket, for `vunet stats` after a failure
}

// guest returns the QEMU guest wired to this backend. vunet and passt-vhost
// are attached with vhost-user (qemutest's default: shared memfd guest RAM,
// -chardev socket + -netdev vhost-user); passt and gvproxy speak QEMU's stream
// netdev (4-byte length-prefixed frames over a unix socket). The device is
// the same virtio-net-pci (vectors=0, no ROM) in every case.
func (b *backend) guest(script string, memMB, smp int, timeout time.Duration) *qemutest.Guest {
	g := &qemutest.Guest{Script: script, MemMB: memMB, Timeout: timeout,
		// Names QEMU's threads ("CPU 0/TCG"), so vcpuTime can find them.
		ExtraArgs: []string{"-name", "perf,debug-threads=on", "-smp", strconv.Itoa(smp)}}
	switch b.spec.Kind {
	case "vunet", "passt-vhost":
		g.Socket = b.socket
		if b.spec.Queues > 1 {
			g.NetdevOpts = "queues=" + strconv.Itoa(b.spec.Queues)
			g.DeviceOpts = "mq=on"
		}
	default:
		dev := "virtio-net-pci,netdev=n0,romfile=,vectors=0"
		if b.spec.Kind == "gvproxy" {
			// gvproxy's default static DHCP lease; its pool would hand out
			// an address to any MAC, this just keeps the address stable.
			dev += ",mac=5a:94:ef:e4:0c:ee"
		}
		g.NoNet = true // qemutest adds only "-nic none"; the NIC comes from ExtraArgs
		g.ExtraArgs = append(g.ExtraArgs,
			"-netdev", "stream,id=n0,server=off,addr.type=unix,addr.path="+b.socket,
			"-device", dev)
	}
	return g
}

// startBackend starts spec on a fresh socket in dir, with extra arguments
// appended to its command line, and waits until it accepts connections.
func startBackend(ctx context.Context, bins *binaries, spec backendSpec, dir string, extra ...string) (*backend, error) {
	sock := filepath.Join(dir, spec.Kind+".sock")
	pidFile := filepath.Join(dir, spec.Kind+".pid")
	os.Remove(sock)
	os.Remove(pidFile)
	b := &backend{spec: spec, socket: sock}
	var (
		bin   string
		args  []string
		ready func(*proc) bool
	)
	sockExists := func(*proc) bool { _, err := os.Stat(sock); return err == nil }
	switch spec.Kind {
	case "vunet":
		bin = cmp.Or(spec.Bin, bins.vunet)
		b.target = vunetTarget
		b.api = filepath.Join(dir, "vunet-api.sock")
		os.Remove(b.api)
		args = []string{"--socket", sock, "--log-level", "info", "--api", b.api}
		if spec.MTU != 0 {
			args = append(args, "--mtu", strconv.Itoa(spec.MTU))
		}
		if spec.Queues != 0 {
			args = append(args, "--queues", strconv.Itoa(spec.Queues))
		}
		ready = func(p *proc) bool { return sockExists(p) && strings.Contains(p.Output(), "vunet ready") }
	case "passt", "passt-vhost":
		if err := setupFakeUplink(); err != nil {
			return nil, err
		}
		bin = bins.passt
		if spec.Kind == "passt-vhost" {
			bin = bins.passtVhost
		}
		b.target = passtTarget
		// passt (run as root) switches to "nobody" before it binds its
		// socket, so the socket's directory must be writable by anyone.
		sub := filepath.Join(dir, "passt")
		if err := os.MkdirAll(sub, 0o777); err != nil {
			return nil, err
		}
		if err := os.Chmod(sub, 0o1777); err != nil {
			return nil, err
		}
		sock = filepath.Join(sub, "passt.sock")
		os.Remove(sock)
		b.socket = sock
		// -f: stay in the foreground (the process we started is the one
		// forwarding), -e: log to stderr, -4: the guest only does DHCPv4
		// here, -1: exit when QEMU disconnects. No -P: passt drops to
		// "nobody" before writing it and cannot create it in dir (with
		// -f it does not fork, so its pid is the one we started).
		args = []string{"-f", "-e", "-4", "-1", "-s", sock}
		if spec.Kind == "passt-vhost" {
			// The same socket, now a vhost-user one: QEMU maps guest
			// RAM into passt and passt runs the virtqueues itself.
			args = append(args, "--vhost-user")
		}
		if spec.MTU != 0 {
			args = append(args, "-m", strconv.Itoa(spec.MTU))
		}
		ready = sockExists
	case "gvproxy":
		bin = bins.gvproxy
		b.target = gvproxyTarget
		// -ssh-port -1: no default host->guest SSH forward.
		args = []string{"-listen-qemu", "unix://" + sock, "-ssh-port", "-1", "-pid-file", pidFile}
		if spec.MTU != 0 {
			args = append(args, "-mtu", strconv.Itoa(spec.MTU))
		}
		ready = sockExists
	}
	if bin == "" {
		return nil, fmt.Errorf("%s: %s", spec.Kind, bins.missing[spec.Kind])
	}
	p, err := startProc(bin, append(args, extra...)...)
	if err != nil {
		return nil, err
	}
	b.proc = p
	b.pidOf = func() int {
		// Trust the pid file if the backend wrote one (a backend that
		// forks would report its worker there).
		if data, err := os.ReadFile(pidFile); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && pid > 0 {
				return pid
			}
		}
		return p.Pid()
	}
	deadline := time.Now().Add(30 * time.Second)
	for !ready(p) {
		select {
		case <-p.Done():
			return nil, fmt.Errorf("%s exited early (%v):\n%s", spec.Kind, p.Err(), p.Output())
		case <-ctx.Done():
			p.Stop(5 * time.Second)
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.Stop(5 * time.Second)
			return nil, fmt.Errorf("%s not ready after 30s:\n%s", spec.Kind, p.Output())
		}
	}
	return b, nil
}

// proc is the e2e harness's child process (output kept, killed with us).
type proc = harness.Proc

var startProc = harness.StartProc

// clockTicks is USER_HZ, the unit of /proc/PID/stat times (100 on every
// Linux architecture this runs on).
const clockTicks = 100

// cpuTime returns the user and system CPU time pid has used (all threads).
func cpuTime(pid int) (time.Duration, error) {
	return statTime(fmt.Sprintf("/proc/%d/stat", pid))
}

// vcpuTime returns the CPU time of QEMU's vCPU threads (named "CPU n/TCG"):
// the emulated guest's own work, as opposed to QEMU's main loop, which does
// the stream netdev's socket I/O.
func vcpuTime(pid int) (time.Duration, error) {
	dirs, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	if err != nil {
		return 0, err
	}
	var sum time.Duration
	for _, d := range dirs {
		comm, err := os.ReadFile(filepath.Join(d, "comm"))
		if err != nil || !strings.HasPrefix(string(comm), "CPU ") {
			continue
		}
		v, err := statTime(filepath.Join(d, "stat"))
		if err != nil {
			return 0, err
		}
		sum += v
	}
	return sum, nil
}

// memKB returns the VmHWM (peak resident set) and RssAnon (private
// anonymous memory, i.e. not the mapped guest RAM a vhost-user backend
// shares with QEMU) of pid, in KiB, from /proc/PID/status.
func memKB(pid int) (hwm, anon int64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	hwm, anon = -1, -1
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "VmHWM" && k != "RssAnon") {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, perr := strconv.ParseInt(f[0], 10, 64)
		if perr != nil {
			continue
		}
		if k == "VmHWM" {
			hwm = n
		} else {
			anon = n
		}
	}
	if hwm < 0 || anon < 0 {
		return 0, 0, fmt.Errorf("no VmHWM/RssAnon in /proc/%d/status", pid)
	}
	return hwm, anon, nil
}

// statTime reads utime+stime from a /proc stat file.
func statTime(path string) (time.Duration, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may contain spaces; fields after it are
	// space separated. utime and stime are fields 14 and 15.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed %s", path)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("short %s", path)
	}
	// f[0] is field 3 (state), so field N is f[N-3].
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("malformed %s", path)
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// hostBusy returns the CPU time all CPUs of the machine spent busy (user,
// nice, system, irq, softirq, steal; not idle or iowait), from /proc/stat.
// Compared with the backend's and QEMU's share it shows whether anything
// else was competing for the CPUs during a measurement.
func hostBusy() (time.Duration, error) {
	busy, _, err := hostTimes()
	return busy, err
}

// hostTimes returns hostBusy's figure and the part of it spent in
// interrupts and softirqs (which the kernel charges to no process: with
// IRQ time accounting a socket's loopback receive processing shows
// there, not in the process that triggered it).
func hostTimes() (busy, irq time.Duration, err error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	return parseProcStat(string(data))
}

// parseProcStat reads the "cpu" line of /proc/stat.
func parseProcStat(data string) (busy, irq time.Duration, err error) {
	line, _, _ := strings.Cut(data, "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("unexpected /proc/stat: %q", line)
	}
	var b, q uint64
	for _, i := range []int{1, 2, 3, 6, 7, 8} { // user nice system irq softirq steal
		v, err := strconv.ParseUint(f[i], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("unexpected /proc/stat: %q", line)
		}
		b += v
		if i == 6 || i == 7 {
			q += v
		}
	}
	return time.Duration(b) * time.Second / clockTicks, time.Duration(q) * time.Second / clockTicks, nil
}
