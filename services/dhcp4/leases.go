package dhcp4

import (
	"net"
	"net/netip"
	"time"
)

// mac is a client hardware (Ethernet) address, usable as a map key.
type mac [6]byte

func (m mac) String() string { return net.HardwareAddr(m[:]).String() }

// lease is one entry of the lease table.
type lease struct {
	mac    mac
	addr   netip.Addr
	expiry time.Time
	// bound is false while the address is only offered: an offer is held for
	// offerHold so that two clients racing through DISCOVER do not get the same
	// address, but it does not survive as a lease.
	bound bool
}

// declined is the placeholder owner of an address a client DECLINEd (someone
// else on the link uses it); the address is skipped until the entry expires.
var declined = mac{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// leaseTable is a bounded pool of addresses [start, start+size) keyed by client
// MAC. It is not safe for concurrent use; Server serialises access.
type leaseTable struct {
	start  netip.Addr
	size   int
	byMAC  map[mac]*lease
	byAddr map[netip.Addr]*lease
	// static are fixed leases (Options.Static) and reserved their
	// addresses, which no other client gets.
	static   map[mac]netip.Addr
	reserved map[netip.Addr]mac
}

func newLeaseTable(start netip.Addr, size int) *leaseTable {
	return &leaseTable{
		start:    start,
		size:     size,
		byMAC:    make(map[mac]*lease),
		byAddr:   make(map[netip.Addr]*lease),
		static:   make(map[mac]netip.Addr),
		reserved: make(map[netip.Addr]mac),
	}
}

// inPool reports whether a is one of the pool's addresses.
func (t *leaseTable) inPool(a netip.Addr) bool {
	if !a.Is4() {
		return false
	}
	off := int64(ipToUint(a)) - int64(ipToUint(t.start))
	return off >= 0 && off < int64(t.size)
}

// lookup returns the live entry for m, dropping it if expired.
func (t *leaseTable) lookup(m mac, now time.Time) *lease {
	l := t.byMAC[m]
	if l != nil && !now.Before(l.expiry) {
		t.remove(l)
		return nil
	}
	return l
}

// owner returns the live entry holding a, dropping it if expired.
func (t *leaseTable) owner(a netip.Addr, now time.Time) *lease {
	l := t.byAddr[a]
	if l != nil && !now.Before(l.expiry) {
		t.remove(l)
		return nil
	}
	return l
}

func (t *leaseTable) remove(l *lease) {
	if t.byMAC[l.mac] == l {
		delete(t.byMAC, l.mac)
	}
	if t.byAddr[l.addr] == l {
		delete(t.byAddr, l.addr)
	}
}

// free reports whether m may have a: its static address, or, for a client
// without one, a pool address that is not reserved and nobody (other than
// m) holds.
func (t *leaseTable) free(a netip.Addr, m mac, now time.Time) bool {
	if s, ok := t.static[m]; ok {
		return a == s
	}
	if _, ok := t.reserved[a]; ok || !t.inPool(a) {
		return false
	}
	o := t.owner(a, now)
	return o == nil || o.mac == m
}

// pick chooses an address for m: its current entry, else the address it asked
// for if free, else the lowest free pool address. ok is false when the pool is
// exhausted.
func (t *leaseTable) pick(m mac, requested netip.Addr, now time.Time) (netip.Addr, bool) {
	if s, ok := t.static[m]; ok {
		return s, true
	}
	if l := t.lookup(m, now); l != nil {
		return l.addr, true
	}
	if requested.IsValid() && t.free(requested, m, now) {
		return requested, true
	}
	a := t.start
	for i := 0; i < t.size; i++ {
		if _, res := t.reserved[a]; !res && t.owner(a, now) == nil {
			return a, true
		}
		a = a.Next()
	}
	return netip.Addr{}, false
}

// set records that m holds a until expiry, replacing any entry m or a had.
func (t *leaseTable) set(m mac, a netip.Addr, expiry time.Time, bound bool) {
	if l := t.byMAC[m]; l != nil {
		t.remove(l)
	}
	if l := t.byAddr[a]; l != nil {
		t.remove(l)
	}
	l := &lease{mac: m, addr: a, expiry: expiry, bound: bound}
	if m != declined {
		t.byMAC[m] = l
	}
	t.byAddr[a] = l
}

// release drops m's entry if it holds a.
func (t *leaseTable) release(m mac, a netip.Addr) bool {
	l := t.byMAC[m]
	if l == nil || l.addr != a {
		return false
	}
	t.remove(l)
	return true
}

// expire drops every expired entry and returns the number of bound leases
// left.
func (t *leaseTable) expire(now time.Time) (bound int) {
	for _, l := range t.byAddr {
		if !now.Before(l.expiry) {
			t.remove(l)
			continue
		}
		if l.bound {
			bound++
		}
	}
	return bound
}

func ipToUint(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}
