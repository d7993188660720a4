package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// The routed test network, all inside namespaces the test creates: the
// test's namespace (198.18.0.1) reaches 198.51.100.0/24 through router 1
// (198.18.0.2 / 198.18.1.1) and router 2 (198.18.1.2), which has an
// "unreachable" route for it and answers with ICMP host unreachable.
const (
	router1     = "198.18.0.2"
	router2     = "198.18.1.2"
	unreachable = "198.51.100.7"
)

// TestLinuxGuestRouted sends the guest's traffic through real routers
// whose ICMP errors vunet must pass on (docs/forwarding.md, ICMP errors):
// traceroute from the guest shows the gateway (vunet, hop 1), router 1
// (its "time exceeded", hop 2) and ends at router 2 with "host
// unreachable"; a TCP connect to the unreachable address fails at once
// with "No route to host" instead of timing out or being refused.
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
	for _, ns := range []string{r1, r2} {
		sh("ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		in(ns, "ip", "link", "set", "lo", "up")
		// (Not sysctl(8): procps may be missing on a minimal machine.)
		in(ns, "sh", "-c", "echo 1 >/proc/sys/net/ipv4/ip_forward && echo 0 >/proc/sys/net/ipv4/icmp_ratelimit")
	}
	// Here <-> router 1.
	sh("ip", "link", "add", "vrt0", "type", "veth", "peer", "name", "vrt1", "netns", r1)
	t.Cleanup(func() { exec.Command("ip", "link", "del", "vrt0").Run() })
	sh("ip", "addr", "add", "198.18.0.1/24", "dev", "vrt0")
	sh("ip", "link", "set", "vrt0", "up")
	sh("ip", "route", "add", "198.51.100.0/24", "via", router1)
	in(r1, "ip", "addr", "add", router1+"/24", "dev", "vrt1")
	in(r1, "ip", "link", "set", "vrt1", "up")
	// Router 1 <-> router 2.
	in(r1, "ip", "link", "add", "vrt2", "type", "veth", "peer", "name", "vrt3", "netns", r2)
	in(r1, "ip", "addr", "add", "198.18.1.1/24", "dev", "vrt2")
	in(r1, "ip", "link", "set", "vrt2", "up")
	in(r1, "ip", "route", "add", "198.51.100.0/24", "via", router2)
	in(r2, "ip", "addr", "add", router2+"/24", "dev", "vrt3")
	in(r2, "ip", "link", "set", "vrt3", "up")
	in(r2, "ip", "route", "add", "198.18.0.0/24", "via", "198.18.1.1")
	in(r2, "ip", "route", "add", "unreachable", "198.51.100.0/24")

	ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
	defer cancel()
	vn := vunettest.Start(t, e.vunetArgs()...)
	inst := startGuest(t, ctx, &qemutest.Guest{
		Socket: vn.Socket,
		Script: script(
			harness.StepDHCP(1500),
			harness.StepRouted(unreachable, harness.Gateway4, router1, router2),
		),
	})
	finish(t, inst, "dhcp", "trace-routed", "connect-unreachable")
}
