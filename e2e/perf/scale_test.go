package perf

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/e2e/tapfront"
	"github.com/vunet/vunet/internal/qemutest"
)

// Connection scale (issue 11): N idle guest TCP connections to a listener
// on the host's loopback, through each backend in turn, in one run. The
// guest is the Linux stack of a network namespace behind e2e/tapfront (the
// VM-less vhost-user frontend), so opening thousands of connections is
// not slowed by an emulated CPU, and both backends are attached exactly
// the same way. Per backend: the time until every connection is open on
// both ends, the backend's resident set before and with the connections
// (VmRSS, RssAnon) and its peak (VmHWM), its threads and, for vunet, its
// goroutines (vunet_process_goroutines). After both ends of every
// connection closed at once, the same again at several times (default 1,
// 3, 10 and 65 s: gVisor's TIME_WAIT lasts 60 s), with, for vunet, its Go
// heap, stacks and heap memory not yet returned (vunet_process_*), its
// gVisor endpoints still connected (TIME_WAIT included) and the peak of its
// goroutines while they closed.
//
//	VUNET_PERF_SCALE_CONNS     connections (default 10000; 0 skips)
//	VUNET_PERF_SCALE_AFTER     when to sample after the close, e.g.
//	                           "1s,3s,10s,65s" (the default)
//	VUNET_PERF_SCALE_BACKENDS  default "vunet,passt-vhost"
//	VUNET_PERF_SCALE_OUT       markdown report file (bench-compare.sh:
//	                           build/perf/scale.md)
//	VUNET_PERF_SCALE_JSON      JSON report file (build/perf/scale.json)

// scaleResult is one backend's measurement.
type scaleResult struct {
	Backend      string  `json:"backend"`
	Conns        int     `json:"connections"`
	Opened       int     `json:"opened"`
	DialErrors   int     `json:"dial_errors"`
	FirstError   string  `json:"first_error,omitempty"`
	OpenSeconds  float64 `json:"open_seconds"`
	RSSIdleKB    int64   `json:"rss_idle_kb"`
	RSSOpenKB    int64   `json:"rss_open_kb"`
	AnonIdleKB   int64   `json:"anon_idle_kb"`
	AnonOpenKB   int64   `json:"anon_open_kb"`
	HWMKB        int64   `json:"hwm_kb"`
	RSSClosedKB  int64   `json:"rss_closed_kb"`
	Threads      int64   `json:"threads"`
	Goroutines   int64   `json:"goroutines"` // -1: not reported by the backend
	GoroutinesIn int64   `json:"goroutines_idle"`
	// The peak of vunet's goroutines while the connections closed
	// (sampled every 20 ms until the first sample, at most 2 s), and the
	// samples: with the connections open, then after the close.
	GoroutinesClosePeak int64         `json:"goroutines_close_peak"`
	AfterClose          []closeSample `json:"after_close,omitempty"`
	Err                 string        `json:"error,omitempty"`
}

// closeSample is the backend's memory some time after every connection
// closed (At 0: before, with them open). The vunet_* figures are -1 for
// other backends.
type closeSample struct {
	At         float64 `json:"seconds"`
	RSSKB      int64   `json:"rss_kb"`
	AnonKB     int64   `json:"anon_kb"`
	HWMKB      int64   `json:"hwm_kb"`
	Goroutines int64   `json:"goroutines"`
	HeapKB     int64   `json:"heap_objects_kb"`  // vunet_process_heap_objects_bytes
	StackKB    int64   `json:"stack_kb"`         // vunet_process_stack_bytes
	FreeKB     int64   `json:"heap_free_kb"`     // vunet_process_heap_free_bytes: not yet returned
	ReleasedKB int64   `json:"heap_released_kb"` // vunet_process_heap_released_bytes
	Connected  int64   `json:"tcp_connected"`    // vunet_netstack_tcp_connected: gVisor endpoints, TIME_WAIT included
	Flows      int64   `json:"tcp_flows"`        // vunet_flows{proto="tcp"}: splices
}

