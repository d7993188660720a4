package e2e

import (
	"context"
	"strings"
	"testing"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// TestLinuxGuestNames is the real-client test of guest host names
// (docs/services.md): the guest's udhcpc sends its host name (option 12,
// then option 81) and the guest resolves NAME.vunet.internal (A and AAAA)
// through vunet's DNS; an unknown name under vunet.internal is NXDOMAIN and
// a released lease takes the name with it.
func TestLinuxGuestNames(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*guestTimeout)
	defer cancel()
	vn := vunettest.Start(t, e.vunetArgs()...)
	inst := startGuest(t, ctx, &qemutest.Guest{
		Socket: vn.Socket,
		Script: script(harness.StepNames("vm1")),
	})
	finish(t, inst, "name-a", "name-aaaa", "name-nxdomain", "name-release", "name-fqdn")
	// vunet's side of it: the bindings and the release, logged.
	for _, want := range []string{`msg="guest host name bound"`, `name=vm1.vunet.internal`, `msg="guest host name released"`} {
		if !strings.Contains(vn.Log(), want) {
			t.Errorf("vunet log lacks %q", want)
		}
	}
}
