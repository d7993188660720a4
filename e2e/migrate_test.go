package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// migrateMemMB is the guest RAM of the migration test: small, so that the
// copy takes a second or two under TCG.
const migrateMemMB = 256

// stepMigrate is the guest's side of TestLinuxLiveMigration. After its
// lease it keeps udhcpc running (to renew later), pings the gateway every
// 0.1 s and sends a slow TCP stream to the host's sink, says it is ready,
// and waits (polling the host's flag server through the gateway) until the
// host says the migration completed. It is then running on the
// destination QEMU and vunet, and reports: the longest run of lost pings,
// what became of the TCP stream, and a DHCP renewal against the new vunet.
// Throughout, it answers on fwdPort (the target of the host's runtime
// forward) with migrateAnswer and the line it read. An interactive TCP
// session to the host's echo server (sessPort) says "before" ahead of the
// migration, stays idle across it, and says "after" on the destination:
// with --migrate-tcp the same connection answers.
func stepMigrate(sinkPort, flagPort, fwdPort, sessPort int) string {
	return fmt.Sprintf(`begin
printf '#!/bin/sh\nread -r line\necho "%[7]s $line"\n' >/tmp/mig-fwd.sh
chmod +x /tmp/mig-fwd.sh
nc -ll -p %[6]d -e /tmp/mig-fwd.sh &
wait_for sh -c 'netstat -ltn | grep -q ":%[6]d "' || fail migrate-forward "nc never listened on %[6]d"
udhcpc -i eth0 -f -t 10 -T 2 -O mtu >/tmp/ud.log 2>&1 &
udpid=$!
wait_for grep -qs "lease of" /tmp/ud.log || fail udhcpc-daemon "no lease: $(cat /tmp/ud.log)"
# This udhcpc deconfigures eth0 first and logs "lease of" before its
# script has put the address and default route back: starting ping and nc
# in between fails them with "Network is unreachable".
has_route() { ip -4 route show default | grep -q via; }
wait_for has_route || fail udhcpc-daemon "no default route: $(ip -4 route)"
ping -i 0.1 %[1]s >/tmp/ping.log 2>&1 &
pingpid=$!
( while :; do echo "vunet live migration stream line"; sleep 0.05; done | nc %[1]s %[2]d; echo "rc=$?" >/tmp/nc.rc ) &
mkfifo /tmp/sess.in
( nc %[1]s %[8]d </tmp/sess.in >/tmp/sess.out; echo "rc=$?" >/tmp/sess.rc ) &
exec 3>/tmp/sess.in
echo before >&3
wait_for grep -qs "echo before" /tmp/sess.out || fail tcp-session "no echo before the migration: $(cat /tmp/sess.out)"
sleep 1
echo "%[4]s"
i=0
# timeout 3: a poll caught by the switch would otherwise wait for an answer
# that the source vunet can no longer deliver (the connection is unknown to
# the destination, and the guest, sending nothing, gets no RST). Debian's
# busybox wget has no -T.
until timeout 3 wget -q -O /dev/null http://%[1]s:%[3]d/migrated; do
	i=$((i + 1)); [ $i -ge 600 ] && break; sleep 0.2
done
if [ $i -ge 600 ]; then fail migrated "host never said the migration completed"; else pass migrated "flag seen after $i polls"; fi
sleep 3
kill $pingpid
sleep 0.2
begin
gap=$(awk -F'seq=' '/seq=/ { split($2, a, " "); s = a[1] + 0; if (n && s - last > max) max = s - last; last = s; n++ }
	END { printf "max_seq_gap=%%d replies=%%d last_seq=%%d", max, n, last }' /tmp/ping.log)
pass ping-gap "$gap"
begin
echo after >&3
if wait_for grep -qs "echo after" /tmp/sess.out; then
	pass tcp-session "the idle session answered after the migration: $(tr '\n' ' ' </tmp/sess.out)"
else
	fail tcp-session "no answer after the migration: out=$(tr '\n' ' ' </tmp/sess.out) $(cat /tmp/sess.rc 2>/dev/null)"
fi
exec 3>&-
begin
# The stream was busy at the save: moved (it goes on) or reset (it
# ended); the host checks that a moved one still delivers.
i=0
until [ -f /tmp/nc.rc ] || [ $i -ge 30 ]; do i=$((i + 1)); sleep 0.1; done
if [ -f /tmp/nc.rc ]; then pass tcp-after "nc ended: $(cat /tmp/nc.rc)"; else pass tcp-after "nc running"; fi
begin
n=$(grep -c "lease of" /tmp/ud.log)
kill -USR1 $udpid
renewed() { [ "$(grep -c "lease of" /tmp/ud.log)" -gt "$n" ]; }
if wait_for renewed; then
	addr=$(ip -4 addr show dev eth0 | awk '/inet / { print $2 }')
	if grep -q -i nak /tmp/ud.log || [ "$addr" != %[5]s/24 ]; then
		fail dhcp-renew "addr=$addr log: $(tr '\n' ' ' </tmp/ud.log)"
	else
		pass dhcp-renew "addr=$addr $(grep 'lease of' /tmp/ud.log | tail -n1)"
	fi
else
	fail dhcp-renew "no renewal: $(tr '\n' ' ' </tmp/ud.log)"
fi
kill $udpid
`, harness.Gateway4, sinkPort, flagPort, harness.ReadyLine("migrate"), harness.GuestIP, fwdPort, migrateAnswer, sessPort)
}

