package appliance

import (
	"net"
	"net/netip"
	"slices"
	"strconv"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/config"
)

// resolveGuest answers forward.Options.ResolveGuest for forwards that name
// their guest (--forward tcp:2222:vm1:22): sel is a config.GuestSelector in
// its String form. Only a connected guest matches (Guests), so a forward
// to a VM that is not there is refused, not sent to a stale address. The
// address returned is of the family the forward's host address has when
// the guest has one (IPv6 end to end for [::1]), else the other.
func (a *Appliance) resolveGuest(sel string, ipv6 bool) (netip.Addr, bool) {
	gs, err := config.ParseGuestSelector(sel)
	if err != nil {
		return netip.Addr{}, false // cannot happen: config parsed it
	}
	mac := gs.MAC
	if gs.Name != "" {
		g, ok := a.Names.Lookup(gs.Name)
		if !ok {
			return netip.Addr{}, false
		}
		mac = g.MAC.String()
	}
	for _, g := range a.Guests() {
		switch {
		case mac != "" && g.MAC == mac:
		case gs.Addr.IsValid() && (slices.Contains(g.IPv4, gs.Addr) || slices.Contains(g.IPv6, gs.Addr)):
			if gs.Addr.Is6() == ipv6 {
				return gs.Addr, true
			}
		default:
			continue
		}
		return a.pickAddr(g, ipv6)
	}
	return netip.Addr{}, false
}

// pickAddr chooses g's address to connect to: its DHCPv4 lease (else an
// IPv4 address it uses) or, for ipv6, its IPv6 address as guestAddrs6
// ranks them; the other family when it has none of the wanted one.
func (a *Appliance) pickAddr(g Guest, ipv6 bool) (netip.Addr, bool) {
	var v4, v6 netip.Addr
	for _, l := range g.Leases {
		if l.Addr.Is4() {
			v4 = l.Addr
		}
	}
	if !v4.IsValid() && len(g.IPv4) > 0 {
		v4 = g.IPv4[0]
	}
	if ipv6 {
		if hw, err := net.ParseMAC(g.MAC); err == nil {
			if addrs := a.guestAddrs6(hw); len(addrs) > 0 {
				v6 = addrs[0]
			}
		}
		if !v6.IsValid() {
			for _, ad := range g.IPv6 {
				if !ad.IsLinkLocalUnicast() {
					v6 = ad
					break
				}
			}
		}
		if v6.IsValid() {
			return v6, true
		}
	}
	return v4, v4.IsValid()
}

// GuestList implements api.GuestsBackend (GET /v1/guests, `vunet
// guests`): Guests with their DHCP host names and their series, the
// entries of the one metrics snapshot whose guest label is their port.
func (a *Appliance) GuestList() []api.Guest {
	gs := a.Guests()
	if len(gs) == 0 {
		return nil
	}
	metrics := a.Stats().Metrics
	out := make([]api.Guest, 0, len(gs))
	for _, g := range gs {
		ag := api.Guest{Port: g.Port, Session: g.Session, Since: g.Since, MAC: g.MAC,
			IPv4: g.IPv4, IPv6: g.IPv6, Leases: g.Leases, Rings: g.Rings}
		if hw, err := net.ParseMAC(g.MAC); err == nil {
			ag.Name = a.Names.NameOf(hw)
		}
		port := strconv.Itoa(g.Port)
		for _, m := range metrics {
			if m.Labels["guest"] == port {
				ag.Metrics = append(ag.Metrics, m)
			}
		}
		out = append(out, ag)
	}
	return out
}
