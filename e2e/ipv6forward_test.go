package e2e

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// TestLinuxGuestIPv6Forward: with --dhcpv6 stateful the Linux guest (no
// DHCPv6 client: Debian's busybox-static has no udhcpc6) still configures
// its SLAAC address, as the prefix keeps its A flag; an inbound forward on
// the host's [::1] then reaches the guest over IPv6, at that address,
// from the IPv6 gateway (docs/forwarding.md).
func TestLinuxGuestIPv6Forward(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*guestTimeout)
	defer cancel()

	fwdHost := vunettest.FreePort(t)
	vn := vunettest.Start(t, e.vunetArgs("--dhcpv6", "stateful",
		"--forward", fmt.Sprintf("tcp:[::1]:%d:%d", fwdHost, guestFwdPort))...)
	inst := startGuest(t, ctx, &qemutest.Guest{
		Socket: vn.Socket,
		Script: script(
			harness.StepDHCP(1500),
			harness.StepIPv6(e.http.Port6), // SLAAC, and traffic from the address
			harness.StepForward(guestFwdPort),
		),
	})
	if err := inst.WaitFor(ctx, harness.ReadyLine("forward")); err != nil {
		t.Fatal(err)
	}
	fctx, fcancel := context.WithTimeout(ctx, time.Minute)
	peer, err := harness.ProbeForward(fctx, net.JoinHostPort("::1", strconv.Itoa(fwdHost)))
	fcancel()
	if err != nil {
		t.Errorf("inbound forward on [::1]: %v", err)
	} else {
		// A loopback client appears as the gateway of the family used:
		// fd00::2 means the connection reached the guest over IPv6.
		host := peer
		if i := strings.LastIndexByte(peer, ':'); i >= 0 {
			host = peer[:i]
		}
		if host != harness.Gateway6 {
			t.Errorf("guest saw the forward on [::1] from %q, want %s (IPv6)", peer, harness.Gateway6)
		}
		t.Logf("inbound forward [::1]:%d -> guest:%d: guest saw %s", fwdHost, guestFwdPort, peer)
	}
	finish(t, inst, "dhcp", "ipv6-slaac", "ping6", "dns6", "http6", "forward")
}
