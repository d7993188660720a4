package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/internal/testutil"
)

// fakeAPI is an api.Backend recording what the CLI asked for.
type fakeAPI struct {
	mu       sync.Mutex
	forwards []api.Forward
	removed  []api.Forward
	// exposes and removedExposes: expose_test.go.
	exposes        []api.Expose
	removedExposes []api.Expose
}

func (f *fakeAPI) Health() api.Health { return api.Health{Status: "ok", Version: "fake"} }

func (f *fakeAPI) Stats() api.Stats {
	m := func(layer, name string, v int64, kv ...string) api.Metric {
		labels := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			labels[kv[i]] = kv[i+1]
		}
		kind := api.Gauge
		if strings.HasSuffix(name, "_total") {
			kind = api.Counter
		}
		return api.Metric{Layer: layer, Name: name, Kind: kind, Help: "h", Labels: labels, Value: v}
	}
	return api.Stats{
		Version: "fake", UptimeSeconds: 3661,
		Metrics: []api.Metric{
			m("link", "vunet_link_frames_total", 5, "queue", "0", "direction", "to_guest"),
			m("link", "vunet_link_bytes_total", 3<<20, "queue", "0", "direction", "to_guest"),
			m("link", "vunet_link_drops_total", 2, "reason", "tx_short"),
			m("virtqueue", "vunet_virtqueue_bad_chains_total", 1, "queue", "1", "direction", "from_guest"),
			m("forward", "vunet_flows", 1, "proto", "tcp"),
			m("forward", "vunet_port_forwards", 2),
			m("dhcp", "vunet_dhcp_leases", 1),
			m("dhcpv6", "vunet_dhcpv6_leases", 1),
			m("dns", "vunet_dns_queries_total", 4, "transport", "udp"),
		},
		Rings: []api.RingState{{Queue: 1, Direction: api.FromGuest, Size: 256, AvailIdx: 9, NextAvail: 8, UsedIdx: 8},
			{Queue: 0, Direction: api.ToGuest, Size: 256, AvailIdx: 0x8000 | 5, NextAvail: 0x8000 | 3, UsedIdx: 2,
				EventIdx: true, AvailEvent: 0x8000 | 3, UsedEvent: 2, Packed: true}},
		Leases: []api.Lease{{MAC: "52:54:00:12:34:56", Addr: netip.MustParseAddr("10.0.2.15"), Expiry: time.Unix(1e9, 0)},
			{MAC: "52:54:00:12:34:56", Addr: netip.MustParseAddr("fd00::100"), Expiry: time.Unix(1e9, 0), DUID: "00030001525400123456", IAID: 7}},
	}
}

func (f *fakeAPI) Forwards() []api.Forward {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]api.Forward(nil), f.forwards...)
}

func (f *fakeAPI) AddForward(fw api.Forward) (api.Forward, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, g := range f.forwards {
		if g.Proto == fw.Proto && g.Host == fw.Host {
			return api.Forward{}, api.Errorf(api.ErrConflict, "a %s port forward already listens on %s", fw.Proto, fw.Host)
		}
	}
	if fw.GuestSelector == "" {
		fw.Guest = netip.AddrPortFrom(netip.MustParseAddr("10.0.2.15"), fw.GuestPort)
	}
	f.forwards = append(f.forwards, fw)
	return fw, nil
}

func (f *fakeAPI) RemoveForward(fw api.Forward) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, g := range f.forwards {
		if g.Proto == fw.Proto && g.Host == fw.Host {
			f.forwards = append(f.forwards[:i], f.forwards[i+1:]...)
			f.removed = append(f.removed, fw)
			return nil
		}
	}
	return api.Errorf(api.ErrNotFound, "no %s port forward on %s", fw.Proto, fw.Host)
}

// fakeServer serves b on a socket for the test's duration.
func fakeServer(t *testing.T, b api.Backend) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "api.sock")
	l, err := api.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		api.NewServer(b, nil).Serve(ctx, l)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return path
}

