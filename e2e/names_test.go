package e2e

import (
	"context"
	"fmt"
	"net"
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

// TestLinuxGuestNames is the real-client test of guest host names
// (docs/services.md) and of what builds on them: the guest's udhcpc sends
// its host name (option 12, then option 81) and the guest resolves
// NAME.vunet.internal (A and AAAA) through vunet's DNS; an unknown name
// under vunet.internal is NXDOMAIN and a released lease takes the name
// with it. Then a forward naming the guest (--forward tcp:P:vm1:8080)
// reaches it, and GET /v1/guests (vunet guests) lists it with its name,
// MAC, lease and queues.
func TestLinuxGuestNames(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*guestTimeout)
	defer cancel()
	apiSock := filepath.Join(t.TempDir(), "api.sock")
	fwdHost := vunettest.FreePort(t)
	vn := vunettest.Start(t, e.vunetArgs("--api", apiSock,
		"--forward", fmt.Sprintf("tcp:127.0.0.1:%d:vm1:%d", fwdHost, guestFwdPort))...)
	inst := startGuest(t, ctx, &qemutest.Guest{
		Socket: vn.Socket,
		Script: script(harness.StepNames("vm1"), harness.StepForward(guestFwdPort)),
	})
	if err := inst.WaitFor(ctx, harness.ReadyLine("forward")); err != nil {
		t.Fatal(err)
	}
	// The guest waits in StepForward: list it while it is connected.
	cl := api.NewClient(apiSock)
	defer cl.Close()
	gs, err := cl.Guests(ctx)
	if err != nil {
		t.Errorf("GET /v1/guests: %v", err)
	} else if len(gs) != 1 || gs[0].Name != "vm1" || gs[0].MAC == "" || len(gs[0].Rings) == 0 ||
		len(gs[0].Leases) == 0 || gs[0].Leases[0].Addr.String() != harness.GuestIP || len(gs[0].Metrics) == 0 {
		t.Errorf("GET /v1/guests = %+v; want one guest vm1 with its MAC, lease %s, rings and counters", gs, harness.GuestIP)
	} else {
		t.Logf("guest: port %d mac %s name %s ipv4 %v ipv6 %v lease %s, %d rings, %d series",
			gs[0].Port, gs[0].MAC, gs[0].Name, gs[0].IPv4, gs[0].IPv6, gs[0].Leases[0].Expiry.Format(time.RFC3339), len(gs[0].Rings), len(gs[0].Metrics))
	}
	fctx, fcancel := context.WithTimeout(ctx, time.Minute)
	peer, err := harness.ProbeForward(fctx, net.JoinHostPort("127.0.0.1", strconv.Itoa(fwdHost)))
	fcancel()
	if err != nil {
		t.Errorf("forward to vm1: %v", err)
	} else {
		t.Logf("forward 127.0.0.1:%d -> vm1:%d: guest saw %s", fwdHost, guestFwdPort, peer)
	}
	finish(t, inst, "name-a", "name-aaaa", "name-nxdomain", "name-release", "name-fqdn", "forward")
	// vunet's side of it: the bindings and the release, logged.
	for _, want := range []string{`msg="guest host name bound"`, `name=vm1.vunet.internal`, `msg="guest host name released"`} {
		if !strings.Contains(vn.Log(), want) {
			t.Errorf("vunet log lacks %q", want)
		}
	}
}