// perConnKB is the resident set the open connections added, per
// connection.
func (r scaleResult) perConnKB() float64 {
	if r.Opened == 0 {
		return 0
	}
	return float64(r.RSSOpenKB-r.RSSIdleKB) / float64(r.Opened)
}

func (r scaleResult) anonPerConnKB() float64 {
	if r.Opened == 0 {
		return 0
	}
	return float64(r.AnonOpenKB-r.AnonIdleKB) / float64(r.Opened)
}

// guestNet is how a backend's guest is addressed.
type guestNet struct{ addr, gateway string }

func scaleGuestNet(kind string) guestNet {
	if kind == "passt-vhost" {
		// passt gives its guest the address of the namespace's uplink
		// (setupFakeUplink) and maps the gateway to the host's loopback.
		return guestNet{fakeAddr, fakeGateway}
	}
	return guestNet{"10.0.2.15/24", vunetTarget}
}

func TestConnScale(t *testing.T) {
	if os.Getenv(enabledEnv) != "1" {
		t.Skipf("set %s=1 to run the connection-scale comparison (see docs/performance.md)", enabledEnv)
	}
	if testing.Short() {
		t.Skip("skipped with -short")
	}
	if !isolated {
		t.Fatal("needs a private network namespace: run as root with unshare(1) available")
	}
	n := 10000
	if v := os.Getenv("VUNET_PERF_SCALE_CONNS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 0 {
			t.Fatalf("VUNET_PERF_SCALE_CONNS=%q", v)
		}
	}
	if n == 0 {
		t.Skip("VUNET_PERF_SCALE_CONNS=0")
	}
	after, err := parseAfter(cmp.Or(os.Getenv("VUNET_PERF_SCALE_AFTER"), "1s,3s,10s,65s"))
	if err != nil {
		t.Fatalf("VUNET_PERF_SCALE_AFTER: %v", err)
	}
	specs, err := parseBackends(cmp.Or(os.Getenv("VUNET_PERF_SCALE_BACKENDS"), "vunet,passt-vhost"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range specs {
		if s.Kind != "vunet" && s.Kind != "passt-vhost" {
			t.Fatalf("backend %s: the scale run needs a vhost-user backend (vunet, passt-vhost)", s)
		}
	}
	root, err := qemutest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	// The connections' three sockets live in three processes (the
	// dialer in the namespace, this one, the backend), so each needs
	// only n descriptors: Go raises the soft limit to the hard one.
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur < uint64(n+1024) {
		t.Fatalf("open-file limit %d is too small for %d connections (raise it with ulimit -n)", lim.Cur, n)
	}
	bins := findBinaries(t, root)
	meta := describeMachine(root, bins)
	var results []scaleResult
	for _, spec := range specs {
		r := scaleOne(t, bins, spec, n, after)
		t.Logf("%s: %+v", spec, r)
		results = append(results, r)
	}
	report := formatScale(results, meta)
	t.Log("\n" + report)
	if out := os.Getenv("VUNET_PERF_SCALE_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(report), 0o644); err != nil {
			t.Error(err)
		}
	}
	if out := os.Getenv("VUNET_PERF_SCALE_JSON"); out != "" {
		data, _ := json.MarshalIndent(results, "", "  ")
		if err := os.WriteFile(out, append(data, '\n'), 0o644); err != nil {
			t.Error(err)
		}
	}
	for _, p := range scaleProblems(specs, results) {
		t.Error(p)
	}
}

// scaleProblems is why a finished scale run fails, by TestCompare's rule
// (runProblems): a vunet backend that could not run, failed or opened
// fewer connections than asked, or no backend measured at all. Another
// backend's failure is only reported (in the markdown and the JSON).
func scaleProblems(specs []backendSpec, results []scaleResult) []string {
	var out []string
	any := false
	for i, r := range results {
		any = any || (r.Err == "" && r.Opened > 0)
		if specs[i].Kind != "vunet" {
			continue
		}
		if r.Err != "" {
			out = append(out, fmt.Sprintf("%s: %s", r.Backend, firstLine(r.Err)))
		} else if r.Opened != r.Conns {
			out = append(out, fmt.Sprintf("%s: opened %d of %d connections (%d dial errors, first: %s)", r.Backend, r.Opened, r.Conns, r.DialErrors, r.FirstError))
		}
	}
	if len(results) > 0 && !any {
		out = append(out, "nothing was measured: every backend was unavailable or failed")
	}
	return out
}

