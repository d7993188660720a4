package appliance

import (
	"net/netip"
	"slices"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/endpoint"
)

// Guest is one connected VM (vhost-user frontend) on the network, as
// Guests lists it.
type Guest struct {
	// Port is the guest's switch port, 0..max_guests-1: the `guest`
	// label of its link and virtqueue counters. Ports are reused: the
	// next frontend takes the lowest free one.
	Port int
	// Session numbers the frontends accepted since start, from 1; a
	// reconnecting VM gets a new one.
	Session uint64
	// Since is when its frontend connected.
	Since time.Time
	// MAC is the guest's MAC, learned from its first frame (QEMU's
	// mac=); "" until it has sent one.
	MAC string
	// IPv4 and IPv6 are its addresses: those it has used as a source,
	// and its DHCP leases.
	IPv4, IPv6 []netip.Addr
	// Leases are its DHCPv4 and DHCPv6 leases (by its MAC).
	Leases []api.Lease
	// Rings are its running virtqueues.
	Rings []api.RingState
	// Stats are its link counters (frames, bytes, drops).
	Stats *endpoint.Stats
}

// Guests lists the connected guests by port. It is the one place that
// joins what the switch learned with the DHCP servers' leases; `vunet
// guests`, the API and forwards that name a guest use it.
func (a *Appliance) Guests() []Guest {
	var v4, v6 []api.Lease
	for _, l := range a.DHCP.Leases() {
		v4 = append(v4, api.Lease{MAC: l.MAC, Addr: l.Addr, Expiry: l.Expiry})
	}
	if a.DHCPv6 != nil {
		for _, l := range a.DHCPv6.Leases() {
			v6 = append(v6, api.Lease{MAC: l.MAC, Addr: l.Addr, Expiry: l.Expiry, DUID: l.DUID, IAID: l.IAID})
		}
	}
	var out []Guest
	for _, sg := range a.Link.Guests() {
		g := Guest{Port: sg.Port, Session: sg.Session, Since: sg.Since, Rings: rings(sg.Endpoint),
			Stats: &sg.Endpoint.Stats}
		if sg.MAC != nil {
			g.MAC = sg.MAC.String()
		}
		add := func(ad netip.Addr) {
			switch {
			case ad.Is4() && !slices.Contains(g.IPv4, ad):
				g.IPv4 = append(g.IPv4, ad)
			case ad.Is6() && !slices.Contains(g.IPv6, ad):
				g.IPv6 = append(g.IPv6, ad)
			}
		}
		for _, ad := range sg.Addrs {
			add(ad)
		}
		for _, l := range append(slices.Clone(v4), v6...) {
			if g.MAC != "" && l.MAC == g.MAC {
				g.Leases = append(g.Leases, l)
				add(l.Addr)
			}
		}
		out = append(out, g)
	}
	return out
}

// guestLeft runs when a guest's frontend has gone away (the switch's
// OnPortDown): the NAT flows of its addresses are closed, so they neither
// hold host sockets and budget until they time out nor meet a new guest
// that reuses the address and port (its SYN would hit the old connection
// and hang). Addresses another connected guest also uses are left alone:
// a guest leaving never disturbs the others. Its DHCP lease is kept until
// it expires, so a rebooted VM gets its address back.
func (a *Appliance) guestLeft(g endpoint.Guest) {
	others := map[netip.Addr]bool{}
	for _, o := range a.Link.Guests() {
		for _, ad := range o.Addrs {
			others[ad] = true
		}
	}
	var mine []netip.Addr
	for _, ad := range g.Addrs {
		if !others[ad] {
			mine = append(mine, ad)
		}
	}
	if len(mine) == 0 {
		return
	}
	n := a.Forward.CloseGuest(mine)
	// The stack forgets the guest's link address: a VM that takes the
	// address next, with another MAC, is resolved afresh.
	s, nic := a.Stack.Stack(), a.Stack.NIC()
	for _, ad := range mine {
		proto := ipv4.ProtocolNumber
		if ad.Is6() {
			proto = ipv6.ProtocolNumber
		}
		_ = s.RemoveNeighbor(nic, proto, tcpip.AddrFromSlice(ad.AsSlice()))
	}
	a.log.Info("guest's NAT flows closed", "guest", g.Port, "session", g.Session, "addrs", mine, "flows", n)
}
