package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
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

// peerFileLines is how many lines of `seq` each guest serves to the other
// (about 1.3 MB): the guest-to-guest TCP transfer, checked by sha256.
const peerFileLines = 200000

// peerFileSHA256 is the sha256 of `seq 1 peerFileLines`.
func peerFileSHA256() string {
	var b strings.Builder
	for i := 1; i <= peerFileLines; i++ {
		fmt.Fprintf(&b, "%d\n", i)
	}
	sum := sha256.Sum256([]byte(b.String()))
	return hex.EncodeToString(sum[:])
}

// slaacAddr is the EUI-64 address of mac in fd00::/64, the Linux guest's
// SLAAC address.
func slaacAddr(mac net.HardwareAddr) string {
	b := netip.MustParseAddr("fd00::").As16()
	b[8], b[9], b[10], b[11], b[12] = mac[0]^2, mac[1], mac[2], 0xff, 0xfe
	b[13], b[14], b[15] = mac[3], mac[4], mac[5]
	return netip.AddrFrom16(b).String()
}

// stepPeerDHCP leases an address (any of the pool's; the host checks the
// two differ) with host name name (DHCP option 12: the guest becomes
// name.vunet.internal) and names the other guest's: the pool hands out
// .15 and .16.
func stepPeerDHCP(name string) string {
	return `begin
if udhcpc -i eth0 -n -q -t 10 -T 2 -x hostname:` + name + ` >/tmp/udhcpc.log 2>&1 && [ -f /run/dhcp-eth0 ]; then
	. /run/dhcp-eth0
	pass dhcp "ip=$ip"
else
	cat /tmp/udhcpc.log
	fail dhcp "no lease"
	ip=none
fi
case $ip in 10.0.2.15) peer=10.0.2.16 ;; *) peer=10.0.2.15 ;; esac
mkdir -p /www && seq 1 ` + fmt.Sprint(peerFileLines) + ` >/www/f && httpd -p 8000 -h /www
`
}

// stepPeer checks the other guest (peer, peer6, host name peerName): ping
// over IPv4 and IPv6, by address and by name (peerName.vunet.internal, A
// and AAAA from vunet's DNS), and a TCP transfer from its httpd with the
// sha256 checked. With isolated, the pings must fail instead (and the
// transfer is skipped).
func stepPeer(peer6, peerName, sha string, isolated bool) string {
	if isolated {
		return fmt.Sprintf(`begin
if ping -c 3 -W 1 $peer >/dev/null 2>&1; then fail peer-blocked "echo reply from $peer"; else pass peer-blocked "no reply from $peer"; fi
begin
if ping6 -c 3 -W 1 %[1]s >/dev/null 2>&1; then fail peer6-blocked "echo reply from %[1]s"; else pass peer6-blocked "no reply from %[1]s"; fi
`, peer6)
	}
	return fmt.Sprintf(`begin
if wait_for ping -c 1 -W 1 $peer >/dev/null 2>&1; then pass ping-peer "$peer"; else fail ping-peer "no reply from $peer"; fi
begin
slaac() { ip -6 addr show dev eth0 | grep -q 'inet6 fd00:.*scope global' && ! ip -6 addr show dev eth0 | grep -q tentative; }
if wait_for slaac && wait_for ping6 -c 1 -W 1 %[1]s >/dev/null 2>&1; then
	pass ping6-peer "%[1]s from $(ip -6 addr show dev eth0 | awk '/inet6 fd00:/ { print $2; exit }')"
else
	ip -6 addr show dev eth0; ip -6 neigh
	fail ping6-peer "no reply from %[1]s"
fi
begin
fq=%[3]s.vunet.internal
if ping -4 -c 1 -W 2 $fq >/dev/null 2>&1; then pass ping-name "$fq"; else nslookup $fq; fail ping-name "no reply from $fq"; fi
begin
if ping6 -c 1 -W 2 $fq >/dev/null 2>&1; then pass ping6-name "$fq"; else nslookup -type=aaaa $fq; fail ping6-name "no reply from $fq over IPv6"; fi
begin
getpeer() { timeout 60 wget -q -O /tmp/g http://$peer:8000/f; }
if wait_for getpeer; then
	sum=$(sha256sum </tmp/g | cut -d' ' -f1)
	if [ "$sum" = %[2]s ]; then pass peer-http "bytes=$(wc -c </tmp/g) sha256=$sum"; else fail peer-http "sha256=$sum want %[2]s"; fi
else
	fail peer-http "wget http://$peer:8000/f failed"
fi
rm -f /tmp/g
`, peer6, sha, peerName)
}

