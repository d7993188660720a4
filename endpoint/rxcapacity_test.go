package endpoint

import "testing"

// TestRXCapacity: the bytes of TCP payload one receive queue's backlog
// holds, which bound what the NAT's connections have in flight to the
// guest: MTU-sized frames without TSO, 64 KiB segments with it (then the
// bound is far above any send buffer).
func TestRXCapacity(t *testing.T) {
	ep, _ := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC, RXBacklog: 1024})
	ep.SetFeatures(v1)
	if got, want := ep.RXCapacity(), int64(1024*(1500-40-20-12)); got != want {
		t.Errorf("MTU 1500, no offloads: %d, want %d", got, want)
	}
	ep.SetFeatures(v1 | 1<<FeatureGuestCsum | 1<<FeatureGuestTSO4)
	if got, want := ep.RXCapacity(), int64(1024*gsoMaxSize); got != want {
		t.Errorf("TSO: %d, want %d", got, want)
	}
	big, _ := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC, MTU: MaxMTU, NoOffloads: true})
	big.SetFeatures(v1)
	if got, want := big.RXCapacity(), int64(DefaultRXBacklog*(MaxMTU-72)); got != want {
		t.Errorf("MTU %d, no offloads: %d, want %d", MaxMTU, got, want)
	}
}