func TestForwardCommands(t *testing.T) {
	b := &fakeAPI{}
	sock := fakeServer(t, b)

	r := runVunet(t, nil, "forward", "add", "--api", sock, "tcp:2222:22", "udp:[::1]:5300-5301:53-54")
	if r.err != nil {
		t.Fatal(r.line())
	}
	want := "added tcp:127.0.0.1:2222:22 (to guest 10.0.2.15:22)\n" +
		"added udp:[::1]:5300:53 (to guest 10.0.2.15:53)\n" +
		"added udp:[::1]:5301:54 (to guest 10.0.2.15:54)\n"
	if r.stdout != want {
		t.Errorf("add printed\n%s\nwant\n%s", r.stdout, want)
	}

	// A forward naming its guest carries the selector; the list shows it.
	r = runVunet(t, nil, "forward", "add", "--api", sock, "tcp:2225:vm1:22")
	if r.err != nil || r.stdout != "added tcp:127.0.0.1:2225:vm1:22 (to guest vm1)\n" {
		t.Errorf("add to vm1: %q %q", r.line(), r.stdout)
	}
	r = runVunet(t, nil, "forward", "list", "--api", sock)
	if !strings.Contains(r.stdout, "vm1:22        tcp:127.0.0.1:2225:vm1:22\n") {
		t.Errorf("list lacks the forward to vm1:\n%s", r.stdout)
	}
	if r := runVunet(t, nil, "forward", "rm", "--api", sock, "tcp:2225:22"); r.err != nil {
		t.Fatal(r.line())
	}
	b.removed = nil

	// The socket can come from VUNET_API.
	r = runVunet(t, map[string]string{"VUNET_API": sock}, "forward", "list")
	if r.err != nil {
		t.Fatal(r.line())
	}
	for _, w := range []string{"PROTO", "tcp:127.0.0.1:2222:22", "[::1]:5301", "10.0.2.15:54"} {
		if !strings.Contains(r.stdout, w) {
			t.Errorf("list output lacks %q:\n%s", w, r.stdout)
		}
	}
	if n := strings.Count(r.stdout, "\n"); n != 4 {
		t.Errorf("list printed %d lines, want header + 3:\n%s", n, r.stdout)
	}
	r = runVunet(t, nil, "forward", "ls", "--api", sock, "--json")
	var fs api.Forwards
	if err := json.Unmarshal([]byte(r.stdout), &fs); err != nil || len(fs.Forwards) != 3 || fs.Forwards[1].Host.Addr().String() != "::1" {
		t.Errorf("list --json: %v %+v\n%s", err, fs, r.stdout)
	}

	// A conflict is reported in one line with how far the batch got.
	r = runVunet(t, nil, "forward", "add", "--api", sock, "tcp:2223-2224:23-24", "tcp:2222:22")
	if r.err == nil || exitCode(r.err) != 1 || !errors.Is(r.err, api.ErrConflict) ||
		strings.Contains(r.line(), "\n") || !strings.Contains(r.line(), "already listens on 127.0.0.1:2222 (2 of 3 already added)") {
		t.Errorf("conflicting add: %q", r.line())
	}

	r = runVunet(t, nil, "forward", "rm", "--api", sock, "tcp:2222:22", "udp:[::1]:5300:53")
	if r.err != nil || r.stdout != "removed tcp:127.0.0.1:2222:22\nremoved udp:[::1]:5300:53\n" {
		t.Errorf("remove: %q %q", r.line(), r.stdout)
	}
	if len(b.removed) != 2 || b.removed[0].GuestPort != 22 {
		t.Errorf("backend saw removals %+v (the guest port is sent along)", b.removed)
	}
	r = runVunet(t, nil, "forward", "remove", "--api", sock, "tcp:2222:22")
	if !errors.Is(r.err, api.ErrNotFound) || r.line() != "vunet: forward remove tcp:127.0.0.1:2222:22: no tcp port forward on 127.0.0.1:2222" {
		t.Errorf("removing a missing forward: %q", r.line())
	}
}

