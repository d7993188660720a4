package forward

import (
	"bufio"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// TestInboundSelect checks a port forward that names its guest: each new
// connection goes where the resolver says the guest is now (over IPv6 for
// an IPv6 host address), and while the guest is not there the connection
// is refused at once and counted, without a dial into the stack.
func TestInboundSelect(t *testing.T) {
	var mu sync.Mutex
	present := true
	var asked []bool
	e := newEnv(t, func(o *Options) {
		o.ResolveGuest = func(sel string, ipv6 bool) (netip.Addr, bool) {
			mu.Lock()
			defer mu.Unlock()
			asked = append(asked, ipv6)
			if sel != "vm1" || !present {
				return netip.Addr{}, false
			}
			if ipv6 {
				return netstacktest.Guest6, true
			}
			return netstacktest.Guest4, true
		}
	})
	guestPeerServer(t, e, netip.AddrPortFrom(netstacktest.Guest4, 8080))
	guestPeerServer(t, e, netip.AddrPortFrom(netstacktest.Guest6, 8080))
	for _, fam := range families(t) {
		pf, err := e.f.AddPortForward(PortForward{Proto: "tcp", Host: netip.AddrPortFrom(fam.loop, 0),
			Guest: netip.AddrPortFrom(netip.Addr{}, 8080), Select: "vm1"})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(pf.String(), "->vm1:8080") {
			t.Errorf("String() = %q", pf.String())
		}
		mu.Lock()
		present = true
		mu.Unlock()
		c, err := net.Dial("tcp", pf.Host.String())
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		want := netip.AddrPortFrom(fam.gw, addrPortOf(c.LocalAddr()).Port())
		if err != nil || strings.TrimSpace(line) != want.String() {
			t.Errorf("%s: guest saw %q (%v), want %s", fam.loop, line, err, want)
		}
		_ = c.Close()

		// The guest leaves: the next connection is refused.
		mu.Lock()
		present = false
		mu.Unlock()
		before := e.f.c.InboundNoGuestTCP.Load()
		c, err = net.Dial("tcp", pf.Host.String())
		if err == nil {
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = c.Read(make([]byte, 1))
			_ = c.Close()
		}
		var ne net.Error
		if err == nil || errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("%s: connection with the guest gone: err %v, want reset or EOF", fam.loop, err)
		}
		eventually(t, "no-guest refusal counted", func() bool { return e.f.c.InboundNoGuestTCP.Load() == before+1 })
	}
	mu.Lock()
	defer mu.Unlock()
	for i, fam := range families(t) {
		// Two connections per family, each asking for the host address's family.
		if asked[2*i] != fam.loop.Is6() {
			t.Errorf("resolver asked ipv6=%v for a forward on %s", asked[2*i], fam.loop)
		}
	}
}
