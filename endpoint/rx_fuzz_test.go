package endpoint

import (
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/stack"

	vqt "github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

// rxPacket builds an IPv4 packet of n bytes as the stack hands it to
// WritePackets.
func rxPacket(ep *Endpoint, n int, fill byte) *stack.PacketBuffer {
	p := make([]byte, n)
	for i := range p {
		p[i] = fill
	}
	return outPacket(ep, p)
}

// FuzzRX posts hostile RX buffer layouts (tiny, zero-length and split
// buffers, chains whose buffers lie outside guest memory between good
// ones, device-readable chains, indirect tables), then has the endpoint
// write frames of fuzzed sizes into them, with and without mergeable
// buffers, draining its backlog as the real worker would. Every head the
// device took from the ring must come back exactly once, and no other.
// Mutations checked by hand: Rewind restoring the available index but not
// the pending used entries (the old Rewind bug: a skipped bad chain
// returned twice, a good one never) fails seed#1; dropping Pop's Push of a
// bad chain fails it too.
func FuzzRX(f *testing.F) {
	f.Add(uint8(0), []byte{0x3f, 0x3f, 0x3f}, []byte{0, 100, 5, 220})
	f.Add(uint8(0), []byte{0x02, 0x80, 0x02, 0x02}, []byte{30, 0})           // bad chain between small good ones
	f.Add(uint8(1), []byte{0x3f, 0x80, 0x3f, 0x40, 0xff}, []byte{40, 0, 40}) // no mergeable buffers
	f.Add(uint8(0), []byte{0xc1, 0x41, 0x00, 0x80, 0xc0}, []byte{255, 255, 1})
	f.Fuzz(func(t *testing.T, feat uint8, layout []byte, frames []byte) {
		features := []uint64{v1, v1 &^ (1 << FeatureMrgRxbuf), 0, 1 << FeatureMrgRxbuf}[int(feat)%4]
		ep, err := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC})
		if err != nil {
			t.Fatal(err)
		}
		ep.SetFeatures(features)
		d := vqt.New(1<<20, 64, features&(1<<29) != 0)
		q := d.Queue(nil)
		// The worker is not started: the target drains the backlog itself
		// (as the worker does on a kick), so each input runs to the end.
		rx := &ep.pairs[0].rx
		rx.mu.Lock()
		rx.q = q
		rx.mu.Unlock()
		ep.updateActiveRX()

		posted := map[uint16]int{} // head -> times posted and not yet returned
		var order []uint16         // heads in avail order
		returned := map[uint16]int{}
		reap := func() {
			for _, u := range d.Reap() {
				if posted[u.Head] == 0 {
					t.Fatalf("device returned head %d, which the guest does not own to it (returned %d times before)", u.Head, returned[u.Head])
				}
				posted[u.Head]--
				returned[u.Head]++
			}
		}
		post := func(b byte) {
			size := (int(b&0x3f) + 1) * 24
			var head uint16
			var err error
			switch b >> 6 {
			case 0: // one writable buffer
				head, err = d.Post(nil, nil, []int{size}, false)
			case 1: // split in three, the first empty
				head, err = d.Post(nil, nil, []int{0, size / 2, size - size/2}, b&1 == 1)
			case 2: // a buffer outside guest memory: a bad chain
				head, err = d.Post(nil, nil, []int{size}, false)
				if err == nil {
					d.WriteDesc(head, vqt.Desc{Addr: 1 << 50, Len: uint32(size), Flags: 2})
				}
			case 3: // device-readable only, or readable then writable
				head, err = d.Post(make([]byte, 8), nil, []int{size * int(b&1)}, b&2 == 2)
			}
			if err != nil {
				return // ring full
			}
			posted[head]++
			order = append(order, head)
		}
		for i, b := range layout {
			if i >= 48 {
				break
			}
			post(b)
		}
		for i, b := range frames {
			if i >= 32 {
				break
			}
			n := int(b) * 8
			if b >= 0xf0 {
				n = int(b-0xf0+1) * 4000 // larger than most layouts hold
			}
			var l stack.PacketBufferList
			l.PushBack(rxPacket(ep, n, b))
			ep.WritePackets(l)
			l.DecRef()
			reap()
			if i%4 == 3 && len(layout) > 48+i/4 { // the guest adds buffers later
				post(layout[48+i/4])
				rx.drainLocked(ep, q)
				reap()
			}
		}
		rx.drainLocked(ep, q)
		reap()
		q.Lock()
		next := q.Stop()
		q.Unlock()
		rx.mu.Lock()
		rx.q = nil
		rx.mu.Unlock()
		ep.updateActiveRX()
		rx.dropBacklog()
		reap()
		// The device took the first next-start entries of the avail ring;
		// each of those heads must have come back exactly once.
		taken := int(next)
		if taken > len(order) {
			t.Fatalf("device consumed %d avail entries, only %d posted", taken, len(order))
		}
		want := map[uint16]int{}
		for _, h := range order[:taken] {
			want[h]++
		}
		for h, n := range want {
			if returned[h] != n {
				t.Fatalf("head %d taken %d times, returned %d times (layout %x, frames %x)", h, n, returned[h], layout, frames)
			}
		}
		for h, n := range returned {
			if want[h] != n {
				t.Fatalf("head %d returned %d times, taken %d times", h, n, want[h])
			}
		}
	})
}
