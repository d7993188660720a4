package ra

import (
	"encoding/hex"
	"net/netip"
	"time"
)

// iaKey names one identity association: the client's DUID (its wire form)
// and the IAID of one of its IA_NA options. RFC 8415 section 12: a binding
// is per client and IA, so a client with two interfaces (two IAIDs) gets
// two addresses.
type iaKey struct {
	duid string
	iaid [4]byte
}

// declinedKey owns an address a client DECLINEd (someone else on the link
// answers for it): the address is skipped until the entry expires. No DUID
// is empty (the parser rejects that), so it cannot clash with a client.
var declinedKey = iaKey{}

// lease6 is one entry of the lease table.
type lease6 struct {
	key    iaKey
	addr   netip.Addr
	expiry time.Time // end of the valid lifetime
}

// leaseTable6 is a bounded pool of addresses [start, start+size) keyed by
// DUID and IAID. Each entry holds a distinct pool address, so the table
// never has more than size entries however many DUIDs a guest makes up.
// ADVERTISE reserves nothing (see DHCPv6.solicit), so only REQUEST, Rapid
// Commit SOLICIT, RENEW, REBIND and DECLINE add entries. Not safe for
// concurrent use; DHCPv6 serialises access.
type leaseTable6 struct {
	start  netip.Addr
	size   int
	byKey  map[iaKey]*lease6
	byAddr map[netip.Addr]*lease6
}

func newLeaseTable6(start netip.Addr, size int) *leaseTable6 {
	return &leaseTable6{start: start, size: size, byKey: map[iaKey]*lease6{}, byAddr: map[netip.Addr]*lease6{}}
}

// inPool reports whether a is one of the pool's addresses.
func (t *leaseTable6) inPool(a netip.Addr) bool {
	if !a.Is6() || a.Is4In6() || a.Zone() != "" {
		return false
	}
	s, x := t.start.As16(), a.As16()
	// The pool is at most MaxDHCPv6PoolSize (< 2^16) addresses, so start and
	// a share their first 12 bytes unless the pool crosses a 2^32 boundary,
	// which setDefaults rules out.
	for i := 0; i < 12; i++ {
		if s[i] != x[i] {
			return false
		}
	}
	lo := func(b [16]byte) int64 {
		return int64(b[12])<<24 | int64(b[13])<<16 | int64(b[14])<<8 | int64(b[15])
	}
	off := lo(x) - lo(s)
	return off >= 0 && off < int64(t.size)
}

func (t *leaseTable6) live(l *lease6, now time.Time) *lease6 {
	if l != nil && !now.Before(l.expiry) {
		t.remove(l)
		return nil
	}
	return l
}

// lookup returns the live lease of k.
func (t *leaseTable6) lookup(k iaKey, now time.Time) *lease6 { return t.live(t.byKey[k], now) }

// owner returns the live entry holding a.
func (t *leaseTable6) owner(a netip.Addr, now time.Time) *lease6 { return t.live(t.byAddr[a], now) }

func (t *leaseTable6) remove(l *lease6) {
	if t.byKey[l.key] == l {
		delete(t.byKey, l.key)
	}
	if t.byAddr[l.addr] == l {
		delete(t.byAddr, l.addr)
	}
}

// free reports whether a is in the pool and nobody other than k holds it.
func (t *leaseTable6) free(a netip.Addr, k iaKey, now time.Time) bool {
	if !t.inPool(a) {
		return false
	}
	o := t.owner(a, now)
	return o == nil || o.key == k
}

// pick chooses an address for k: its lease, else hint if free, else the
// lowest free pool address; addresses in taken (picked for another IA of
// the same message) are skipped. ok is false when the pool is exhausted.
func (t *leaseTable6) pick(k iaKey, hint netip.Addr, now time.Time, taken map[netip.Addr]bool) (netip.Addr, bool) {
	if l := t.lookup(k, now); l != nil {
		return l.addr, true
	}
	if hint.IsValid() && !taken[hint] && t.free(hint, k, now) {
		return hint, true
	}
	a := t.start
	for i := 0; i < t.size; i++ {
		if !taken[a] && t.owner(a, now) == nil {
			return a, true
		}
		a = a.Next()
	}
	return netip.Addr{}, false
}

// set records that k holds a until expiry, replacing what k or a had.
func (t *leaseTable6) set(k iaKey, a netip.Addr, expiry time.Time) {
	if l := t.byKey[k]; l != nil && k != declinedKey {
		t.remove(l)
	}
	if l := t.byAddr[a]; l != nil {
		t.remove(l)
	}
	l := &lease6{key: k, addr: a, expiry: expiry}
	if k != declinedKey {
		t.byKey[k] = l
	}
	t.byAddr[a] = l
}

// drop removes k's lease if it holds a, and reports whether it did.
func (t *leaseTable6) drop(k iaKey, a netip.Addr, now time.Time) bool {
	l := t.lookup(k, now)
	if l == nil || l.addr != a {
		return false
	}
	t.remove(l)
	return true
}

// expire drops every expired entry and returns the number of client leases
// left (declined placeholders are not leases).
func (t *leaseTable6) expire(now time.Time) (n int) {
	for _, l := range t.byAddr {
		if !now.Before(l.expiry) {
			t.remove(l)
		} else if l.key != declinedKey {
			n++
		}
	}
	return n
}

// duidString is a DUID in the usual colon-less hex form, for logs and the
// lease list.
func duidString(k iaKey) string { return hex.EncodeToString([]byte(k.duid)) }
