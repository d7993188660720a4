package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// The routed test network, all inside namespaces the test creates: the
// test's namespace (198.18.0.1, fd01::1) reaches 198.51.100.0/24 and
// 2001:db8:100::/64 through router 1 (198.18.0.2 / 198.18.1.1, fd01::2 /
// fd02::1) and router 2 (198.18.1.2, fd02::2), which has "unreachable"
// routes for them and answers with ICMP errors.
var routed = []struct {
	v6                       bool
	prefix, dst              string
	here, r1a, r1b, r2, link string // addresses, and the prefix length
}{
	{false, "198.51.100.0/24", "198.51.100.7", "198.18.0.1", "198.18.0.2", "198.18.1.1", "198.18.1.2", "/24"},
	{true, "2001:db8:100::/64", "2001:db8:100::7", "fd01::1", "fd01::2", "fd02::1", "fd02::2", "/64"},
}

// TestLinuxGuestRouted sends the guest's traffic through real routers
// whose ICMP errors vunet must pass on (docs/forwarding.md, ICMP errors),
// over IPv4 and IPv6: traceroute from the guest shows the gateway (vunet,
// hop 1), router 1 (its "time exceeded", hop 2) and ends at router 2 with
// "unreachable"; a TCP connect to the unreachable network fails at once
// ("No route to host", "Network is unreachable") instead of timing out or
// being refused; a ping gets router 2's "destination unreachable".
func TestLinuxGuestRouted(t *testing.T) {
	e := setup(t)
	sh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	r1, r2 := fmt.Sprintf("vunetr1-%d", os.Getpid()), fmt.Sprintf("vunetr2-%d", os.Getpid())
	in := func(ns string, args ...string) {
		t.Helper()
		sh(append([]string{"ip", "netns", "exec", ns}, args...)...)
	}
	// (Not sysctl(8): procps may be missing on a minimal machine.)
	const sysctls = `for f in ipv4/ip_forward ipv6/conf/all/forwarding; do echo 1 >/proc/sys/net/$f; done
echo 0 >/proc/sys/net/ipv4/icmp_ratelimit; echo 0 >/proc/sys/net/ipv6/icmp/ratelimit`
	for _, ns := range []string{r1, r2} {
		sh("ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		in(ns, "ip", "link", "set", "lo", "up")
		in(ns, "sh", "-c", sysctls)
	}
	sh("ip", "link", "add", "vrt0", "type", "veth", "peer", "name", "vrt1", "netns", r1)
	t.Cleanup(func() { exec.Command("ip", "link", "del", "vrt0").Run() })
	in(r1, "ip", "link", "add", "vrt2", "type", "veth", "peer", "name", "vrt3", "netns", r2)
	for _, n := range routed {
		fam := "-4"
		if n.v6 {
			fam = "-6"
		}
		// nodad: the addresses are usable at once (IPv4 ignores it).
		addr := func(ns, a, dev string) {
			args := []string{"ip", fam, "addr", "add", a + n.link, "dev", dev}
			if n.v6 {
				args = append(args, "nodad")
			}
			if ns == "" {
				sh(args...)
			} else {
				in(ns, args...)
			}
		}
		addr("", n.here, "vrt0")
		addr(r1, n.r1a, "vrt1")
		addr(r1, n.r1b, "vrt2")
		addr(r2, n.r2, "vrt3")
	}
	sh("ip", "link", "set", "vrt0", "up")
	in(r1, "ip", "link", "set", "vrt1", "up")
	in(r1, "ip", "link", "set", "vrt2", "up")
	in(r2, "ip", "link", "set", "vrt3", "up")
	for _, n := range routed {
		fam := "-4"
		if n.v6 {
			fam = "-6"
		}
		here, _ := netip.ParsePrefix(n.here + n.link)
		sh("ip", fam, "route", "add", n.prefix, "via", n.r1a)
		in(r1, "ip", fam, "route", "add", n.prefix, "via", n.r2)
		in(r2, "ip", fam, "route", "add", here.Masked().String(), "via", n.r1b)
		in(r2, "ip", fam, "route", "add", "unreachable", n.prefix)
	}
	// Let vunet forward pings through host ping sockets (per namespace).
	const pingRange = "/proc/sys/net/ipv4/ping_group_range"
	if old, err := os.ReadFile(pingRange); err == nil {
		t.Cleanup(func() { os.WriteFile(pingRange, old, 0o644) })
	}
	if err := os.WriteFile(pingRange, []byte("0 2147483647"), 0o644); err != nil {
		t.Fatalf("allowing ping sockets: %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
	defer cancel()
	vn := vunettest.Start(t, e.vunetArgs()...)
	v4, v6 := routed[0], routed[1]
	inst := startGuest(t, ctx, &qemutest.Guest{
		Socket: vn.Socket,
		Script: script(
			harness.StepDHCP(1500),
			harness.StepRouted("routed4", v4.dst, harness.Gateway4, v4.r1a, v4.r2),
			harness.StepIPv6(e.http.Port6),
			harness.StepRouted("routed6", v6.dst, harness.Gateway6, v6.r1a, v6.r2),
		),
	})
	finish(t, inst, "dhcp", "routed4-trace", "routed4-connect", "routed4-ping",
		"ipv6-slaac", "routed6-trace", "routed6-connect", "routed6-ping")
}
