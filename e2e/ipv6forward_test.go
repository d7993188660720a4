package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// TestLinuxGuestDHCPv6 is the real-client test of stateful DHCPv6: dhcpcd
// (Debian's dhcpcd-base, in the guest since busybox-static has no udhcpc6)
// gets an address from fd00::100-fd00::1ff (its only global
// address), and a POST from it reaches the host's [::1] through fd00::2.
func TestLinuxGuestDHCPv6(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*guestTimeout)
	defer cancel()
	vn := vunettest.Start(t, e.vunetArgs("--dhcpv6", "stateful")...)
	inst := startGuest(t, ctx, &qemutest.Guest{
		Socket: vn.Socket,
		Script: script(harness.StepDHCP(1500), harness.StepDHCPv6("dhcpv6", e.http.Port6)),
	})
	steps := finish(t, inst, "dhcp", "dhcpv6")
	s, ok := harness.Find(steps, "dhcpv6")
	if !ok || !s.OK {
		return
	}
	var addr string
	fmt.Sscanf(s.Detail, "addr=%s", &addr)
	a, err := netip.ParseAddr(addr)
	if err != nil || !netip.MustParsePrefix("fd00::100/120").Contains(a) {
		t.Errorf("leased address %q is not in fd00::100-fd00::1ff", addr)
	}
	// The host saw the request: the body names the leased address.
	u, ok := e.http.Upload("dhcpv6")
	if want := int64(len("dhcpv6 " + addr)); !ok || u.Bytes != want {
		t.Errorf("host upload %+v (seen %v), want %d bytes", u, ok, want)
	}
}

// TestLinuxGuestIPv6Forward: with --dhcpv6 stateful a Linux guest that runs no
// DHCPv6 client still configures
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