// migrateAnswer starts the guest's answers on the migration test's
// forwarded port.
const migrateAnswer = "guest-answer"

// migrateFwdGuestPort is the guest port the migration test's runtime
// forward reaches.
const migrateFwdGuestPort = 8022

// TestLinuxLiveMigration live-migrates a running guest between two QEMUs,
// each on its own vunet (the destination started with -incoming), over
// QMP, while the guest pings the gateway every 0.1 s and streams TCP to a
// host server. The migration must complete (QEMU refuses to start one
// without vunet's dirty logging: VHOST_F_LOG_ALL, LOG_SHMFD), vunet A
// must have logged dirty pages, pings must resume within a second, the
// guest must keep its address through a DHCP renewal (RENEWING, unicast)
// against vunet B, which has no lease on record, and the TCP stream must
// not hang: both vunets run with --migrate-tcp, so it goes on if it was
// quiet at the save (moved) and ends if not (reset). An interactive
// session idle across the migration must answer on the same connection. A port forward
// added on vunet A at run time (vunet forward add) must reach the guest
// through vunet B after vunet A's device state is moved (vunet state save
// | vunet state load: QEMU 7.2 does not move it) and vunet A has exited:
// vunet B was started without it, so only the state can carry it.
//
// Opt-in (VUNET_E2E_MIGRATION=1) until it has passed against QEMU 7.2:
// its first run found the SET_STATUS 0 ring-position bug (fixed since,
// TestStatusZeroKeepsRingBase) and none has completed after the fix.
func TestLinuxLiveMigration(t *testing.T) {
	if os.Getenv("VUNET_E2E_MIGRATION") == "0" {
		t.Skip("VUNET_E2E_MIGRATION=0")
	}
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*guestTimeout)
	defer cancel()
	dir := t.TempDir()
	apiA, apiB := filepath.Join(dir, "a.api"), filepath.Join(dir, "b.api")
	// --migrate-tcp on both: established TCP connections move.
	vnA := vunettest.Start(t, e.vunetArgs("--api", apiA, "--migrate-tcp")...)
	vnB := vunettest.Start(t, e.vunetArgs("--api", apiB, "--migrate-tcp")...)

	// The guest's TCP stream goes to this sink (host loopback, through
	// vunet A's NAT); it counts what arrives.
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	var sunk atomic.Int64
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					sunk.Add(int64(n))
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	// The guest's interactive session: every line is echoed back, on
	// however many connections (there must be one).
	sess, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	var sessConns atomic.Int32
	go func() {
		for {
			c, err := sess.Accept()
			if err != nil {
				return
			}
			sessConns.Add(1)
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					fmt.Fprintf(c, "echo %s", line)
				}
			}()
		}
	}()
	// The guest polls /migrated; it answers 200 once the migration has
	// completed.
	var migrated atomic.Bool
	flag, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !migrated.Load() {
			http.Error(w, "not yet", http.StatusNotFound)
		}
	})}
	go srv.Serve(flag)
	defer srv.Close()

	qmpA, qmpB := filepath.Join(dir, "a.qmp"), filepath.Join(dir, "b.qmp")
	migSock := filepath.Join(dir, "mig.sock")
	guest := func(sock, qmpSock string, extra ...string) *qemutest.Guest {
		return &qemutest.Guest{
			Socket: sock,
			MemMB:  migrateMemMB,
			Script: script(
				harness.StepDHCP(1500),
				stepMigrate(sink.Addr().(*net.TCPAddr).Port, flag.Addr().(*net.TCPAddr).Port, migrateFwdGuestPort,
					sess.Addr().(*net.TCPAddr).Port),
			),
			ExtraArgs: append([]string{"-qmp", "unix:" + qmpSock + ",server=on,wait=off"}, extra...),
		}
	}
	src := startGuest(t, ctx, guest(vnA.Socket, qmpA))
	if err := src.WaitFor(ctx, harness.ReadyLine("migrate")); err != nil {
		t.Fatal(err)
	}
	// A forward added at run time on vunet A, which only the device
	// state can give vunet B (started without it).
	fwdSpec := fmt.Sprintf("tcp:127.0.0.1:%d:%d", vunettest.FreePort(t), migrateFwdGuestPort)
	vunetCLI(t, nil, "forward", "add", "--api", apiA, fwdSpec)
	fwdAddr := strings.TrimPrefix(fwdSpec[:strings.LastIndexByte(fwdSpec, ':')], "tcp:")
	if err := probeForward(ctx, fwdAddr, "before", 5*time.Second); err != nil {
		t.Fatalf("runtime forward on vunet A: %v", err)
	}
	if out := vunetCLI(t, nil, "forward", "list", "--api", apiB); strings.Contains(out, fwdAddr) {
		t.Fatalf("vunet B has the runtime forward before the state load:\n%s", out)
	}
	dst := startGuest(t, ctx, guest(vnB.Socket, qmpB, "-incoming", "unix:"+migSock))
	// The destination listens for the migration once QMP answers.
	waitQMP(t, ctx, qmpB)
	if sunk.Load() == 0 {
		time.Sleep(time.Second)
	}
	sunkBefore := sunk.Load()
	qmp(t, qmpA, "migrate-set-parameters", map[string]any{"max-bandwidth": 1 << 30, "downtime-limit": 300})
	start := time.Now()
	qmp(t, qmpA, "migrate", map[string]any{"uri": "unix:" + migSock})
	var st struct {
		Status     string
		TotalTime  int64 `json:"total-time"`
		Downtime   int64
		RAM        struct{ Transferred, Duplicate, Normal, DirtySyncCount int64 } `json:"ram"`
		ErrorDesc  string                                                         `json:"error-desc"`
		SetupTime  int64                                                          `json:"setup-time"`
		ExpectDown int64                                                          `json:"expected-downtime"`
	}
	for {
		raw := qmp(t, qmpA, "query-migrate", nil)
		if err := json.Unmarshal(raw, &st); err != nil {
			t.Fatalf("query-migrate: %v: %s", err, raw)
		}
		if st.Status == "completed" || st.Status == "failed" || st.Status == "cancelled" {
			break
		}
		if time.Since(start) > 2*time.Minute {
			t.Fatalf("migration still %q after 2 minutes: %s", st.Status, raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st.Status != "completed" {
		t.Fatalf("migration %s: %s", st.Status, st.ErrorDesc)
	}
	t.Logf("migration completed in %v (QEMU: total %d ms, downtime %d ms, setup %d ms, %d bytes sent)",
		time.Since(start).Round(time.Millisecond), st.TotalTime, st.Downtime, st.SetupTime, st.RAM.Transferred)
	logged := metric(t, apiA, "vunet_vhost_dirty_pages_logged_total")
	t.Logf("vunet A: %d dirty pages logged, %d dirty logs mapped", logged, metric(t, apiA, "vunet_vhost_dirty_logs_total"))
	if logged == 0 {
		t.Error("vunet A logged no dirty pages during the migration")
	}
	// QEMU 7.2 does not move vunet's device state: move it over the
	// API, as docs/migration.md says, while the source is paused.
	state := vunetCLI(t, nil, "state", "save", "--api", apiA)
	var sum struct {
		Forwards int
		Pending  int `json:"forwards_pending"`
		TCP      int `json:"tcp_connections"`
		Problems []string
	}
	if out := vunetCLI(t, strings.NewReader(state), "state", "load", "--json", "--api", apiB); json.Unmarshal([]byte(out), &sum) != nil {
		t.Fatalf("state load: %s", out)
	}
	t.Logf("state load: %+v (%d bytes of state)", sum, len(state))
	moves := func(result string) uint64 {
		return metric(t, apiA, `vunet_forward_tcp_moves_total{result="`+result+`"}`)
	}
	t.Logf("vunet A's TCP connections at the save: moved %d, reset busy %d, state %d, failed %d; vunet B restored %d",
		moves("moved"), moves("busy"), moves("state"), moves("failed"), sum.TCP)
	if sum.TCP < 1 || moves("failed") != 0 {
		t.Errorf("TCP connections: %d restored on vunet B (want at least the idle session), %d failed on vunet A", sum.TCP, moves("failed"))
	}
	sunkAtSave := sunk.Load()
	// On one host vunet A still holds the port: the forward is pending
	// until A exits.
	if sum.Forwards+sum.Pending != 1 || len(sum.Problems) != 0 {
		t.Errorf("state load restored %d forwards, %d pending (want 1 in all), problems %q", sum.Forwards, sum.Pending, sum.Problems)
	}
	// The source stays paused (postmigrate) until it is stopped; vunet
	// A holds the forward's host port until it exits (one host), and B
	// retries it every 250 ms.
	src.Kill()
	stopped := time.Now()
	vnA.Stop()
	if err := probeForward(ctx, fwdAddr, "after", 5*time.Second); err != nil {
		t.Errorf("runtime forward after the migration, through vunet B: %v", err)
	} else {
		t.Logf("runtime forward reached the guest through vunet B %v after vunet A stopped", time.Since(stopped).Round(time.Millisecond))
	}
	migrated.Store(true)

	res, err := dst.Wait()
	if err != nil {
		t.Errorf("destination guest: %v", err)
	}
	steps := harness.ParseSteps(src.Console() + res.Console)
	var b strings.Builder
	for _, s := range steps {
		fmt.Fprintf(&b, "\n  %v %-12s %s", s.OK, s.Name, s.Detail)
	}
	t.Logf("steps:%s", b.String())
	for _, name := range []string{"dhcp", "migrated", "ping-gap", "tcp-session", "tcp-after", "dhcp-renew"} {
		s, ok := harness.Find(steps, name)
		if !ok || !s.OK {
			t.Errorf("step %s: %+v", name, s)
		}
	}
	if s, ok := harness.Find(steps, "ping-gap"); ok {
		var gap, replies, last int
		fmt.Sscanf(s.Detail, "max_seq_gap=%d replies=%d last_seq=%d", &gap, &replies, &last)
		// Sequence numbers 0.1 s apart: a gap of g means g-1 pings
		// lost, about (g-1)×0.1 s without connectivity.
		t.Logf("ping gap across the migration: %d sequence numbers (about %d ms without replies); %d replies of %d", gap, (gap-1)*100, replies, last+1)
		if gap > 10 || replies == 0 {
			t.Errorf("pings did not resume within a second: %s", s.Detail)
		}
	}
	t.Logf("TCP sink: %d bytes before the migration, %d at the state save, %d in all", sunkBefore, sunkAtSave, sunk.Load())
	if n := sessConns.Load(); n != 1 {
		t.Errorf("the echo server saw %d session connections, want 1 (the moved one)", n)
	}
	// A stream that moved must still deliver, not hang.
	// (The guest writes a line of 34 bytes every 50 ms; it runs several
	// seconds after the save.)
	if s, ok := harness.Find(steps, "tcp-after"); ok && strings.Contains(s.Detail, "running") && sunk.Load() < sunkAtSave+500 {
		t.Errorf("the stream moved but hardly delivered after the migration (%d bytes at the save, %d at the end)", sunkAtSave, sunk.Load())
	}
	if res.ExitCode != 0 {
		t.Errorf("guest script exited %d", res.ExitCode)
	}
	if q := vnB.Log(); !strings.Contains(q, "frontend connected") {
		t.Errorf("vunet B never served the destination")
	}
}

// vunetCLI runs the vunet binary with args (and stdin) and returns its
// standard output; it fails the test if the command fails.
func vunetCLI(t *testing.T, stdin io.Reader, args ...string) string {
	t.Helper()
	cmd := exec.Command(vunettest.Binary(t), args...)
	cmd.Stdin = stdin
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("vunet %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

// probeForward connects to addr until the guest answers a line through it
// (within timeout): a connection that vunet accepts but cannot relay is
// closed without the answer, so only the guest's listener passes.
func probeForward(ctx context.Context, addr, tag string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		last = func() error {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(3 * time.Second))
			if _, err := fmt.Fprintf(c, "%s\n", tag); err != nil {
				return err
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if want := migrateAnswer + " " + tag + "\n"; line != want {
				return fmt.Errorf("read %q (%v), want %q", line, err, want)
			}
			return nil
		}()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return last
}

// waitQMP waits until QEMU's monitor socket accepts a command.
func waitQMP(t *testing.T, ctx context.Context, path string) {
	t.Helper()
	for {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			qmp(t, path, "query-status", nil)
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("QMP %s: %v", path, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