// stepHostLoop downloads the host's blob again and again (sha256 checked)
// until the host sets generation gen: a transfer that runs while the other
// guest goes away and comes back.
func stepHostLoop(port int, sha string, gen int) string {
	return fmt.Sprintf(`echo %[4]s
begin
ok=0 bad=0 g=
while [ $ok -lt 1000 ]; do
	if timeout 60 wget -q -O /tmp/blob http://%[1]s:%[2]d/blob && [ "$(sha256sum </tmp/blob | cut -d' ' -f1)" = %[3]s ]; then
		ok=$((ok + 1))
	else
		bad=$((bad + 1))
	fi
	rm -f /tmp/blob
	g=$(timeout 5 wget -q -O - http://%[1]s:%[2]d/generation 2>/dev/null)
	[ "$g" = %[5]d ] && break
done
if [ $bad = 0 ] && [ "$g" = %[5]d ]; then pass host-loop "downloads=$ok"; else fail host-loop "downloads=$ok failed=$bad generation=$g"; fi
`, harness.Gateway4, port, sha, harness.ReadyLine("host-loop"), gen)
}

// stepIperf runs iperf3 from this guest to target (a shell word: $peer,
// or the gateway) for secs seconds, this guest sending.
func stepIperf(name, target string, port, secs int) string {
	return fmt.Sprintf(`begin
iperfto() { timeout %[4]d iperf3 -c %[2]s -p %[5]d -t %[3]d -f m >/tmp/iperf.out 2>&1; }
if wait_for iperfto; then
	rate=$(grep receiver /tmp/iperf.out | tail -n1 | awk '{ for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") print $(i-1) }')
	pass %[1]s "rate=${rate}Mbit/s"
else
	tail -n 12 /tmp/iperf.out
	fail %[1]s "iperf3 to %[2]s failed or stalled"
fi
`, name, target, secs, secs+30, port)
}

// guestIperfSeconds is the length of the guest-to-guest iperf3 run:
// 3 s in make test, VUNET_E2E_GUESTS_IPERF seconds when set, which also
// runs the same guest to the host for a throughput comparison
// (docs/performance.md).
func guestIperfSeconds(t *testing.T) (secs int, withHost bool) {
	v := os.Getenv("VUNET_E2E_GUESTS_IPERF")
	if v == "" {
		return 3, false
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("VUNET_E2E_GUESTS_IPERF=%q: want seconds", v)
	}
	return n, true
}

// dhcpIP is the address a guest's dhcp step leased.
func dhcpIP(t *testing.T, steps []harness.Step) string {
	t.Helper()
	s, ok := harness.Find(steps, "dhcp")
	if !ok || !s.OK {
		return ""
	}
	return s.Field("ip")
}

func counter(t *testing.T, c *api.Client, name string, labels ...string) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.Stats(ctx)
	if err != nil {
		t.Fatalf("stats: %v", err)
	}
	v, _ := st.Find(name, labels...)
	return uint64(v)
}

// memKB returns fields of /proc/PID/status (VmRSS, RssAnon, RssShmem) in
// KiB, for what a second guest costs.
func memKB(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, k := range []string{"VmRSS:", "RssAnon:", "RssShmem:"} {
			if strings.HasPrefix(l, k) {
				out = append(out, strings.Join(strings.Fields(l), " "))
			}
		}
	}
	return strings.Join(out, ", ")
}

var (
	macA = net.HardwareAddr{0x52, 0x54, 0, 0, 0, 0x0a}
	macB = net.HardwareAddr{0x52, 0x54, 0, 0, 0, 0x0b}
)

// guestName is the DHCP host name of the guest with mac: "vm" and its
// last byte in hex (vm0a, vm0b), so the other guest can reach it as
// NAME.vunet.internal.
func guestName(mac net.HardwareAddr) string { return fmt.Sprintf("vm%02x", mac[len(mac)-1]) }