// scaleOne measures one backend. Failures to set up are reported in the
// result, so the other backends still run.
func scaleOne(t *testing.T, bins *binaries, spec backendSpec, n int, after []time.Duration) (res scaleResult) {
	res = scaleResult{Backend: spec.String(), Conns: n, Goroutines: -1, GoroutinesIn: -1, GoroutinesClosePeak: -1}
	fail := func(err error) scaleResult { res.Err = err.Error(); t.Logf("%s: %v", spec, err); return res }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	var extra []string
	if spec.Kind == "vunet" {
		// The appliance's default max_connections is 4096; it is a
		// configuration-file key.
		cfg := filepath.Join(dir, "scale.toml")
		if err := os.WriteFile(cfg, []byte(fmt.Sprintf("max_connections = %d\n", n+64)), 0o644); err != nil {
			return fail(err)
		}
		extra = []string{"--config", cfg}
	}
	if why, ok := bins.missing[spec.Kind]; ok {
		return fail(fmt.Errorf("unavailable: %s", why))
	}
	b, err := startBackend(ctx, bins, spec, dir, extra...)
	if err != nil {
		return fail(err)
	}
	defer b.proc.Stop(10 * time.Second)

	ns := fmt.Sprintf("vunetscale%d", os.Getpid())
	_ = exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		return fail(fmt.Errorf("ip netns add: %v: %s", err, out))
	}
	defer exec.Command("ip", "netns", "del", ns).Run()
	const dev = "vsc0"
	tap, err := tapfront.OpenTap(dev)
	if err != nil {
		return fail(err)
	}
	if out, err := exec.Command("ip", "link", "set", dev, "netns", ns).CombinedOutput(); err != nil {
		tap.Close()
		return fail(fmt.Errorf("ip link set netns: %v: %s", err, out))
	}
	fe, err := tapfront.Dial(b.socket, tap, tapfront.Options{FillDataValid: spec.Kind == "passt-vhost"})
	if err != nil {
		tap.Close()
		return fail(fmt.Errorf("tapfront: %v\n%s", err, b.proc.Output()))
	}
	if err := fe.SetTapOffload(); err != nil {
		return fail(err)
	}
	feCtx, feStop := context.WithCancel(ctx)
	feDone := make(chan error, 1)
	go func() { feDone <- fe.Run(feCtx) }()
	defer func() { feStop(); <-feDone }()
	gn := scaleGuestNet(spec.Kind)
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "set", dev, "address", "52:54:00:12:34:56"},
		{"addr", "add", gn.addr, "dev", dev},
		{"link", "set", dev, "up"},
		{"route", "add", "default", "via", gn.gateway},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			return fail(fmt.Errorf("ip -n %s %s: %v: %s", ns, strings.Join(args, " "), err, out))
		}
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	var (
		mu       sync.Mutex
		accepted []net.Conn
		acc      atomic.Int64
	)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			accepted = append(accepted, c)
			mu.Unlock()
			acc.Add(1)
		}
	}()
	closeHost := func() {
		_ = l.Close()
		mu.Lock()
		for _, c := range accepted {
			_ = c.Close()
		}
		accepted = nil
		mu.Unlock()
	}
	defer closeHost()
	target := net.JoinHostPort(gn.gateway, strconv.Itoa(l.Addr().(*net.TCPAddr).Port))

	// One connection first: ARP, and whatever the backend sets up lazily,
	// are not charged to the n.
	warm, err := dialInNS(ns, 1, target)
	if err != nil || warm.opened != 1 {
		diag, _ := exec.Command("sh", "-c", "ip -n "+ns+" neigh; ip -n "+ns+" -s link show "+dev+"; ip netns exec "+ns+" nstat -az | grep -E \"InCsum|InSegs|OutSegs|InReceives|InHdrErr|InAddrErr|Discards|SynRetrans|InErrs|RcvPruned\"").CombinedOutput()
		st := &fe.Stats
		first := ""
		if warm != nil {
			first = warm.first
			warm.close()
		}
		return fail(fmt.Errorf("first connection to %s: %v %s\n%s\ntapfront: to backend %d frames, from backend %d (%d bad)\n%s",
			target, err, first, diag, st.TXFrames.Load(), st.RXFrames.Load(), st.RXBad.Load(), b.proc.Output()))
	}
	defer warm.close()
	for acc.Load() < 1 {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)
	pid := b.pidOf()
	st0, err := procStatus(pid)
	if err != nil {
		return fail(err)
	}
	res.RSSIdleKB, res.AnonIdleKB = st0["VmRSS"], st0["RssAnon"]
	res.GoroutinesIn = b.goroutines()

	start := time.Now()
	d, err := dialInNS(ns, n, target)
	if err != nil {
		return fail(err)
	}
	defer d.close()
	res.Opened, res.DialErrors, res.FirstError = d.opened, d.errs, d.first
	deadline := time.Now().Add(60 * time.Second)
	for acc.Load() < int64(1+res.Opened) && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
	res.OpenSeconds = time.Since(start).Seconds()
	if got := acc.Load() - 1; got < int64(res.Opened) {
		res.Err = fmt.Sprintf("the host accepted %d of %d connections the guest opened", got, res.Opened)
	}
	// Idle: let what opening left behind (handshake goroutines, garbage)
	// settle before measuring.
	time.Sleep(3 * time.Second)
	st1, err := procStatus(pid)
	if err != nil {
		return fail(err)
	}
	res.RSSOpenKB, res.AnonOpenKB, res.HWMKB, res.Threads = st1["VmRSS"], st1["RssAnon"], st1["VmHWM"], st1["Threads"]
	res.Goroutines = b.goroutines()
	if open, err := b.closeSample(pid, 0); err == nil {
		res.AfterClose = append(res.AfterClose, open) // the row "open"
	}

	// Both ends at once: the dialer closes the guest's sockets while
	// this process closes the host's.
	closed := time.Now()
	peak := make(chan int64, 1)
	go func() {
		p := int64(-1)
		for time.Since(closed) < min(2*time.Second, after[0]-50*time.Millisecond) {
			p = max(p, b.goroutines())
			time.Sleep(20 * time.Millisecond)
		}
		peak <- p
	}()
	dclosed := make(chan struct{})
	go func() { d.close(); close(dclosed) }()
	closeHost()
	<-dclosed
	defer func() { res.GoroutinesClosePeak = <-peak }()
	for _, at := range after {
		time.Sleep(time.Until(closed.Add(at)))
		cs, err := b.closeSample(pid, at)
		if err != nil {
			break
		}
		res.AfterClose = append(res.AfterClose, cs)
		if at <= 3*time.Second || res.RSSClosedKB == 0 {
			res.RSSClosedKB = cs.RSSKB // the table's column: 3 s after
		}
	}
	return res
}