func TestForwardUsageErrors(t *testing.T) {
	b := &fakeAPI{}
	sock := fakeServer(t, b)
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"forward", "add", "--api", sock}, "forward add: expected at least one SPEC"},
		{[]string{"forward", "add", "--api", sock, "tcp:2222:22", "tcp:x:22"}, `forward add "tcp:x:22": expected tcp:[HOSTADDR:]HOSTPORT:[GUEST:]GUESTPORT`},
		{[]string{"forward", "add", "tcp:2222:22"}, "forward add: --api PATH is required (or VUNET_API)"},
		{[]string{"forward", "remove", "--api", sock, "icmp:1:1"}, `forward remove "icmp:1:1"`},
		{[]string{"forward", "list", "--api", sock, "extra"}, `forward list: unexpected argument "extra"`},
		{[]string{"forward", "add", "tcp:2222:22", "--api", sock}, "forward add: flag --api after a SPEC; put flags first"},
		{[]string{"forward"}, "forward: expected a command"},
		{[]string{"forward", "frob"}, `forward: unknown command "frob"`},
		{[]string{"stats"}, "stats: --api PATH is required"},
		{[]string{"stats", "--api", sock, "--json", "--metrics"}, "mutually exclusive"},
		{[]string{"stats", "--api", sock, "--watch", "--metrics"}, "--watch and --metrics are mutually exclusive"},
		{[]string{"stats", "--api", sock, "--watch", "fast"}, `--watch "fast": want a duration`},
		{[]string{"stats", "--api", sock, "--watch", "10ms"}, "at least 100ms"},
		{[]string{"stats", "--api", sock, "5s"}, `unexpected argument "5s"`},
		{[]string{"stats", "--api", sock, "--watch", "1s", "2s"}, `unexpected argument "1s"`},
		{[]string{"stats", "--api", sock, "--bogus"}, "flag provided but not defined: -bogus"},
	}
	for _, tt := range tests {
		r := runVunet(t, nil, tt.args...)
		if r.err == nil || exitCode(r.err) != 2 || !strings.Contains(r.line(), tt.want) || strings.Contains(r.line(), "\n") {
			t.Errorf("%q: exit %d %q, want usage error containing %q", tt.args, exitCode(r.err), r.line(), tt.want)
		}
	}
	if len(b.forwards) != 0 {
		t.Errorf("a usage error still added %+v (the bad spec must stop the batch before any request)", b.forwards)
	}
}

func TestStatsCommand(t *testing.T) {
	sock := fakeServer(t, &fakeAPI{})
	r := runVunet(t, nil, "stats", "--api", sock)
	if r.err != nil {
		t.Fatal(r.line())
	}
	for _, w := range []string{"vunet fake, up 1h1m1s\n\nlink\n", "  frames   0 to_guest 5\n", "  bytes    0 to_guest 3.0 MiB\n",
		"  drops    tx_short 2\n", "\n\nvirtqueue\n  bad_chains   1 from_guest 1\n",
		"  ring         1 from_guest: size 256, avail 9, next 8, used 8\n",
		"  ring         0 to_guest: size 256, avail 5/w1, next 3/w1, used 2/w0, avail_event 3/w1, used_event 2/w0, packed\n",
		"  lease    52:54:00:12:34:56 10.0.2.15 until ", "  port_forwards   2\n",
		"\n\ndhcpv6\n  leases   1\n  lease    duid 00030001525400123456 iaid 7 fd00::100 until "} {
		if !strings.Contains(r.stdout, w) {
			t.Errorf("stats output lacks %q:\n%s", w, r.stdout)
		}
	}
	if strings.Contains(r.stdout, "52:54:00:12:34:56 fd00::100") {
		t.Errorf("the DHCPv6 lease is also listed under dhcp:\n%s", r.stdout)
	}

	r = runVunet(t, nil, "stats", "--api", sock, "--json")
	var st api.Stats
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st.Version != "fake" || len(st.Metrics) != 9 {
		t.Errorf("stats --json: %v %+v", err, st)
	}
	if v, ok := st.Find("vunet_virtqueue_bad_chains_total", "queue", "1", "direction", "from_guest"); !ok || v != 1 {
		t.Errorf("stats --json: bad_chains = %d, %v", v, ok)
	}

	r = runVunet(t, nil, "stats", "--api", sock, "--metrics")
	if r.err != nil || !strings.Contains(r.stdout, "# TYPE vunet_link_frames_total counter\n") {
		t.Errorf("stats --metrics: %v\n%s", r.err, r.stdout)
	}
}