// TestLinuxGuests: two Linux guests (mac= distinct) share one vunet with
// --max-guests 2. They get distinct DHCP addresses, ping each other over
// IPv4 and IPv6 by address and by name (vm0a.vunet.internal from their
// DHCP host names), move a file between them over TCP (sha256 checked),
// iperf3 for 3 s, and both reach the host's loopback through the gateway.
// A third QEMU is refused (logged, counted). Guest B then powers off and
// boots again with the same MAC while guest A keeps downloading from the
// host: A's transfers never fail, B gets its address back (the lease is
// kept) and reaches A again. Then, on a vunet with --isolate-guests, two
// guests cannot reach each other but do reach the host.
func TestLinuxGuests(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*guestTimeout)
	defer cancel()
	sha := peerFileSHA256()
	apiSock := filepath.Join(t.TempDir(), "api.sock")
	sock := shortSocket(t)
	vn := vunettest.StartAt(t, sock, e.vunetArgs("--max-guests", "2", "--api", apiSock)...)
	client := api.NewClient(apiSock)
	defer client.Close()

	start := time.Now()
	guest := func(mac net.HardwareAddr, steps ...string) *qemutest.Instance {
		return startGuest(t, ctx, &qemutest.Guest{Socket: sock, DeviceOpts: "mac=" + mac.String(),
			Script: script(append([]string{stepPeerDHCP(guestName(mac))}, steps...)...)})
	}
	a := guest(macA,
		"iperf3 -s -D >/dev/null 2>&1\n",
		stepPeer(slaacAddr(macB), guestName(macB), sha, false),
		harness.StepFetch("host-hello", fmt.Sprintf("http://%s:%d/hello", harness.Gateway4, e.http.Port4), strings.TrimSuffix(harness.HelloText, "\n")),
		harness.StepWaitGeneration("checked", e.http.Port4, 2),
		stepHostLoop(e.http.Port4, e.http.BlobSHA256, 3),
		// B is back: reachable again; then A leaves.
		stepPeer(slaacAddr(macB), guestName(macB), sha, false),
	)
	secs, withHost := guestIperfSeconds(t)
	bIperf := []string{stepPeer(slaacAddr(macA), guestName(macA), sha, false), stepIperf("iperf-peer", "$peer", 5201, secs)}
	if withHost {
		port := vunettest.FreePort(t)
		p, err := harness.StartIperf3(ctx, port)
		if err != nil {
			t.Fatalf("iperf3 server: %v", err)
		}
		t.Cleanup(func() { p.Stop(time.Second) })
		bIperf = append(bIperf, stepIperf("iperf-host", harness.Gateway4, port, secs))
	}
	b := guest(macB, append(bIperf,
		harness.StepFetch("host-hello", fmt.Sprintf("http://%s:%d/hello", harness.Gateway4, e.http.Port4), strings.TrimSuffix(harness.HelloText, "\n")),
		harness.StepWaitGeneration("checked", e.http.Port4, 2))...,
	)

	// Both have leases: a third frontend is refused at once.
	for _, g := range []*qemutest.Instance{a, b} {
		if err := g.WaitFor(ctx, "E2E-PASS dhcp"); err != nil {
			t.Fatal(err)
		}
	}
	third := startGuest(t, ctx, &qemutest.Guest{Socket: sock, DeviceOpts: "mac=52:54:00:00:00:0c", Timeout: time.Minute})
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	if err := vn.WaitLog(wctx, "frontend refused: already serving the maximum number of frontends"); err != nil {
		t.Errorf("no refusal logged for the third guest: %v", err)
	}
	wcancel()
	third.Kill()
	if n := counter(t, client, "vunet_vhost_frontends_refused_total", "reason", "busy"); n < 1 {
		t.Errorf("vunet_vhost_frontends_refused_total{reason=busy} = %d, want ≥ 1", n)
	}

	// The host is the barrier (a guest cannot tell whether its peer is
	// gone or slow): once both have checked each other, B leaves and A
	// keeps downloading.
	for _, g := range []*qemutest.Instance{a, b} {
		if err := g.WaitFor(ctx, " host-hello "); err != nil {
			t.Fatal(err)
		}
	}
	e.http.SetGeneration(2)
	bSteps := finish(t, b, "dhcp", "ping-peer", "ping6-peer", "ping-name", "ping6-name", "peer-http", "iperf-peer", "host-hello", "checked")
	bIP := dhcpIP(t, bSteps)
	if err := a.WaitFor(ctx, harness.ReadyLine("host-loop")); err != nil {
		t.Fatal(err)
	}
	oneGuest := memKB(vn.Pid())
	// B's VM boots again with the same MAC while A's transfer runs.
	b2 := guest(macB, stepPeer(slaacAddr(macA), guestName(macA), sha, false), harness.StepWaitGeneration("a-done", e.http.Port4, 4))
	if err := b2.WaitFor(ctx, "E2E-PASS peer-http"); err != nil {
		t.Fatal(err)
	}
	t.Logf("vunet memory with one guest (A downloading): %s; with B back: %s", oneGuest, memKB(vn.Pid()))
	// A's loop ends, A checks B again and leaves; then B2 may leave.
	e.http.SetGeneration(3)
	aSteps := finish(t, a, "dhcp", "ping-peer", "ping6-peer", "ping-name", "ping6-name", "peer-http", "host-hello", "checked", "host-loop")
	e.http.SetGeneration(4)
	b2Steps := finish(t, b2, "dhcp", "ping-peer", "ping6-peer", "ping-name", "ping6-name", "peer-http", "a-done")
	aIP := dhcpIP(t, aSteps)
	if aIP == "" || bIP == "" || aIP == bIP {
		t.Errorf("guest addresses %q and %q: want two distinct leases", aIP, bIP)
	}
	if got := dhcpIP(t, b2Steps); got != bIP {
		t.Errorf("rebooted guest B leased %q, want its old address %q (the lease is kept)", got, bIP)
	}
	for _, name := range []string{"iperf-peer", "iperf-host"} {
		if s, ok := harness.Find(bSteps, name); ok && s.OK {
			t.Logf("%s: iperf3 -t %d, 1 stream, guest B sending: %s", name, secs, s.Field("rate"))
		}
	}
	if n := counter(t, client, "vunet_switch_frames_total", "kind", "unicast"); n == 0 {
		t.Error("vunet_switch_frames_total{kind=unicast} = 0: guest traffic did not go through the switch")
	}
	t.Logf("two guests, third refused, B rebooted: %v", time.Since(start).Round(10*time.Millisecond))
	if err := vn.Stop(); err != nil {
		t.Errorf("stopping vunet: %v", err)
	}

	t.Run("isolated", func(t *testing.T) {
		start := time.Now()
		api2 := filepath.Join(t.TempDir(), "api.sock")
		sock2 := shortSocket(t)
		vunettest.StartAt(t, sock2, e.vunetArgs("--max-guests", "2", "--isolate-guests", "--api", api2)...)
		c2 := api.NewClient(api2)
		defer c2.Close()
		hello := harness.StepFetch("host-hello", fmt.Sprintf("http://%s:%d/hello", harness.Gateway4, e.http.Port4), strings.TrimSuffix(harness.HelloText, "\n"))
		var insts []*qemutest.Instance
		for _, m := range [][2]net.HardwareAddr{{macA, macB}, {macB, macA}} {
			// Each waits until the other has a lease (through the
			// host: the guests cannot see each other), so a failed
			// ping means isolation, not a peer still booting.
			insts = append(insts, startGuest(t, ctx, &qemutest.Guest{Socket: sock2, DeviceOpts: "mac=" + m[0].String(),
				Script: script(stepPeerDHCP(guestName(m[0])),
					harness.StepWaitGeneration("both-up", e.http.Port4, 5),
					"slaac() { ip -6 addr show dev eth0 | grep -q 'inet6 fd00:.*scope global'; }; wait_for slaac\n",
					stepPeer(slaacAddr(m[1]), guestName(m[1]), sha, true), hello,
					harness.StepWaitGeneration("both-done", e.http.Port4, 6))}))
		}
		for _, g := range insts {
			if err := g.WaitFor(ctx, "E2E-PASS dhcp"); err != nil {
				t.Fatal(err)
			}
		}
		e.http.SetGeneration(5)
		for _, g := range insts {
			if err := g.WaitFor(ctx, "host-hello"); err != nil {
				t.Fatal(err)
			}
		}
		e.http.SetGeneration(6)
		for _, g := range insts {
			finish(t, g, "dhcp", "both-up", "peer-blocked", "peer6-blocked", "host-hello", "both-done")
		}
		if n := counter(t, c2, "vunet_switch_drops_total", "reason", "isolated"); n == 0 {
			t.Error("vunet_switch_drops_total{reason=isolated} = 0")
		}
		t.Logf("isolated guests: %v", time.Since(start).Round(10*time.Millisecond))
	})
}