// closeSample reads the backend's memory now, at after seconds from the
// close (0: with the connections open).
func (b *backend) closeSample(pid int, after time.Duration) (closeSample, error) {
	st, err := procStatus(pid)
	if err != nil {
		return closeSample{}, err
	}
	m := b.metrics()
	get := func(name string, div int64) int64 {
		if v, ok := m[name]; ok {
			return v / div
		}
		return -1
	}
	return closeSample{At: after.Seconds(), RSSKB: st["VmRSS"], AnonKB: st["RssAnon"], HWMKB: st["VmHWM"],
		Goroutines: get("vunet_process_goroutines", 1), HeapKB: get("vunet_process_heap_objects_bytes", 1024),
		StackKB: get("vunet_process_stack_bytes", 1024), FreeKB: get("vunet_process_heap_free_bytes", 1024),
		ReleasedKB: get("vunet_process_heap_released_bytes", 1024), Connected: get("vunet_netstack_tcp_connected", 1),
		Flows: get(`vunet_flows{proto="tcp"}`, 1)}, nil
}

// parseAfter reads VUNET_PERF_SCALE_AFTER: increasing durations.
func parseAfter(v string) ([]time.Duration, error) {
	var out []time.Duration
	for _, f := range strings.Split(v, ",") {
		d, err := time.ParseDuration(strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		if d <= 0 || len(out) > 0 && d <= out[len(out)-1] {
			return nil, fmt.Errorf("%q: want increasing positive durations", v)
		}
		out = append(out, d)
	}
	return out, nil
}

// Environment of the dialer: this test binary run inside the namespace
// (TestMain calls scaleDialer), which opens the connections, reports, and
// holds them until its stdin closes.
const (
	scaleDialEnv  = "VUNET_PERF_SCALE_DIAL"   // target host:port
	scaleDialNEnv = "VUNET_PERF_SCALE_DIAL_N" // connections
)

// dialed is a running dialer and what it opened.
type dialed struct {
	cmd    *exec.Cmd
	stdin  interface{ Close() error }
	opened int
	errs   int
	first  string
}

func (d *dialed) close() {
	if d.cmd == nil {
		return
	}
	_ = d.stdin.Close()
	_ = d.cmd.Wait()
	d.cmd = nil
}

// dialInNS opens n TCP connections to target from network namespace ns
// (in a child process, 32 at a time) and returns once they are all open
// or failed; they stay open until close.
func dialInNS(ns string, n int, target string) (*dialed, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", "netns", "exec", ns, self)
	cmd.Env = append(os.Environ(), scaleDialEnv+"="+target, scaleDialNEnv+"="+strconv.Itoa(n))
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	d := &dialed{cmd: cmd, stdin: in}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		d.close()
		return nil, fmt.Errorf("dialer: %v", err)
	}
	var first string
	if _, err := fmt.Sscanf(line, "dialed %d %d %q", &d.opened, &d.errs, &first); err != nil {
		d.close()
		return nil, fmt.Errorf("dialer said %q: %v", line, err)
	}
	d.first = first
	return d, nil
}