func TestAPIUnreachable(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.sock")
	for _, args := range [][]string{
		{"stats", "--api", missing},
		{"forward", "list", "--api", missing},
		{"forward", "add", "--api", missing, "tcp:2222:22", "tcp:2223:23"},
		{"forward", "remove", "--api", missing, "tcp:2222:22"},
	} {
		r := runVunet(t, nil, args...)
		want := "vunet: cannot reach the vunet API at " + missing + ": connect: no such file or directory (is vunet running with --api " + missing + "?)"
		if r.line() != want || exitCode(r.err) != 1 {
			t.Errorf("%q: exit %d\n got %q\nwant %q", args, exitCode(r.err), r.line(), want)
		}
	}
}

// TestRunWithAPIAndNotify runs the real appliance the way systemd would
// (NOTIFY_SOCKET set), drives it with the CLI over --api, then stops it
// with SIGTERM: READY=1 and STOPPING=1 arrive and both sockets are removed.
func TestRunWithAPIAndNotify(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	notifyPath := filepath.Join(dir, "notify")
	pc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	t.Setenv("NOTIFY_SOCKET", notifyPath)
	recv := func() string {
		t.Helper()
		pc.SetReadDeadline(time.Now().Add(20 * time.Second))
		buf := make([]byte, 256)
		n, err := pc.Read(buf)
		if err != nil {
			t.Fatalf("waiting for sd_notify: %v", err)
		}
		return string(buf[:n])
	}

	vsock, asock := filepath.Join(dir, "vhost.sock"), filepath.Join(dir, "api.sock")
	app := buildApp(runAppliance)
	var logs testutil.Buffer
	app.Writer, app.ErrWriter = &logs, &logs
	done := make(chan error, 1)
	go func() {
		// In-process: the sandbox would confine the test binary itself
		// (TestSandboxBinary covers the real binary under it).
		done <- app.Run([]string{"vunet", "--sandbox=off", "--socket", vsock, "--api", asock, "--dns-upstream", "127.0.0.1:1",
			"--forward", "tcp:127.0.0.1:" + strconv.Itoa(freePort(t)) + ":22"})
	}()
	select {
	case err := <-done:
		t.Fatalf("vunet exited early: %v\n%s", err, logs.String())
	case <-time.After(100 * time.Millisecond):
	}
	if got := recv(); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1\n%s", got, logs.String())
	}

	cli := func(args ...string) (string, error) {
		a := buildApp(nil)
		var out bytes.Buffer
		a.Writer, a.ErrWriter = &out, &out
		err := a.Run(append([]string{"vunet"}, args...))
		return out.String(), err
	}
	out, err := cli("forward", "add", "--api", asock, "udp:127.0.0.1:0:53")
	// Port 0 is not valid in a spec; the CLI says so before sending.
	if err == nil || exitCode(err) != 2 {
		t.Errorf("port 0 spec: %v %q", err, out)
	}
	spec := "tcp:127.0.0.1:" + strconv.Itoa(freePort(t)) + ":8080"
	if out, err := cli("forward", "add", "--api", asock, spec); err != nil || !strings.Contains(out, "added "+spec) {
		t.Fatalf("forward add: %v %q", err, out)
	}
	if out, err := cli("forward", "list", "--api", asock); err != nil || strings.Count(out, "\n") != 3 || !strings.Contains(out, spec) {
		t.Errorf("forward list: %v\n%s", err, out)
	}
	if out, err := cli("stats", "--api", asock); err != nil || !regexp.MustCompile(`\n  port_forwards +2\n`).MatchString(out) {
		t.Errorf("stats: %v\n%s", err, out)
	}
	if out, err := cli("forward", "remove", "--api", asock, spec); err != nil || out != "removed "+spec+"\n" {
		t.Errorf("forward remove: %v %q", err, out)
	}

	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if got := recv(); got != "STOPPING=1" {
		t.Errorf("second notification %q, want STOPPING=1", got)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("vunet: %v\n%s", err, logs.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("vunet did not stop on SIGTERM")
	}
	for _, p := range []string{vsock, asock} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind after SIGTERM: %v", p, err)
		}
	}
}

// freePort returns a TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