// scaleDialer is the dialer process: it opens the connections, prints
// "dialed OPENED ERRORS FIRST-ERROR", and holds them until stdin closes.
func scaleDialer(target string) int {
	n, err := strconv.Atoi(os.Getenv(scaleDialNEnv))
	if err != nil || n <= 0 {
		fmt.Fprintln(os.Stderr, "dialer: bad", scaleDialNEnv)
		return 2
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		errs  int
		first = ""
		wg    sync.WaitGroup
		next  atomic.Int64
	)
	for w := 0; w < min(32, n); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dl := net.Dialer{Timeout: 30 * time.Second}
			for next.Add(1) <= int64(n) {
				c, err := dl.Dial("tcp", target)
				mu.Lock()
				if err != nil {
					if errs == 0 {
						first = err.Error()
					}
					errs++
				} else {
					conns = append(conns, c)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	fmt.Printf("dialed %d %d %q\n", len(conns), errs, first)
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n') // EOF: the test is done
	for _, c := range conns {
		_ = c.Close()
	}
	return 0
}

// procStatus reads the numeric fields of /proc/PID/status (kB values in
// kB).
func procStatus(pid int) (map[string]int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		if fs := strings.Fields(v); len(fs) > 0 {
			if n, err := strconv.ParseInt(fs[0], 10, 64); err == nil {
				out[k] = n
			}
		}
	}
	for _, k := range []string{"VmRSS", "RssAnon", "VmHWM", "Threads"} {
		if _, ok := out[k]; !ok {
			return nil, fmt.Errorf("/proc/%d/status has no %s", pid, k)
		}
	}
	return out, sc.Err()
}

// goroutines asks vunet's API for vunet_process_goroutines; -1 for other
// backends or on error.
func (b *backend) goroutines() int64 {
	if v, ok := b.metrics()["vunet_process_goroutines"]; ok {
		return v
	}
	return -1
}

// metrics reads vunet's /metrics: every series ("name" or
// "name{labels}") with an integer value; empty for other backends or on
// error.
func (b *backend) metrics() map[string]int64 {
	out := map[string]int64{}
	if b.api == "" {
		return out
	}
	// No keep-alive: an idle API connection would hold a goroutine in
	// vunet, which the figures would count.
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", b.api)
		}}}
	resp, err := c.Get("http://vunet/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if n, err := strconv.ParseInt(line[i+1:], 10, 64); err == nil {
			out[line[:i]] = n
		}
	}
	return out
}

// formatScale renders the scale results as markdown.
func formatScale(results []scaleResult, meta string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "## Connection scale (%s)\n\n%s\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"), meta)
	b.WriteString("| backend | connections | open s | RSS idle MiB | RSS open MiB | KiB/conn (RSS) | KiB/conn (anon) | VmHWM MiB | RSS after close MiB | threads | goroutines idle → open |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	mib := func(kb int64) string { return strconv.FormatFloat(float64(kb)/1024, 'f', 1, 64) }
	for _, r := range results {
		if r.Err != "" && r.Opened == 0 {
			fmt.Fprintf(&b, "| %s | %d | failed: %s | | | | | | | | |\n", r.Backend, r.Conns, strings.ReplaceAll(firstLine(r.Err), "|", "/"))
			continue
		}
		g := "—"
		if r.Goroutines >= 0 {
			g = fmt.Sprintf("%d → %d", r.GoroutinesIn, r.Goroutines)
		}
		fmt.Fprintf(&b, "| %s | %d of %d | %.2f | %s | %s | %.1f | %.1f | %s | %s | %d | %s |\n",
			r.Backend, r.Opened, r.Conns, r.OpenSeconds, mib(r.RSSIdleKB), mib(r.RSSOpenKB), r.perConnKB(), r.anonPerConnKB(),
			mib(r.HWMKB), mib(r.RSSClosedKB), r.Threads, g)
	}
	b.WriteString(formatAfterClose(results))
	for _, r := range results {
		if r.DialErrors > 0 || r.Err != "" {
			fmt.Fprintf(&b, "\n%s: %d dial errors (first: %s) %s", r.Backend, r.DialErrors, r.FirstError, r.Err)
		}
	}
	b.WriteString("\n")
	return b.String()
}

// formatAfterClose renders the samples after the close as a second
// table: one row per backend and time.
func formatAfterClose(results []scaleResult) string {
	var b strings.Builder
	mib := func(kb int64) string {
		if kb < 0 {
			return "—"
		}
		return strconv.FormatFloat(float64(kb)/1024, 'f', 1, 64)
	}
	num := func(v int64) string {
		if v < 0 {
			return "—"
		}
		return strconv.FormatInt(v, 10)
	}
	for _, r := range results {
		if len(r.AfterClose) == 0 {
			continue
		}
		if b.Len() == 0 {
			b.WriteString("\nAfter closing both ends at once (Go heap, stacks, free heap not yet returned: vunet_process_*; endpoints: gVisor's still connected, TIME_WAIT included):\n\n")
			b.WriteString("| backend | after s | RSS MiB | RssAnon MiB | VmHWM MiB | goroutines (peak) | heap objects MiB | stacks MiB | heap free MiB | heap released MiB | endpoints | splices |\n")
			b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		}
		first := true
		for _, c := range r.AfterClose {
			g, at := num(c.Goroutines), "open"
			if c.At > 0 {
				at = strconv.FormatFloat(c.At, 'g', -1, 64)
				if first && r.GoroutinesClosePeak >= 0 {
					g += " (" + num(r.GoroutinesClosePeak) + ")"
				}
				first = false
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.Backend, at,
				mib(c.RSSKB), mib(c.AnonKB), mib(c.HWMKB), g, mib(c.HeapKB), mib(c.StackKB), mib(c.FreeKB), mib(c.ReleasedKB),
				num(c.Connected), num(c.Flows))
		}
	}
	return b.String()
}
